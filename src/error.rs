//! The library's error type.
//!
//! Every variant names the thing it is about (a file, a tensor, an array), so that
//! the CLI can print it as it is. [`Error::is_user_error`] separates problems with the
//! inputs (exit code 2) from failures of the machinery (exit code 1).

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `aswa-merge`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Checkpoint discovery found nothing usable, or something ambiguous.
    #[error("{0}")]
    Discovery(String),

    /// A checkpoint file is malformed or disagrees with the others.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },

    /// The ONNX model cannot be read, or does not fit the checkpoints.
    #[error("model {}: {message}", path.display())]
    Model { path: PathBuf, message: String },

    /// The validation data cannot be read or does not fit the model.
    #[error("validation data {}: {message}", path.display())]
    Data { path: PathBuf, message: String },

    /// An unknown metric, or one that does not fit the model's output.
    #[error("metric: {0}")]
    Metric(String),

    /// The ONNX Runtime library could not be found or loaded.
    #[error("{0}")]
    RuntimeNotFound(String),

    /// ONNX Runtime failed while building a session or running the model.
    #[error("ONNX Runtime: {0}")]
    Runtime(String),

    /// The output cannot be written where it was asked to go.
    #[error("output {}: {message}", path.display())]
    Output { path: PathBuf, message: String },

    /// A command-line value that is well-formed for the parser but invalid.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// `true` when the error is caused by the inputs the user gave (exit code 2),
    /// `false` when ONNX Runtime failed while running a model that passed every
    /// check (exit code 1).
    pub fn is_user_error(&self) -> bool {
        !matches!(self, Error::Runtime(_))
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn data(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl From<ort::Error> for Error {
    fn from(e: ort::Error) -> Self {
        Error::Runtime(e.to_string())
    }
}
