//! One RPC per volume at a time.
//!
//! The CSI spec lets a plugin answer ABORTED when an operation on the same volume is still
//! pending; the CO retries later. Without this, a retried NodeStage racing a slow mkfs could
//! format or mount the same disk twice.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

/// Volume ids with an RPC in progress.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    ids: Arc<Mutex<HashSet<String>>>,
}

impl InFlight {
    fn set(&self) -> MutexGuard<'_, HashSet<String>> {
        // The set stays consistent even if a holder panicked; keep serving.
        self.ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Claims the volume, or `None` when another RPC holds it.
    pub fn try_claim(&self, volume_id: &str) -> Option<InFlightGuard> {
        self.set()
            .insert(volume_id.to_owned())
            .then(|| InFlightGuard {
                owner: self.clone(),
                volume_id: volume_id.to_owned(),
            })
    }
}

/// Releases the volume when dropped, so every return path (and a panic) frees it.
#[derive(Debug)]
pub struct InFlightGuard {
    owner: InFlight,
    volume_id: String,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.owner.set().remove(&self.volume_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_fails_until_the_first_is_dropped() {
        let f = InFlight::default();
        let g = f.try_claim("a").unwrap();
        assert!(f.try_claim("a").is_none());
        assert!(f.try_claim("b").is_some());
        drop(g);
        assert!(f.try_claim("a").is_some());
    }
}
