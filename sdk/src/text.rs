//! BERT WordPiece tokenisation for functions that run tensor models
//! themselves (the host uses the same code for `gigafactory:ai` `embed`).

pub use gigafactory_text::*;
