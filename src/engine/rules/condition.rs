//! Tier conditions: `"<metric> <op> <value>"`, e.g. `"window.m12.sum >= 1000000"`,
//! `"score.R >= 4"`, `"cell in 55?, 54?, 45?"`.

use super::operand::{Operand, Type};
use super::value::{Ratio, Value};

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `>=`
    Ge,
    /// `>`
    Gt,
    /// `<=`
    Le,
    /// `<`
    Lt,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Cmp {
    fn symbol(self) -> &'static str {
        match self {
            Self::Ge => ">=",
            Self::Gt => ">",
            Self::Le => "<=",
            Self::Lt => "<",
            Self::Eq => "==",
            Self::Ne => "!=",
        }
    }
}

/// A cell pattern: one entry per digit, `None` for `?`.
pub type Pattern = Vec<Option<u8>>;

/// One condition of a tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// A numeric comparison.
    Compare {
        /// The metric.
        operand: Operand,
        /// The operator.
        cmp: Cmp,
        /// The value compared with, exact.
        value: Ratio,
    },
    /// The customer is (or, negated, is not) in the top band of a rank: their rank value is
    /// at least the cut-off of the cut point.
    InTop {
        /// The rank.
        rank: usize,
        /// Index of the cut point in the rules.
        point: usize,
        /// `>`: not in the band.
        negate: bool,
    },
    /// The cell matches (or, negated, matches none of) the patterns.
    CellIn {
        /// Patterns, e.g. `5??`.
        patterns: Vec<Pattern>,
        /// `not in` / `!=`.
        negate: bool,
    },
}

impl Condition {
    /// Parses a condition. `operand` resolves a metric name; `literal` reads a number for a type.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(
        text: &str,
        operand: &dyn Fn(&str) -> Result<Operand, String>,
        literal: &dyn Fn(Type, &str) -> Result<Ratio, String>,
        cut_point: &dyn Fn(usize, &str) -> Result<usize, String>,
        cell_len: usize,
    ) -> Result<Self, String> {
        let mut tokens = text.split_whitespace();
        let (Some(name), Some(op)) = (tokens.next(), tokens.next()) else {
            return Err(format!("{text:?} is not `<metric> <op> <value>`"));
        };
        let (op, rest): (&str, Vec<&str>) = if op == "not" && tokens.clone().next() == Some("in") {
            tokens.next();
            ("not in", tokens.collect())
        } else {
            (op, tokens.collect())
        };
        if rest.is_empty() {
            return Err(format!("{text:?}: no value after {op:?}"));
        }
        let operand = operand(name)?;
        if let Operand::Rank(rank) = operand {
            let negate = match op {
                "<=" => false,
                ">" => true,
                _ => {
                    return Err(format!(
                        "{text:?}: a rank is compared with `<=` (in the top p%) or `>` (not in it)"
                    ))
                }
            };
            if rest.len() != 1 {
                return Err(format!("{text:?}: expected one percentage after {op:?}"));
            }
            let point = cut_point(rank, rest[0]).map_err(|e| format!("{text:?}: {e}"))?;
            return Ok(Self::InTop {
                rank,
                point,
                negate,
            });
        }
        if operand.kind() == Type::Time {
            return Err(format!("{text:?}: {name} is a moment; rank it (e.g. recency quintiles) or compare recency_days"));
        }
        if operand.kind() == Type::Cell {
            let negate = match op {
                "in" | "==" => false,
                "not in" | "!=" => true,
                _ => {
                    return Err(format!(
                        "{text:?}: a cell is compared with `in`, `not in`, `==` or `!=`"
                    ))
                }
            };
            let patterns = rest
                .join(" ")
                .split([',', ' ', '[', ']', '"', '\''])
                .filter(|p| !p.is_empty())
                .map(|p| {
                    if p.chars().count() != cell_len {
                        return Err(format!(
                            "{text:?}: pattern {p:?} has {} characters, the cell has {cell_len}",
                            p.chars().count()
                        ));
                    }
                    p.chars()
                        .map(|c| match c {
                            '?' => Ok(None),
                            '1'..='9' => Ok(Some(c as u8 - b'0')),
                            _ => Err(format!(
                                "{text:?}: pattern {p:?} may hold digits 1-9 and `?` only"
                            )),
                        })
                        .collect()
                })
                .collect::<Result<Vec<Pattern>, String>>()?;
            return Ok(Self::CellIn { patterns, negate });
        }
        let cmp = match op {
            ">=" => Cmp::Ge,
            ">" => Cmp::Gt,
            "<=" => Cmp::Le,
            "<" => Cmp::Lt,
            "==" => Cmp::Eq,
            "!=" => Cmp::Ne,
            _ => {
                return Err(format!(
                    "{text:?}: unknown operator {op:?} (>=, >, <=, <, ==, !=)"
                ))
            }
        };
        if rest.len() != 1 {
            return Err(format!("{text:?}: expected one value after {op:?}"));
        }
        let value = literal(operand.kind(), rest[0]).map_err(|e| format!("{text:?}: {e}"))?;
        Ok(Self::Compare {
            operand,
            cmp,
            value,
        })
    }

    /// Whether the condition holds for the metric value (undefined: false); a rank condition
    /// compares the rank value with the cut-off in force.
    pub fn holds(&self, v: &Value, in_top: &[bool]) -> bool {
        match (self, v) {
            (Self::InTop { point, negate, .. }, _) => {
                in_top.get(*point).copied().unwrap_or(false) != *negate
            }
            (Self::Compare { cmp, value, .. }, Value::Num(x)) => match cmp {
                Cmp::Ge => x >= value,
                Cmp::Gt => x > value,
                Cmp::Le => x <= value,
                Cmp::Lt => x < value,
                Cmp::Eq => x == value || x.cmp(value).is_eq(),
                Cmp::Ne => !x.cmp(value).is_eq(),
            },
            (Self::CellIn { patterns, negate }, Value::Text(cell)) => {
                let digits: Vec<u8> = cell.bytes().map(|b| b - b'0').collect();
                let any = patterns.iter().any(|p| {
                    p.len() == digits.len()
                        && p.iter()
                            .zip(&digits)
                            .all(|(want, got)| want.is_none_or(|w| w == *got))
                });
                any != *negate
            }
            _ => false,
        }
    }

    /// The metric the condition reads.
    pub fn operand(&self) -> Operand {
        match self {
            Self::Compare { operand, .. } => *operand,
            Self::CellIn { .. } => Operand::Cell,
            Self::InTop { rank, .. } => Operand::Rank(*rank),
        }
    }

    /// As a rule description, with values shown by `show`.
    pub fn describe(&self, name: &str, show: &dyn Fn(Ratio) -> String) -> String {
        match self {
            Self::Compare { cmp, value, .. } => format!("{name} {} {}", cmp.symbol(), show(*value)),
            Self::InTop { negate, point, .. } => {
                format!(
                    "{name} {} cut point {point}",
                    if *negate { ">" } else { "<=" }
                )
            }
            Self::CellIn { patterns, negate } => {
                let ps: Vec<String> = patterns
                    .iter()
                    .map(|p| {
                        p.iter()
                            .map(|d| d.map_or('?', |d| char::from(b'0' + d)))
                            .collect()
                    })
                    .collect();
                format!(
                    "{name} {} {}",
                    if *negate { "not in" } else { "in" },
                    ps.join(",")
                )
            }
        }
    }

    /// For integer metrics: the whole values at which the condition's truth flips.
    pub fn flip_points(&self) -> Vec<i128> {
        let Self::Compare { cmp, value, .. } = self else {
            return Vec::new();
        };
        let ceil = value.floor() + i128::from(value.n.rem_euclid(value.d) != 0);
        match cmp {
            Cmp::Ge | Cmp::Lt => vec![ceil],
            Cmp::Gt | Cmp::Le => vec![value.floor() + 1],
            Cmp::Eq | Cmp::Ne => vec![ceil, value.floor() + 1],
        }
    }
}

