//! Write Gigafactory functions in Rust.
//!
//! A function is a `wasi:http/incoming-handler` component built with
//! `cargo build --target wasm32-wasip2`. This crate gives it:
//!
//! - [`http`]: a request/response handler (whole or streamed response
//!   bodies), exported with [`export_handler!`];
//! - [`ai`]: text generation with the platform's resident language
//!   models (`gigafactory:ai`), streamed as it is produced;
//! - [`nn`]: typed wrappers over the standard `wasi:nn` interface
//!   (`wasi:nn@0.2.0-rc-2024-10-28`): graphs by name, tensors from and to
//!   slices;
//! - [`text`]: a BERT WordPiece tokenizer, so text models can be fed from
//!   inside the sandbox.
//!
//! ```ignore
//! use gigafactory_sdk::http::{Request, Response};
//!
//! struct Hello;
//!
//! impl gigafactory_sdk::http::Handler for Hello {
//!     fn handle(request: Request) -> Response {
//!         Response::text(200, format!("hello from {}\n", request.path))
//!     }
//! }
//!
//! gigafactory_sdk::export_handler!(Hello);
//! ```

pub mod ai;
pub mod http;
pub mod nn;
pub mod text;

/// Re-exports used by [`export_handler!`]; not part of the stable surface.
#[doc(hidden)]
pub mod __private {
    pub use wasip2;
}
