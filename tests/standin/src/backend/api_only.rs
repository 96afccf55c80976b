//! The API-only backend: nothing to plug, the status changes are the whole attach.

use super::{AttachBackend, AttachRequest, BackendError};
use futures::future::{BoxFuture, FutureExt};

pub struct ApiOnly;

impl AttachBackend for ApiOnly {
    fn name(&self) -> &'static str {
        "api-only"
    }
    fn attach<'a>(&'a self, _req: &'a AttachRequest) -> BoxFuture<'a, Result<(), BackendError>> {
        futures::future::ready(Ok(())).boxed()
    }
    fn detach<'a>(&'a self, _req: &'a AttachRequest) -> BoxFuture<'a, Result<(), BackendError>> {
        futures::future::ready(Ok(())).boxed()
    }
}

/// Stands in for the QEMU backend in builds without it: every attach fails, loudly.
#[cfg_attr(feature = "qemu", allow(dead_code))]
pub struct Unavailable(pub String);

impl AttachBackend for Unavailable {
    fn name(&self) -> &'static str {
        "unavailable"
    }
    fn attach<'a>(&'a self, req: &'a AttachRequest) -> BoxFuture<'a, Result<(), BackendError>> {
        let e = BackendError::QemuUnavailable {
            vmi: req.vmi.clone(),
            socket: self.0.clone(),
        };
        futures::future::ready(Err(e)).boxed()
    }
    fn detach<'a>(&'a self, req: &'a AttachRequest) -> BoxFuture<'a, Result<(), BackendError>> {
        self.attach(req)
    }
}
