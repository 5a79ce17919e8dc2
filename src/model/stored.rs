//! The stored form of a customer state in Redis: a version byte, then the state in
//! [postcard](https://docs.rs/postcard) (varints, no field names). Times are stored as
//! differences to the customer's event clock (most are minutes or days apart, 1–4 bytes
//! instead of 6), the remembered event ids as their packed bytes ([`super::packed_ids`]).
//!
//! Why not JSON (the form before): a state is read and written once per batch a customer
//! appears in, and is most of Redis's memory. The binary form is about a third of the bytes
//! (the presets' worst cases: docs/rules.md), and the per-event instructions fell by a
//! quarter with it (docs/performance.md).
//!
//! The layout is data every deployment holds: it is pinned byte for byte by a test here, and
//! enums are stored by variant position (`TimeCause`, `PinMode`: append, never reorder).
//!
//! States stored as JSON (by an older tierd) are still read, and written in this form the next
//! time the customer changes. An older tierd cannot read this form: roll binaries forward only.

use super::change::{ChangeReason, Direction};
use super::packed_ids::{self, PackedIdsError};
use super::state::{
    Bucket, CustomerState, Pin, PinMode, Series, SeriesBucket, TierStep, TimeCause,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The first byte of the binary form, version 1 (a JSON state starts with `{`).
const V1: u8 = 1;

/// Version 2: version 1's fields, then the customer's tier history ([`StepV2`] list). Written
/// only for a state that keeps history (`api.history_changes` > 0): without it a state is
/// stored as version 1, byte for byte as before, which older binaries read.
const V2: u8 = 2;

/// Version 3: version 2's fields (the history list, possibly empty), then the customer's
/// points and window series ([`ExtrasV3`]). Written only for a state that has points (events
/// that carried `points`) or series (rules filtering windows by attributes, or reading a
/// window's points): any other state is stored as version 1 or 2, byte for byte as before.
const V3: u8 = 3;

/// Why stored bytes are not a customer state.
#[derive(Debug, thiserror::Error)]
pub enum StoredStateError {
    /// JSON (the older form) that is not a state.
    #[error("stored JSON state: {0}")]
    Json(#[from] serde_json::Error),
    /// The binary form, damaged.
    #[error("stored binary state: {0}")]
    Binary(#[from] postcard::Error),
    /// The binary form, with bytes after the state.
    #[error("stored binary state: {0} bytes after the state")]
    Trailing(usize),
    /// Its remembered ids, damaged.
    #[error("stored binary state: {0}")]
    Ids(#[from] PackedIdsError),
    /// A tier history entry with a direction or reason code this binary does not know.
    #[error(
        "stored binary state (version {V2} or later): tier history entry with unknown {what} code {code}"
    )]
    HistoryCode {
        /// `direction` or `reason`.
        what: &'static str,
        /// The code.
        code: u8,
    },
    /// Neither form: empty, or a version this binary does not know (a newer tierd wrote it).
    #[error("stored state starts with byte {0:?}: neither JSON nor a binary form this tierd knows (written by a newer tierd?)")]
    Unknown(Option<u8>),
}

/// The state's bytes as stored, appended to `out`.
pub fn encode(state: &CustomerState, out: &mut Vec<u8>) {
    let clock = state.clock;
    let rel = |t: i64| t.wrapping_sub(clock);
    let mut ids = Vec::with_capacity(state.ids.len() * 12);
    packed_ids::encode_bytes(&state.ids, &mut ids);
    let v1 = StateV1 {
        clock,
        first: state.first.map(rel),
        last: state.last.map(rel),
        count: state.count,
        sum: state.sum,
        refunds: state.refunds,
        refunded: state.refunded,
        day_buckets: &state.day_buckets,
        month_buckets: &state.month_buckets,
        tier: state.tier.as_deref(),
        since: rel(state.since),
        review: state.review.map(rel),
        pending: state.pending.map(rel),
        timer: state.timer.map(|(t, cause)| (rel(t), cause)),
        notified: state.notified.map(rel),
        pin: state.pin.as_ref().map(|p| PinV1 {
            tier: p.tier.as_str(),
            mode: p.mode,
            until: p.until.map(rel),
            by: p.by.as_str(),
        }),
        rules_hash: state.rules_hash,
        ranked_values: &state.ranked_values,
        cutoffs_version: state.cutoffs_version,
        at: rel(state.at),
        seq: state.seq,
        ids: Bytes(&ids),
        floor: rel(state.floor),
        origin: state.origin.map(u64::to_le_bytes),
        born: state.born.map(rel),
    };
    // The version byte, then the state (then, in version 2, the history). Writing into a Vec
    // cannot fail, and every field has a postcard form.
    let extras = state.points_earned != 0 || state.points_refunded != 0 || !state.series.is_empty();
    out.reserve(96 + ids.len() + 24 * state.history.len());
    out.push(match (extras, state.history.is_empty()) {
        (true, _) => V3,
        (false, true) => V1,
        (false, false) => V2,
    });
    postcard::serialize_with_flavor(&v1, Appended(&mut *out)).expect("states encode");
    if extras || !state.history.is_empty() {
        let steps: Vec<StepV2<&str>> = state
            .history
            .iter()
            .map(|h| StepV2 {
                seq: h.seq,
                at: rel(h.at),
                previous: h.previous.as_deref(),
                tier: h.tier.as_str(),
                direction: h.direction.code(),
                reason: h.reason.code(),
            })
            .collect();
        postcard::serialize_with_flavor(&steps, Appended(&mut *out)).expect("states encode");
    }
    if extras {
        let series: Vec<SeriesV3<&[SeriesBucket]>> = state
            .series
            .iter()
            .map(|x| SeriesV3 {
                key: x.key.to_le_bytes(),
                buckets: x.buckets.as_slice(),
            })
            .collect();
        let extras = ExtrasV3 {
            points_earned: state.points_earned,
            points_refunded: state.points_refunded,
            series,
        };
        postcard::serialize_with_flavor(&extras, Appended(out)).expect("states encode");
    }
}

/// A postcard output appending to a Vec we size up front (`postcard::to_allocvec` starts
/// empty and grows: its reallocations were a fifth of the encoding's instructions).
struct Appended<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Appended<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// The state's bytes as stored (see [`encode`]).
pub fn to_vec(state: &CustomerState) -> Vec<u8> {
    let mut out = Vec::new();
    encode(state, &mut out);
    out
}

/// Reads a stored state, binary or JSON.
///
/// # Errors
/// [`StoredStateError`] naming what is wrong.
pub fn decode(bytes: &[u8]) -> Result<CustomerState, StoredStateError> {
    match bytes.first() {
        Some(&version @ (V1 | V2 | V3)) => {
            let (v1, mut rest): (OwnedV1<'_>, _) = postcard::take_from_bytes(&bytes[1..])?;
            let clock = v1.clock;
            let abs = |d: i64| d.wrapping_add(clock);
            let mut history = Vec::new();
            if version >= V2 {
                let (steps, after): (Vec<StepV2<String>>, _) = postcard::take_from_bytes(rest)?;
                rest = after;
                history.reserve(steps.len());
                for step in steps {
                    history.push(TierStep {
                        seq: step.seq,
                        at: abs(step.at),
                        previous: step.previous,
                        tier: step.tier,
                        direction: Direction::from_code(step.direction).ok_or(
                            StoredStateError::HistoryCode {
                                what: "direction",
                                code: step.direction,
                            },
                        )?,
                        reason: ChangeReason::from_code(step.reason).ok_or(
                            StoredStateError::HistoryCode {
                                what: "reason",
                                code: step.reason,
                            },
                        )?,
                    });
                }
            }
            let mut extras = ExtrasV3::<Vec<SeriesBucket>>::default();
            if version == V3 {
                let (read, after): (ExtrasV3<Vec<SeriesBucket>>, _) =
                    postcard::take_from_bytes(rest)?;
                rest = after;
                extras = read;
            }
            if !rest.is_empty() {
                return Err(StoredStateError::Trailing(rest.len()));
            }
            Ok(CustomerState {
                first: v1.first.map(abs),
                last: v1.last.map(abs),
                count: v1.count,
                sum: v1.sum,
                refunds: v1.refunds,
                refunded: v1.refunded,
                day_buckets: v1.day_buckets,
                month_buckets: v1.month_buckets,
                tier: v1.tier,
                since: abs(v1.since),
                review: v1.review.map(abs),
                pending: v1.pending.map(abs),
                timer: v1.timer.map(|(d, cause)| (abs(d), cause)),
                notified: v1.notified.map(abs),
                pin: v1.pin.map(|p| Pin {
                    tier: p.tier,
                    mode: p.mode,
                    until: p.until.map(abs),
                    by: p.by,
                }),
                rules_hash: v1.rules_hash,
                ranked_values: v1.ranked_values,
                cutoffs_version: v1.cutoffs_version,
                at: abs(v1.at),
                seq: v1.seq,
                clock,
                ids: packed_ids::decode_bytes(v1.ids.0)?,
                floor: abs(v1.floor),
                origin: v1.origin.map(u64::from_le_bytes),
                born: v1.born.map(abs),
                history,
                points_earned: extras.points_earned,
                points_refunded: extras.points_refunded,
                series: extras
                    .series
                    .into_iter()
                    .map(|x| Series {
                        key: u64::from_le_bytes(x.key),
                        buckets: x.buckets,
                    })
                    .collect(),
            })
        }
        Some(b'{') => Ok(serde_json::from_slice(bytes)?),
        other => Err(StoredStateError::Unknown(other.copied())),
    }
}

/// Version 1, field by field (postcard keeps the order, not the names: append new fields
/// only in a new version). `S`, `B` and `R` are borrowed when encoding, owned when decoding.
#[derive(Serialize, Deserialize)]
struct StateV1<'a, S, B, R> {
    clock: i64,
    first: Option<i64>,
    last: Option<i64>,
    count: u64,
    sum: i128,
    refunds: u64,
    refunded: i128,
    day_buckets: B,
    month_buckets: B,
    tier: Option<S>,
    since: i64,
    review: Option<i64>,
    pending: Option<i64>,
    timer: Option<(i64, TimeCause)>,
    notified: Option<i64>,
    pin: Option<PinV1<S>>,
    rules_hash: u32,
    ranked_values: R,
    cutoffs_version: u64,
    at: i64,
    seq: u64,
    #[serde(borrow)]
    ids: Bytes<'a>,
    floor: i64,
    origin: Option<[u8; 8]>,
    born: Option<i64>,
}

/// Version 1 as decoded (its strings and lists owned, its ids borrowed from the bytes).
type OwnedV1<'a> = StateV1<'a, String, Vec<Bucket>, Vec<Option<i128>>>;

/// A pin, its times relative to the clock.
#[derive(Serialize, Deserialize)]
struct PinV1<S> {
    tier: S,
    mode: PinMode,
    until: Option<i64>,
    by: S,
}

/// A tier history entry (version 2), its time relative to the clock, direction and reason
/// by their codes ([`Direction::code`], [`ChangeReason::code`]).
#[derive(Serialize, Deserialize)]
struct StepV2<S> {
    seq: u64,
    at: i64,
    previous: Option<S>,
    tier: S,
    direction: u8,
    reason: u8,
}

/// Version 3's additions: lifetime points, then the window series (each its key as 8
/// little-endian bytes, then its buckets as `[index, purchases, net, points]`).
#[derive(Serialize, Deserialize)]
struct ExtrasV3<B> {
    points_earned: i128,
    points_refunded: i128,
    series: Vec<SeriesV3<B>>,
}

impl<B> Default for ExtrasV3<B> {
    fn default() -> Self {
        Self {
            points_earned: 0,
            points_refunded: 0,
            series: Vec::new(),
        }
    }
}

/// One window series (version 3).
#[derive(Serialize, Deserialize)]
struct SeriesV3<B> {
    key: [u8; 8],
    buckets: B,
}

/// Bytes written as one length-prefixed run (a `&[u8]` would go through serde byte by byte).
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<Z: Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        s.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Bytes<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'de [u8]>::deserialize(d).map(Bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> CustomerState {
        CustomerState {
            first: Some(1_793_527_200_000),
            last: Some(1_796_338_323_000),
            count: 12,
            sum: 123_456_789,
            refunds: 1,
            refunded: 5_000,
            day_buckets: vec![Bucket::from((20_400, 2, 3_000))],
            month_buckets: vec![Bucket::from((670, 5, -i128::MAX))],
            tier: Some("vip".into()),
            since: 1_796_000_000_000,
            review: Some(1_800_000_000_000),
            pending: None,
            timer: Some((1_796_597_523_000, TimeCause::Recency)),
            notified: Some(1_796_500_000_000),
            pin: Some(Pin {
                tier: "key".into(),
                mode: PinMode::Floor,
                until: None,
                by: "ovr-1".into(),
            }),
            rules_hash: 0xdead_beef,
            ranked_values: vec![Some(i128::MIN), None, Some(7)],
            cutoffs_version: 9,
            at: 1_796_338_323_000,
            seq: 4,
            clock: 1_796_338_323_000,
            ids: vec![(u64::MAX, 1_796_338_323_000), (3, 1_796_338_000_000)],
            floor: 1_795_733_522_999,
            origin: Some(0x0123_4567_89ab_cdef),
            born: Some(1_793_527_200_000),
            history: Vec::new(),
            points_earned: 0,
            points_refunded: 0,
            series: Vec::new(),
        }
    }

    #[test]
    fn round_trips_and_is_under_half_the_json() {
        let state = sample();
        let bytes = to_vec(&state);
        assert_eq!(decode(&bytes).unwrap(), state);
        let json = serde_json::to_vec(&state).unwrap();
        assert!(
            bytes.len() * 2 < json.len(),
            "{} vs {} B",
            bytes.len(),
            json.len()
        );
        let empty = CustomerState::default();
        assert_eq!(decode(&to_vec(&empty)).unwrap(), empty);
    }

    #[test]
    fn json_states_of_older_binaries_are_read() {
        let state = sample();
        let json = serde_json::to_vec(&state).unwrap();
        assert_eq!(decode(&json).unwrap(), state);
    }

    #[test]
    fn damaged_bytes_are_errors_naming_the_form() {
        let bytes = to_vec(&sample());
        for cut in 1..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(decode(b""), Err(StoredStateError::Unknown(None))));
        assert!(matches!(
            decode(&[4, 0]),
            Err(StoredStateError::Unknown(Some(4)))
        ));
        assert!(matches!(
            decode(b"{not json"),
            Err(StoredStateError::Json(_))
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer),
            Err(StoredStateError::Trailing(1))
        ));
    }

    /// The stored bytes of a full state, literally: a change to the layout, to a field's
    /// encoding or to an enum's variant order fails here (it would need a new version byte
    /// and a migration, not an edit of these bytes).
    #[test]
    fn the_binary_layout_is_pinned() {
        let mut state = sample();
        state.pending = Some(1_796_300_000_000);
        state.pin.as_mut().unwrap().mode = PinMode::Fixed;
        state.pin.as_mut().unwrap().until = Some(1_796_400_000_000);
        state.timer = Some((1_796_597_523_000, TimeCause::ManualExpired));
        let hex: String = to_vec(&state).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, PINNED, "{hex}");
        let pinned: Vec<u8> = (0..PINNED.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&PINNED[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(decode(&pinned).unwrap(), state);
    }

    fn with_history() -> CustomerState {
        let mut state = sample();
        state.history = vec![
            TierStep {
                seq: 3,
                at: 1_796_000_000_000,
                previous: Some("key".into()),
                tier: "vip".into(),
                direction: Direction::Up,
                reason: ChangeReason::Purchase,
            },
            TierStep {
                seq: 4,
                at: 1_796_338_323_000,
                previous: None,
                tier: "vip".into(),
                direction: Direction::Initial,
                reason: ChangeReason::RankShift,
            },
        ];
        state
    }

    /// A state keeping tier history is version 2: version 1's bytes, then the history; one
    /// without is version 1, unchanged (older binaries read it).
    #[test]
    fn tier_history_is_version_2_after_version_1s_bytes() {
        let state = with_history();
        let bytes = to_vec(&state);
        assert_eq!(bytes[0], V2);
        assert_eq!(decode(&bytes).unwrap(), state);
        let plain = to_vec(&sample());
        assert_eq!(plain[0], V1);
        assert_eq!(bytes[1..plain.len()], plain[1..]);
        let hex: String = bytes[plain.len()..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        // Two steps: seq, at (relative), previous, tier, direction code, reason code.
        assert_eq!(
            hex, "0203ef98d3c20201036b657903766970010004000003766970000a",
            "{hex}"
        );
        for cut in plain.len()..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut unknown = bytes.clone();
        let last = unknown.len() - 1;
        unknown[last] = 200;
        let err = decode(&unknown).unwrap_err();
        assert!(err.to_string().contains("unknown reason code 200"), "{err}");
        // The JSON form (older binaries' states, and tools) keeps it too.
        let json = serde_json::to_vec(&state).unwrap();
        assert_eq!(decode(&json).unwrap(), state);
    }

    /// A state with points or window series is version 3: version 1's bytes, the history
    /// list (here empty), then the points and the series; pinned byte for byte.
    #[test]
    fn points_and_series_are_version_3_after_the_history() {
        let mut state = sample();
        state.points_earned = 1_500;
        state.points_refunded = 200;
        state.series = vec![Series {
            key: 0x0102_0304_0506_0708,
            buckets: vec![SeriesBucket::from((670, 2, 9_000, 1_300))],
        }];
        let bytes = to_vec(&state);
        assert_eq!(bytes[0], V3);
        assert_eq!(decode(&bytes).unwrap(), state);
        let plain = to_vec(&sample());
        assert_eq!(bytes[1..plain.len()], plain[1..]);
        let hex: String = bytes[plain.len()..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        // No steps; earned 1500 and refunded 200 (zigzag varints); one series: its key's 8
        // bytes, one bucket [670, 2, 9000, 1300].
        assert_eq!(
            hex, "00b817900301080706050403020101bc0a02d08c01a814",
            "{hex}"
        );
        for cut in plain.len()..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // With history too: the steps sit between version 1's bytes and the extras.
        let mut both = with_history();
        both.points_earned = 7;
        both.series = state.series.clone();
        assert_eq!(decode(&to_vec(&both)).unwrap(), both);
        // Points alone, or an empty state: no series list needed.
        let points = CustomerState {
            points_refunded: 3,
            ..CustomerState::default()
        };
        assert_eq!(decode(&to_vec(&points)).unwrap(), points);
        let json = serde_json::to_vec(&both).unwrap();
        assert_eq!(decode(&json).unwrap(), both);
    }

    const PINNED: &str = concat!(
        "01f0b8dce1c76801efd4f2f81401000caab4de7501904e01e0be0202f02e01bc0a05fdffffffffff",
        "ffffffffffffffffffffffff030103766970ef98d3c20201908786a41b01ef8cc6240180d098f701",
        "050190fb979a0101036b6579010190f7e83a056f76722d31effdb6f50d0301ffffffffffffffffff",
        "ffffffffffffffffff0300010e09000419fffffffffffffffff0b8dce1c7680300000000000000ef",
        "b6278190e4c00401efcdab896745230101efd4f2f814"
    );

    proptest! {
        #[test]
        fn any_times_round_trip(
            clock in any::<i64>(), first in any::<Option<i64>>(), at in any::<i64>(),
            floor in any::<i64>(), until in any::<Option<i64>>(), sum in any::<i128>(),
            ids in proptest::collection::vec(any::<(u64, i64)>(), 0..20),
        ) {
            let mut state = sample();
            state.clock = clock;
            state.first = first;
            state.at = at;
            state.floor = floor;
            state.sum = sum;
            state.ids = ids;
            state.pin.as_mut().unwrap().until = until;
            prop_assert_eq!(decode(&to_vec(&state)).unwrap(), state);
        }
    }
}
