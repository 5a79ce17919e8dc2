//! Decoding and validation of one input message against the input contract (README "Contracts").
//! Pure: bad input is a [`Rejection`] value with a reason code, never an error or a panic.

use crate::model::state::{Pin, PinMode, PinRequest};
use crate::model::{money, time, Event, EventKind};
use serde_json::value::RawValue;

/// Why an input message was rejected. The set is fixed: it is the `reason` of dead-letter
/// records and a label of `tierd_events_dead_lettered_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The value is larger than `ingest.max_message_bytes`.
    Oversize,
    /// The value is empty, not UTF-8 or not JSON.
    InvalidJson,
    /// Valid JSON but not an object.
    NotObject,
    /// A required field is absent (or null).
    MissingField,
    /// A field has the wrong JSON type.
    InvalidField,
    /// `event_id` or `customer_id` is empty or longer than 128 characters.
    InvalidId,
    /// `amount` is not an exact decimal in the currency (not a number, too many fraction digits).
    InvalidAmount,
    /// A purchase or refund with a negative amount.
    NegativeAmount,
    /// `amount` is above `money.max_amount`.
    AmountOutOfRange,
    /// `currency` is not the configured one.
    UnknownCurrency,
    /// `occurred_at` is not RFC 3339 with an offset.
    InvalidTimestamp,
    /// `occurred_at` is before `ingest.min_occurred_at` or too far in the future.
    TimestampOutOfRange,
    /// `type` is not one of the known types.
    UnknownType,
    /// An `override` names a tier the rules do not have, or an invalid `mode`/`expires_at`.
    InvalidOverride,
    /// The Kafka key is missing or differs from `customer_id` (the customer's state would be
    /// split across partitions).
    KeyMismatch,
    /// Older than the dedup horizon behind the customer's latest event (decided at apply).
    TooLate,
}

impl Reason {
    /// All reasons, for metric pre-registration and docs.
    pub const ALL: [Reason; 16] = [
        Self::Oversize,
        Self::InvalidJson,
        Self::NotObject,
        Self::MissingField,
        Self::InvalidField,
        Self::InvalidId,
        Self::InvalidAmount,
        Self::NegativeAmount,
        Self::AmountOutOfRange,
        Self::UnknownCurrency,
        Self::InvalidTimestamp,
        Self::TimestampOutOfRange,
        Self::UnknownType,
        Self::InvalidOverride,
        Self::KeyMismatch,
        Self::TooLate,
    ];

    /// The machine-readable code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::InvalidJson => "invalid_json",
            Self::NotObject => "not_object",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::InvalidId => "invalid_id",
            Self::InvalidAmount => "invalid_amount",
            Self::NegativeAmount => "negative_amount",
            Self::AmountOutOfRange => "amount_out_of_range",
            Self::UnknownCurrency => "unknown_currency",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::TimestampOutOfRange => "timestamp_out_of_range",
            Self::UnknownType => "unknown_type",
            Self::InvalidOverride => "invalid_override",
            Self::KeyMismatch => "key_mismatch",
            Self::TooLate => "too_late",
        }
    }
}

/// A rejected message: the reason code and a human-readable detail naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Machine-readable reason.
    pub reason: Reason,
    /// What exactly is wrong, e.g. ``field `amount`: 3 fraction digits, the currency allows 2``.
    pub detail: String,
}

fn reject(reason: Reason, detail: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        detail: detail.into(),
    }
}

/// Limits the decoder enforces, from configuration.
#[derive(Debug, Clone)]
pub struct DecodeLimits {
    /// Largest accepted value in bytes.
    pub max_message_bytes: usize,
    /// The configured currency code.
    pub currency: String,
    /// Its fraction digits.
    pub fraction_digits: u32,
    /// Largest single amount, minor units.
    pub max_amount_minor: i64,
    /// Earliest accepted `occurred_at`, Unix ms.
    pub min_occurred_at_ms: i64,
    /// How far `occurred_at` may lie after the reference time, ms.
    pub max_future_skew_ms: i64,
    /// Tier names of the rules (an override must name one).
    pub tiers: Vec<String>,
}

