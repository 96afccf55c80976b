//! Errors of the reconcilers.

use crate::backend::BackendError;
use crate::faults::Operation;
use crate::files::FileError;
use crate::quantity::QuantityError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// A call to the apiserver failed.
    #[error("kubernetes api call failed: {0}")]
    Kube(#[from] kube::Error),
    /// A backing file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// A size in an object could not be read.
    #[error(transparent)]
    Quantity(#[from] QuantityError),
    /// An attach backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A fault knob failed this call.
    #[error("injected {} failure: {message}", op.as_str())]
    Injected { op: Operation, message: String },
    /// An object lacks a field the stand-in needs.
    #[error("{kind} {name} has no {field}")]
    MissingField {
        kind: &'static str,
        name: String,
        field: &'static str,
    },
    /// An object asks for something this stand-in does not do.
    #[error("{kind} {name}: {message}")]
    Unsupported {
        kind: &'static str,
        name: String,
        message: String,
    },
}
