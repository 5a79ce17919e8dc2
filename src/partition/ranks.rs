//! Trigger: the rank check. The owner of partition 0 recomputes the rank cut-offs over all
//! partitions when due (interval, or the population changed enough) and publishes them;
//! every owner moves its partition to a newer published version, re-evaluating the customers
//! whose ranked value lies between an old and a new cut-off. Each move is recorded with the
//! changes it decides ([`CutoffsSwitch`]), so a replay after Redis lost writes moves at the
//! same input offsets.

use super::draft::Working;
use super::runner::Runner;
use super::sweep::SweepState;
use crate::engine::rules::rank::{Cutoffs, CutoffsSwitch};
use crate::engine::Trigger;
use crate::model::state::rules_hash;
use crate::publish::position::Published;
use crate::store::cutoffs;
use crate::store::outbox::{EntryKind, OutboxEntry};
use crate::store::partition::{ApplyError, SortedSet};
use crate::store::retry::Backoff;
use crate::store::views;
use crate::telemetry::events;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// How long partition 0 waits for the published positions before a computation (Kafka not
/// answering: the computation waits for the next check).
const PUBLISHED_TIMEOUT: Duration = Duration::from_secs(2);

/// How long partition 0 holds new cut-offs back for another partition's replay after Redis
/// lost writes (see [`Runner::published_floor`]): a replay normally takes seconds, but a
/// partition that cannot finish it (stopped: its input deleted meanwhile) or whose stored
/// offset an operator moved back must not freeze everyone's ranks for good.
const REPLAY_WAIT_MAX: Duration = Duration::from_secs(300);

impl Runner {
    /// Computes (partition 0's owner) and applies (every owner) new cut-offs when due. A
    /// failed Redis call is retried at the next check. While a replay is still inside the
    /// published changes' input (switches to apply, or offsets below what they reach), it
    /// waits: the first run had no other cut-offs there. With the outbox over its bound
    /// (`outbox_full`) it applies none.
    pub(super) async fn rank_step(&mut self, outbox_full: bool) -> Result<(), ApplyError> {
        // (A replay under earlier rules takes only their recorded cut-offs.)
        if !self.replay.is_empty()
            || self.replay_rules.is_some()
            || self
                .replay_through
                .is_some_and(|through| self.next_offset() < through)
        {
            return Ok(());
        }
        let p = Arc::clone(&self.pipeline);
        let partitions = p.partitions.load(Ordering::Relaxed);
        let zero = p.keyspace.partition(0);
        if self.partition == 0 && partitions > 0 && !self.compute_cutoffs(partitions).await {
            return Ok(());
        }
        // Past the outbox bound no re-ranking decides changes (partition 0 still computes the
        // cut-offs for the others): the newer cut-offs apply once the outbox drains.
        if outbox_full {
            return Ok(());
        }
        // A rules sweep under way keeps the partition on the cut-offs its pages evaluate with
        // (the new rules' first): its changes then carry one cut-offs version whenever a page
        // runs, and a replay after Redis lost writes (whose pages run at other moments than the
        // first time) publishes them again with the same body. Newer cut-offs apply once the
        // sweep completes; partition 0 goes on computing them meanwhile for the others.
        if self.sweep_running().is_some() {
            return Ok(());
        }
        let global = match cutoffs::load_cutoffs(self.store.connection(), &zero).await {
            Ok(g) => g,
            Err(e) => {
                self.store.failed(&mut Backoff::default(), &e).await;
                return Ok(());
            }
        };
        if let Some(new) = global {
            if new.version > self.cutoffs.version && new.rules == rules_hash(p.rules.version()) {
                let (at, now) = (self.next_offset(), self.engine_now());
                self.apply_cutoffs(new, at, now, None).await?;
            }
        }
        Ok(())
    }

