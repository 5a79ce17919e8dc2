//! The nouns of tierd, with no dependency on the rules: events in, customer state, tier
//! changes out, money, time and the calendar.

pub mod calendar;
pub mod change;
pub mod event;
pub mod money;
pub mod packed_ids;
pub mod state;
pub mod stored;
pub mod time;

pub use change::{Cause, ChangeReason, Direction, TierChange};
pub use event::{Event, EventKind};
pub use state::{CustomerState, DedupPolicy, Metrics, TimeCause};
