//! `[ranks.<name>]`: a metric every customer is ordered by across all partitions (for
//! "top p%" conditions and rank scores), with its tie rule.

use super::file::RankFile;
use super::Parser;
use crate::engine::rules::operand::Operand;
use crate::engine::rules::rank::Rank;
use std::collections::BTreeMap;
use toml::Spanned;

impl Parser<'_> {
    /// Parses every rank.
    pub(super) fn ranks(&mut self, raw: &BTreeMap<String, Spanned<RankFile>>) {
        for (name, r) in raw {
            let field = format!("ranks.{name}.metric");
            match self.resolve(&r.get_ref().metric) {
                Ok(Operand::Rank(_) | Operand::Score(_) | Operand::Cell) => self.problem(
                    Some(r.span()),
                    field,
                    "a rank orders a metric (count, sum, a window metric, last_purchase, product …), not a score, cell or rank".into(),
                ),
                Ok(m) => {
                    self.intern(m);
                    self.ranks.push(Rank {
                        name: name.clone(),
                        metric: m,
                        ties: r.get_ref().ties.unwrap_or_default(),
                    });
                }
                Err(m) => self.problem(Some(r.span()), field, m),
            }
        }
    }
}
