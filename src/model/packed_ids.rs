//! The remembered event ids of a customer state, stored packed: one base64 string (URL-safe
//! alphabet, no padding) of, per id, the 8 little-endian bytes of its xxh3-64 hash and its
//! `occurred_at` as an LEB128 varint of the zigzag-encoded difference to the previous id's
//! (the list is in time order, so most take 2–5 bytes). About 16 characters an id where the
//! JSON pair `[hash, ms]` took about 36: the ids are most of a state (issue 12: Redis bytes per
//! customer), and one string parses faster than two numbers per id.
//!
//! States written before (the JSON array of pairs) are still read; they are written packed
//! the next time the customer changes.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Serializer;

/// Serializes `(hash, occurred_at)` pairs as the packed string.
pub fn serialize<S: Serializer>(ids: &[(u64, i64)], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&encode(ids))
}

/// Reads the packed string, or the JSON array of `[hash, occurred_at]` pairs of older states.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u64, i64)>, D::Error> {
    d.deserialize_any(IdsVisitor)
}

/// The packed form (see the module documentation).
pub fn encode(ids: &[(u64, i64)]) -> String {
    let mut bytes = Vec::with_capacity(ids.len() * 13);
    encode_bytes(ids, &mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The packed bytes (before base64), appended to `bytes`: the binary state form stores them
/// as they are ([`super::stored`]).
pub fn encode_bytes(ids: &[(u64, i64)], bytes: &mut Vec<u8>) {
    let mut previous = 0i64;
    for &(hash, at) in ids {
        bytes.extend_from_slice(&hash.to_le_bytes());
        let delta = at.wrapping_sub(previous);
        let mut zigzag = ((delta << 1) ^ (delta >> 63)) as u64;
        loop {
            let byte = (zigzag & 0x7f) as u8;
            zigzag >>= 7;
            if zigzag == 0 {
                bytes.push(byte);
                break;
            }
            bytes.push(byte | 0x80);
        }
        previous = at;
    }
}

/// Why a packed string is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackedIdsError {
    /// Not base64 of the URL-safe alphabet without padding.
    #[error("remembered ids: not unpadded URL-safe base64 ({0})")]
    Base64(String),
    /// The bytes end inside an id.
    #[error("remembered ids: truncated after {0} ids")]
    Truncated(usize),
    /// A varint longer than 64 bits.
    #[error("remembered ids: time of id {0} is not a 64-bit varint")]
    Overlong(usize),
}

/// Reads the packed form.
///
/// # Errors
/// [`PackedIdsError`] naming what is wrong.
pub fn decode(packed: &str) -> Result<Vec<(u64, i64)>, PackedIdsError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(packed)
        .map_err(|e| PackedIdsError::Base64(e.to_string()))?;
    decode_bytes(&bytes)
}

/// Reads the packed bytes (see [`encode_bytes`]).
///
/// # Errors
/// [`PackedIdsError`] naming what is wrong.
pub fn decode_bytes(bytes: &[u8]) -> Result<Vec<(u64, i64)>, PackedIdsError> {
    let mut ids = Vec::with_capacity(bytes.len() / 12);
    let mut rest = bytes;
    let mut previous = 0i64;
    while !rest.is_empty() {
        let n = ids.len();
        let (hash, tail) = rest
            .split_first_chunk::<8>()
            .ok_or(PackedIdsError::Truncated(n))?;
        rest = tail;
        let mut zigzag = 0u64;
        let mut shift = 0u32;
        loop {
            let (&byte, tail) = rest.split_first().ok_or(PackedIdsError::Truncated(n))?;
            rest = tail;
            if shift > 63 || (shift == 63 && byte & 0x7e != 0) {
                return Err(PackedIdsError::Overlong(n));
            }
            zigzag |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let delta = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
        previous = previous.wrapping_add(delta);
        ids.push((u64::from_le_bytes(*hash), previous));
    }
    Ok(ids)
}

struct IdsVisitor;

impl<'de> Visitor<'de> for IdsVisitor {
    type Value = Vec<(u64, i64)>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("packed remembered ids (a base64 string) or an array of [hash, ms] pairs")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        decode(v).map_err(E::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(pair) = seq.next_element::<(u64, i64)>()? {
            ids.push(pair);
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_extreme_and_unordered_values() {
        let ids = vec![
            (0, 0),
            (u64::MAX, i64::MIN),
            (1, i64::MAX),
            (0x0123_4567_89ab_cdef, 1_793_527_200_000),
            (42, 1_793_527_200_001),
            (43, 1_793_527_100_000),
            (44, -5),
        ];
        assert_eq!(decode(&encode(&ids)).unwrap(), ids);
        assert_eq!(decode(&encode(&[])).unwrap(), vec![]);
    }

    #[test]
    fn ten_ids_a_minute_apart_take_under_a_fifth_of_the_json_pairs() {
        let ids: Vec<(u64, i64)> = (0..10u64)
            .map(|i| {
                (
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    1_793_527_200_000 + 60_000 * i as i64,
                )
            })
            .collect();
        let packed = encode(&ids).len();
        let pairs = serde_json::to_string(&ids).unwrap().len();
        assert!(packed * 2 < pairs, "packed {packed} B, pairs {pairs} B");
    }

    #[test]
    fn malformed_strings_are_errors_naming_what_is_wrong() {
        assert!(matches!(
            decode("not base64!"),
            Err(PackedIdsError::Base64(_))
        ));
        // 8 hash bytes and no time.
        let short = URL_SAFE_NO_PAD.encode([1u8; 8]);
        assert_eq!(decode(&short), Err(PackedIdsError::Truncated(0)));
        // A varint that never ends within 64 bits.
        let mut long = vec![0u8; 8];
        long.extend([0xff; 10]);
        long.push(0x01);
        let long = URL_SAFE_NO_PAD.encode(long);
        assert_eq!(decode(&long), Err(PackedIdsError::Overlong(0)));
    }

    #[test]
    fn states_with_the_older_array_form_are_read() {
        #[derive(serde::Deserialize)]
        struct S {
            #[serde(deserialize_with = "deserialize")]
            ids: Vec<(u64, i64)>,
        }
        let s: S = serde_json::from_str(r#"{"ids":[[16,17],[18446744073709551615,-3]]}"#).unwrap();
        assert_eq!(s.ids, vec![(16, 17), (u64::MAX, -3)]);
        let s: S = serde_json::from_str(&format!(r#"{{"ids":"{}"}}"#, encode(&s.ids))).unwrap();
        assert_eq!(s.ids, vec![(16, 17), (u64::MAX, -3)]);
    }
}
