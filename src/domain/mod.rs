//! The shared nouns of tierd: events in, customer state, tier changes out, money and time.

pub mod calendar;
pub mod change;
pub mod event;
pub mod explain;
pub mod money;
pub mod state;
pub mod time;

pub use change::{Cause, ChangeReason, Direction, TierChange};
pub use event::{Event, EventKind};
pub use state::{Applied, CustomerState, DedupPolicy, Metrics};
