//! Decoding and validation of one input message against the input contract (README "Contracts").
//! Pure: bad input is a [`Rejection`] value with a reason code, never an error or a panic.

use crate::model::event::{check_attribute_key, check_attribute_value, MAX_ATTRIBUTES, MAX_POINTS};
use crate::model::state::{Pin, PinMode, PinRequest};
use crate::model::{money, time, Event, EventKind};
use serde_json::value::RawValue;
use std::borrow::Cow;

mod rejection;

use rejection::reject;
pub use rejection::{Reason, Rejection};

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

impl DecodeLimits {
    /// The limits of `config` under `rules` (the service's and every tool's: `tierd backfill`
    /// validates rows with the same).
    pub fn new(config: &crate::config::Config, rules: &crate::engine::rules::Rules) -> Self {
        Self {
            max_message_bytes: config.ingest.max_message_bytes,
            currency: config.money.currency.clone(),
            fraction_digits: config.money.fraction_digits,
            max_amount_minor: config.max_amount_minor(),
            min_occurred_at_ms: config.min_occurred_at_ms(),
            max_future_skew_ms: i64::try_from(config.ingest.max_future_skew_s.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            tiers: rules.tiers().iter().map(|t| t.name.clone()).collect(),
        }
    }
}

/// Maximum length of `event_id` and `customer_id`, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// Decodes one message. `reference_ms` is the Kafka message timestamp, or the ingesting
/// instance's clock if that is earlier (or the message has none): `occurred_at` may not lie
/// more than `max_future_skew_ms` after it. The message timestamp keeps replays deterministic;
/// the clock keeps a producer from dating a record (and its timestamp) far in the future.
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
    // One pass: the known fields read (strings borrowed), unknown fields skipped. A message
    // that is UTF-8 throughout (checked once) is parsed as text, so that the parser does not
    // check every string again (`from_slice` does: a fifth of the decoding's instructions).
    // Any other is parsed from its bytes as every tierd before did, which skips the strings
    // of fields outside the contract unread: input an older binary applied decodes alike in
    // a replay.
    let parsed = match std::str::from_utf8(value) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(value),
    };
    let fields: Fields<'_> = parsed.map_err(|e| {
        let object = value.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        match e.classify() {
            serde_json::error::Category::Data if !object => {
                reject(Reason::NotObject, "the value must be a JSON object")
            }
            _ => reject(Reason::InvalidJson, e.to_string()),
        }
    })?;

    let event_id = id_field(&fields.event_id, "event_id")?;
    let customer_id = id_field(&fields.customer_id, "customer_id")?;

    let kind = match optional_string(&fields.kind, "type")?.as_deref() {
        None | Some("purchase") => EventKind::Purchase,
        Some("refund") => EventKind::Refund,
        Some("override") => EventKind::Override,
        Some("erase") => EventKind::Erase,
        Some(other) => {
            return Err(reject(
                Reason::UnknownType,
                format!(
                    "field `type`: {other:?} is not one of \"purchase\", \"refund\", \"override\", \"erase\""
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
        (EventKind::Override | EventKind::Erase, None) => "0",
        (_, field) => present(field, "amount")?.get(),
    };
    let amount_text: Cow<'_, str> = if amount_raw.starts_with('"') {
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

    if let Some(currency) = optional_string(&fields.currency, "currency")? {
        if *currency != *limits.currency {
            return Err(reject(
                Reason::UnknownCurrency,
                format!(
                    "field `currency`: {currency:?}, this deployment accepts only {:?}",
                    limits.currency
                ),
            ));
        }
    }

    // Points and attributes mean something for purchases and refunds only: on an override or
    // an erase they are not read (a producer's other fields never stop an erase).
    let (points, attributes) = match kind {
        EventKind::Purchase | EventKind::Refund => {
            (points(fields.points)?, attributes(fields.attributes)?)
        }
        EventKind::Override | EventKind::Erase => (0, Vec::new()),
    };

    let occurred_text = required_string(&fields.occurred_at, "occurred_at")?;
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
                "field `occurred_at`: {occurred_text} is more than {} s after {} (the message timestamp, or tierd's clock if earlier)",
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
        points,
        attributes,
    })
}

/// Reads an override's `tier`, `mode` (`floor` default, `fixed`, `clear`) and `expires_at`.
fn pin_request(fields: &Fields<'_>, limits: &DecodeLimits) -> Result<PinRequest, Rejection> {
    let bad = |m: String| reject(Reason::InvalidOverride, m);
    let mode = match optional_string(&fields.mode, "mode")?.as_deref() {
        None | Some("floor") => PinMode::Floor,
        Some("fixed") => PinMode::Fixed,
        Some("clear") => return Ok(PinRequest::Clear),
        Some(other) => {
            return Err(bad(format!(
                "field `mode`: {other:?} is not one of \"floor\", \"fixed\", \"clear\""
            )))
        }
    };
    let tier = required_string(&fields.tier, "tier")?.into_owned();
    if !limits.tiers.contains(&tier) {
        return Err(bad(format!(
            "field `tier`: {tier:?} is not a tier of the rules ({})",
            limits.tiers.join(", ")
        )));
    }
    let until = match optional_string(&fields.expires_at, "expires_at")? {
        None => None,
        Some(text) => Some(
            time::parse_rfc3339_ms(&text)
                .map_err(|e| bad(format!("field `expires_at`: {text:?}: {e}")))?,
        ),
    };
    let by = id_field(&fields.event_id, "event_id")?;
    Ok(PinRequest::Set(Pin {
        tier,
        mode,
        until,
        by,
    }))
}

/// The contract's fields as read in one pass (absent or `null`: `None`). Only `amount` is kept
/// as raw JSON text: a JSON number must be read from its digits, exactly, never through a
/// float.
#[derive(serde::Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    event_id: Option<Text<'a>>,
    #[serde(borrow)]
    customer_id: Option<Text<'a>>,
    #[serde(borrow)]
    amount: Option<&'a RawValue>,
    #[serde(borrow)]
    currency: Option<Text<'a>>,
    #[serde(borrow)]
    occurred_at: Option<Text<'a>>,
    #[serde(borrow, rename = "type")]
    kind: Option<Text<'a>>,
    #[serde(borrow)]
    tier: Option<Text<'a>>,
    #[serde(borrow)]
    mode: Option<Text<'a>>,
    #[serde(borrow)]
    expires_at: Option<Text<'a>>,
    #[serde(borrow)]
    points: Option<&'a RawValue>,
    #[serde(borrow)]
    attributes: Option<Attributes<'a>>,
}

