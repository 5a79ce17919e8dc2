//! What one commit will write, assembled while a trigger runs: the customers it touched (with
//! what Redis holds for each), the outbox entries, the counters for telemetry. Turning it into
//! a [`CommitBatch`] — which states, timer-index and rank-set entries and tier counts change —
//! is pure, and tested here without Redis.

use super::Pipeline;
use crate::engine::changes::number_above;
use crate::engine::rules::Rules;
use crate::engine::Outcome;
use crate::model::change::{AtRiskNotice, Cause, TierChange};
use crate::model::state::TierStep;
use crate::model::stored::{self, StoredStateError};
use crate::model::CustomerState;
use crate::store::keys::PartitionKeys;
use crate::store::outbox::{EntryKind, OutboxEntry};
use crate::store::partition::{CommitBatch, SortedSet};
use std::collections::HashMap;

/// A customer in the working set of one trigger, with what the partition's indexes in Redis
/// hold for them (so a commit writes only what changed).
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The customer's state, possibly changed by the trigger. Boxed: a state is a few hundred
    /// bytes, and it moves between the cache and a trigger's working set on every event
    /// (profiled: moving it by value was ~10 % of tierd's CPU in memmove).
    pub state: Box<CustomerState>,
    /// Whether the state must be written.
    pub dirty: bool,
    /// The due time the timer index holds for the customer.
    pub indexed: Option<i64>,
    /// The values the rank sorted sets hold for the customer, in the rules' rank order.
    pub ranked: Vec<Option<i128>>,
    /// The tier the partition's tier counts count the customer in.
    pub counted: Option<String>,
    /// The state's stored form (empty: not stored) when the runner's cache does not hold it
    /// yet: read from Redis, or written by the last commit. The cache keeps customers in this
    /// form rather than decoded, which takes 3–4 times the memory (see [`Self::into_cache`]).
    pub stored: Option<Box<[u8]>>,
}

impl Loaded {
    /// A customer as stored (a new customer: the default state, indexed nowhere).
    pub fn new(state: Box<CustomerState>) -> Self {
        Self {
            indexed: state.timer.map(|(due, _)| due),
            ranked: state.ranked_values.clone(),
            counted: state.tier.clone(),
            state,
            dirty: false,
            stored: None,
        }
    }

    /// A customer from its stored form (empty: not stored, the default state) as the cache
    /// holds it.
    ///
    /// # Errors
    /// The stored form cannot be read.
    pub fn from_cache(stored: &[u8]) -> Result<Self, StoredStateError> {
        let state = if stored.is_empty() {
            CustomerState::default()
        } else {
            stored::decode(stored)?
        };
        Ok(Self::new(Box::new(state)))
    }

    /// A customer as read from Redis (`None`: not stored; the cache is to keep it either way).
    ///
    /// # Errors
    /// The stored form cannot be read — also an empty value: the commit deletes the key of a
    /// customer it stores as new, so an empty value is damage, not absence.
    pub fn from_redis(stored: Option<Vec<u8>>) -> Result<Self, StoredStateError> {
        let mut loaded = match &stored {
            None => Self::new(Box::default()),
            Some(bytes) => Self::new(Box::new(stored::decode(bytes)?)),
        };
        loaded.stored = Some(stored.unwrap_or_default().into_boxed_slice());
        Ok(loaded)
    }

    /// What the cache is to be given for this customer: the stored form of a state changed
    /// (encoded here unless a commit wrote it), or read from Redis; `None` for a state taken
    /// from the cache and unchanged (the cache holds it already, or dropped it meanwhile to
    /// make room: the next read is from Redis).
    #[must_use]
    pub fn into_cache(self) -> Option<Box<[u8]>> {
        if self.dirty {
            Some(encode(&self.state).into_boxed_slice())
        } else {
            self.stored
        }
    }

    /// Records that the state and indexes as they are now were committed.
    pub fn committed(&mut self) {
        if self.dirty {
            self.indexed = self.state.timer.map(|(due, _)| due);
            self.ranked.clone_from(&self.state.ranked_values);
            self.counted.clone_from(&self.state.tier);
            self.dirty = false;
        }
    }
}

/// A state's stored form; a new state (an erased customer) is stored by deleting the key: an
/// empty value.
fn encode(state: &CustomerState) -> Vec<u8> {
    if state.is_new() {
        Vec::new()
    } else {
        stored::to_vec(state)
    }
}

/// The customers one trigger works on, by id (foldhash: std's SipHash was ~2 % of tierd's
/// CPU, and these keys are customer ids of our own input, hashed once per event).
pub type Working = HashMap<String, Loaded, foldhash::fast::RandomState>;

