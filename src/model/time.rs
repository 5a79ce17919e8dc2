//! Timestamps: event time is carried as Unix milliseconds and shown as RFC 3339 UTC.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Parses an RFC 3339 timestamp with an explicit offset into Unix milliseconds.
///
/// # Errors
/// The parser's message when the text is not RFC 3339.
pub fn parse_rfc3339_ms(text: &str) -> Result<i64, String> {
    let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| e.to_string())?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|e| e.to_string())
}

/// Formats Unix milliseconds as RFC 3339 in UTC with millisecond precision.
pub fn format_ms(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
    let Ok(year) = u16::try_from(y).map(u32::from) else {
        // Before year 0: the general formatting (never in practice; input times are bounded).
        return format!(
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        );
    };
    // Written digit by digit rather than with `format!`: every change event carries up to
    // three times, and the formatting machinery was ~13 % of the per-event instructions.
    let mut out = String::with_capacity(24);
    push_padded(&mut out, year, 4);
    out.push('-');
    push_padded(&mut out, u32::from(mo), 2);
    out.push('-');
    push_padded(&mut out, u32::from(d), 2);
    out.push('T');
    push_padded(&mut out, u32::from(t.hour()), 2);
    out.push(':');
    push_padded(&mut out, u32::from(t.minute()), 2);
    out.push(':');
    push_padded(&mut out, u32::from(t.second()), 2);
    out.push('.');
    push_padded(&mut out, u32::from(t.millisecond()), 3);
    out.push('Z');
    out
}

/// `value` in decimal, zero-padded to at least `width` digits.
fn push_padded(out: &mut String, value: u32, width: usize) {
    let mut digits = itoa::Buffer::new();
    let text = digits.format(value);
    for _ in text.len()..width {
        out.push('0');
    }
    out.push_str(text);
}

/// Wall-clock now in Unix milliseconds.
pub fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn format_ms_matches_the_formatting_machinery(ms in -80_000_000_000_000i64..=253_402_300_799_999) {
            let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
            let expected = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second(), t.millisecond()
            );
            proptest::prop_assert_eq!(format_ms(ms), expected);
        }
    }

    #[test]
    fn round_trips_and_normalises_offsets() {
        let ms = parse_rfc3339_ms("2026-03-01T10:00:00+02:00").unwrap();
        assert_eq!(format_ms(ms), "2026-03-01T08:00:00.000Z");
        assert_eq!(parse_rfc3339_ms(&format_ms(1_234_567)).unwrap(), 1_234_567);
        assert!(parse_rfc3339_ms("2026-03-01 10:00:00").is_err());
        assert!(
            parse_rfc3339_ms("2026-03-01T10:00:00").is_err(),
            "offset is required"
        );
    }
}