/// Maximum length of `event_id` and `customer_id`, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// Decodes one message. `reference_ms` is the Kafka message timestamp (or, if the message has
/// none, the wall clock): `occurred_at` may not lie more than `max_future_skew_ms` after it.
/// Using the message timestamp keeps replays deterministic.
///
/// # Errors
/// A [`Rejection`] for every violation of the input contract.
pub fn decode(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    reference_ms: i64,
    limits: &DecodeLimits,
) -> Result<Event, Rejection> {
    let value = value.unwrap_or_default();
    if value.len() > limits.max_message_bytes {
        return Err(reject(
            Reason::Oversize,
            format!(
                "{} bytes, the limit is {}",
                value.len(),
                limits.max_message_bytes
            ),
        ));
    }
    if value.is_empty() {
        return Err(reject(Reason::InvalidJson, "empty message"));
    }
    // One pass: every known field is borrowed as raw JSON text, unknown fields are skipped.
    let fields: Fields<'_> = serde_json::from_slice(value).map_err(|e| {
        let object = value.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        match e.classify() {
            serde_json::error::Category::Data if !object => {
                reject(Reason::NotObject, "the value must be a JSON object")
            }
            _ => reject(Reason::InvalidJson, e.to_string()),
        }
    })?;

    let event_id = id_field(fields.event_id, "event_id")?;
    let customer_id = id_field(fields.customer_id, "customer_id")?;

    let kind = match optional_string(fields.kind, "type")?.as_deref() {
        None | Some("purchase") => EventKind::Purchase,
        Some("refund") => EventKind::Refund,
        Some("override") => EventKind::Override,
        Some(other) => {
            return Err(reject(
                Reason::UnknownType,
                format!(
                    "field `type`: {other:?} is not one of \"purchase\", \"refund\", \"override\""
                ),
            ))
        }
    };

    let pin = if kind == EventKind::Override {
        Some(pin_request(&fields, limits)?)
    } else {
        None
    };
    let amount_raw = match (kind, fields.amount) {
        (EventKind::Override, None) => "0",
        (_, field) => present(field, "amount")?.get(),
    };
    let amount_text: std::borrow::Cow<'_, str> = if amount_raw.starts_with('"') {
        serde_json::from_str::<String>(amount_raw)
            .map_err(|e| reject(Reason::InvalidField, format!("field `amount`: {e}")))?
            .into()
    } else if amount_raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        amount_raw.into()
    } else {
        return Err(reject(
            Reason::InvalidField,
            "field `amount`: must be a JSON number or a decimal string",
        ));
    };
    let amount_minor = match money::parse_minor(
        &amount_text,
        limits.fraction_digits,
        limits.max_amount_minor,
    ) {
        Ok(v) if v < 0 => {
            return Err(reject(
                Reason::NegativeAmount,
                format!("field `amount`: {amount_text} is negative"),
            ))
        }
        Ok(v) => v,
        Err(money::MoneyError::TooLarge { .. }) => {
            return Err(reject(
                Reason::AmountOutOfRange,
                format!("field `amount`: {amount_text} is above money.max_amount"),
            ))
        }
        Err(e) => {
            return Err(reject(
                Reason::InvalidAmount,
                format!("field `amount`: {e}"),
            ))
        }
    };

    if let Some(currency) = optional_string(fields.currency, "currency")? {
        if currency != limits.currency {
            return Err(reject(
                Reason::UnknownCurrency,
                format!(
                    "field `currency`: {currency:?}, this deployment accepts only {:?}",
                    limits.currency
                ),
            ));
        }
    }

    let occurred_text = required_string(fields.occurred_at, "occurred_at")?;
    let occurred_at_ms = time::parse_rfc3339_ms(&occurred_text).map_err(|e| {
        reject(
            Reason::InvalidTimestamp,
            format!("field `occurred_at`: {occurred_text:?}: {e}"),
        )
    })?;
    if occurred_at_ms < limits.min_occurred_at_ms {
        return Err(reject(
            Reason::TimestampOutOfRange,
            format!(
                "field `occurred_at`: {occurred_text} is before {}",
                time::format_ms(limits.min_occurred_at_ms)
            ),
        ));
    }
    if occurred_at_ms > reference_ms.saturating_add(limits.max_future_skew_ms) {
        return Err(reject(
            Reason::TimestampOutOfRange,
            format!(
                "field `occurred_at`: {occurred_text} is more than {} s after the message time {}",
                limits.max_future_skew_ms / 1000,
                time::format_ms(reference_ms)
            ),
        ));
    }

    match key {
        Some(k) if k == customer_id.as_bytes() => {}
        Some(k) => {
            return Err(reject(
                Reason::KeyMismatch,
                format!(
                    "message key {:?} differs from customer_id {customer_id:?}",
                    String::from_utf8_lossy(&k[..k.len().min(MAX_ID_CHARS * 4)])
                ),
            ))
        }
        None => {
            return Err(reject(
                Reason::KeyMismatch,
                "message has no key; it must be the customer_id",
            ))
        }
    }

    Ok(Event {
        event_id,
        customer_id,
        kind,
        amount_minor,
        occurred_at_ms,
        pin,
    })
}

