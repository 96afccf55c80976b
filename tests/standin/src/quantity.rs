//! Byte sizes from and to Kubernetes quantities (`1Gi`, `500M`, `1e9`).

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum QuantityError {
    /// The string is not a Kubernetes quantity this stand-in understands.
    #[error("invalid quantity {0:?}")]
    Invalid(String),
    /// The value does not fit in 63 bits of bytes.
    #[error("quantity {0:?} is too large")]
    TooLarge(String),
}

/// Parses a quantity into bytes, rounding a fractional byte count up.
pub fn parse_bytes(q: &str) -> Result<u64, QuantityError> {
    let s = q.trim();
    let invalid = || QuantityError::Invalid(q.to_string());
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num.starts_with('-') {
        return Err(invalid());
    }
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    let int_part = int_part.trim_start_matches('+');
    if !int_part.chars().all(|c| c.is_ascii_digit())
        || !frac_part.chars().all(|c| c.is_ascii_digit())
    {
        return Err(invalid());
    }
    // value = mantissa / 10^frac_len * multiplier, computed in u128 to stay exact.
    let mantissa: u128 = format!("{int_part}{frac_part}")
        .parse::<u128>()
        .map_err(|_| invalid())?;
    let mut divisor: u128 = 10u128.pow(u32::try_from(frac_part.len()).map_err(|_| invalid())?);
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "m" => {
            divisor = divisor.checked_mul(1000).ok_or_else(invalid)?;
            1
        }
        e if e.starts_with(['e', 'E']) => {
            let exp: u32 = e[1..].parse().map_err(|_| invalid())?;
            10u128
                .checked_pow(exp)
                .ok_or_else(|| QuantityError::TooLarge(q.to_string()))?
        }
        _ => return Err(invalid()),
    };
    let total = mantissa
        .checked_mul(multiplier)
        .ok_or_else(|| QuantityError::TooLarge(q.to_string()))?;
    let bytes = total.div_ceil(divisor);
    u64::try_from(bytes)
        .ok()
        .filter(|b| *b <= i64::MAX as u64)
        .ok_or_else(|| QuantityError::TooLarge(q.to_string()))
}

/// Formats bytes with the largest binary suffix that divides them exactly.
pub fn format_bytes(bytes: u64) -> String {
    const SUFFIXES: [(&str, u32); 6] = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    if bytes == 0 {
        return "0".into();
    }
    for (suffix, shift) in SUFFIXES {
        let unit = 1u64 << shift;
        if bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1.5Ki"), Ok(1536));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("1e3"), Ok(1000));
        assert_eq!(parse_bytes("1500m"), Ok(2));
        assert_eq!(parse_bytes("0.1"), Ok(1));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("Gi").is_err());
        assert!(parse_bytes("-1Gi").is_err());
        assert!(parse_bytes("1Xi").is_err());
        assert!(parse_bytes("1.2.3").is_err());
        assert!(matches!(
            parse_bytes("100Ei"),
            Err(QuantityError::TooLarge(_))
        ));
    }

    #[test]
    fn formats_exact_binary_units() {
        assert_eq!(format_bytes(1 << 30), "1Gi");
        assert_eq!(format_bytes(3 << 20), "3Mi");
        assert_eq!(format_bytes(1536), "1536");
        assert_eq!(format_bytes(1000), "1000");
        assert_eq!(format_bytes(0), "0");
    }
}
