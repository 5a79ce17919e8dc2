//! Store: the only place that speaks to Redis. Key layout ([`keys`]), the client built from the
//! configuration ([`client`]) and the shared connection ([`connection`]), a partition's fenced claim / load / commit ([`partition`]), the
//! rank cut-off search over all partitions ([`cutoffs`]), the outbox stream ([`outbox`]) and
//! the Lua scripts they run (`lua/`), the one [`retry`] policy, the read-only [`views`] the
//! API and the tools share, and the consistent [`snapshot`] of a partition `tierd export` reads.

pub mod client;
pub mod connection;
pub mod cutoffs;
pub mod keys;
pub mod outbox;
pub mod partition;
pub mod rank_pages;
pub mod retry;
pub mod scan;
pub mod snapshot;
pub mod views;