/// Reads an override's `tier`, `mode` (`floor` default, `fixed`, `clear`) and `expires_at`.
fn pin_request(fields: &Fields<'_>, limits: &DecodeLimits) -> Result<PinRequest, Rejection> {
    let bad = |m: String| reject(Reason::InvalidOverride, m);
    let mode = match optional_string(fields.mode, "mode")?.as_deref() {
        None | Some("floor") => PinMode::Floor,
        Some("fixed") => PinMode::Fixed,
        Some("clear") => return Ok(PinRequest::Clear),
        Some(other) => {
            return Err(bad(format!(
                "field `mode`: {other:?} is not one of \"floor\", \"fixed\", \"clear\""
            )))
        }
    };
    let tier = required_string(fields.tier, "tier")?;
    if !limits.tiers.contains(&tier) {
        return Err(bad(format!(
            "field `tier`: {tier:?} is not a tier of the rules ({})",
            limits.tiers.join(", ")
        )));
    }
    let until = match optional_string(fields.expires_at, "expires_at")? {
        None => None,
        Some(text) => Some(
            time::parse_rfc3339_ms(&text)
                .map_err(|e| bad(format!("field `expires_at`: {text:?}: {e}")))?,
        ),
    };
    let by = id_field(fields.event_id, "event_id")?;
    Ok(PinRequest::Set(Pin {
        tier,
        mode,
        until,
        by,
    }))
}

/// The contract's fields as raw JSON text (absent: `None`).
#[derive(serde::Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow)]
    customer_id: Option<&'a RawValue>,
    #[serde(borrow)]
    amount: Option<&'a RawValue>,
    #[serde(borrow)]
    currency: Option<&'a RawValue>,
    #[serde(borrow)]
    occurred_at: Option<&'a RawValue>,
    #[serde(borrow, rename = "type")]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    tier: Option<&'a RawValue>,
    #[serde(borrow)]
    mode: Option<&'a RawValue>,
    #[serde(borrow)]
    expires_at: Option<&'a RawValue>,
}

/// A field that must be present and not null.
fn present<'a>(field: Option<&'a RawValue>, name: &str) -> Result<&'a RawValue, Rejection> {
    match field {
        Some(v) if v.get() != "null" => Ok(v),
        _ => Err(reject(
            Reason::MissingField,
            format!("field `{name}` is required"),
        )),
    }
}

fn string(raw: &RawValue, name: &str) -> Result<String, Rejection> {
    serde_json::from_str::<String>(raw.get()).map_err(|_| {
        reject(
            Reason::InvalidField,
            format!("field `{name}`: must be a string"),
        )
    })
}

fn required_string(field: Option<&RawValue>, name: &str) -> Result<String, Rejection> {
    string(present(field, name)?, name)
}

fn optional_string(field: Option<&RawValue>, name: &str) -> Result<Option<String>, Rejection> {
    match field {
        Some(v) if v.get() != "null" => string(v, name).map(Some),
        _ => Ok(None),
    }
}

