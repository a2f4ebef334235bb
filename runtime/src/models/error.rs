//! Model errors as a guest sees them: the standard wasi-nn error codes.

use std::fmt;

/// The `wasi:nn/errors.error-code` values, mirrored so the model pool does
/// not depend on the generated bindings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The caller passed a bad argument (unknown input, wrong type or shape).
    InvalidArgument,
    /// The graph encoding is not one the host runs.
    InvalidEncoding,
    /// The operation ran out of time.
    Timeout,
    /// The backend failed while running the graph.
    RuntimeError,
    /// The host does not support what was asked (e.g. a BF16 tensor).
    UnsupportedOperation,
    /// The graph is too large to load.
    TooLarge,
    /// No model by that name.
    NotFound,
    /// The caller may not do this.
    Security,
    /// The model is too busy to take the call now (its queue is full): a
    /// host-side code, which WIT wasi-nn guests see as `runtime-error`
    /// with a message starting with [`BUSY_PREFIX`], and witx guests as
    /// `busy`.
    Busy,
    /// Anything else.
    Unknown,
}

/// Longest error message a guest is given.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// How a busy model's `runtime-error` message starts.
pub const BUSY_PREFIX: &str = "model busy: ";

/// A wasi-nn error: a code and a message for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NnError {
    /// The standard error code.
    pub code: ErrorCode,
    /// What went wrong, for the guest's logs.
    pub message: String,
}

impl NnError {
    /// An error with `code` and `message`, cut at [`MAX_MESSAGE_BYTES`]
    /// (messages may quote what a guest sent, such as a model name).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: crate::logs::bounded(message.into(), MAX_MESSAGE_BYTES),
        }
    }

    /// An `invalid-argument` error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    /// The model is too busy to take the call now. The message starts with
    /// [`BUSY_PREFIX`], which is how WIT wasi-nn guests (the SDK's
    /// `Error::is_busy`), whose error codes have no `busy`, tell it from a
    /// failure.
    pub fn busy(why: impl fmt::Display) -> Self {
        Self::new(
            ErrorCode::Busy,
            format!("{BUSY_PREFIX}{why}; retry shortly"),
        )
    }

    /// Whether this is a [`Self::busy`] refusal.
    pub fn is_busy(&self) -> bool {
        self.code == ErrorCode::Busy
    }

    /// An `unsupported-operation` error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::UnsupportedOperation, message)
    }
}

impl fmt::Display for NnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for NnError {}