/// The `attributes` field as read: its entries (values as [`Text`], so that a wrong type is a
/// rejection naming the attribute, not a parse error), or the JSON type it has instead.
enum Attributes<'a> {
    Object(Vec<(Cow<'a, str>, Text<'a>)>),
    Other,
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Attributes<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AttributesVisitor(std::marker::PhantomData))
    }
}

struct AttributesVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> serde::de::Visitor<'de> for AttributesVisitor<'a> {
    type Value = Attributes<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<Attributes<'a>, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            // Read at most one more than allowed: the rest is skipped, the event rejected.
            if entries.len() > MAX_ATTRIBUTES {
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            let value: Text<'a> = map.next_value()?;
            entries.push((key, value));
        }
        Ok(Attributes::Object(entries))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Attributes<'a>, E> {
        Ok(Attributes::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Attributes<'a>, E> {
        Ok(Attributes::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Attributes<'a>, E> {
        Ok(Attributes::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Attributes<'a>, E> {
        Ok(Attributes::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<Attributes<'a>, E> {
        Ok(Attributes::Other)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> Result<Attributes<'a>, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Attributes::Other)
    }
}

/// Reads `points`: absent or null is 0; a JSON integer or a string of digits, 0..=10^15.
fn points(field: Option<&RawValue>) -> Result<i64, Rejection> {
    let Some(raw) = field else { return Ok(0) };
    let raw = raw.get();
    let text: Cow<'_, str> = if raw.starts_with('"') {
        serde_json::from_str::<String>(raw)
            .map_err(|e| reject(Reason::InvalidPoints, format!("field `points`: {e}")))?
            .into()
    } else {
        raw.into()
    };
    let (negative, digits) = text
        .strip_prefix('-')
        .map_or((false, &*text), |d| (true, d));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(reject(
            Reason::InvalidPoints,
            format!("field `points`: {text} is not a whole number of points"),
        ));
    }
    let value = digits.trim_start_matches('0');
    let too_large = value.len() > 16 || value.parse::<i64>().map_or(true, |v| v > MAX_POINTS);
    if negative && !value.is_empty() {
        return Err(reject(
            Reason::PointsOutOfRange,
            format!("field `points`: {text} is negative (a refund takes points back with a positive number)"),
        ));
    }
    if too_large {
        return Err(reject(
            Reason::PointsOutOfRange,
            format!("field `points`: {text} is above {MAX_POINTS}, the most one event may carry"),
        ));
    }
    Ok(value.parse::<i64>().unwrap_or(0))
}

/// Reads `attributes`: absent or null is none; an object of at most 32 string values with
/// valid names and values, each name once.
fn attributes(field: Option<Attributes<'_>>) -> Result<Vec<(String, String)>, Rejection> {
    let bad = |m: String| {
        reject(
            Reason::InvalidAttributes,
            format!("field `attributes`: {m}"),
        )
    };
    let entries = match field {
        None => return Ok(Vec::new()),
        Some(Attributes::Other) => {
            return Err(bad(
                "must be an object of string values, e.g. {\"category\": \"fuel\"}".into(),
            ))
        }
        Some(Attributes::Object(entries)) => entries,
    };
    if entries.len() > MAX_ATTRIBUTES {
        return Err(bad(format!("more than {MAX_ATTRIBUTES} attributes")));
    }
    let mut out: Vec<(String, String)> = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        check_attribute_key(&key).map_err(bad)?;
        let Text::Str(value) = value else {
            return Err(bad(format!("attribute {key:?}: must be a string")));
        };
        check_attribute_value(&value).map_err(|m| bad(format!("attribute {key:?}: {m}")))?;
        if out.iter().any(|(k, _)| **k == *key) {
            return Err(bad(format!("attribute {key:?} given twice")));
        }
        out.push((key.into_owned(), value.into_owned()));
    }
    Ok(out)
}

