//! The input decoder on arbitrary messages: never a panic or a hang; an accepted event keeps
//! every promise of the input contract, a refused one carries a reason code and a detail.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tierd::ingest::decode::{decode, DecodeLimits};
use tierd::model::EventKind;

const NOW: i64 = 1_780_000_000_000;

fuzz_target!(|data: &[u8]| {
    // First byte: key length (up to 64), then the key, then the value; a leading 0xff means
    // "no key".
    let (key, value) = match data.split_first() {
        Some((&0xff, rest)) => (None, rest),
        Some((&n, rest)) => {
            let n = usize::from(n % 65).min(rest.len());
            (Some(&rest[..n]), &rest[n..])
        }
        None => (None, data),
    };
    let limits = DecodeLimits {
        max_message_bytes: 4096,
        currency: "EUR".into(),
        fraction_digits: 2,
        max_amount_minor: 100_000_000_000,
        min_occurred_at_ms: 946_684_800_000,
        max_future_skew_ms: 86_400_000,
        tiers: vec!["vip".into(), "basic".into()],
    };
    match decode(key, Some(value), NOW, &limits) {
        Ok(event) => {
            assert!((1..=128).contains(&event.event_id.chars().count()));
            assert!((1..=128).contains(&event.customer_id.chars().count()));
            assert_eq!(
                Some(event.customer_id.as_bytes()),
                key,
                "customer id equals the key"
            );
            assert!((0..=limits.max_amount_minor).contains(&event.amount_minor));
            assert!(event.occurred_at_ms >= limits.min_occurred_at_ms);
            assert!(event.occurred_at_ms <= NOW + limits.max_future_skew_ms);
            if event.kind != EventKind::Override {
                assert!(event.pin.is_none());
            }
        }
        Err(rejection) => {
            assert!(!rejection.reason.as_str().is_empty());
            assert!(
                !rejection.detail.is_empty(),
                "{:?} without a detail",
                rejection.reason
            );
        }
    }
});
