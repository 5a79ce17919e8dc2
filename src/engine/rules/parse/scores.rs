//! `[scores.<name>]`: a digit 1-9 per customer, from fixed bins over a metric
//! (`min`/`above`/`max`/`below`) or from bands of a rank (`top = "p%"`); and `cell`, the
//! order in which the score digits form a customer's cell (e.g. R, F, M → "545").

use super::file::{BinFile, ScoreFile};
use super::{toml_literal, Parser};
use crate::engine::rules::operand::Operand;
use crate::engine::rules::rank::Rank;
use crate::engine::rules::score::{Bin, Bound, Score};
use crate::engine::rules::value::Ratio;
use crate::engine::rules::ScoreDef;
use std::collections::BTreeMap;
use std::ops::Range;
use toml::Spanned;

impl Parser<'_> {
    /// Parses every score.
    pub(super) fn scores(&mut self, raw: &BTreeMap<String, Spanned<ScoreFile>>) {
        for (name, s) in raw {
            let field = format!("scores.{name}");
            let span = s.span();
            let s = s.get_ref();
            match (&s.metric, &s.rank) {
                (Some(metric), None) => match self.resolve(metric) {
                    Ok(m) => self.fixed_score(name, &field, span, s, m),
                    Err(m) => self.problem(Some(span), format!("{field}.metric"), m),
                },
                (None, Some(rank)) => self.rank_score(&field, span, s, rank),
                _ => self.problem(
                    Some(span),
                    field,
                    "give either `metric` (fixed bins) or `rank` (rank bands)".into(),
                ),
            }
        }
    }

    /// A score by rank bands: `top` on every bin but the last, bands growing down the bins.
    fn rank_score(&mut self, field: &str, span: Range<usize>, s: &ScoreFile, rank: &str) {
        let Some(r) = self.rank_names.iter().position(|n| n == rank) else {
            self.problem(
                Some(span),
                format!("{field}.rank"),
                format!("unknown rank {rank:?}: declare it under [ranks.{rank}]"),
            );
            return;
        };
        if self
            .ranks
            .get(r)
            .is_some_and(|x: &Rank| x.metric == Operand::Product)
        {
            self.problem(
                Some(span),
                format!("{field}.rank"),
                "a score cannot band a rank of `product` (the product is made of scores)".into(),
            );
            return;
        }
        let last = s.bins.len().saturating_sub(1);
        let mut bins = Vec::new();
        let mut prev: Option<Ratio> = None;
        for (i, b) in s.bins.iter().enumerate() {
            let bspan = Some(b.span());
            let b = b.get_ref();
            let f = format!("{field}.bins[{i}]");
            if b.min.is_some() || b.above.is_some() || b.max.is_some() || b.below.is_some() {
                self.problem(
                    bspan.clone(),
                    f.clone(),
                    "rank scores give `top = \"p%\"` bands, not min/above/max/below".into(),
                );
            }
            if !(1..=9).contains(&b.score) {
                self.problem(
                    bspan.clone(),
                    f.clone(),
                    "scores are single digits 1-9".into(),
                );
            }
            match (&b.top, i == last) {
                (Some(_), true) => self.problem(
                    bspan,
                    f,
                    "the last bin takes everyone below the other bands: remove `top`".into(),
                ),
                (None, false) => self.problem(
                    bspan,
                    f,
                    "`top` is required on every bin but the last".into(),
                ),
                (None, true) => bins.push((b.score, None)),
                (Some(top), false) => match self.cut_point(r, top) {
                    Ok(point) => {
                        let pct = self.cut_points.borrow()[point].pct;
                        if prev.is_some_and(|p| pct <= p) {
                            self.problem(bspan, f, "bands must grow down the bins (20%, 40%, …): this one is unreachable".into());
                        }
                        prev = Some(pct);
                        bins.push((b.score, Some(point)));
                    }
                    Err(m) => self.problem(bspan, format!("{f}.top"), m),
                },
            }
        }
        self.intern(Operand::Rank(r));
        self.scores.push(ScoreDef::Ranked { rank: r, bins });
    }

    /// A score by fixed bins over `metric`: at most one bound per bin.
    fn fixed_score(
        &mut self,
        name: &str,
        field: &str,
        span: Range<usize>,
        s: &ScoreFile,
        metric: Operand,
    ) {
        let mut bins = Vec::new();
        let mut ok = true;
        for (i, b) in s.bins.iter().enumerate() {
            match self.bound(field, i, b, metric) {
                Ok(bound) => bins.push(Bin {
                    score: b.get_ref().score,
                    bound,
                }),
                Err(()) => ok = false,
            }
        }
        if !ok {
            return;
        }
        if s.bins.iter().any(|b| b.get_ref().top.is_some()) {
            self.problem(
                Some(span),
                format!("{field}.bins"),
                "`top` bands need `rank = …` instead of `metric`".into(),
            );
            return;
        }
        match Score::new(name.to_owned(), metric, bins) {
            Ok(score) => {
                self.intern(metric);
                self.scores.push(ScoreDef::Fixed(score));
            }
            Err((bin, m)) => {
                let (span, f) = match bin {
                    Some(i) => (s.bins[i].span(), format!("{field}.bins[{i}]")),
                    None => (span, field.to_owned()),
                };
                self.problem(Some(span), f, m);
            }
        }
    }

    /// The bound of fixed bin `i` (`None`: the catch-all bin); `Err` after recording why not.
    fn bound(
        &mut self,
        field: &str,
        i: usize,
        b: &Spanned<BinFile>,
        metric: Operand,
    ) -> Result<Option<Bound>, ()> {
        let bspan = b.span();
        let b = b.get_ref();
        let bounds: Vec<(&str, &toml::Value)> = [
            ("min", &b.min),
            ("above", &b.above),
            ("max", &b.max),
            ("below", &b.below),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        .collect();
        match bounds.as_slice() {
            [] => Ok(None),
            [(k, v)] => match toml_literal(v).and_then(|t| self.literal(metric.kind(), &t)) {
                Ok(x) => Ok(Some(match *k {
                    "min" => Bound::Min(x),
                    "above" => Bound::Above(x),
                    "max" => Bound::Max(x),
                    _ => Bound::Below(x),
                })),
                Err(m) => {
                    self.problem(Some(bspan), format!("{field}.bins[{i}].{k}"), m);
                    Err(())
                }
            },
            _ => {
                self.problem(
                    Some(bspan),
                    format!("{field}.bins[{i}]"),
                    "give at most one of min, above, max, below".into(),
                );
                Err(())
            }
        }
    }

    /// The cell's digit order: the declared score names, or every score in name order.
    pub(super) fn cell(&mut self, raw: Option<&Spanned<Vec<String>>>) {
        self.cell = match raw {
            None => (0..self.score_names.len()).collect(),
            Some(c) => {
                let mut idx = Vec::new();
                for n in c.get_ref() {
                    match self.score_names.iter().position(|s| s == n) {
                        Some(i) => idx.push(i),
                        None => self.problem(
                            Some(c.span()),
                            "cell".into(),
                            format!("unknown score {n:?}"),
                        ),
                    }
                }
                idx
            }
        };
    }
}
