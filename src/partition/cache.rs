//! The runners' caches of committed customer states, bounded by a count per partition and by
//! one memory budget for the whole instance (`ingest.cache_bytes`), shared evenly by the
//! partitions it runs: an instance's cache takes the same memory whether it owns one partition
//! or sixty-four.

use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What an entry costs besides its key and state bytes: the LRU's node (key and value headers,
/// two links: 56 B), its hash-table slot, and the allocator's rounding of three allocations.
/// An estimate: the budget bounds the cache's memory, not the process's to the byte (the hash
/// table keeps the slots of its largest size, and freed memory stays with the allocator).
pub const ENTRY_OVERHEAD: usize = 128;

/// The instance's cache memory, shared by the partitions it runs.
#[derive(Debug)]
pub struct CacheBudget {
    /// Bytes for all caches together (`ingest.cache_bytes`).
    total: usize,
    /// Caches alive now (one per running partition).
    caches: AtomicUsize,
}

impl CacheBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            caches: AtomicUsize::new(0),
        })
    }

    /// One cache's share now. A cache started later shrinks the others at their next insert
    /// or their runner's periodic trim: until then the instance may hold up to their earlier
    /// shares.
    fn share(&self) -> usize {
        self.total / self.caches.load(Ordering::Relaxed).max(1)
    }
}

/// One partition's customers as committed, in their stored form (empty: not stored), least
/// recently used first out.
pub struct StateCache {
    /// Unbounded in the crate's terms (it would reserve a table for its whole count up front):
    /// [`Self::put`] keeps both bounds.
    lru: LruCache<String, Box<[u8]>>,
    max_customers: usize,
    /// What the entries cost, [`ENTRY_OVERHEAD`] included.
    bytes: usize,
    budget: Arc<CacheBudget>,
}

/// What an entry costs.
fn cost(id: &str, stored: &[u8]) -> usize {
    id.len() + stored.len() + ENTRY_OVERHEAD
}

impl StateCache {
    /// A cache of at most `max_customers` entries, within its share of `budget`.
    pub fn new(max_customers: usize, budget: Arc<CacheBudget>) -> Self {
        budget.caches.fetch_add(1, Ordering::Relaxed);
        Self {
            lru: LruCache::unbounded(),
            max_customers: max_customers.max(1),
            bytes: 0,
            budget,
        }
    }

    /// The cached stored form of `id`, marked as used.
    pub fn get(&mut self, id: &str) -> Option<&[u8]> {
        self.lru.get(id).map(|b| &**b)
    }

    /// Caches `stored` as `id`'s state (in place if `id` is cached), then evicts the least
    /// recently used entries while the cache is over its share of the budget.
    pub fn put(&mut self, id: String, stored: Box<[u8]>) {
        let added = cost(&id, &stored);
        let len = stored.len();
        // Unbounded in the crate's terms, `push` gives back only a replaced entry (in place:
        // no entry freed and made); a bounded one would give back an evicted entry of another
        // id, which this accounting does not expect.
        debug_assert_eq!(self.lru.cap(), NonZeroUsize::MAX);
        match self.lru.push(id, stored) {
            Some((_, replaced)) => self.bytes = self.bytes + len - replaced.len(),
            None => self.bytes += added,
        }
        self.trim();
    }