/// Starting buffer size for the JSON of a change event (~300–450 bytes). Serialising into a
/// buffer of the right size instead of an empty one saves the reallocations and copies of
/// growing it (profiled: `serde_json::to_vec` spent ~6 % of tierd's CPU in realloc).
const CHANGE_CAPACITY: usize = 512;

/// `value` as JSON, serialised into a buffer of `capacity` bytes to start with.
fn to_json(value: &impl serde::Serialize, capacity: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(capacity);
    // Writing to a Vec cannot fail, and these types have no map with non-string keys.
    serde_json::to_writer(&mut buf, value).expect("serializes to JSON");
    buf
}

/// What one commit will write, accumulated while a trigger runs.
#[derive(Debug, Default)]
pub struct Draft {
    /// First input offset covered (the partition's position for commits without input).
    pub first_offset: i64,
    /// One past the last input offset covered.
    pub end_offset: i64,
    /// The leader epoch of the last input record covered (if it has one).
    pub leader_epoch: Option<i32>,
    /// Input messages covered.
    pub messages: u64,
    /// Tier changes, notices and dead letters, in order.
    pub outbox: Vec<OutboxEntry>,
    /// Events counted.
    pub applied: u64,
    /// Events recognised as duplicates.
    pub duplicates: u64,
    /// Reasons of the messages dead-lettered.
    pub rejected: Vec<&'static str>,
    /// Tier changes: (from, to, reason), for telemetry.
    pub changes: Vec<(String, String, &'static str)>,
    /// At-risk notices.
    pub notices: u64,
    /// The rules version hash whose sweep this commit completes.
    pub swept_rules: Option<u32>,
    /// Rank cut-offs (JSON) this commit finishes applying.
    pub applied_cutoffs: Option<String>,
    /// The re-ranking's progress to store with this commit (JSON; `""`: done, remove it).
    pub rerank: Option<String>,
    /// Timer-index and rank-set entries without a stored customer, to remove.
    pub orphans: Vec<(SortedSet, String)>,
    /// The partition's sequence floor (0: none): changes are numbered above it
    /// ([`crate::engine::changes::number_above`]).
    pub seq_floor: u64,
    /// The highest sequence among the changes recorded (the publisher keeps the highest it
    /// published, from which a later floor is set).
    pub max_sequence: Option<u64>,
}

/// Appends `change` (decided at engine time `at`) to the state's tier history, keeping the
/// latest `keep` (none when 0: the list is dropped, and the state stored without it).
fn keep_in_history(state: &mut CustomerState, change: &TierChange, at: i64, keep: usize) {
    if keep > 0 {
        state.history.push(TierStep {
            seq: change.sequence,
            at,
            previous: change.previous_tier.clone(),
            tier: change.tier.clone(),
            direction: change.direction,
            reason: change.reason,
        });
    }
    let over = state.history.len().saturating_sub(keep);
    state.history.drain(..over);
}

impl Draft {
    /// An empty draft at input position `offset` (nothing consumed), numbering changes
    /// above the partition's sequence floor `seq_floor` (0: none).
    pub fn at(offset: i64, seq_floor: u64) -> Self {
        Self {
            first_offset: offset,
            end_offset: offset,
            seq_floor,
            ..Self::default()
        }
    }

    /// Adds an evaluation's tier change and at-risk notice to the outbox. A change's body is
    /// decided by the partition's input and the cut-offs in force alone (never by other
    /// partitions' live counts), so a replay publishes it again byte for byte.
    pub fn record(
        &mut self,
        p: &Pipeline,
        rules: &Rules,
        customer_id: &str,
        state: &mut CustomerState,
        outcome: &Outcome,
        cause: Option<Cause>,
    ) {
        if let Some(t) = &outcome.transition {
            number_above(state, self.seq_floor);
            self.max_sequence = self.max_sequence.max(Some(state.seq));
            let change = TierChange::new(customer_id, state, t, rules, &p.money, cause);
            keep_in_history(state, &change, t.at, p.history_changes);
            self.changes.push((
                change
                    .previous_tier
                    .clone()
                    .unwrap_or_else(|| "none".into()),
                change.tier.clone(),
                change.reason.as_str(),
            ));
            self.outbox.push(OutboxEntry {
                kind: EntryKind::Change,
                key: customer_id.as_bytes().to_vec(),
                value: to_json(&change, CHANGE_CAPACITY),
                headers: Vec::new(),
            });
        }
        if let Some(n) = &outcome.notice {
            let notice = AtRiskNotice::new(customer_id, state.origin, n, rules, self.seq_floor);
            self.notices += 1;
            self.outbox.push(OutboxEntry {
                kind: EntryKind::AtRisk,
                key: customer_id.as_bytes().to_vec(),
                value: to_json(&notice, CHANGE_CAPACITY),
                headers: Vec::new(),
            });
        }
    }

