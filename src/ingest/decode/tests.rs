//! Decoder tests: every reason code, each field named in the detail.

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
fn erase_events_need_no_amount() {
    let e = dec(
        "c1",
        r#"{"event_id":"x1","customer_id":"c1","type":"erase","occurred_at":"2026-05-01T10:00:00Z"}"#,
    )
    .unwrap();
    assert_eq!((e.kind, e.amount_minor, e.pin), (EventKind::Erase, 0, None));
    let r = dec("c1", r#"{"event_id":"x1","customer_id":"c1","type":"forget","occurred_at":"2026-05-01T10:00:00Z"}"#).unwrap_err();
    assert_eq!(r.reason, Reason::UnknownType);
    assert!(r.detail.contains("\"erase\""), "{}", r.detail);
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
    // Bytes that are not UTF-8: refused in a field of the contract; in the string of a field
    // outside it, skipped unread, as every earlier tierd did (a replay decodes alike).
    let template = br#"{"x":"?","event_id":"e?","customer_id":"c1","amount":"1.00","occurred_at":"2026-05-01T10:00:00Z"}"#;
    let mut bytes = template.to_vec();
    bytes[21] = 0xff;
    let e = decode(Some(b"c1"), Some(&bytes), NOW, &limits()).unwrap_err();
    assert_eq!(e.reason, Reason::InvalidJson);
    let mut bytes = template.to_vec();
    bytes[6] = 0xff;
    assert_eq!(
        decode(Some(b"c1"), Some(&bytes), NOW, &limits())
            .unwrap()
            .event_id,
        "e?"
    );
    // A lone surrogate escape is not a character: the message is not read as JSON.
    assert_eq!(
        reason("c1", &with(r#""event_id":"e1""#, r#""event_id":"e\ud800""#)),
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
    // Every other JSON type where a string belongs is refused naming the field (the
    // object or array read whole), and a null string field is absent.
    for other in [
        "7",
        "-1.5e3",
        "1.7e308",
        "true",
        "{\"a\":[1,{}]}",
        "[\"e1\"]",
    ] {
        let e = dec(
            "c1",
            &with(
                r#""amount":"1.00""#,
                &format!(r#""amount":"1.00","currency":{other}"#),
            ),
        )
        .unwrap_err();
        assert_eq!(
            (e.reason, e.detail.as_str()),
            (Reason::InvalidField, "field `currency`: must be a string"),
            "{other}"
        );
    }
    assert!(dec(
        "c1",
        &with(r#""amount":"1.00""#, r#""amount":"1.00","currency":null"#)
    )
    .is_ok());
    assert_eq!(
        reason(
            "c1",
            &with(
                r#""occurred_at":"2026-05-01T10:00:00Z""#,
                r#""occurred_at":null"#
            )
        ),
        Reason::MissingField
    );
    // Fields outside the contract are skipped, whatever they hold.
    assert!(dec(
        "c1",
        &with(
            r#""event_id":"e1","#,
            r#""event_id":"e1","x":{"y":[1,"\"",null]},"z":1e999,"#
        )
    )
    .is_ok());
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

#[test]
fn points_and_attributes_are_read_and_checked() {
    let with = |extra: &str| {
        dec(
            "c1",
            &format!(
                r#"{{"event_id":"e1","customer_id":"c1","amount":"10.00","occurred_at":"2026-05-01T10:00:00Z"{extra}}}"#
            ),
        )
    };
    let e =
        with(r#","points":1500,"attributes":{"category":"fuel","channel":"st\u006fre"}"#).unwrap();
    assert_eq!(e.points, 1500);
    assert_eq!(
        e.attributes,
        [
            ("category".to_owned(), "fuel".to_owned()),
            ("channel".to_owned(), "store".to_owned())
        ]
    );
    assert_eq!(with(r#","points":"20""#).unwrap().points, 20);
    assert_eq!(
        with(r#","points":null,"attributes":null"#).unwrap().points,
        0
    );
    let none = with("").unwrap();
    assert_eq!((none.points, none.attributes.len()), (0, 0));
    let cases: &[(&str, Reason, &str)] = &[
        (
            r#","points":1.5"#,
            Reason::InvalidPoints,
            "field `points`: 1.5 is not a whole number",
        ),
        (
            r#","points":"ten""#,
            Reason::InvalidPoints,
            "field `points`",
        ),
        (r#","points":true"#, Reason::InvalidPoints, "field `points`"),
        (r#","points":1e3"#, Reason::InvalidPoints, "field `points`"),
        (r#","points":-5"#, Reason::PointsOutOfRange, "is negative"),
        (
            r#","points":1000000000000001"#,
            Reason::PointsOutOfRange,
            "above 1000000000000000",
        ),
        (
            r#","points":123456789012345678901234567890"#,
            Reason::PointsOutOfRange,
            "above",
        ),
        (
            r#","attributes":["fuel"]"#,
            Reason::InvalidAttributes,
            "must be an object of string values",
        ),
        (
            r#","attributes":"fuel""#,
            Reason::InvalidAttributes,
            "must be an object",
        ),
        (
            r#","attributes":{"category":3}"#,
            Reason::InvalidAttributes,
            "attribute \"category\": must be a string",
        ),
        (
            r#","attributes":{"category":null}"#,
            Reason::InvalidAttributes,
            "attribute \"category\": must be a string",
        ),
        (
            r#","attributes":{"category":""}"#,
            Reason::InvalidAttributes,
            "attribute \"category\": attribute value \"\"",
        ),
        (
            r#","attributes":{"":"x"}"#,
            Reason::InvalidAttributes,
            "attribute name \"\"",
        ),
        (
            r#","attributes":{"sales channel":"x"}"#,
            Reason::InvalidAttributes,
            "no whitespace",
        ),
        (
            r#","attributes":{"a":"x","a":"y"}"#,
            Reason::InvalidAttributes,
            "given twice",
        ),
    ];
    for (extra, reason, detail) in cases {
        let r = with(extra).unwrap_err();
        assert_eq!(r.reason, *reason, "{extra}: {r:?}");
        assert!(r.detail.contains(detail), "{extra}: {}", r.detail);
    }
    let many: Vec<String> = (0..=MAX_ATTRIBUTES)
        .map(|i| format!(r#""k{i}":"v""#))
        .collect();
    let r = with(&format!(r#","attributes":{{{}}}"#, many.join(","))).unwrap_err();
    assert_eq!(r.reason, Reason::InvalidAttributes);
    assert!(r.detail.contains("more than 32 attributes"), "{}", r.detail);
    let exactly: Vec<String> = (0..MAX_ATTRIBUTES)
        .map(|i| format!(r#""k{i}":"v""#))
        .collect();
    assert_eq!(
        with(&format!(r#","attributes":{{{}}}"#, exactly.join(",")))
            .unwrap()
            .attributes
            .len(),
        MAX_ATTRIBUTES
    );
    // An override or an erase does not read them: another consumer's fields never stop one.
    let erase = dec(
        "c1",
        r#"{"event_id":"x1","customer_id":"c1","type":"erase","occurred_at":"2026-05-01T10:00:00Z","points":12.5,"attributes":{"qty":2}}"#,
    )
    .unwrap();
    assert_eq!((erase.points, erase.attributes.len()), (0, 0));
    // The codes are part of the dead-letter contract.
    assert_eq!(
        [
            Reason::InvalidPoints,
            Reason::PointsOutOfRange,
            Reason::InvalidAttributes
        ]
        .map(Reason::as_str),
        [
            "invalid_points",
            "points_out_of_range",
            "invalid_attributes"
        ]
    );
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
        let _ = decode(Some(b"k"), Some(&bytes), NOW, &limits());
    }

    /// A string field reads as a full JSON parse reads it, escaped or not (the decoder takes
    /// a string without escapes straight from between its quotes).
    #[test]
    fn string_fields_read_as_json_parses_them(id in "\\PC{1,40}", escape_all in proptest::prelude::any::<bool>()) {
        let json = if escape_all {
            // Every character as a \u escape (surrogate pairs beyond the BMP).
            let mut out = String::from('"');
            for unit in id.encode_utf16() {
                out.push_str(&format!("\\u{unit:04x}"));
            }
            out.push('"');
            out
        } else {
            serde_json::to_string(&id).unwrap()
        };
        let value = format!(r#"{{"event_id":{json},"customer_id":{json},"amount":"1.00","occurred_at":"2026-01-01T00:00:00Z"}}"#);
        let key = id.as_bytes().to_vec();
        match decode(Some(&key), Some(value.as_bytes()), NOW, &limits()) {
            Ok(event) => {
                proptest::prop_assert_eq!(&event.event_id, &id);
                proptest::prop_assert_eq!(&event.customer_id, &id);
            }
            Err(rejection) => proptest::prop_assert!(id.chars().count() > 128, "{rejection:?}"),
        }
    }
}
