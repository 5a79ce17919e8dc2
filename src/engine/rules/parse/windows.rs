//! `[windows.<name>]`: rolling windows (`length`, bucketed by day or month) and calendar
//! windows (`calendar = "month" | "quarter" | "year"`).

use super::file::WindowFile;
use super::{parse_length, parse_period, parse_unit, Parser};
use crate::engine::rules::window::{Span, Window};
use crate::model::calendar::Unit;
use std::collections::BTreeMap;
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
            match span_kind {
                Ok(span_kind) => self.windows.push(Window {
                    name: name.clone(),
                    span: span_kind,
                }),
                Err(m) => self.problem(span, field, m),
            }
        }
    }
}
