//! One operation per volume (or snapshot) at a time.
//!
//! The CSI spec lets a plugin answer ABORTED when an operation is already in flight for the
//! same volume; the sidecars then retry. Holding a guard for the whole RPC keeps two
//! concurrent calls from racing each other's infra writes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::ControllerError;

#[derive(Clone, Debug, Default)]
pub struct Locks {
    held: Arc<Mutex<HashSet<String>>>,
}

/// Releases the key when dropped, including when the RPC future is cancelled.
#[derive(Debug)]
pub struct Guard {
    held: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Locks {
    /// Takes `key`, or fails with ABORTED if another operation holds it.
    pub fn try_lock(&self, key: &str) -> Result<Guard, ControllerError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if !held.insert(key.to_string()) {
            return Err(ControllerError::InProgress(key.to_string()));
        }
        Ok(Guard {
            held: self.held.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_aborted_until_release() {
        let locks = Locks::default();
        let g = locks.try_lock("v1").unwrap();
        assert_eq!(
            locks.try_lock("v1").unwrap_err().code(),
            tonic::Code::Aborted
        );
        assert!(locks.try_lock("v2").is_ok());
        drop(g);
        assert!(locks.try_lock("v1").is_ok());
    }
}
