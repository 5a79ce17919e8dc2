//! The rules parser on arbitrary text (seeded with every shipped preset): never a panic or a
//! hang; a refusal names what is wrong; accepted rules evaluate a few customers without
//! panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tierd::engine::rules::rank::Cutoffs;
use tierd::engine::rules::Rules;
use tierd::model::{CustomerState, DedupPolicy, Event, EventKind};

const DAY: i64 = 86_400_000;
const START: i64 = 1_767_225_600_000; // 2026-01-01

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let rules = match Rules::parse(text, "fuzz.toml", 2) {
        Ok(rules) => rules,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    let dedup = DedupPolicy {
        horizon_ms: 30 * DAY,
        max_ids: 8,
    };
    let mut state = CustomerState::default();
    for (i, (kind, amount, day)) in [
        (EventKind::Purchase, 12_345, 0),
        (EventKind::Purchase, 99_000_000, 3),
        (EventKind::Refund, 50_000, 40),
        (EventKind::Purchase, 1, 400),
    ]
    .into_iter()
    .enumerate()
    {
        let event = Event {
            event_id: format!("e{i}"),
            customer_id: "c".into(),
            kind,
            amount_minor: amount,
            occurred_at_ms: START + day * DAY,
            pin: None,
            points: 0,
            attributes: Vec::new(),
        };
        let _ = state.apply(
            &event,
            &rules,
            dedup,
            event.occurred_at_ms,
            &Cutoffs::default(),
        );
    }
    let _ = state.metrics();
});
