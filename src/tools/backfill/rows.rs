//! Rows of a history file read as tierd input events: the column mapping, the two formats
//! (JSON Lines and CSV) and the check of each row against the input contract. Pure apart
//! from reading: a bad row is a value ([`Row::Bad`] with a reason code), never an error.

use crate::ingest::decode::{decode, DecodeLimits, Reason};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

/// The fields of the input contract a row can carry (README "Contracts": input).
pub const FIELDS: [&str; 10] = [
    "event_id",
    "customer_id",
    "amount",
    "currency",
    "occurred_at",
    "type",
    "tier",
    "mode",
    "expires_at",
    "points",
];

/// The format of a history file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line (blank lines skipped).
    Jsonl,
    /// Comma-separated values with a header row (RFC 4180 quoting).
    Csv,
}

impl Format {
    /// The format a file's name says (`.jsonl`, `.ndjson`, `.json`, `.csv`; each also with
    /// `.gz`), if any.
    pub fn of_path(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        if name.ends_with(".csv") {
            Some(Self::Csv)
        } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") || name.ends_with(".json") {
            Some(Self::Jsonl)
        } else {
            None
        }
    }
}

/// Whether a file is gzip-compressed (by its name: `.gz`).
pub fn is_gzip(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// Which source column (CSV) or field (JSON Lines) holds each field of the input contract;
/// a field not mapped is read from the column or field of its own name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    sources: BTreeMap<&'static str, String>,
    /// Attributes read from columns (`--attribute NAME=COLUMN`): name, source column.
    attributes: Vec<(String, String)>,
}

impl Mapping {
    /// Parses `FIELD=COLUMN` pairs (the `--map` flags).
    ///
    /// # Errors
    /// A message naming the pair: not `FIELD=COLUMN`, a field outside the contract, or a
    /// field mapped twice.
    pub fn parse(pairs: &[String]) -> Result<Self, String> {
        let mut sources = BTreeMap::new();
        for pair in pairs {
            let (field, column) = pair
                .split_once('=')
                .filter(|(f, c)| !f.is_empty() && !c.is_empty())
                .ok_or_else(|| format!("--map {pair:?}: expected FIELD=COLUMN"))?;
            let field = FIELDS.iter().find(|f| **f == field).ok_or_else(|| {
                format!(
                    "--map {pair:?}: {field:?} is not a field of the input contract (one of {})",
                    FIELDS.join(", ")
                )
            })?;
            if sources.insert(*field, column.to_owned()).is_some() {
                return Err(format!("--map: {field} is mapped twice"));
            }
        }
        Ok(Self {
            sources,
            attributes: Vec::new(),
        })
    }

    /// Adds attributes read from columns or fields (`--attribute NAME=COLUMN` flags): the
    /// column's text becomes the event's attribute `NAME` (an empty CSV cell: absent).
    ///
    /// # Errors
    /// A message naming the pair: not `NAME=COLUMN`, an invalid attribute name, or a name
    /// given twice.
    pub fn with_attributes(mut self, pairs: &[String]) -> Result<Self, String> {
        for pair in pairs {
            let (name, column) = pair
                .split_once('=')
                .filter(|(n, c)| !n.is_empty() && !c.is_empty())
                .ok_or_else(|| format!("--attribute {pair:?}: expected NAME=COLUMN"))?;
            crate::model::event::check_attribute_key(name)
                .map_err(|m| format!("--attribute {pair:?}: {m}"))?;
            if self.attributes.iter().any(|(n, _)| n == name) {
                return Err(format!("--attribute: {name} is given twice"));
            }
            self.attributes.push((name.to_owned(), column.to_owned()));
        }
        Ok(self)
    }

    /// The source column or field of `field`.
    pub fn source<'a>(&'a self, field: &'a str) -> &'a str {
        self.sources.get(field).map_or(field, String::as_str)
    }
}

/// A row read from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    /// A valid input event: the Kafka key (`customer_id`) and the JSON value to produce.
    Event {
        /// `customer_id`.
        key: String,
        /// The event as JSON.
        value: Vec<u8>,
    },
    /// A row tierd would dead-letter (or one that is not a row at all), and why.
    Bad {
        /// The reason code: one of tierd's dead-letter reasons, or `invalid_csv`.
        reason: &'static str,
        /// What exactly is wrong.
        detail: String,
        /// The row as read (for the rejects file).
        raw: String,
    },
}

