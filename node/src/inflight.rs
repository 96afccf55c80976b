//! One RPC per volume at a time.
//!
//! The CSI spec lets a plugin answer ABORTED when an operation on the same volume is still
//! pending; the CO retries later. Without this, a retried NodeStage racing a slow mkfs could
//! format or mount the same disk twice.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

/// Keys (volume ids, and the disks and paths an RPC works on) with an RPC in progress.
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
        self.try_claim_all(&[volume_id.to_owned()])
    }

    /// Claims every key at once, or none of them when another RPC holds any: two requests
    /// for different volume ids can still name the same disk or path, and must not mkfs,
    /// mount or record it at the same time.
    pub fn try_claim_all(&self, keys: &[String]) -> Option<InFlightGuard> {
        let mut set = self.set();
        if keys.iter().any(|k| set.contains(k)) {
            return None;
        }
        set.extend(keys.iter().cloned());
        Some(InFlightGuard {
            owner: self.clone(),
            keys: keys.to_vec(),
        })
    }
}

/// Releases the keys when dropped, so every return path (and a panic) frees them.
#[derive(Debug)]
pub struct InFlightGuard {
    owner: InFlight,
    keys: Vec<String>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut set = self.owner.set();
        for k in &self.keys {
            set.remove(k);
        }
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

    #[test]
    fn a_shared_disk_or_path_blocks_a_second_volume() {
        let f = InFlight::default();
        let keys = |v: &str, k: &str| vec![v.to_string(), k.to_string()];
        let g = f.try_claim_all(&keys("a", "disk:s1")).unwrap();
        assert!(f.try_claim_all(&keys("b", "disk:s1")).is_none());
        // Nothing of the refused claim was kept.
        assert!(f.try_claim("b").is_some());
        drop(g);
        assert!(f.try_claim_all(&keys("b", "disk:s1")).is_some());
    }
}