    /// Adds the tombstone of an erased customer (who had `tier`) to the outbox.
    pub fn erase(&mut self, customer_id: &str, tier: Option<String>) {
        self.changes.push((
            tier.unwrap_or_else(|| "none".into()),
            "erased".into(),
            "erased",
        ));
        self.outbox.push(OutboxEntry {
            kind: EntryKind::Erased,
            key: customer_id.as_bytes().to_vec(),
            value: Vec::new(),
            headers: Vec::new(),
        });
    }

    /// The commit of this draft (its outbox and markers are moved into it): every dirty
    /// customer's state, and only the timer-index entries, rank-set entries and tier counts
    /// that differ from what Redis holds. `ranks` is the number of ranks of the rules;
    /// `history_keep` the tier changes a state keeps (`api.history_changes`: a list written
    /// under a larger setting is trimmed here, so that 0 brings states back to version 1).
    pub fn take_batch(
        &mut self,
        position: Position,
        work: &mut Working,
        keys: &PartitionKeys,
        ranks: usize,
        history_keep: usize,
    ) -> CommitBatch {
        let mut batch = CommitBatch {
            expected_offset: position.expected_offset,
            expected_commits: position.expected_commits,
            clock: position.clock,
            first_offset: self.first_offset,
            end_offset: self.end_offset,
            leader_epoch: (self.messages > 0).then_some(self.leader_epoch),
            outbox: std::mem::take(&mut self.outbox),
            swept_rules: self.swept_rules,
            applied_cutoffs: self.applied_cutoffs.take(),
            rerank: self.rerank.take(),
            max_sequence: self.max_sequence.take(),
            seq_floor: self.seq_floor,
            ..CommitBatch::default()
        };
        batch.zrem.append(&mut self.orphans);
        for (id, loaded) in work.iter_mut().filter(|(_, l)| l.dirty) {
            let over = loaded.state.history.len().saturating_sub(history_keep);
            loaded.state.history.drain(..over);
            let value = encode(&loaded.state);
            // What Redis will hold once the batch is committed (the cache keeps it).
            loaded.stored = Some(value.as_slice().into());
            batch.states.push((keys.customer(id), value));
            let timer = loaded.state.timer.map(|(due, _)| i128::from(due));
            diff_entry(
                &mut batch,
                SortedSet::Timers,
                id,
                timer,
                loaded.indexed.map(i128::from),
            );
            for r in 0..ranks {
                let now = loaded.state.ranked_values.get(r).copied().flatten();
                let indexed = loaded.ranked.get(r).copied().flatten();
                diff_entry(&mut batch, SortedSet::Rank(r), id, now, indexed);
            }
            if loaded.state.tier != loaded.counted {
                if let Some(old) = &loaded.counted {
                    batch.tier_deltas.push((old.clone(), -1));
                }
                if let Some(new) = &loaded.state.tier {
                    batch.tier_deltas.push((new.clone(), 1));
                }
            }
        }
        batch
    }
}

/// Where the owner believes the partition stands in Redis (the fence of the next commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The next offset stored (-1 if nothing was ever applied).
    pub expected_offset: i64,
    /// Commits stored.
    pub expected_commits: i64,
    /// The partition's event-time clock to store (`clock.mode = "event"`).
    pub clock: Option<i64>,
}