    /// Evicts the least recently used entries while the cache is over its count or its
    /// share of the budget (which shrinks when partitions start: a quiet cache is trimmed by
    /// its runner's periodic check). The most recent entry stays even when it alone exceeds
    /// the share.
    pub fn trim(&mut self) {
        let share = self.budget.share();
        while (self.bytes > share || self.lru.len() > self.max_customers) && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((id, stored)) => self.bytes -= cost(&id, &stored),
                None => break,
            }
        }
    }

    /// Entries cached.
    pub fn len(&self) -> usize {
        self.lru.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    /// What the entries cost, [`ENTRY_OVERHEAD`] included.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for StateCache {
    fn drop(&mut self) {
        self.budget.caches.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(n: usize) -> Box<[u8]> {
        vec![7u8; n].into_boxed_slice()
    }

    /// What the cache's entries cost, counted from scratch.
    fn recount(c: &StateCache, ids: &[String]) -> usize {
        ids.iter()
            .filter_map(|id| c.lru.peek(id).map(|s| cost(id, s)))
            .sum()
    }

    /// A cache over `budget` with 200 entries of 20 bytes put (ids `a000`…).
    fn filled(budget: &Arc<CacheBudget>) -> StateCache {
        let mut c = StateCache::new(usize::MAX, Arc::clone(budget));
        for i in 0..200 {
            c.put(format!("a{i:03}"), state(20));
        }
        c
    }

    #[test]
    fn the_budget_evicts_least_recently_used_first_and_keeps_the_count_exact() {
        let budget = CacheBudget::new(10 * (ENTRY_OVERHEAD + 2 + 50));
        let mut c = StateCache::new(1000, Arc::clone(&budget));
        let ids: Vec<String> = (0..30).map(|i| format!("c{i:02}")).collect();
        for id in &ids[..10] {
            c.put(id.clone(), state(49));
        }
        assert_eq!(c.len(), 10, "49 + 3 + overhead each: ten fit");
        // c00 used again: c01 is the oldest now.
        assert!(c.get("c00").is_some());
        c.put(ids[10].clone(), state(49));
        assert!(c.get("c00").is_some());
        assert!(c.get("c01").is_none(), "the least recently used went first");
        // Growing an entry in place evicts others to stay within the share.
        c.put(ids[0].clone(), state(400));
        assert!(
            c.bytes() <= budget.share(),
            "{} > {}",
            c.bytes(),
            budget.share()
        );
        assert!(c.get("c00").is_some(), "the entry just put stays");
        assert_eq!(c.bytes(), recount(&c, &ids));
        // Shrinking in place frees its bytes.
        c.put(ids[0].clone(), state(1));
        assert_eq!(c.bytes(), recount(&c, &ids));
        for id in &ids[11..] {
            c.put(id.clone(), state(49));
            assert!(c.bytes() <= budget.share());
        }
        assert_eq!(c.bytes(), recount(&c, &ids));
    }

    #[test]
    fn the_count_bound_holds_and_its_evictions_are_counted() {
        let budget = CacheBudget::new(usize::MAX);
        let mut c = StateCache::new(3, budget);
        let ids: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
        for id in &ids {
            c.put(id.clone(), state(10));
        }
        assert_eq!(c.len(), 3);
        assert_eq!(c.bytes(), 3 * cost("c0", &state(10)));
        assert_eq!(c.bytes(), recount(&c, &ids));
    }

    #[test]
    fn partitions_share_the_instance_budget_evenly() {
        let one = 100 * (ENTRY_OVERHEAD + 4 + 20);
        let budget = CacheBudget::new(2 * one);
        let mut a = filled(&budget);
        assert!(
            a.len() >= 190 && a.bytes() <= 2 * one,
            "alone: the whole budget"
        );
        let mut b = StateCache::new(usize::MAX, Arc::clone(&budget));
        a.put("a-new".into(), state(20));
        assert!(a.bytes() <= one, "two caches: half each ({})", a.bytes());
        for i in 0..200 {
            b.put(format!("b{i:02}"), state(20));
        }
        assert!(a.bytes() + b.bytes() <= 2 * one);
        drop(b);
        assert_eq!(
            budget.caches.load(Ordering::Relaxed),
            1,
            "a dropped cache leaves"
        );
    }

    #[test]
    fn a_quiet_cache_gives_back_its_share_when_trimmed() {
        let one = 100 * (ENTRY_OVERHEAD + 4 + 20);
        let budget = CacheBudget::new(2 * one);
        let mut a = filled(&budget);
        let _b = StateCache::new(usize::MAX, Arc::clone(&budget));
        assert!(a.bytes() > one, "nothing put since: still the old share");
        a.trim();
        assert!(
            a.bytes() <= one && a.len() >= 90,
            "{} B, {}",
            a.bytes(),
            a.len()
        );
    }

    #[test]
    fn one_entry_over_the_share_is_still_kept() {
        let mut c = StateCache::new(10, CacheBudget::new(10));
        c.put("big".into(), state(1000));
        assert_eq!(c.len(), 1);
        c.put("next".into(), state(1000));
        assert_eq!(c.len(), 1);
        assert!(c.get("next").is_some());
    }
}