/// Checks an event's JSON against the input contract, as tierd would on ingestion at
/// `now_ms` (the message timestamp a producer sets now).
fn checked(key: Option<String>, value: Vec<u8>, now_ms: i64, limits: &DecodeLimits) -> Row {
    match decode(
        key.as_deref().map(str::as_bytes),
        Some(&value),
        now_ms,
        limits,
    ) {
        Ok(event) => Row::Event {
            key: event.customer_id,
            value,
        },
        Err(rejection) => Row::Bad {
            reason: rejection.reason.as_str(),
            detail: rejection.detail,
            raw: String::from_utf8_lossy(&value).into_owned(),
        },
    }
}

/// One line of a JSON Lines file (not blank) as an input event: mapped fields renamed to
/// the contract's names, every other field kept as it is.
pub fn jsonl_row(line: &[u8], mapping: &Mapping, now_ms: i64, limits: &DecodeLimits) -> Row {
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_slice(line) else {
        // Not an object: the decoder names what it is.
        return checked(None, line.to_vec(), now_ms, limits);
    };
    // Attribute fields move into `attributes` first: a field is read once, as an attribute
    // or as a contract field.
    for (name, source) in &mapping.attributes {
        let Some(v) = object.remove(source) else {
            continue;
        };
        let slot = object
            .entry("attributes")
            .or_insert(serde_json::Value::Null);
        if slot.is_null() {
            *slot = serde_json::Value::Object(serde_json::Map::new());
        }
        let problem = match slot.as_object_mut() {
            Some(map) if map.contains_key(name) => format!(
                "field `attributes`: attribute {name:?} is in the row's attributes and mapped from field {source:?} too: give it once"
            ),
            Some(map) => {
                map.insert(name.clone(), v);
                continue;
            }
            None => format!(
                "field `attributes`: must be an object to add field {source:?} to it as attribute {name:?}"
            ),
        };
        return Row::Bad {
            reason: Reason::InvalidAttributes.as_str(),
            detail: problem,
            raw: String::from_utf8_lossy(line).into_owned(),
        };
    }
    for field in FIELDS {
        let source = mapping.source(field);
        if source != field {
            if let Some(v) = object.remove(source) {
                object.insert(field.to_owned(), v);
            }
        }
    }
    let key = object
        .get("customer_id")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let value = serde_json::to_vec(&object).unwrap_or_default();
    checked(key, value, now_ms, limits)
}