    /// Finishes a re-ranking pass the previous owner left half done (its progress is stored
    /// with the cut-offs it moves to), before anything else: it first ran as one step at its
    /// input offset, with no input, timer or other cut-offs between its pages, so a replay
    /// (which applies its recorded switch whole) gives the same changes. Moving straight to
    /// the newest cut-offs instead would decide the rest of its customers under other
    /// cut-offs than a replay does. A replay that applies the same switch itself is left to.
    /// A pass of earlier rules (the previous owner ran them) is finished under those rules,
    /// before this owner's sweep starts, as a replay from before the change applies it.
    pub(super) async fn finish_stored_pass(&mut self) -> Result<(), ApplyError> {
        let p = Arc::clone(&self.pipeline);
        if !p.rules.uses_ranks() {
            return Ok(());
        }
        let Some(json) = self.store.rerank_progress().await? else {
            return Ok(());
        };
        let Some((target, now)) = serde_json::from_str::<Progress>(&json)
            .ok()
            .and_then(|at| Some((at.cutoffs?, at.now?)))
        else {
            return Ok(());
        };
        let replayed = self
            .replay
            .iter()
            .any(|s| s.cutoffs.version == target.version);
        if target.version <= self.cutoffs.version || replayed {
            return Ok(());
        }
        let at = self.next_offset();
        if target.rules == rules_hash(p.rules.version()) {
            return self.apply_cutoffs(target, at, now, None).await;
        }
        // Earlier rules' pass (unknown ones, or ones that rank otherwise, leave it).
        if self.earlier_rules_of(&target).is_none() {
            return Ok(());
        }
        self.apply_cutoffs_of(target, at, now).await
    }

    /// The known rules `cutoffs` were computed under if they are not the rules in force and
    /// rank as the running rules do (the rank sets hold the same values).
    fn earlier_rules_of(&self, cutoffs: &Cutoffs) -> Option<Arc<crate::engine::rules::Rules>> {
        let p = &self.pipeline;
        (cutoffs.rules != rules_hash(self.rules().version()))
            .then(|| p.known_rules(cutoffs.rules))
            .flatten()
            .filter(|r| r.ranks_like(&p.rules))
    }

    /// [`Self::apply_cutoffs`] under the rules `cutoffs` were computed under: cut-offs of
    /// earlier rules (a pass their owner left half done, or its switch published and applied
    /// again at the offset the next version took over) are applied under those rules, ahead
    /// of the next version's sweep — its record waits for the next commit after the pass — as
    /// a replay from before the change applies them (see `replay_switches_through`).
    pub(super) async fn apply_cutoffs_of(
        &mut self,
        cutoffs: Cutoffs,
        at: i64,
        now: i64,
    ) -> Result<(), ApplyError> {
        let Some(earlier) = self.earlier_rules_of(&cutoffs) else {
            return self.apply_cutoffs(cutoffs, at, now, None).await;
        };
        let sweep = std::mem::replace(&mut self.sweep, SweepState::Done);
        let running = self.replay_rules.replace(earlier);
        // Only the customers still under those rules: one a later version already placed
        // (an event after a fallback, or a binary that left the pass) is not moved back.
        let only = cutoffs.rules;
        let applied = self.apply_cutoffs(cutoffs, at, now, Some(only)).await;
        self.replay_rules = running;
        self.sweep = sweep;
        applied
    }

