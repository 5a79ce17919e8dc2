//! The state transition on arbitrary event sequences under every shipped rule preset (and the
//! richer conditions' bench rules): never a
//! panic or a hang; re-applying what was applied counts nothing again; the state survives its
//! round trip through the JSON stored in Redis; time only moves a customer forward; the next
//! timer is never in the past.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tierd::engine::rules::rank::Cutoffs;
use tierd::engine::rules::Rules;
use tierd::engine::transition::{Applied, Trigger};
use tierd::model::{CustomerState, DedupPolicy, Event, EventKind};

const PRESETS: [&str; 14] = [
    include_str!("../../config/rules/abc.toml"),
    include_str!("../../config/rules/airline.toml"),
    include_str!("../../config/rules/b2b-lifetime.toml"),
    include_str!("../../config/rules/b2b.toml"),
    include_str!("../../config/rules/bank.toml"),
    include_str!("../../config/rules/pyramid-gems.toml"),
    include_str!("../../config/rules/pyramid-metals.toml"),
    include_str!("../../config/rules/pyramid.toml"),
    include_str!("../../config/rules/rfm-product.toml"),
    include_str!("../../config/rules/rfm-quintiles.toml"),
    include_str!("../../config/rules/rfm-segments.toml"),
    include_str!("../../config/rules/telecom.toml"),
    include_str!("../../config/rules/travel.toml"),
    // Groups, points and attribute-filtered windows (window series in the stored state).
    include_str!("../../benches/rules/richer.toml"),
];

fn presets() -> &'static [Rules] {
    static RULES: OnceLock<Vec<Rules>> = OnceLock::new();
    RULES.get_or_init(|| {
        PRESETS
            .iter()
            .map(|text| Rules::parse(text, "preset.toml", 2).expect("presets parse"))
            .collect()
    })
}

const DAY: i64 = 86_400_000;
const START: i64 = 1_767_225_600_000; // 2026-01-01

fuzz_target!(|data: &[u8]| {
    let Some((&which, data)) = data.split_first() else {
        return;
    };
    let rules = &presets()[usize::from(which) % PRESETS.len()];
    let dedup = DedupPolicy {
        horizon_ms: 30 * DAY,
        max_ids: 8,
    };
    // Six bytes per event: a byte of its own, kind, amount (2 bytes), time (2 bytes, hours
    // after the start). The id is all six: a re-sent event is the same event (the input
    // contract), so equal ids come from equal chunks.
    let events: Vec<Event> = data
        .chunks_exact(6)
        .map(|c| Event {
            event_id: c.iter().map(|b| format!("{b:02x}")).collect(),
            customer_id: "c".into(),
            kind: match c[1] % 8 {
                0..=4 => EventKind::Purchase,
                5 | 6 => EventKind::Refund,
                _ => EventKind::Override,
            },
            amount_minor: i64::from(u16::from_le_bytes([c[2], c[3]])) * 97,
            occurred_at_ms: START + i64::from(u16::from_le_bytes([c[4], c[5]])) * 3_600_000,
            pin: None,
            // Points and attributes for the rules that read them (the last preset).
            points: i64::from(c[0] % 4) * 20_000,
            attributes: match c[0] % 3 {
                0 => Vec::new(),
                1 => vec![("category".into(), "gift_card".into())],
                _ => vec![("channel".into(), "store".into())],
            },
        })
        .collect();
    let cutoffs = Cutoffs::default();
    let mut state = CustomerState::default();
    for event in &events {
        let before = state.at;
        let _ = state.apply(event, rules, dedup, event.occurred_at_ms, &cutoffs);
        assert!(state.at >= before, "engine time ran backwards");
        if let Some((due, _)) = state.timer {
            assert!(
                due > state.at,
                "a timer due at or before the evaluation that set it"
            );
        }
        // The stored form (binary), and the JSON form older binaries stored.
        let stored = tierd::model::stored::to_vec(&state);
        let back = tierd::model::stored::decode(&stored).expect("stored state reads back");
        assert_eq!(back, state, "state changed through its stored form: {stored:?}");
        let json = serde_json::to_string(&state).expect("state serializes");
        let back: CustomerState = serde_json::from_str(&json).expect("state parses back");
        assert_eq!(back, state, "state changed through its JSON: {json}");
    }
    // Re-applying every event counts none of them again.
    let mut again = state.clone();
    for event in &events {
        let applied = again.apply(event, rules, dedup, event.occurred_at_ms, &cutoffs);
        assert!(
            !matches!(applied, Applied::Counted(_)),
            "{} counted twice",
            event.event_id
        );
    }
    // Time alone: fire the timer until none is left or a year has passed.
    let mut fired = 0;
    while let Some((due, cause)) = state.timer {
        if due > START + 800 * DAY || fired > 64 {
            break;
        }
        let before = state.at;
        let _ = state.evaluate(rules, due, Trigger::Time(cause), &cutoffs);
        assert!(state.at >= before);
        fired += 1;
    }
});