/// Where each contract field is in a CSV file's records.
#[derive(Debug, Clone)]
pub struct CsvColumns {
    index: Vec<(&'static str, usize)>,
    /// Attribute name and column.
    attributes: Vec<(String, usize)>,
}

impl CsvColumns {
    /// Finds the mapped columns in `header`.
    ///
    /// # Errors
    /// A message naming a required column missing from the header (`event_id`,
    /// `customer_id`, `occurred_at`, and `amount` unless the file has a `type` column) and
    /// the `--map` flag that maps it.
    pub fn new(header: &csv::StringRecord, mapping: &Mapping) -> Result<Self, String> {
        let position = |field: &str| {
            header
                .iter()
                .position(|h| h.trim() == mapping.source(field))
        };
        let has_type = position("type").is_some();
        let mut index = Vec::new();
        for field in FIELDS {
            match position(field) {
                Some(i) => index.push((field, i)),
                None => {
                    let required = matches!(field, "event_id" | "customer_id" | "occurred_at")
                        || (field == "amount" && !has_type);
                    if required {
                        return Err(format!(
                            "no column {:?} (for `{field}`) in the header ({}): name the column with --map {field}=COLUMN",
                            mapping.source(field),
                            header.iter().collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
            }
        }
        let mut attributes = Vec::new();
        for (name, source) in &mapping.attributes {
            let i = header.iter().position(|h| h.trim() == source).ok_or_else(|| {
                format!(
                    "no column {source:?} (for attribute `{name}`) in the header ({}): name the column with --attribute {name}=COLUMN",
                    header.iter().collect::<Vec<_>>().join(", ")
                )
            })?;
            attributes.push((name.clone(), i));
        }
        Ok(Self { index, attributes })
    }

    /// One CSV record as an input event: each mapped column's text under its field's name
    /// (an empty cell is left out, as an absent field).
    pub fn row(&self, record: &csv::StringRecord, now_ms: i64, limits: &DecodeLimits) -> Row {
        let mut object = serde_json::Map::new();
        for (field, i) in &self.index {
            if let Some(cell) = record.get(*i).map(str::trim).filter(|c| !c.is_empty()) {
                object.insert((*field).to_owned(), cell.into());
            }
        }
        let mut attributes = serde_json::Map::new();
        for (name, i) in &self.attributes {
            if let Some(cell) = record.get(*i).map(str::trim).filter(|c| !c.is_empty()) {
                attributes.insert(name.clone(), cell.into());
            }
        }
        if !attributes.is_empty() {
            object.insert("attributes".into(), attributes.into());
        }
        let key = object
            .get("customer_id")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let value = serde_json::to_vec(&object).unwrap_or_default();
        checked(key, value, now_ms, limits)
    }
}

/// The rows of one file, in order.
pub enum Rows<R: BufRead> {
    /// JSON Lines.
    Jsonl {
        /// The file.
        reader: R,
        /// The line being read.
        line: Vec<u8>,
    },
    /// CSV, the header read.
    Csv {
        /// The file.
        reader: csv::Reader<R>,
        /// The mapped columns.
        columns: CsvColumns,
        /// The record being read.
        record: csv::ByteRecord,
        /// The delimiter (to write a rejected row back as it was).
        delimiter: u8,
    },
}

/// Separators fed to the prefix hash between a CSV record's fields and after each record (ASCII
/// unit and record separators), so that `a,bc` and `ab,c` hash differently.
const UNIT: &[u8] = &[0x1f];
const RECORD: &[u8] = &[0x1e];

impl<R: BufRead> Rows<R> {
    /// Starts reading `reader` as `format` (for CSV: reads the header and finds the columns).
    ///
    /// # Errors
    /// A message when the CSV header cannot be read or lacks a required column.
    pub fn new(
        reader: R,
        format: Format,
        mapping: &Mapping,
        delimiter: u8,
    ) -> Result<Self, String> {
        match format {
            Format::Jsonl => Ok(Self::Jsonl {
                reader,
                line: Vec::new(),
            }),
            Format::Csv => {
                let mut reader = csv::ReaderBuilder::new()
                    .delimiter(delimiter)
                    .flexible(true)
                    .from_reader(reader);
                let header = reader
                    .headers()
                    .map_err(|e| format!("the CSV header: {e}"))?
                    .clone();
                let columns = CsvColumns::new(&header, mapping)?;
                Ok(Self::Csv {
                    reader,
                    columns,
                    record: csv::ByteRecord::new(),
                    delimiter,
                })
            }
        }
    }

    /// The next row and its line number in the file (1-based), or `None` at the end. The row's
    /// bytes as read are fed to `prefix` (a resumed run checks that the rows it skips are the
    /// ones a checkpoint recorded).
    ///
    /// # Errors
    /// An I/O error reading the file (a malformed row is a [`Row::Bad`], not an error).
    pub fn next_row(
        &mut self,
        mapping: &Mapping,
        now_ms: i64,
        limits: &DecodeLimits,
        line_no: &mut u64,
        prefix: &mut xxhash_rust::xxh3::Xxh3Default,
    ) -> std::io::Result<Option<Row>> {
        match self {
            Self::Jsonl { reader, line } => loop {
                line.clear();
                if reader.read_until(b'\n', line)? == 0 {
                    return Ok(None);
                }
                *line_no += 1;
                let text = line.trim_ascii();
                if !text.is_empty() {
                    prefix.update(text);
                    prefix.update(RECORD);
                    return Ok(Some(match jsonl_row(text, mapping, now_ms, limits) {
                        Row::Bad { reason, detail, .. } => Row::Bad {
                            reason,
                            detail,
                            raw: String::from_utf8_lossy(text).into_owned(),
                        },
                        ok => ok,
                    }));
                }
            },
            Self::Csv {
                reader,
                columns,
                record,
                delimiter,
            } => match reader.read_byte_record(record) {
                Ok(false) => Ok(None),
                Ok(true) => {
                    *line_no = record.position().map_or(*line_no + 1, |p| p.line());
                    for field in record.iter() {
                        prefix.update(field);
                        prefix.update(UNIT);
                    }
                    prefix.update(RECORD);
                    let raw = || {
                        let mut w = csv::WriterBuilder::new()
                            .delimiter(*delimiter)
                            .terminator(csv::Terminator::Any(b'\n'))
                            .from_writer(Vec::new());
                        let _ = w.write_byte_record(record);
                        let bytes = w.into_inner().unwrap_or_default();
                        String::from_utf8_lossy(bytes.strip_suffix(b"\n").unwrap_or(&bytes))
                            .into_owned()
                    };
                    let fields = reader.byte_headers().map_or(0, csv::ByteRecord::len);
                    if record.len() != fields {
                        return Ok(Some(Row::Bad {
                            reason: "invalid_csv",
                            detail: format!("{} fields, the header has {fields}", record.len()),
                            raw: raw(),
                        }));
                    }
                    let text = match csv::StringRecord::from_byte_record(record.clone()) {
                        Ok(text) => text,
                        Err(e) => {
                            return Ok(Some(Row::Bad {
                                reason: "invalid_csv",
                                detail: format!("not UTF-8 (convert the file to UTF-8): {e}"),
                                raw: raw(),
                            }))
                        }
                    };
                    Ok(Some(match columns.row(&text, now_ms, limits) {
                        Row::Bad { reason, detail, .. } => Row::Bad {
                            reason,
                            detail,
                            raw: raw(),
                        },
                        ok => ok,
                    }))
                }
                Err(e) => match e.kind() {
                    csv::ErrorKind::Io(_) => Err(std::io::Error::other(e.to_string())),
                    _ => {
                        *line_no = e.position().map_or(*line_no + 1, csv::Position::line);
                        prefix.update(e.to_string().as_bytes());
                        prefix.update(RECORD);
                        Ok(Some(Row::Bad {
                            reason: "invalid_csv",
                            detail: e.to_string(),
                            raw: String::new(),
                        }))
                    }
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DecodeLimits {
        DecodeLimits {
            max_message_bytes: 65536,
            currency: "CNY".into(),
            fraction_digits: 2,
            max_amount_minor: 100_000_000_000,
            min_occurred_at_ms: 946_684_800_000,
            max_future_skew_ms: 86_400_000,
            tiers: vec!["vip".into()],
        }
    }
    const NOW: i64 = 1_780_000_000_000;

    fn all(text: &str, format: Format, mapping: &Mapping) -> Result<Vec<(u64, Row)>, String> {
        let mut rows = Rows::new(text.as_bytes(), format, mapping, b',')?;
        let mut out = Vec::new();
        let mut line = 0;
        let mut prefix = xxhash_rust::xxh3::Xxh3Default::new();
        while let Some(row) = rows
            .next_row(mapping, NOW, &limits(), &mut line, &mut prefix)
            .unwrap()
        {
            out.push((line, row));
        }
        Ok(out)
    }

    fn reason(row: &Row) -> &str {
        match row {
            Row::Event { .. } => "ok",
            Row::Bad { reason, .. } => reason,
        }
    }

    #[test]
    fn csv_columns_are_mapped_to_the_contract_and_bad_rows_carry_tierds_reasons() {
        let map = Mapping::parse(&[
            "event_id=order_no".into(),
            "customer_id=member".into(),
            "amount=total".into(),
            "occurred_at=paid_at".into(),
        ])
        .unwrap();
        let text = "order_no,member,total,paid_at,shop\n\
                    o1,m1,12.50,2024-03-01T10:00:00+08:00,north\n\
                    o2,m1,-3,2024-03-01T10:00:00+08:00,north\n\
                    o3,,5,2024-03-01T10:00:00+08:00,north\n\
                    o4,m2,5,yesterday,north\n\
                    o5,m2,5\n\
                    \"o6\",\"m3\",\"1,000.00\",2024-03-01T10:00:00Z,x\n";
        let rows = all(text, Format::Csv, &map).unwrap();
        let got: Vec<(u64, &str)> = rows.iter().map(|(l, r)| (*l, reason(r))).collect();
        assert_eq!(
            got,
            [
                (2, "ok"),
                (3, "negative_amount"),
                (4, "missing_field"),
                (5, "invalid_timestamp"),
                (6, "invalid_csv"),
                (7, "invalid_amount"),
            ]
        );
        // A rejected row is kept as it was in the file (quoted where it must be).
        let Row::Bad { raw, .. } = &rows[5].1 else {
            unreachable!()
        };
        assert_eq!(raw, "o6,m3,\"1,000.00\",2024-03-01T10:00:00Z,x");
        let Row::Bad { raw, .. } = &rows[1].1 else {
            unreachable!()
        };
        assert_eq!(raw, "o2,m1,-3,2024-03-01T10:00:00+08:00,north");
        let Row::Event { key, value } = &rows[0].1 else {
            unreachable!()
        };
        assert_eq!(key, "m1");
        let v: serde_json::Value = serde_json::from_slice(value).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event_id": "o1", "customer_id": "m1", "amount": "12.50",
                "occurred_at": "2024-03-01T10:00:00+08:00"})
        );
    }

    #[test]
    fn points_and_attribute_columns_become_the_events_points_and_attributes() {
        let map = Mapping::parse(&["points=miles".into()])
            .unwrap()
            .with_attributes(&["category=product_group".into(), "channel=channel".into()])
            .unwrap();
        let text = "event_id,customer_id,amount,occurred_at,miles,product_group,channel\n\
                    e1,c1,5,2024-03-01T10:00:00Z,1500,fuel,store\n\
                    e2,c1,5,2024-03-01T11:00:00Z,,,app\n\
                    e3,c1,5,2024-03-01T12:00:00Z,1.5,fuel,store\n";
        let rows = all(text, Format::Csv, &map).unwrap();
        let value = |i: usize| match &rows[i].1 {
            Row::Event { value, .. } => serde_json::from_slice::<serde_json::Value>(value).unwrap(),
            bad => panic!("{bad:?}"),
        };
        assert_eq!(value(0)["points"], "1500");
        assert_eq!(
            value(0)["attributes"],
            serde_json::json!({"category": "fuel", "channel": "store"})
        );
        // Empty cells are absent.
        assert_eq!(value(1).get("points"), None);
        assert_eq!(
            value(1)["attributes"],
            serde_json::json!({"channel": "app"})
        );
        assert_eq!(reason(&rows[2].1), "invalid_points");
        // JSON Lines: fields moved into `attributes`, next to any the row already has.
        let line = br#"{"event_id":"j1","customer_id":"c1","amount":"5","occurred_at":"2024-03-01T10:00:00Z","miles":20,"product_group":"gift_card","attributes":{"store":"s-12"}}"#;
        let Row::Event { value, .. } = jsonl_row(line, &map, NOW, &limits()) else {
            panic!("valid")
        };
        let v: serde_json::Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(v["points"], 20);
        assert_eq!(
            v["attributes"],
            serde_json::json!({"store": "s-12", "category": "gift_card"})
        );
        // An attribute given twice, or `attributes` that is no object: the row is rejected
        // (null counts as absent).
        for (row, want) in [
            (
                r#"{"event_id":"j2","customer_id":"c1","amount":"5","occurred_at":"2024-03-01T10:00:00Z","product_group":"x","attributes":{"category":"y"}}"#,
                "invalid_attributes",
            ),
            (
                r#"{"event_id":"j3","customer_id":"c1","amount":"5","occurred_at":"2024-03-01T10:00:00Z","product_group":"x","attributes":"y"}"#,
                "invalid_attributes",
            ),
            (
                r#"{"event_id":"j4","customer_id":"c1","amount":"5","occurred_at":"2024-03-01T10:00:00Z","product_group":"x","attributes":null}"#,
                "ok",
            ),
        ] {
            assert_eq!(
                reason(&jsonl_row(row.as_bytes(), &map, NOW, &limits())),
                want,
                "{row}"
            );
        }
        // A missing attribute column names its flag; bad flags are refused.
        let header = "event_id,customer_id,amount,occurred_at\n";
        let err = Rows::new(header.as_bytes(), Format::Csv, &map, b',')
            .err()
            .unwrap();
        assert!(err.contains("--attribute category=COLUMN"), "{err}");
        for bad in ["category", "=x", "sales channel=x"] {
            assert!(
                Mapping::default().with_attributes(&[bad.into()]).is_err(),
                "{bad}"
            );
        }
        let twice = Mapping::default().with_attributes(&["a=x".into(), "a=y".into()]);
        assert!(twice.unwrap_err().contains("given twice"));
    }

    #[test]
    fn a_csv_row_that_is_not_utf8_is_rejected_with_its_bytes_shown() {
        let mut text = b"event_id,customer_id,amount,occurred_at\n".to_vec();
        text.extend_from_slice(b"e1,\xc0\xeb,5,2024-03-01T10:00:00Z\n");
        text.extend_from_slice(b"e2,c2,5,2024-03-01T10:00:00Z\n");
        let map = Mapping::default();
        let mut rows = Rows::new(text.as_slice(), Format::Csv, &map, b',').unwrap();
        let (mut line, mut prefix) = (0, xxhash_rust::xxh3::Xxh3Default::new());
        let first = rows
            .next_row(&map, NOW, &limits(), &mut line, &mut prefix)
            .unwrap();
        let Some(Row::Bad {
            reason,
            detail,
            raw,
        }) = first
        else {
            panic!("{first:?}")
        };
        assert_eq!((reason, line), ("invalid_csv", 2));
        assert!(detail.contains("not UTF-8"), "{detail}");
        assert_eq!(raw, "e1,\u{fffd}\u{fffd},5,2024-03-01T10:00:00Z");
        let second = rows
            .next_row(&map, NOW, &limits(), &mut line, &mut prefix)
            .unwrap();
        assert!(matches!(second, Some(Row::Event { .. })), "{second:?}");
    }

    #[test]
    fn the_prefix_hash_tells_rows_apart_whatever_their_split() {
        let digest = |text: &str| {
            let map = Mapping::default();
            let mut rows = Rows::new(text.as_bytes(), Format::Csv, &map, b',').unwrap();
            let (mut line, mut prefix) = (0, xxhash_rust::xxh3::Xxh3Default::new());
            while rows
                .next_row(&map, NOW, &limits(), &mut line, &mut prefix)
                .unwrap()
                .is_some()
            {}
            prefix.digest()
        };
        let head = "event_id,customer_id,amount,occurred_at\n";
        let a = digest(&format!("{head}e1,c1,5,t\n"));
        assert_eq!(
            a,
            digest(&format!("{head}\"e1\",c1,5,t\r\n")),
            "the same fields"
        );
        assert_ne!(a, digest(&format!("{head}e1,c15,,t\n")));
        assert_ne!(a, digest(&format!("{head}e1,c1,6,t\n")));
    }

    #[test]
    fn a_csv_header_without_a_required_column_names_it_and_the_flag() {
        let err = all("id,who,amount,at\n", Format::Csv, &Mapping::default()).unwrap_err();
        assert!(
            err.contains("\"event_id\"") && err.contains("--map event_id=COLUMN"),
            "{err}"
        );
        // `amount` may be absent when a `type` column says what each row is.
        let map = Mapping::parse(&[
            "event_id=id".into(),
            "customer_id=who".into(),
            "occurred_at=at".into(),
        ])
        .unwrap();
        assert!(all("id,who,type,at\n", Format::Csv, &map).is_ok());
        let err = all("id,who,at\n", Format::Csv, &map).unwrap_err();
        assert!(err.contains("`amount`"), "{err}");
    }

    #[test]
    fn jsonl_fields_are_renamed_and_others_kept() {
        let map = Mapping::parse(&["customer_id=member".into()]).unwrap();
        let text = "{\"event_id\":\"e1\",\"member\":\"m1\",\"amount\":7,\"occurred_at\":\"2024-01-01T00:00:00Z\",\"shop\":\"s\"}\n\
                    \n\
                    [1,2]\n\
                    {\"event_id\":\"e2\",\"member\":\"m1\",\"amount\":7,\"occurred_at\":\"2024-01-01T00:00:00Z\",\"currency\":\"USD\"}\n\
                    {broken\n";
        let rows = all(text, Format::Jsonl, &map).unwrap();
        let got: Vec<(u64, &str)> = rows.iter().map(|(l, r)| (*l, reason(r))).collect();
        assert_eq!(
            got,
            [
                (1, "ok"),
                (3, "not_object"),
                (4, "unknown_currency"),
                (5, "invalid_json")
            ]
        );
        let Row::Event { value, .. } = &rows[0].1 else {
            unreachable!()
        };
        let v: serde_json::Value = serde_json::from_slice(value).unwrap();
        assert_eq!(v["customer_id"], "m1");
        assert_eq!(v["shop"], "s");
        assert!(v.get("member").is_none());
    }

    #[test]
    fn mappings_name_what_is_wrong() {
        assert!(Mapping::parse(&["nope".into()])
            .unwrap_err()
            .contains("FIELD=COLUMN"));
        assert!(Mapping::parse(&["customer=c".into()])
            .unwrap_err()
            .contains("not a field of the input contract"));
        assert!(Mapping::parse(&["amount=a".into(), "amount=b".into()])
            .unwrap_err()
            .contains("mapped twice"));
        assert_eq!(
            Format::of_path(Path::new("x/History.CSV.gz")),
            Some(Format::Csv)
        );
        assert_eq!(Format::of_path(Path::new("h.ndjson")), Some(Format::Jsonl));
        assert_eq!(Format::of_path(Path::new("h.txt")), None);
        assert!(is_gzip(Path::new("a.csv.gz")) && !is_gzip(Path::new("a.csv")));
    }
}
