//! Exact money: decimal text → integer minor units, and back, never through binary floating point.

/// Why an amount could not be turned into minor units.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Not a decimal number at all (or NaN/Infinity, which JSON and we do not allow).
    #[error("not a decimal number: {0:?}")]
    NotANumber(String),
    /// More fraction digits than the currency has (after dropping trailing zeros).
    #[error("{digits} fraction digits, the currency allows {allowed}")]
    TooPrecise { digits: u32, allowed: u32 },
    /// Larger than the configured maximum amount, or too large to represent.
    #[error("amount exceeds the maximum of {max_minor} minor units")]
    TooLarge { max_minor: i64 },
}

/// Parses a decimal amount (`"12.50"`, `12.5`, `1.25e3`) into minor units of a currency with
/// `fraction_digits` digits (2 for EUR, 0 for JPY). Trailing zeros beyond the currency's
/// digits are accepted (`"12.500"` is 1250 cents); a non-zero digit beyond them is an error.
/// The sign is kept: negative amounts are a rule violation decided by the caller.
///
/// Exact for any length of input: digits are shifted as text, never rounded (a decimal type
/// with 28 significant digits would silently round `1.00000000000000000000000000001`).
///
/// # Errors
/// [`MoneyError`] naming what is wrong with the text.
pub fn parse_minor(text: &str, fraction_digits: u32, max_minor: i64) -> Result<i64, MoneyError> {
    let nan = || MoneyError::NotANumber(text.to_owned());
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (number, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((n, e)) => (n, Some(e)),
        None => (unsigned, None),
    };
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty()
        || !all_digits(int)
        || !all_digits(frac)
        || (number.contains('.') && frac.is_empty())
    {
        return Err(nan());
    }
    // Power of ten applied to the digit string `int ++ frac`, counted in minor units.
    let mut shift = i64::from(fraction_digits) - frac.len() as i64;
    if let Some(e) = exponent {
        let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
        if digits.is_empty() || !all_digits(digits) {
            return Err(nan());
        }
        // Saturate absurd exponents: they end as TooLarge or TooPrecise below.
        let magnitude = digits
            .parse::<i64>()
            .unwrap_or(i64::MAX / 4)
            .min(i64::MAX / 4);
        shift += if e.starts_with('-') {
            -magnitude
        } else {
            magnitude
        };
    }
    let mut mantissa = String::with_capacity(int.len() + frac.len());
    mantissa.push_str(int);
    mantissa.push_str(frac);
    let mut significant = mantissa.trim_start_matches('0');
    // Trailing zeros only move the decimal point.
    while shift < 0 && significant.ends_with('0') {
        significant = &significant[..significant.len() - 1];
        shift += 1;
    }
    if significant.is_empty() {
        return Ok(0);
    }
    if shift < 0 {
        let digits = u32::try_from(i64::from(fraction_digits) - shift).unwrap_or(u32::MAX);
        return Err(MoneyError::TooPrecise {
            digits,
            allowed: fraction_digits,
        });
    }
    let too_large = MoneyError::TooLarge { max_minor };
    if significant.len() as i64 + shift > 19 {
        return Err(too_large);
    }
    let value = significant
        .parse::<i128>()
        .ok()
        .and_then(|v| v.checked_mul(10i128.checked_pow(u32::try_from(shift).ok()?)?))
        .ok_or(too_large.clone())?;
    if value > i128::from(max_minor.unsigned_abs().min(i64::MAX as u64)) {
        return Err(too_large);
    }
    let value = i64::try_from(value).map_err(|_| too_large)?;
    Ok(if negative { -value } else { value })
}

/// Formats minor units as a decimal string with exactly `fraction_digits` digits
/// (`1250, 2` → `"12.50"`). Exact for every `i128`.
pub fn format_minor(minor: i128, fraction_digits: u32) -> String {
    // Written digit by digit (itoa) rather than with `format!`: every change event carries
    // two amounts, and the formatting machinery was ~5 % of the per-event instructions.
    let mut out = String::with_capacity(48);
    if minor < 0 {
        out.push('-');
    }
    let abs = minor.unsigned_abs();
    let mut digits = itoa::Buffer::new();
    let Some(unit) = 10u128
        .checked_pow(fraction_digits)
        .filter(|_| fraction_digits > 0)
    else {
        out.push_str(digits.format(abs));
        return out;
    };
    out.push_str(digits.format(abs / unit));
    out.push('.');
    let fraction = digits.format(abs % unit);
    for _ in fraction.len()..fraction_digits as usize {
        out.push('0');
    }
    out.push_str(fraction);
    out
}

