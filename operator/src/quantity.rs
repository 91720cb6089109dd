//! Kubernetes quantities of bytes: read from node capacities and pod
//! requests, and written for the memory a shard pod requests.

/// Bytes in a mebibyte.
pub const MIB: u64 = 1 << 20;

/// The quantity `text` in bytes, rounded up to a whole byte; `None` when it
/// is not a quantity (`16Gi`, `16393708Ki`, `1.5G`, `128974848`, `129e6`,
/// `500m`) or is negative. Values beyond `u64::MAX` bytes saturate.
pub fn bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let text = text.strip_prefix('+').unwrap_or(text);
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) {
        return None;
    }
    let (base, exponent) = scale(suffix)?;
    // Digits of the whole number then the fraction, as one integer scaled
    // by base^exponent / 10^fraction digits.
    let joined = format!("{whole}{fraction}");
    let significant = joined.trim_start_matches('0');
    // Only digits are left, so parsing fails only by overflow.
    let mantissa: u128 = match significant {
        "" => 0,
        s => s.parse().unwrap_or(u128::MAX),
    };
    let mut tens = -i32::try_from(fraction.len()).ok()?;
    let mut value = mantissa;
    if base == 2 {
        value = value.saturating_mul(1u128 << exponent.clamp(0, 120));
    } else {
        tens = tens.saturating_add(exponent);
    }
    for _ in 0..tens.max(0) {
        value = value.saturating_mul(10);
    }
    // Division last, rounding up, so that `1.5Ki` and `500m` stay exact.
    let divisor = 10u128.checked_pow(tens.min(0).unsigned_abs());
    let value = match divisor {
        Some(d) => value.div_ceil(d),
        None => u128::from(value > 0),
    };
    Some(u64::try_from(value).unwrap_or(u64::MAX))
}

/// Base and exponent of a quantity suffix: binary (`Ki` … `Ei`), decimal
/// SI (`n` … `E`) or a decimal exponent (`e6`, `E-3`).
fn scale(suffix: &str) -> Option<(u32, i32)> {
    let binary = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if let Some(i) = binary.iter().position(|s| *s == suffix) {
        return Some((2, 10 * (i as i32 + 1)));
    }
    let decimal = match suffix {
        "" => Some(0),
        "n" => Some(-9),
        "u" => Some(-6),
        "m" => Some(-3),
        "k" => Some(3),
        "M" => Some(6),
        "G" => Some(9),
        "T" => Some(12),
        "P" => Some(15),
        "E" => Some(18),
        _ => None,
    };
    if let Some(e) = decimal {
        return Some((10, e));
    }
    let exponent = suffix.strip_prefix(['e', 'E'])?;
    let unsigned = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
    if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let e: i32 = exponent.parse().ok()?;
    // Far beyond any memory size; bounds the loops above.
    (-60..=60).contains(&e).then_some((10, e))
}

/// `bytes` rounded up to whole mebibytes, as a quantity (`52Mi`).
pub fn mebibytes(bytes: u64) -> String {
    format!("{}Mi", bytes.div_ceil(MIB))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_in_bytes() {
        for (text, want) in [
            ("16Gi", 16 << 30),
            ("16393708Ki", 16_393_708 * 1024),
            ("128974848", 128_974_848),
            ("129e6", 129_000_000),
            ("129E6", 129_000_000),
            ("1.5G", 1_500_000_000),
            ("1.5Ki", 1536),
            ("123M", 123_000_000),
            ("500m", 1),
            ("1500m", 2),
            ("0", 0),
            ("+2k", 2000),
            ("12e-1", 2),
            ("0.5", 1),
            ("1Ei", 1 << 60),
        ] {
            assert_eq!(bytes(text), Some(want), "{text}");
        }
        assert_eq!(bytes("99999999Ei"), Some(u64::MAX));
        for bad in [
            "", "Gi", "-1Gi", "1GiB", "1.2.3", "two", "1e", "1e+", "1 Gi", ".",
        ] {
            assert_eq!(bytes(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn mebibytes_round_up() {
        assert_eq!(mebibytes(1), "1Mi");
        assert_eq!(mebibytes(MIB), "1Mi");
        assert_eq!(mebibytes(MIB + 1), "2Mi");
        assert_eq!(mebibytes(24 << 30), "24576Mi");
        assert_eq!(bytes(&mebibytes(5 * MIB + 7)), Some(6 * MIB));
    }
}