/// A field the contract wants as a string, as read: the string (borrowed from the message when
/// it has no escapes, so that fields only compared or parsed allocate nothing), or the JSON
/// type it has instead, for the rejection. Read in the parser's one pass: taking fields as raw
/// JSON text and reading that again (the form before) was ~10 % of tierd's per-event
/// instructions (the raw text's UTF-8 validated once more, then scanned again for escapes).
enum Text<'a> {
    Str(Cow<'a, str>),
    Other,
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor(std::marker::PhantomData))
    }
}

struct TextVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> serde::de::Visitor<'de> for TextVisitor<'a> {
    type Value = Text<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'a>, E> {
        Ok(Text::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Text<'a>, E> {
        Ok(Text::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Text<'a>, E> {
        Ok(Text::Str(Cow::Owned(v)))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Text<'a>, E> {
        Ok(Text::Other)
    }

    fn visit_unit<E>(self) -> Result<Text<'a>, E> {
        // Only an attribute's value reaches here as null (a contract field's null is `None`).
        Ok(Text::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Text<'a>, E> {
        Ok(Text::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Text<'a>, E> {
        Ok(Text::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Text<'a>, E> {
        Ok(Text::Other)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Text<'a>, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Text::Other)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Text<'a>, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Text::Other)
    }
}

/// A field that must be present and not null.
fn present<T>(field: Option<T>, name: &str) -> Result<T, Rejection> {
    field.ok_or_else(|| reject(Reason::MissingField, format!("field `{name}` is required")))
}

/// A string field's text.
fn string<'a>(field: &Text<'a>, name: &str) -> Result<Cow<'a, str>, Rejection> {
    match field {
        Text::Str(Cow::Borrowed(text)) => Ok(Cow::Borrowed(text)),
        Text::Str(Cow::Owned(text)) => Ok(Cow::Owned(text.clone())),
        Text::Other => Err(reject(
            Reason::InvalidField,
            format!("field `{name}`: must be a string"),
        )),
    }
}

fn required_string<'a>(field: &Option<Text<'a>>, name: &str) -> Result<Cow<'a, str>, Rejection> {
    string(present(field.as_ref(), name)?, name)
}

fn optional_string<'a>(
    field: &Option<Text<'a>>,
    name: &str,
) -> Result<Option<Cow<'a, str>>, Rejection> {
    field.as_ref().map(|v| string(v, name)).transpose()
}

fn id_field(field: &Option<Text<'_>>, name: &str) -> Result<String, Rejection> {
    let id = required_string(field, name)?;
    let chars = id.chars().count();
    if chars == 0 || chars > MAX_ID_CHARS {
        return Err(reject(
            Reason::InvalidId,
            format!("field `{name}`: {chars} characters, must be 1..={MAX_ID_CHARS}"),
        ));
    }
    Ok(id.into_owned())
}

#[cfg(test)]
mod tests;