/// Parses a decimal threshold from configuration (`"1000000"`, `"99.5"`) into minor units.
///
/// # Errors
/// As [`parse_minor`], with no upper bound beyond `i64`.
pub fn parse_threshold(text: &str, fraction_digits: u32) -> Result<i64, MoneyError> {
    parse_minor(text, fraction_digits, i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn format_minor_matches_the_formatting_machinery(minor in proptest::prelude::any::<i128>(), fraction_digits in 0u32..=18) {
            let sign = if minor < 0 { "-" } else { "" };
            let abs = minor.unsigned_abs();
            let unit = 10u128.pow(fraction_digits);
            let expected = if fraction_digits == 0 {
                minor.to_string()
            } else {
                format!("{sign}{}.{:0width$}", abs / unit, abs % unit, width = fraction_digits as usize)
            };
            proptest::prop_assert_eq!(format_minor(minor, fraction_digits), expected);
        }
    }
    use proptest::prelude::*;

    const MAX: i64 = 1_000_000_000_000;

    #[test]
    fn parses_plain_and_scientific_decimals() {
        assert_eq!(parse_minor("12.50", 2, MAX), Ok(1250));
        assert_eq!(parse_minor("12.5", 2, MAX), Ok(1250));
        assert_eq!(parse_minor("12", 2, MAX), Ok(1200));
        assert_eq!(parse_minor("0", 2, MAX), Ok(0));
        assert_eq!(parse_minor("1.25e3", 2, MAX), Ok(125_000));
        assert_eq!(parse_minor("1E-2", 2, MAX), Ok(1));
        assert_eq!(parse_minor("-3.10", 2, MAX), Ok(-310));
        assert_eq!(parse_minor("12.500", 2, MAX), Ok(1250));
        assert_eq!(parse_minor("7", 0, MAX), Ok(7));
        // 0.1 + 0.2 is exact here: no float ever touches the value.
        assert_eq!(
            parse_minor("0.1", 2, MAX).unwrap() + parse_minor("0.2", 2, MAX).unwrap(),
            30
        );
    }

    #[test]
    fn rejects_what_is_not_an_exact_amount() {
        assert_eq!(
            parse_minor("12.345", 2, MAX),
            Err(MoneyError::TooPrecise {
                digits: 3,
                allowed: 2
            })
        );
        assert_eq!(
            parse_minor("1.5", 0, MAX),
            Err(MoneyError::TooPrecise {
                digits: 1,
                allowed: 0
            })
        );
        for bad in [
            "", " 1", "1 ", "abc", "1,5", "NaN", "inf", "+1", "1_000", "0x10", "1.2.3",
        ] {
            assert!(
                matches!(parse_minor(bad, 2, MAX), Err(MoneyError::NotANumber(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_minor("10000000000.01", 2, MAX),
            Err(MoneyError::TooLarge { max_minor: MAX })
        );
        assert_eq!(
            parse_minor("1e40", 2, MAX),
            Err(MoneyError::TooLarge { max_minor: MAX })
        );
        assert_eq!(
            parse_minor("1e999999999999999999999", 2, MAX),
            Err(MoneyError::TooLarge { max_minor: MAX })
        );
        assert_eq!(
            parse_minor("123456789012345678901234567890", 2, MAX),
            Err(MoneyError::TooLarge { max_minor: MAX })
        );
        // More digits than a 96-bit decimal holds: still exact, so still too precise.
        assert_eq!(
            parse_minor("1.0000000000000000000000000001e0", 2, MAX),
            Err(MoneyError::TooPrecise {
                digits: 28,
                allowed: 2
            })
        );
        assert_eq!(
            parse_minor("1e-999999999999999999999", 2, MAX).unwrap_err(),
            MoneyError::TooPrecise {
                digits: u32::MAX,
                allowed: 2
            }
        );
        assert_eq!(parse_minor("0e-50", 2, MAX), Ok(0));
        assert_eq!(parse_minor("1.50e-1", 2, MAX), Ok(15));
    }

    #[test]
    fn formats_minor_units() {
        assert_eq!(format_minor(1250, 2), "12.50");
        assert_eq!(format_minor(-5, 2), "-0.05");
        assert_eq!(format_minor(0, 2), "0.00");
        assert_eq!(format_minor(42, 0), "42");
        assert_eq!(format_minor(1, 3), "0.001");
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(minor in -MAX..=MAX, digits in 0u32..=4) {
            let text = format_minor(minor as i128, digits);
            prop_assert_eq!(parse_minor(&text, digits, MAX), Ok(minor));
        }

        #[test]
        fn integer_and_fraction_parts_are_exact(units in 0i64..10_000_000, cents in 0i64..100) {
            let text = format!("{units}.{cents:02}");
            prop_assert_eq!(parse_minor(&text, 2, MAX), Ok(units * 100 + cents));
        }

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,40}") {
            let _ = parse_minor(&s, 2, MAX);
        }
    }
}