    /// Partition 0's duty: recomputes the cut-offs if due and publishes them if they changed.
    /// Returns false if reading the populations failed (the check ends there).
    async fn compute_cutoffs(&mut self, partitions: i32) -> bool {
        let p = Arc::clone(&self.pipeline);
        let zero = p.keyspace.partition(0);
        let all: Vec<_> = (0..partitions).map(|q| p.keyspace.partition(q)).collect();
        let conn = self.store.connection();
        let population = match cutoffs::populations(conn, &all, &p.rules).await {
            Ok(v) => v,
            Err(e) => {
                self.store.failed(&mut Backoff::default(), &e).await;
                return false;
            }
        };
        let due = match &self.last_compute {
            None => true,
            Some((at, before)) => {
                at.elapsed() >= p.ranks.recompute_every
                    || population.iter().zip(before).any(|(&n, &b)| {
                        n.abs_diff(b) as f64 > p.ranks.recompute_population_change * b as f64
                    })
            }
        };
        if !due {
            return true;
        }
        let Some(floor) = self.published_floor(partitions).await else {
            // Retried at the next check (still due).
            return true;
        };
        let conn = self.store.connection();
        let started = Instant::now();
        let (new, repeated) = match cutoffs::compute(conn, &all, &p.rules).await {
            Ok(new) => new,
            Err(e) => {
                if cutoffs::unverified(&e) {
                    p.telemetry
                        .cutoff_searches_repeated
                        .inc_by(cutoffs::VERIFY_ATTEMPTS as u64);
                }
                self.store.failed(&mut Backoff::default(), &e).await;
                return true;
            }
        };
        let current = match cutoffs::load_cutoffs(conn, &zero).await {
            Ok(current) => current,
            Err(e) => {
                // Retried at the next check (still due). Taken as "none stored", it published
                // the same cut-offs again as a new version, a switch for every partition.
                self.store.failed(&mut Backoff::default(), &e).await;
                return true;
            }
        };
        self.last_compute = Some((Instant::now(), population));
        // A new population is published too (even with the same values): the published
        // cut-offs always say over how many customers they hold.
        let changed = current.as_ref().is_none_or(|c| {
            c.values != new.values || c.rules != new.rules || c.population != new.population
        });
        let mut published = None;
        if changed {
            // Never at or below a version this or any partition applied and published: after
            // Redis lost writes, the replays apply versions Redis no longer counts up to.
            let floor = self.cutoffs.version.max(floor);
            let after = current.as_ref().map_or(0, |c| c.version);
            let publication =
                cutoffs::publish_cutoffs(conn, &zero, self.status.epoch, floor, after, &new).await;
            match publication {
                Ok(cutoffs::Publication::Published(version)) => published = Some(version),
                Ok(cutoffs::Publication::Fenced) => tracing::warn!(
                    "Rank cut-offs not published: partition 0 has another owner now."
                ),
                Ok(cutoffs::Publication::Superseded) => {
                    // Computed again at the next check, after what was published since.
                    self.last_compute = None;
                    tracing::warn!(
                        "Rank cut-offs not published: other cut-offs were published since they were computed."
                    );
                }
                Err(e) => {
                    // Retried at the next check (the computation is repeated).
                    self.last_compute = None;
                    self.store.failed(&mut Backoff::default(), &e).await;
                }
            }
        }
        events::CutoffsComputed {
            seconds: started.elapsed().as_secs_f64(),
            repeated,
            published,
        }
        .emit(&p.telemetry);
        true
    }

    /// Before partition 0 computes new cut-offs: what Kafka holds of every partition's
    /// published changes (Redis may have lost it). `None` (the computation waits for the next
    /// check) while a partition has not applied again all the input its published changes
    /// came from — Redis lost writes and it is replaying: cut-offs over part of its customers
    /// would move others' customers up and back down again once it has replayed; for at most
    /// [`REPLAY_WAIT_MAX`] — or while Kafka or Redis do not answer. Otherwise the newest cut-offs version those changes
    /// carry: new cut-offs are numbered above it, so a version another partition applied is
    /// never issued again for other values (this partition may hold older cut-offs than the
    /// others — during its rules sweep — or not have published its own switch yet).
    async fn published_floor(&mut self, partitions: i32) -> Option<u64> {
        let p = Arc::clone(&self.pipeline);
        let positions = Arc::clone(&self.positions);
        let all: Vec<i32> = (0..partitions).collect();
        let read =
            tokio::task::spawn_blocking(move || positions.last_published(&all, PUBLISHED_TIMEOUT))
                .await;
        let published = match read {
            Ok(Ok(published)) => published,
            Ok(Err(error)) => {
                warn!(%error, "Rank cut-offs not computed: reading the published outbox positions from Kafka failed; retried at the next check.");
                return None;
            }
            Err(error) => {
                warn!(%error, "Rank cut-offs not computed: reading the published outbox positions failed; retried at the next check.");
                return None;
            }
        };
        let stored =
            match views::stored_offsets(self.store.connection(), &p.keyspace, partitions).await {
                Ok(stored) => stored,
                Err(e) => {
                    self.store.failed(&mut Backoff::default(), &e).await;
                    return None;
                }
            };
        let replaying = published
            .iter()
            .zip(&stored)
            .position(|(published, stored)| {
                published
                    .through
                    .is_some_and(|through| stored.unwrap_or(-1) < through)
            });
        match (replaying, self.replay_wait) {
            (Some(partition), None) => {
                warn!(partition, "Rank cut-offs wait: the partition is applying its published input again (Redis lost writes); computed once it is through.");
                self.replay_wait = Some(Instant::now());
                return None;
            }
            (Some(partition), Some(since)) if since.elapsed() < REPLAY_WAIT_MAX => {
                debug!(
                    partition,
                    "Rank cut-offs still wait for the partition's replay."
                );
                return None;
            }
            (Some(partition), Some(_)) => {
                warn!(partition, waited_s = REPLAY_WAIT_MAX.as_secs(), "Rank cut-offs computed although the partition has not applied its published input again yet (stopped? its stored offset moved back by hand?): customers of other partitions may move and move back once it has.");
            }
            (None, Some(_)) => {
                info!("Every partition applied its published input again: rank cut-offs computed again.");
                self.replay_wait = None;
            }
            (None, None) => {}
        }
        Some(
            published
                .iter()
                .map(Published::newest_cutoffs_version)
                .max()
                .unwrap_or(0),
        )
    }

