//! Kubernetes resource quantities (`1Gi`, `500M`, `1073741824`) as bytes.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Bytes in a storage quantity, rounding fractional bytes up; `None` if it cannot be read.
pub fn bytes(q: &Quantity) -> Option<u64> {
    let s = q.0.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => MIB as f64,
        "Gi" => GIB as f64,
        "Ti" => (1u64 << 40) as f64,
        "Pi" => (1u64 << 50) as f64,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        _ => return None,
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult as u64);
    }
    let n: f64 = num.parse().ok()?;
    Some((n * mult).ceil() as u64)
}

pub fn from_bytes(b: u64) -> Quantity {
    Quantity(b.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_plain() {
        let q = |s: &str| bytes(&Quantity(s.into()));
        assert_eq!(q("1Gi"), Some(GIB));
        assert_eq!(q("512Mi"), Some(512 * MIB));
        assert_eq!(q("1G"), Some(1_000_000_000));
        assert_eq!(q("1073741824"), Some(GIB));
        assert_eq!(q("1.5Gi"), Some(GIB + GIB / 2));
        assert_eq!(q("10x"), None);
        assert_eq!(q(""), None);
    }
}
