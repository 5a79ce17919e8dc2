//! The engine: the tier rules and the pure state transition, with no I/O and no clock
//! (engine time is an argument). Depends on [`crate::model`] only.
//!
//! - [`rules`]: the rules file parsed and validated into windows, ranks, scores and tiers;
//!   [`rules::Rules::evaluate`] turns a customer's facts into metric values, scores and a
//!   target tier.
//! - [`transition`]: one event (or time) applied to a customer's state.
//! - [`decide`]: the tier policy that turns a target tier into a placement, a timer and notices.
//! - [`changes`]: the published tier-change and at-risk events of an evaluation.
//! - [`explain`]: why a customer is where they are (API and tools).
//! - [`restate`]: the change that tells consumers a tier they were not told (after a replay).

pub mod changes;
pub mod decide;
pub mod explain;
pub mod restate;
pub mod rules;
pub mod transition;

pub use rules::Rules;
pub use transition::{Applied, Notice, Outcome, Transition, Trigger, MAX_EXACT_TOTAL};