    /// Moves the partition to new cut-offs: from now on evaluations use them, and every
    /// customer whose ranked value lies between an old and a new cut-off is re-evaluated
    /// (reason `rank_shift`), a page per commit. The pages follow a (value, customer) cursor
    /// per moved range, and each page's commit stores how far the pass got: an owner that
    /// takes over (after a crash or a handover) resumes there for the same cut-offs instead of
    /// starting again. The last commit records the cut-offs as applied. A customer re-evaluated
    /// twice (in two ranges, or a page repeated) does not move again, so no change is lost or
    /// doubled. Every re-evaluation of the pass happens at one engine time, `now` (kept with
    /// the progress, so a resumed pass uses it too). The first commit records the switch
    /// (`new` from input offset `at`, evaluated at `now`) in the outbox, ahead of the changes
    /// it decides. With `only_under`, only customers under that rules version hash are
    /// re-evaluated (see [`Self::apply_cutoffs_of`]).
    pub(super) async fn apply_cutoffs(
        &mut self,
        new: Cutoffs,
        at: i64,
        now: i64,
        only_under: Option<u32>,
    ) -> Result<(), ApplyError> {
        let p = Arc::clone(&self.pipeline);
        let old = std::mem::replace(&mut self.cutoffs, Arc::new(new.clone()));
        let page = p.ranks.reevaluate_page;
        // The rules in force (in a replay, those the input first ran under).
        let ranges = moved_ranges(self.rules(), &old, &new);
        let resume = self
            .store
            .rerank_progress()
            .await?
            .and_then(|json| serde_json::from_str::<Progress>(&json).ok())
            .filter(|at| at.version == new.version && at.range < ranges.len());
        let now = resume.as_ref().and_then(|r| r.now).unwrap_or(now);
        let mut switch = Some(OutboxEntry {
            kind: EntryKind::Cutoffs,
            key: Vec::new(),
            value: serde_json::to_vec(&CutoffsSwitch {
                offset: at,
                cutoffs: new.clone(),
                at_ms: now,
            })
            .expect("switches serialize"),
            headers: Vec::new(),
        });
        if let Some(at) = &resume {
            events::RerankResumed {
                partition: self.partition,
                version: new.version,
                range: at.range,
            }
            .emit(&p.telemetry);
        }
        let (mut evaluated, mut moved) = (0u64, 0u64);
        let mut seen = HashSet::new();
        let first_range = resume.as_ref().map_or(0, |at| at.range);
        for (range, &(rank, lo, hi)) in ranges.iter().enumerate().skip(first_range) {
            let mut cursor = resume
                .as_ref()
                .filter(|at| at.range == range)
                .map(|at| (at.value, at.customer.clone()));
            loop {
                let found = self
                    .store
                    .ranked_after(
                        rank,
                        lo,
                        hi,
                        cursor.as_ref().map(|(v, c)| (*v, c.as_str())),
                        page,
                    )
                    .await?;
                let Some((last, value)) = found.last().cloned() else {
                    break;
                };
                cursor = Some((value, last.clone()));
                // A customer in several moved ranges is re-evaluated once per pass here (and
                // at worst once more after a resume, without moving again).
                let fresh: Vec<String> = found
                    .into_iter()
                    .map(|(id, _)| id)
                    .filter(|id| seen.insert(id.clone()))
                    .collect();
                let mut work = Working::default();
                self.load(fresh.iter().cloned(), &mut work).await?;
                let mut draft = self.new_draft();
                draft.outbox.extend(switch.take());
                for id in &fresh {
                    let loaded = work.get_mut(id.as_str()).expect("loaded above");
                    if loaded.state.is_new() {
                        // A rank entry without a stored customer (erased by hand): drop it,
                        // and never evaluate (that would create the customer again).
                        let sets = (0..self.rules().ranks().len()).map(SortedSet::Rank);
                        draft.orphans.extend(sets.map(|set| (set, id.clone())));
                        continue;
                    }
                    if only_under.is_some_and(|rules| loaded.state.rules_hash != rules) {
                        continue;
                    }
                    self.sweep_first(&mut draft, id, loaded);
                    let outcome =
                        self.reevaluate_at(&mut draft, id, loaded, Trigger::RankShift, now);
                    evaluated += 1;
                    moved += u64::from(outcome.transition.is_some());
                }
                draft.rerank = Some(
                    serde_json::to_string(&Progress {
                        version: new.version,
                        range,
                        value,
                        customer: last,
                        now: Some(now),
                        cutoffs: Some(new.clone()),
                    })
                    .expect("progress serializes"),
                );
                self.commit(&mut draft, &mut work).await?;
                self.keep(work);
                events::RankReevaluated {
                    customers: fresh.len() as u64,
                }
                .emit(&p.telemetry);
            }
        }
        // Record the cut-offs as applied (and the pass as done).
        let mut draft = self.new_draft();
        draft.outbox.extend(switch.take());
        draft.applied_cutoffs = Some(serde_json::to_string(&new).expect("cut-offs serialize"));
        draft.rerank = Some(String::new());
        self.commit(&mut draft, &mut Working::default()).await?;
        events::CutoffsApplied {
            partition: self.partition,
            version: new.version,
            evaluated,
            moved,
        }
        .emit(&p.telemetry);
        Ok(())
    }
}

