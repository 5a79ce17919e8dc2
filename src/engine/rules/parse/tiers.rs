//! `[policy]` defaults and `[[tiers]]`, best first: each tier's entry conditions (`when`),
//! hysteresis (`stay`), and its downgrade policy (review, grace, minimum stay, step / replace /
//! base), with the rule text shown on change events.

use super::file::{ClauseFile, PolicyFile, TierFile};
use super::Parser;
use crate::engine::rules::condition::{Clause, Condition};
use crate::engine::rules::operand::Operand;
use crate::engine::rules::policy::{Downgrade, Review, TierPolicy};
use crate::engine::rules::{describe, Tier, TierDef};
use crate::model::calendar::DAY_MS;
use std::collections::HashSet;
use std::ops::Range;
use toml::Spanned;

/// How deep condition groups may nest (`any` in `all` in `any` …): deeper is refused.
const MAX_GROUP_DEPTH: usize = 4;

impl Parser<'_> {
    /// Parses every tier, with `defaults` from `[policy]` (at `default_span`).
    pub(super) fn tiers(
        &mut self,
        raw: &[Spanned<TierFile>],
        defaults: &PolicyFile,
        default_span: Option<Range<usize>>,
    ) {
        let default_review = match defaults.review.as_deref().map(Review::parse).transpose() {
            Ok(r) => r.unwrap_or(Review::Continuous),
            Err(m) => {
                self.problem(default_span, "policy.review".into(), m);
                Review::Continuous
            }
        };
        if raw.is_empty() {
            self.problem(None, "tiers".into(), "at least one tier is required".into());
        }
        let mut seen = HashSet::new();
        let last = raw.len().saturating_sub(1);
        for (i, t) in raw.iter().enumerate() {
            let span = t.span();
            let t = t.get_ref();
            let field = format!("tiers[{i}]");
            if t.name.is_empty()
                || t.name.chars().count() > 64
                || t.name.chars().any(char::is_whitespace)
            {
                self.problem(
                    Some(span.clone()),
                    format!("{field}.name"),
                    "must be 1-64 characters without spaces".into(),
                );
            }
            if !seen.insert(t.name.clone()) {
                self.problem(
                    Some(span.clone()),
                    format!("{field}.name"),
                    format!("duplicate tier {:?}", t.name),
                );
            }
            let when = match (&t.when, i == last) {
                (Some(_), true) => {
                    self.problem(Some(span.clone()), format!("{field}.when"), "the last tier takes every customer the others do not: remove `when`, or add a tier after it".into());
                    Vec::new()
                }
                (None, false) => {
                    self.problem(Some(span.clone()), format!("{field}.when"), "required on every tier but the last (without it, every later tier is unreachable)".into());
                    Vec::new()
                }
                (Some(list), false) if list.is_empty() => {
                    self.problem(
                        Some(span.clone()),
                        format!("{field}.when"),
                        "must hold at least one condition".into(),
                    );
                    Vec::new()
                }
                (Some(list), false) => self.conditions(&field, "when", list),
                (None, true) => Vec::new(),
            };
            let stay = t
                .stay
                .as_deref()
                .map(|l| self.conditions(&field, "stay", l))
                .unwrap_or_default();
            let review = match t.review.as_deref().map(Review::parse).transpose() {
                Ok(r) => r.unwrap_or(default_review),
                Err(m) => {
                    self.problem(Some(span.clone()), format!("{field}.review"), m);
                    default_review
                }
            };
            let downgrade = t
                .downgrade
                .or(defaults.downgrade)
                .unwrap_or(Downgrade::Replace);
            let grace_days = t.grace_days.or(defaults.grace_days).unwrap_or(0);
            let min_stay_days = t.min_stay_days.or(defaults.min_stay_days).unwrap_or(0);
            if downgrade == Downgrade::Step
                && review == Review::Continuous
                && min_stay_days == 0
                && grace_days == 0
                && i < last
            {
                self.problem(Some(span.clone()), format!("{field}.downgrade"), "\"step\" needs a review, grace_days or min_stay_days to pace the steps (otherwise it is \"replace\")".into());
            }
            let mut text = format!("downgrade={}", downgrade.as_str());
            if review != Review::Continuous {
                text.push_str(&format!(" review={}", review.describe()));
            }
            if grace_days > 0 {
                text.push_str(&format!(" grace={grace_days}d"));
            }
            if min_stay_days > 0 {
                text.push_str(&format!(" min_stay={min_stay_days}d"));
            }
            if !stay.is_empty() {
                text.push_str(" stay=hysteresis");
            }
            let rule = self.rule_text(i, &t.name, &when);
            self.tiers.push(Tier {
                def: TierDef {
                    name: t.name.clone(),
                    display_name: t.display_name.clone(),
                },
                when,
                rule,
                policy: TierPolicy {
                    downgrade,
                    grace_ms: i64::from(grace_days) * DAY_MS,
                    min_stay_ms: i64::from(min_stay_days) * DAY_MS,
                    review,
                    stay,
                    upgrade_restarts_review: t
                        .upgrade_restarts_review
                        .or(defaults.upgrade_restarts_review)
                        .unwrap_or(true),
                    text,
                },
            });
        }
    }

    /// Parses the conditions `list` of `<field>.<key>`.
    fn conditions(&mut self, field: &str, key: &str, list: &[Spanned<ClauseFile>]) -> Vec<Clause> {
        list.iter()
            .enumerate()
            .filter_map(|(j, c)| self.clause(&format!("{field}.{key}[{j}]"), c, 0))
            .collect()
    }

    /// Parses one entry of a condition list (`field` names it), a group's members under
    /// `field.any[k]` / `field.all[k]`.
    fn clause(&mut self, field: &str, c: &Spanned<ClauseFile>, depth: usize) -> Option<Clause> {
        let cspan = Some(c.span());
        let (key, members) = match c.get_ref() {
            ClauseFile::Text(text) => return self.comparison(field, cspan, text),
            ClauseFile::Any(members) => ("any", members),
            ClauseFile::All(members) => ("all", members),
        };
        if depth >= MAX_GROUP_DEPTH {
            self.problem(
                cspan,
                field.to_owned(),
                format!("condition groups nest at most {MAX_GROUP_DEPTH} deep"),
            );
            return None;
        }
        if members.is_empty() {
            self.problem(
                cspan,
                format!("{field}.{key}"),
                "a group needs at least one condition".into(),
            );
            return None;
        }
        let parsed: Vec<Option<Clause>> = members
            .iter()
            .enumerate()
            .map(|(k, m)| self.clause(&format!("{field}.{key}[{k}]"), m, depth + 1))
            .collect();
        let parsed: Vec<Clause> = parsed.into_iter().collect::<Option<_>>()?;
        Some(if key == "any" {
            Clause::Any(parsed)
        } else {
            Clause::All(parsed)
        })
    }

    /// Parses one comparison `text` at `field`.
    fn comparison(
        &mut self,
        field: &str,
        cspan: Option<Range<usize>>,
        text: &str,
    ) -> Option<Clause> {
        let parsed = Condition::parse(
            text,
            &|name| self.resolve(name),
            &|kind, text| self.literal(kind, text),
            &|rank, text| self.cut_point(rank, text),
            self.cell.len(),
        );
        match parsed {
            Ok(cond) => {
                if cond.operand() == Operand::Cell && self.cell.is_empty() {
                    self.problem(
                        cspan,
                        field.to_owned(),
                        "`cell` needs declared scores".into(),
                    );
                }
                self.intern(cond.operand());
                Some(Clause::One(cond))
            }
            Err(m) => {
                self.problem(cspan, field.to_owned(), m);
                None
            }
        }
    }

    /// The rule text of tier `i` shown on change events: its conditions, or "otherwise".
    fn rule_text(&self, i: usize, name: &str, when: &[Clause]) -> String {
        if when.is_empty() {
            return format!("tiers[{i}] {name}: otherwise");
        }
        let cut_points = self.cut_points.borrow();
        let one = |c: &Condition| {
            describe(
                c,
                &self.windows,
                &self.score_names,
                &self.rank_names,
                &cut_points,
                self.fraction_digits,
            )
        };
        let parts: Vec<String> = when.iter().map(|c| c.describe(&one)).collect();
        format!("tiers[{i}] {name}: {}", parts.join(" and "))
    }
}
