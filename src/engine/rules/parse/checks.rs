//! Checks across the parsed parts: tiers no customer can reach (contradictory conditions, or
//! conditions implied by an earlier tier's), `cell`/`product` over several scores without a
//! declared digit order, and windows nothing reads (they would only cost memory).

use super::file::RulesFile;
use super::Parser;
use crate::engine::rules::condition::{self, Clause, Condition};
use crate::engine::rules::operand::Operand;
use crate::engine::rules::value::Ratio;

impl Parser<'_> {
    /// Runs every cross-check.
    pub(super) fn checks(&mut self, raw: &RulesFile) {
        self.reachability(raw);
        if raw.cell.is_none()
            && self.score_names.len() > 1
            && self
                .operands
                .iter()
                .any(|o| matches!(o, Operand::Cell | Operand::Product))
        {
            self.problem(
                None,
                "cell".into(),
                format!(
                    "`cell` or `product` is used with {} scores: declare their digit order, e.g. cell = [\"R\", \"F\", \"M\"]",
                    self.score_names.len()
                ),
            );
        }
        for wi in 0..self.windows.len() {
            if !self
                .operands
                .iter()
                .any(|o| matches!(o, Operand::Window(i, _) if *i == wi))
            {
                let name = self.windows[wi].name.clone();
                self.problem(
                    Some(raw.windows[&name].span()),
                    format!("windows.{name}"),
                    "not used by any score or tier: remove it (windows cost memory per customer)"
                        .into(),
                );
            }
        }
    }

    /// A tier whose conditions contradict each other, or imply an earlier tier's, can never
    /// be reached. Groups are judged conservatively: a later tier's groups are not used to
    /// prove it unreachable (only its single comparisons and identical groups are), and an
    /// earlier tier's `any` group is implied when one of its members is.
    fn reachability(&mut self, raw: &RulesFile) {
        let mut found = Vec::new();
        for j in 0..self.tiers.len().saturating_sub(1) {
            let tj = &self.tiers[j];
            let singles: Vec<Condition> =
                tj.when.iter().filter_map(Clause::single).cloned().collect();
            if singles
                .iter()
                .any(|c| Interval::of(&singles, c.operand()).empty())
            {
                found.push((
                    j,
                    "the conditions contradict each other: the tier is unreachable".to_owned(),
                ));
                continue;
            }
            for (i, ti) in self.tiers.iter().enumerate().take(j) {
                let implied = !ti.when.is_empty()
                    && ti.when.iter().all(|c| self.implied(c, &tj.when, &singles));
                if implied {
                    found.push((j, format!("every customer it takes is taken first by tiers[{i}] ({:?}): the tier is unreachable (order tiers best first, with stricter bounds first)", ti.def.name)));
                    break;
                }
            }
        }
        for (j, message) in found {
            self.problem(
                Some(raw.tiers[j].span()),
                format!("tiers[{j}].when"),
                message,
            );
        }
    }

    /// Whether every customer meeting a tier's conditions (`when`, with its single comparisons
    /// `singles`) meets `c`.
    fn implied(&self, c: &Clause, when: &[Clause], singles: &[Condition]) -> bool {
        if when.contains(c) {
            return true;
        }
        match c {
            Clause::Any(members) => members.iter().any(|m| self.implied(m, when, singles)),
            Clause::All(members) => members.iter().all(|m| self.implied(m, when, singles)),
            Clause::One(c) => match c {
                Condition::CellIn { .. } => singles.contains(c),
                Condition::InTop {
                    rank,
                    point,
                    negate: false,
                } => {
                    let points = self.cut_points.borrow();
                    singles.iter().any(|d| matches!(d, Condition::InTop { rank: r2, point: q, negate: false } if r2 == rank && points[*q].pct <= points[*point].pct))
                }
                Condition::InTop { .. } => singles.contains(c),
                Condition::Compare { operand, .. } => Interval::of(singles, *operand).implies(c),
            },
        }
    }
}

/// Interval view of a conjunction of numeric conditions, for reachability checks.
#[derive(Debug, Clone, Copy, Default)]
struct Interval {
    lo: Option<(Ratio, bool)>,
    hi: Option<(Ratio, bool)>,
}

impl Interval {
    fn of(conds: &[Condition], op: Operand) -> Self {
        let mut iv = Self::default();
        for c in conds {
            if let Condition::Compare {
                operand,
                cmp,
                value,
            } = c
            {
                if *operand != op {
                    continue;
                }
                use condition::Cmp::*;
                let (lo, hi) = match cmp {
                    Ge => (Some((*value, false)), None),
                    Gt => (Some((*value, true)), None),
                    Le => (None, Some((*value, false))),
                    Lt => (None, Some((*value, true))),
                    Eq => (Some((*value, false)), Some((*value, false))),
                    Ne => (None, None),
                };
                if let Some(l) = lo {
                    iv.lo = Some(
                        iv.lo
                            .map_or(l, |c| if (l.0, l.1) > (c.0, c.1) { l } else { c }),
                    );
                }
                if let Some(h) = hi {
                    iv.hi = Some(iv.hi.map_or(h, |c| {
                        if h.0 < c.0 || (h.0 == c.0 && h.1) {
                            h
                        } else {
                            c
                        }
                    }));
                }
            }
        }
        iv
    }

    fn empty(self) -> bool {
        matches!((self.lo, self.hi), (Some((l, ls)), Some((h, hs))) if l > h || (l == h && (ls || hs)))
    }

    /// Whether every value in the interval satisfies `c`.
    fn implies(self, c: &Condition) -> bool {
        let Condition::Compare { cmp, value, .. } = c else {
            return false;
        };
        use condition::Cmp::*;
        match cmp {
            Ge => self.lo.is_some_and(|(l, _)| l >= *value),
            Gt => self
                .lo
                .is_some_and(|(l, s)| l > *value || (l == *value && s)),
            Le => self.hi.is_some_and(|(h, _)| h <= *value),
            Lt => self
                .hi
                .is_some_and(|(h, s)| h < *value || (h == *value && s)),
            Eq | Ne => false,
        }
    }
}