/// How far a re-ranking got (stored with each page's commit): the cut-offs version it moves
/// to, the moved range (index into [`moved_ranges`]) and the last customer done in it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Progress {
    version: u64,
    range: usize,
    value: i128,
    customer: String,
    /// The pass's engine time (absent in progress stored by older versions).
    #[serde(default)]
    now: Option<i64>,
    /// The cut-offs the pass moves to (absent in progress stored by older versions): the next
    /// owner finishes the pass with them even when newer ones were published since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cutoffs: Option<Cutoffs>,
}

/// The value ranges between the old and the new cut-offs, per cut point: `(rank, lo, hi)`,
/// `hi = None` meaning no upper end. Old cut-offs of other rules count as absent.
fn moved_ranges(
    rules: &crate::engine::rules::Rules,
    old: &Cutoffs,
    new: &Cutoffs,
) -> Vec<(usize, i128, Option<i128>)> {
    let old_valid = old.rules == new.rules && old.values.len() == new.values.len();
    let mut ranges = Vec::new();
    for (i, point) in rules.cut_points().iter().enumerate() {
        let before = if old_valid { old.value(i) } else { None };
        let after = new.value(i);
        let range = match (before, after) {
            (Some(a), Some(b)) if a == b => None,
            (Some(a), Some(b)) => Some((a.min(b), Some(a.max(b)))),
            (None, Some(b)) => Some((b, None)),
            (Some(a), None) => Some((a, None)),
            (None, None) => None,
        };
        if let Some((lo, hi)) = range {
            ranges.push((point.rank, lo, hi));
        }
    }
    merge_ranges(ranges)
}

/// The union of `ranges` as disjoint ranges, per rank in value order: a customer in several
/// overlapping ranges (the first cut-offs over a population give `[cut, +inf)` for every cut
/// point of a rank) is then paged through once.
fn merge_ranges(mut ranges: Vec<(usize, i128, Option<i128>)>) -> Vec<(usize, i128, Option<i128>)> {
    ranges.sort_by_key(|&(rank, lo, _)| (rank, lo));
    let mut merged: Vec<(usize, i128, Option<i128>)> = Vec::with_capacity(ranges.len());
    for (rank, lo, hi) in ranges {
        match merged.last_mut() {
            // Ranks hold whole numbers: [a, b] and [b + 1, c] are one range too.
            Some((r, _, last_hi)) if *r == rank && last_hi.is_none_or(|h| lo <= h + 1) => {
                *last_hi = match (*last_hi, hi) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
            _ => merged.push((rank, lo, hi)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::merge_ranges;

    #[test]
    fn overlapping_ranges_of_a_rank_are_merged() {
        assert_eq!(
            merge_ranges(vec![(0, 50, None), (0, 1, None), (0, 20, None)]),
            vec![(0, 1, None)]
        );
        assert_eq!(
            merge_ranges(vec![
                (0, 10, Some(20)),
                (1, 5, Some(6)),
                (0, 21, Some(30)),
                (0, 40, Some(50)),
                (0, 15, Some(18)),
            ]),
            vec![(0, 10, Some(30)), (0, 40, Some(50)), (1, 5, Some(6))]
        );
        assert_eq!(merge_ranges(Vec::new()), Vec::new());
    }
}