fn id_field(field: Option<&RawValue>, name: &str) -> Result<String, Rejection> {
    let id = required_string(field, name)?;
    let chars = id.chars().count();
    if chars == 0 || chars > MAX_ID_CHARS {
        return Err(reject(
            Reason::InvalidId,
            format!("field `{name}`: {chars} characters, must be 1..={MAX_ID_CHARS}"),
        ));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_780_000_000_000; // 2026-05-28

    fn limits() -> DecodeLimits {
        DecodeLimits {
            max_message_bytes: 1024,
            currency: "EUR".into(),
            fraction_digits: 2,
            max_amount_minor: 100_000_000_000,
            min_occurred_at_ms: 946_684_800_000,
            max_future_skew_ms: 86_400_000,
            tiers: vec!["vip".into(), "basic".into()],
        }
    }

    fn dec(key: &str, value: &str) -> Result<Event, Rejection> {
        decode(Some(key.as_bytes()), Some(value.as_bytes()), NOW, &limits())
    }

    fn reason(key: &str, value: &str) -> Reason {
        dec(key, value).unwrap_err().reason
    }

    #[test]
    fn overrides_carry_a_pin() {
        let e = dec(
            "c1",
            r#"{"event_id":"o1","customer_id":"c1","type":"override","tier":"vip","mode":"fixed","expires_at":"2026-06-01T00:00:00Z","occurred_at":"2026-05-01T10:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(e.kind, EventKind::Override);
        let Some(PinRequest::Set(pin)) = e.pin else {
            panic!("a pin")
        };
        assert_eq!(
            (pin.tier.as_str(), pin.mode, pin.by.as_str()),
            ("vip", PinMode::Fixed, "o1")
        );
        assert_eq!(
            pin.until,
            Some(time::parse_rfc3339_ms("2026-06-01T00:00:00Z").unwrap())
        );
        let e = dec(
            "c1",
            r#"{"event_id":"o2","customer_id":"c1","type":"override","mode":"clear","occurred_at":"2026-05-01T10:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(e.pin, Some(PinRequest::Clear));
    }

    #[test]
    fn decodes_a_purchase_and_a_refund() {
        let e = dec("c1", r#"{"event_id":"e1","customer_id":"c1","amount":"12.50","currency":"EUR","occurred_at":"2026-05-01T10:00:00+02:00"}"#).unwrap();
        assert_eq!(e.amount_minor, 1250);
        assert_eq!(e.kind, EventKind::Purchase);
        assert_eq!(
            e.occurred_at_ms,
            time::parse_rfc3339_ms("2026-05-01T08:00:00Z").unwrap()
        );
        let e = dec("c1", r#"{"event_id":"e2","customer_id":"c1","amount":0.1,"type":"refund","occurred_at":"2026-05-01T10:00:00Z","extra":[1]}"#).unwrap();
        assert_eq!((e.kind, e.amount_minor), (EventKind::Refund, 10));
        // JSON numbers keep every digit: this is exact, not a float.
        let e = dec(
            "c1",
            r#"{"event_id":"e3","customer_id":"c1","amount":12345678901.23,"occurred_at":"2026-05-01T10:00:00Z"}"#,
        );
        assert_eq!(e.unwrap_err().reason, Reason::AmountOutOfRange);
        let e = dec("c1", r#"{"event_id":"e3","customer_id":"c1","amount":123456789.01,"occurred_at":"2026-05-01T10:00:00Z"}"#).unwrap();
        assert_eq!(e.amount_minor, 12_345_678_901);
    }

    #[test]
    fn every_bad_input_class_has_its_reason() {
        let ok = r#"{"event_id":"e1","customer_id":"c1","amount":"1.00","occurred_at":"2026-05-01T10:00:00Z"}"#;
        let with = |from: &str, to: &str| ok.replace(from, to);
        assert_eq!(reason("c1", &"x".repeat(2000)), Reason::Oversize);
        assert_eq!(reason("c1", ""), Reason::InvalidJson);
        assert_eq!(reason("c1", "{not json"), Reason::InvalidJson);
        assert_eq!(
            decode(Some(b"c1"), Some(&[0xff, 0xfe]), NOW, &limits())
                .unwrap_err()
                .reason,
            Reason::InvalidJson
        );
        assert_eq!(reason("c1", "[1,2]"), Reason::NotObject);
        assert_eq!(reason("c1", " \n [1,2]"), Reason::NotObject);
        assert_eq!(reason("c1", "42"), Reason::NotObject);
        assert_eq!(reason("c1", "[1,2"), Reason::InvalidJson);
        // An ambiguous object (the same field twice) is refused, not resolved silently.
        assert_eq!(
            reason(
                "c1",
                &ok.replace(r#""event_id":"e1""#, r#""event_id":"e1","event_id":"e2""#)
            ),
            Reason::InvalidJson
        );
        assert_eq!(reason("c1", "\"text\""), Reason::NotObject);
        assert_eq!(
            reason("c1", &with(r#""event_id":"e1","#, "")),
            Reason::MissingField
        );
        assert_eq!(
            reason("c1", &with(r#""amount":"1.00""#, r#""amount":null"#)),
            Reason::MissingField
        );
        assert_eq!(
            reason("c1", &with(r#""event_id":"e1""#, r#""event_id":7"#)),
            Reason::InvalidField
        );
        assert_eq!(
            reason("c1", &with(r#""amount":"1.00""#, r#""amount":true"#)),
            Reason::InvalidField
        );
        assert_eq!(
            reason("c1", &with(r#""event_id":"e1""#, r#""event_id":"""#)),
            Reason::InvalidId
        );
        let long = "x".repeat(129);
        assert_eq!(reason(&long, &with("c1", &long)), Reason::InvalidId);
        assert_eq!(reason("c1", &with("1.00", "-1.00")), Reason::NegativeAmount);
        assert_eq!(reason("c1", &with("1.00", "1.001")), Reason::InvalidAmount);
        assert_eq!(reason("c1", &with("1.00", "one")), Reason::InvalidAmount);
        assert_eq!(
            reason("c1", &with("1.00", "2000000000")),
            Reason::AmountOutOfRange
        );
        assert_eq!(
            reason("c1", &with(r#""amount""#, r#""currency":"USD","amount""#)),
            Reason::UnknownCurrency
        );
        assert_eq!(
            reason("c1", &with("2026-05-01T10:00:00Z", "yesterday")),
            Reason::InvalidTimestamp
        );
        assert_eq!(
            reason("c1", &with("2026-05-01T10:00:00Z", "2026-05-01T10:00:00")),
            Reason::InvalidTimestamp
        );
        assert_eq!(
            reason("c1", &with("2026-05-01T10:00:00Z", "1999-12-31T23:59:59Z")),
            Reason::TimestampOutOfRange
        );
        assert_eq!(
            reason("c1", &with("2026-05-01T10:00:00Z", "2026-05-30T10:00:00Z")),
            Reason::TimestampOutOfRange
        );
        assert_eq!(
            reason("c1", &with(r#""amount""#, r#""type":"gift","amount""#)),
            Reason::UnknownType
        );
        assert_eq!(
            reason(
                "c1",
                &with(r#""amount""#, r#""type":"override","tier":"gold","amount""#)
            ),
            Reason::InvalidOverride
        );
        assert_eq!(
            reason("c1", &with(r#""amount""#, r#""type":"override","amount""#)),
            Reason::MissingField
        );
        assert_eq!(
            reason(
                "c1",
                &with(
                    r#""amount""#,
                    r#""type":"override","tier":"vip","mode":"max","amount""#
                )
            ),
            Reason::InvalidOverride
        );
        assert_eq!(
            reason(
                "c1",
                &with(
                    r#""amount""#,
                    r#""type":"override","tier":"vip","expires_at":"soon","amount""#
                )
            ),
            Reason::InvalidOverride
        );
        assert_eq!(reason("c2", ok), Reason::KeyMismatch);
        assert_eq!(
            decode(None, Some(ok.as_bytes()), NOW, &limits())
                .unwrap_err()
                .reason,
            Reason::KeyMismatch
        );
    }

    #[test]
    fn details_name_the_field() {
        let e = dec("c1", r#"{"event_id":"e1","customer_id":"c1","amount":"1.001","occurred_at":"2026-05-01T10:00:00Z"}"#).unwrap_err();
        assert_eq!(
            e.detail,
            "field `amount`: 3 fraction digits, the currency allows 2"
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = decode(Some(b"k"), Some(&bytes), NOW, &limits());
        }
    }
}