/// Adds the sorted-set write that takes `set` from `indexed` to `now` for `id`, if any.
fn diff_entry(
    batch: &mut CommitBatch,
    set: SortedSet,
    id: &str,
    now: Option<i128>,
    indexed: Option<i128>,
) {
    match (now, indexed) {
        (Some(v), Some(i)) if v == i => {}
        (Some(v), _) => batch.zadd.push((set, v, id.to_owned())),
        (None, Some(_)) => batch.zrem.push((set, id.to_owned())),
        (None, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rules::TimeCause;
    use crate::store::keys::Keyspace;

    fn keys() -> PartitionKeys {
        Keyspace::new("t", "g", "in").partition(0)
    }

    #[test]
    fn the_history_keeps_the_latest_changes_and_none_when_off() {
        use crate::model::change::{ChangeReason, Direction};
        let change = |seq: u64| TierChange {
            event_id: String::new(),
            customer_id: "c".into(),
            sequence: seq,
            previous_tier: None,
            tier: format!("t{seq}"),
            tier_display_name: String::new(),
            direction: Direction::Up,
            reason: ChangeReason::Purchase,
            occurred_at: String::new(),
            rules_version: String::new(),
            rule: String::new(),
            policy: String::new(),
            metrics: crate::model::change::MetricsView {
                frequency: 0,
                monetary: String::new(),
                refund_count: 0,
                refunded: String::new(),
                currency: String::new(),
                first_purchase_at: None,
                last_purchase_at: None,
            },
            values: serde_json::Map::new(),
            scores: serde_json::Map::new(),
            ranks: serde_json::Map::new(),
            cutoffs_version: None,
            cause: None,
        };
        let mut state = CustomerState::default();
        for seq in 1..=4 {
            keep_in_history(&mut state, &change(seq), i64::from(seq as u32) * 10, 2);
        }
        let kept: Vec<(u64, i64, &str)> = state
            .history
            .iter()
            .map(|h| (h.seq, h.at, h.tier.as_str()))
            .collect();
        assert_eq!(kept, [(3, 30, "t3"), (4, 40, "t4")]);
        // Turned off: the list is dropped at the customer's next change.
        keep_in_history(&mut state, &change(5), 50, 0);
        assert!(state.history.is_empty());
        assert_eq!(
            stored::to_vec(&state)[0],
            1,
            "a state without history is version 1"
        );
    }

    fn customer(
        timer: Option<i64>,
        ranked: Vec<Option<i128>>,
        tier: Option<&str>,
    ) -> CustomerState {
        CustomerState {
            timer: timer.map(|d| (d, TimeCause::Recency)),
            ranked_values: ranked,
            tier: tier.map(str::to_owned),
            ..CustomerState::default()
        }
    }

    fn position() -> Position {
        Position {
            expected_offset: 10,
            expected_commits: 3,
            clock: None,
        }
    }

    #[test]
    fn a_clean_customer_writes_nothing() {
        let mut work = Working::default();
        work.insert(
            "a".into(),
            Loaded::new(Box::new(customer(Some(5), vec![Some(7)], Some("vip")))),
        );
        let batch = Draft::at(10, 0).take_batch(position(), &mut work, &keys(), 1, 0);
        assert!(batch.states.is_empty() && batch.zadd.is_empty() && batch.zrem.is_empty());
        assert!(batch.tier_deltas.is_empty());
        assert_eq!((batch.first_offset, batch.end_offset), (10, 10));
        assert_eq!((batch.expected_offset, batch.expected_commits), (10, 3));
    }

    #[test]
    fn only_what_changed_is_indexed_and_counted() {
        let mut work = Working::default();
        // Moved: timer later, rank value up, tier key → vip.
        let mut moved = Loaded::new(Box::new(customer(
            Some(5),
            vec![Some(7), Some(1)],
            Some("key"),
        )));
        *moved.state = customer(Some(9), vec![Some(8), Some(1)], Some("vip"));
        moved.dirty = true;
        work.insert("m".into(), moved);
        // Lost their timer and their second rank; same tier.
        let mut dropped = Loaded::new(Box::new(customer(
            Some(5),
            vec![Some(7), Some(2)],
            Some("key"),
        )));
        *dropped.state = customer(None, vec![Some(7), None], Some("key"));
        dropped.dirty = true;
        work.insert("d".into(), dropped);
        // New customer.
        let mut new = Loaded::new(Box::default());
        *new.state = customer(Some(3), vec![None, Some(4)], Some("small"));
        new.dirty = true;
        work.insert("n".into(), new);
        // Erased: back to the new state, so its key is deleted and nothing indexes it.
        let mut erased = Loaded::new(Box::new(customer(
            Some(6),
            vec![Some(5), None],
            Some("vip"),
        )));
        *erased.state = CustomerState::default();
        erased.dirty = true;
        work.insert("e".into(), erased);

        let mut draft = Draft::at(10, 0);
        draft.orphans.push((SortedSet::Timers, "ghost".into()));
        draft.orphans.push((SortedSet::Rank(1), "gone".into()));
        let batch = draft.take_batch(position(), &mut work, &keys(), 2, 0);

        let mut states: Vec<_> = batch
            .states
            .iter()
            .map(|(k, v)| (k.clone(), v.is_empty()))
            .collect();
        states.sort();
        let k = keys();
        assert_eq!(
            states,
            vec![
                (k.customer("d"), false),
                (k.customer("e"), true),
                (k.customer("m"), false),
                (k.customer("n"), false)
            ],
            "an erased customer's key is deleted (an empty value)"
        );
        let mut zadd = batch.zadd.clone();
        zadd.sort_by(|a, b| {
            a.2.cmp(&b.2)
                .then(format!("{:?}", a.0).cmp(&format!("{:?}", b.0)))
        });
        assert_eq!(
            zadd,
            vec![
                (SortedSet::Rank(0), 8, "m".to_owned()),
                (SortedSet::Timers, 9, "m".to_owned()),
                (SortedSet::Rank(1), 4, "n".to_owned()),
                (SortedSet::Timers, 3, "n".to_owned()),
            ]
        );
        let mut zrem = batch.zrem.clone();
        zrem.sort_by(|a, b| {
            a.1.cmp(&b.1)
                .then(format!("{:?}", a.0).cmp(&format!("{:?}", b.0)))
        });
        assert_eq!(
            zrem,
            vec![
                (SortedSet::Rank(1), "d".to_owned()),
                (SortedSet::Timers, "d".to_owned()),
                (SortedSet::Rank(0), "e".to_owned()),
                (SortedSet::Timers, "e".to_owned()),
                (SortedSet::Timers, "ghost".to_owned()),
                (SortedSet::Rank(1), "gone".to_owned()),
            ]
        );
        let mut deltas = batch.tier_deltas.clone();
        deltas.sort();
        assert_eq!(
            deltas,
            vec![
                ("key".into(), -1),
                ("small".into(), 1),
                ("vip".into(), -1),
                ("vip".into(), 1)
            ]
        );
        assert!(draft.orphans.is_empty(), "orphans are taken");
    }

    #[test]
    fn after_commit_a_customer_is_clean_and_indexed_as_its_state() {
        let mut l = Loaded::new(Box::new(customer(Some(5), vec![Some(7)], Some("key"))));
        *l.state = customer(None, vec![Some(9)], Some("vip"));
        l.dirty = true;
        l.committed();
        assert_eq!(
            l,
            Loaded::new(Box::new(customer(None, vec![Some(9)], Some("vip"))))
        );
        let mut work = Working::default();
        work.insert("a".into(), l);
        let batch = Draft::at(0, 0).take_batch(position(), &mut work, &keys(), 1, 0);
        assert!(batch.states.is_empty() && batch.zadd.is_empty() && batch.zrem.is_empty());
    }

    #[test]
    fn the_cache_is_given_the_stored_form_of_what_was_committed() {
        let before = customer(Some(5), vec![Some(7)], Some("key"));
        let stored: Box<[u8]> = stored::to_vec(&before).into_boxed_slice();

        // Read from Redis: the cache is to keep the bytes read, as they are.
        let l = Loaded::from_redis(Some(stored.to_vec())).expect("decodes");
        assert_eq!(*l.state, before);
        assert_eq!(l.indexed, Some(5), "indexed as stored");
        assert_eq!(l.into_cache(), Some(stored.clone()));

        // Taken from the cache and unchanged: nothing to give back.
        let mut l = Loaded::from_cache(&stored).expect("decodes");
        assert_eq!(*l.state, before);
        assert_eq!(l.clone().into_cache(), None);

        // Changed and not committed: encoded as it is now.
        let after = customer(Some(9), vec![Some(8)], Some("vip"));
        *l.state = after.clone();
        l.dirty = true;
        let encoded = l.clone().into_cache().expect("changed");
        assert_eq!(stored::decode(&encoded).expect("decodes"), after);

        // Committed: the cache is given exactly what the commit wrote.
        let mut work = Working::default();
        work.insert("a".into(), l);
        let batch = Draft::at(0, 0).take_batch(position(), &mut work, &keys(), 1, 0);
        let mut l = work.remove("a").expect("kept");
        l.committed();
        assert_eq!(
            l.into_cache().as_deref(),
            Some(batch.states[0].1.as_slice())
        );

        // Absent in Redis: a new customer, cached as the empty form (read back as new).
        let new = Loaded::from_redis(None).expect("decodes");
        assert!(new.state.is_new());
        let cached = new.into_cache().expect("cached");
        assert!(cached.is_empty());
        assert!(Loaded::from_cache(&cached).expect("decodes").state.is_new());
        // Damage: an empty value in Redis (the commit deletes keys instead), unknown bytes.
        assert!(Loaded::from_redis(Some(Vec::new())).is_err());
        assert!(Loaded::from_cache(&[7, 1, 2]).is_err());
    }
}