/// An entry (`when`) or hysteresis (`stay`) condition as written: one comparison, or a group
/// (`{ any = [...] }`: at least one holds; `{ all = [...] }`: every one holds). A tier's list
/// is itself an `all` group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clause {
    /// One comparison.
    One(Condition),
    /// Holds when at least one member holds ("miles OR segments").
    Any(Vec<Clause>),
    /// Holds when every member holds (inside an `any`: "50,000 miles AND 30 segments").
    All(Vec<Clause>),
}

impl Clause {
    /// Whether the clause holds, reading each comparison's metric with `value`.
    pub fn holds<'v, F: Fn(Operand) -> &'v Value>(&self, value: &F, in_top: &[bool]) -> bool {
        match self {
            Self::One(c) => c.holds(value(c.operand()), in_top),
            Self::Any(members) => members.iter().any(|m| m.holds(value, in_top)),
            Self::All(members) => members.iter().all(|m| m.holds(value, in_top)),
        }
    }

    /// Every comparison in the clause, depth first.
    pub fn leaves(&self) -> Vec<&Condition> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a Condition>) {
        match self {
            Self::One(c) => out.push(c),
            Self::Any(members) | Self::All(members) => {
                for m in members {
                    m.collect(out);
                }
            }
        }
    }

    /// The comparison, when the clause is a single one.
    pub fn single(&self) -> Option<&Condition> {
        match self {
            Self::One(c) => Some(c),
            Self::Any(_) | Self::All(_) => None,
        }
    }

    /// As a rule description: comparisons by `one`, groups as `(a or b)` / `(a and b)`.
    pub fn describe(&self, one: &dyn Fn(&Condition) -> String) -> String {
        match self {
            Self::One(c) => one(c),
            Self::Any(members) | Self::All(members) => {
                let join = if matches!(self, Self::Any(_)) {
                    " or "
                } else {
                    " and "
                };
                let parts: Vec<String> = members.iter().map(|m| m.describe(one)).collect();
                format!("({})", parts.join(join))
            }
        }
    }
}
