//! Money parsing on arbitrary text: never a panic; an accepted amount is within its bound and
//! prints back to text that parses to the same amount.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tierd::model::money::{format_minor, parse_minor, parse_threshold};

fuzz_target!(|data: &[u8]| {
    let Some((&digits, text)) = data.split_first() else {
        return;
    };
    let digits = u32::from(digits % 7);
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let max = 100_000_000_000_i64;
    if let Ok(minor) = parse_minor(text, digits, max) {
        assert!(
            minor.unsigned_abs() <= max.unsigned_abs(),
            "{text:?} beyond its bound"
        );
        let printed = format_minor(i128::from(minor), digits);
        assert_eq!(
            parse_minor(&printed, digits, max),
            Ok(minor),
            "{text:?} → {printed:?}"
        );
    }
    if let Ok(minor) = parse_threshold(text, digits) {
        let printed = format_minor(i128::from(minor), digits);
        assert_eq!(
            parse_threshold(&printed, digits),
            Ok(minor),
            "{text:?} → {printed:?}"
        );
    }
});
