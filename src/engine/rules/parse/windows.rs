//! `[windows.<name>]`: rolling windows (`length`, bucketed by day or month) and calendar
//! windows (`calendar = "month" | "quarter" | "year"`).

use super::file::WindowFile;
use super::{parse_length, parse_period, parse_unit, Parser};
use crate::engine::rules::filter::Filter;
use crate::engine::rules::window::{Span, Window};
use crate::model::calendar::Unit;
use crate::model::event::{check_attribute_key, check_attribute_value};
use std::collections::BTreeMap;
use std::ops::Range;
use toml::Spanned;

impl Parser<'_> {
    /// Parses every window.
    pub(super) fn windows(&mut self, raw: &BTreeMap<String, Spanned<WindowFile>>) {
        for (name, w) in raw {
            let field = format!("windows.{name}");
            let span = Some(w.span());
            let w = w.get_ref();
            let span_kind = match (&w.length, &w.calendar) {
                (Some(length), None) => parse_length(length).and_then(|(n, len_unit)| {
                    let bucket = w.bucket.as_deref().map_or(Ok(len_unit), parse_unit)?;
                    match (len_unit, bucket) {
                        (a, b) if a == b => Ok(Span::Rolling { unit: b, length: n }),
                        (Unit::Day, Unit::Month) if n % 30 == 0 => Err(format!(
                            "length {length:?} is given in days but bucket is month: write \"{} months\"",
                            n / 30
                        )),
                        (Unit::Day, Unit::Month) => Err(format!(
                            "the window ({length}) is shorter than or not a whole number of its bucket (month)"
                        )),
                        _ => Err(format!("length {length:?} in months needs bucket = \"month\"")),
                    }
                }),
                (None, Some(cal)) => {
                    if w.bucket.as_deref().is_some_and(|b| b != "month") {
                        Err("calendar windows are bucketed by month".into())
                    } else {
                        parse_period(cal).map(Span::Calendar)
                    }
                }
                _ => Err("give either `length` (rolling) or `calendar`".into()),
            };
            let filter = self.filter(span.clone(), &field, w);
            match span_kind {
                Ok(span_kind) => self.windows.push(Window {
                    name: name.clone(),
                    span: span_kind,
                    filter,
                    series: None,
                }),
                Err(m) => self.problem(span, field, m),
            }
        }
    }

    /// A window's `only` / `exclude` attribute filter (problems recorded at `field`).
    fn filter(&mut self, span: Option<Range<usize>>, field: &str, w: &WindowFile) -> Filter {
        let mut filter = Filter::default();
        for (key, raw, out) in [
            ("only", &w.only, &mut filter.only),
            ("exclude", &w.exclude, &mut filter.exclude),
        ] {
            let Some(map) = raw else { continue };
            if map.is_empty() {
                self.problem(
                    span.clone(),
                    format!("{field}.{key}"),
                    "lists no attribute: remove it, or list e.g. { category = [\"gift_card\"] }"
                        .into(),
                );
            }
            for (attr, values) in map {
                let at = format!("{field}.{key}.{attr}");
                if let Err(m) = check_attribute_key(attr) {
                    self.problem(span.clone(), at.clone(), m);
                }
                if values.is_empty() {
                    self.problem(
                        span.clone(),
                        at.clone(),
                        "lists no value: an attribute filter needs at least one".into(),
                    );
                }
                for v in values {
                    if let Err(m) = check_attribute_value(v) {
                        self.problem(span.clone(), at.clone(), m);
                    }
                }
                let mut values = values.clone();
                values.sort();
                values.dedup();
                out.push((attr.clone(), values));
            }
        }
        for (attr, _) in &filter.only {
            if filter.exclude.iter().any(|(a, _)| a == attr) {
                self.problem(
                    span.clone(),
                    format!("{field}.exclude.{attr}"),
                    format!("{attr:?} is also in `only`: values `only` does not list are left out already"),
                );
            }
        }
        filter
    }
}
