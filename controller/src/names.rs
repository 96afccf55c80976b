//! Deterministic infra names and disk serials.
//!
//! CSI names are up to 128 bytes of any Unicode; infra object names must be DNS-1123
//! labels (KubeVirt volume names, which we set to the DataVolume name, are labels). We keep
//! a readable, sanitised part and append a hash of the *whole* original name, so two names
//! that sanitise alike still map apart, and the same name always maps to the same object.

use sha2::{Digest, Sha256};

/// Longest DNS-1123 label.
const MAX_LABEL: usize = 63;
/// Characters of hash appended to every derived name (50 bits of base32).
const HASH_CHARS: usize = 10;
/// Longest serial that survives every bus: virtio-blk truncates serials to 20 bytes.
pub const MAX_SERIAL: usize = 20;
const SERIAL_PREFIX: &str = "kv";

fn base32_lower(bytes: &[u8], chars: usize) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(chars);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 && out.len() < chars {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
        if out.len() == chars {
            return out;
        }
    }
    if bits > 0 && out.len() < chars {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn digest(input: &str) -> [u8; 32] {
    Sha256::digest(input.as_bytes()).into()
}

/// The infra object name for a CSI object name (volume or snapshot): `<prefix><readable>-<hash>`,
/// a valid DNS-1123 label of at most 63 characters.
pub fn infra_name(prefix: &str, csi_name: &str) -> String {
    let hash = base32_lower(&digest(csi_name), HASH_CHARS);
    let room = MAX_LABEL.saturating_sub(prefix.len() + 1 + HASH_CHARS);
    let mut readable: String = csi_name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    readable.truncate(room);
    let readable = readable.trim_matches('-');
    let mut name = String::with_capacity(MAX_LABEL);
    name.push_str(prefix);
    if !readable.is_empty() {
        name.push_str(readable);
        name.push('-');
    }
    name.push_str(&hash);
    // A prefix that starts with a non-alphanumeric would break the label rule; the hash
    // always ends alphanumeric.
    name.trim_start_matches('-').to_string()
}

/// The disk serial for a volume: at most 20 characters, so virtio-blk (which truncates at
/// 20 bytes) and SCSI (which keeps 36) both show the whole serial to the guest.
pub fn disk_serial(volume_id: &str) -> String {
    let mut s = String::from(SERIAL_PREFIX);
    s.push_str(&base32_lower(
        &digest(volume_id),
        MAX_SERIAL - SERIAL_PREFIX.len(),
    ));
    s
}

/// Whether `name` has the shape of a name [`infra_name`] makes with this prefix: a DNS-1123
/// label that starts with the prefix and ends in the 10-character hash. Ids from the CO are
/// checked against this before they reach a URL, so `x?y`, `x/status`, `..` or a 64 KiB
/// string never becomes a request path or a field selector.
pub fn has_infra_shape(prefix: &str, name: &str) -> bool {
    let prefix = prefix.trim_start_matches('-');
    if !is_dns_label(name) || !name.starts_with(prefix) || name.len() < HASH_CHARS {
        return false;
    }
    let (head, hash) = name.split_at(name.len() - HASH_CHARS);
    hash.bytes()
        .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        && (head.is_empty() || head.ends_with('-'))
}

/// Whether `name` is exactly the name [`infra_name`] derives from `csi_name`: the marker
/// that an infra object was made by this driver for that CSI name, and not merely labelled.
pub fn is_infra_name_of(prefix: &str, csi_name: &str, name: &str) -> bool {
    infra_name(prefix, csi_name) == name
}

/// Whether `s` is a DNS-1123 label (what Kubernetes accepts as a namespace or VM name).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typical_provisioner_names_stay_readable() {
        let n = infra_name("kvcsi-", "pvc-8e1f6bb5-3a5e-4b8a-9f53-0c0e3f6f6b0a");
        assert!(
            n.starts_with("kvcsi-pvc-8e1f6bb5-3a5e-4b8a-9f53-0c0e3f6f6b0a"),
            "{n}"
        );
        assert!(is_dns_label(&n), "{n}");
    }

    #[test]
    fn any_csi_name_maps_to_a_label_without_collisions() {
        let names = [
            "a".repeat(128),
            "A".repeat(128),
            "Volume With Spaces".into(),
            "volume-with-spaces".into(),
            "Volume_With_Spaces".into(),
            "日本語の名前".into(),
            "--leading".into(),
            "".into(),
            "x".into(),
        ];
        let mapped: Vec<String> = names.iter().map(|n| infra_name("kvcsi-", n)).collect();
        for m in &mapped {
            assert!(is_dns_label(m), "{m:?} is not a DNS-1123 label");
        }
        let mut unique = mapped.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), mapped.len(), "collision in {mapped:?}");
        assert_eq!(infra_name("kvcsi-", "x"), infra_name("kvcsi-", "x"));
    }

    #[test]
    fn empty_prefix_and_long_prefix_still_give_labels() {
        assert!(is_dns_label(&infra_name("", "-weird-")));
        assert!(is_dns_label(&infra_name(
            "a-very-long-prefix-for-some-tenant-",
            &"z".repeat(128)
        )));
    }

    #[test]
    fn serials_fit_virtio_and_are_deterministic() {
        let a = disk_serial("kvcsi-pvc-1-abcdefghij");
        let b = disk_serial("kvcsi-pvc-2-abcdefghij");
        assert_eq!(a.len(), MAX_SERIAL);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(a, disk_serial("kvcsi-pvc-1-abcdefghij"));
        assert_ne!(a, b);
    }

    #[test]
    fn only_derived_names_have_the_shape() {
        for csi in ["pvc-1", "", "Volume With Spaces", &"z".repeat(128)] {
            let n = infra_name("kvcsi-", csi);
            assert!(has_infra_shape("kvcsi-", &n), "{n}");
            assert!(is_infra_name_of("kvcsi-", csi, &n));
            assert!(!is_infra_name_of("kvcsi-", "other", &n));
            assert!(has_infra_shape("", &infra_name("", csi)));
        }
        let real = infra_name("kvcsi-", "pvc-1");
        for alias in [
            format!("{real}?x"),
            format!("{real}#x"),
            format!("{real}/status"),
            format!("{real} "),
            format!("{real}-"),
            format!("x{real}"),
            "kvcsi-pvc-1".into(),
            "rootdisk".into(),
            ".".into(),
            "..".into(),
            "%2e%2e".into(),
            "kvcsi-abcdefghi1".into(),
            "a".repeat(65536),
            String::new(),
        ] {
            assert!(!has_infra_shape("kvcsi-", &alias), "{alias:.80}");
        }
        assert!(!has_infra_shape("other-", &real));
    }

    #[test]
    fn base32_matches_known_vector() {
        // RFC 4648 test vector "foobar" -> MZXW6YTBOI (lowercased, truncated).
        assert_eq!(base32_lower(b"foobar", 10), "mzxw6ytboi");
    }
}
