//! Every Redis key tierd uses, in one place.
//!
//! All keys of one input partition share the hash tag `{<group>:<topic>:<partition>}`, so a
//! partition's whole batch commit touches one Redis Cluster slot.

/// Key namespace of one deployment (prefix, consumer group, input topic).
#[derive(Debug, Clone)]
pub struct Keyspace {
    prefix: String,
    group: String,
    topic: String,
}

/// The keys of one partition.
#[derive(Debug, Clone)]
pub struct PartitionKeys {
    /// Hash: `epoch` (owner fence, incremented on every assignment), `next_offset`.
    pub meta: String,
    /// Stream: tier changes and dead letters awaiting publication.
    pub outbox: String,
    /// Stream: dead letters Kafka refused permanently (too large for the topic, not
    /// authorized, …), set aside with the reason so the rest of the outbox flows; retried.
    pub parked: String,
    /// Sorted set: customer → next moment their tier may change without an event.
    pub timers: String,
    /// Hash: tier name → customers of this partition in it.
    pub tier_counts: String,
    /// Hash (meaningful on partition 0 only): the rank cut-offs in force, `version` + `data`.
    pub cutoffs: String,
    /// String with a TTL: the id of the `tierd export` reading a snapshot of the partition
    /// (`store::snapshot`); while it exists, commits save what they overwrite.
    pub snapshot_lease: String,
    /// Hash: state key → its value when the snapshot opened (`''`: absent then), saved by
    /// the first commit that writes the key while the lease exists.
    pub snapshot: String,
    /// Base of the key names (`<prefix>:{<group>:<topic>:<partition>}`).
    base: String,
    /// Prefix of customer state keys (`<prefix><customer_id>`), each one state in its stored form (`model::stored`).
    customer_prefix: String,
}

impl Keyspace {
    /// A keyspace; the parts are validated by config not to contain `{` or `}`.
    pub fn new(prefix: &str, group: &str, topic: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            group: group.to_owned(),
            topic: topic.to_owned(),
        }
    }

    /// Base of `partition`'s key names (`<prefix>:{<group>:<topic>:<partition>}`).
    fn base(&self, partition: i32) -> String {
        format!(
            "{}:{{{}:{}:{}}}",
            self.prefix, self.group, self.topic, partition
        )
    }

    /// The state key of `customer_id` in `partition`: `partition(partition).customer(id)`
    /// without building the partition's other keys (a lookup asks every partition).
    pub fn customer(&self, partition: i32, customer_id: &str) -> String {
        let mut k = self.base(partition);
        k.push_str(":c:");
        k.push_str(customer_id);
        k
    }

    /// `partition(partition).rank(name)`, without building the partition's other keys.
    pub fn rank(&self, partition: i32, name: &str) -> String {
        let mut k = self.base(partition);
        k.push_str(":rank:");
        k.push_str(name);
        k
    }

    /// The hash of the rank cut-offs in force: `partition(0).cutoffs`.
    pub fn cutoffs(&self) -> String {
        self.base(0) + ":cutoffs"
    }

    /// The keys of `partition`.
    pub fn partition(&self, partition: i32) -> PartitionKeys {
        let base = self.base(partition);
        PartitionKeys {
            meta: format!("{base}:meta"),
            outbox: format!("{base}:outbox"),
            parked: format!("{base}:parked"),
            timers: format!("{base}:timers"),
            tier_counts: format!("{base}:tiers"),
            cutoffs: format!("{base}:cutoffs"),
            snapshot_lease: format!("{base}:snapshot:lease"),
            snapshot: format!("{base}:snapshot"),
            customer_prefix: format!("{base}:c:"),
            base,
        }
    }
}

impl PartitionKeys {
    /// Sorted set of rank `name`: customer → their ranked value.
    pub fn rank(&self, name: &str) -> String {
        format!("{}:rank:{name}", self.base)
    }

    /// SCAN pattern of this partition's customer keys (glob characters in the prefix escaped).
    pub fn customer_pattern(&self) -> String {
        let mut p = String::with_capacity(self.customer_prefix.len() + 1);
        for c in self.customer_prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                p.push('\\');
            }
            p.push(c);
        }
        p.push('*');
        p
    }

    /// The customer id of a state key of this partition.
    pub fn customer_id<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.customer_prefix)
    }

    /// The state key of a customer of this partition.
    pub fn customer(&self, customer_id: &str) -> String {
        let mut k = String::with_capacity(self.customer_prefix.len() + customer_id.len());
        k.push_str(&self.customer_prefix);
        k.push_str(customer_id);
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_keys_of_a_partition_share_one_hash_tag() {
        let k = Keyspace::new("tierd", "g", "purchases").partition(3);
        for key in [
            &k.meta,
            &k.outbox,
            &k.parked,
            &k.timers,
            &k.snapshot_lease,
            &k.snapshot,
            &k.customer("c{1}"),
        ] {
            assert!(key.starts_with("tierd:{g:purchases:3}:"), "{key}");
        }
    }

    /// The layout is stored data (and documented in the README): changing it would orphan every
    /// stored customer on upgrade, so it is pinned here literally.
    #[test]
    fn the_key_layout_is_the_documented_one() {
        let k = Keyspace::new("tierd", "g", "purchases").partition(3);
        assert_eq!(k.meta, "tierd:{g:purchases:3}:meta");
        assert_eq!(k.outbox, "tierd:{g:purchases:3}:outbox");
        assert_eq!(k.parked, "tierd:{g:purchases:3}:parked");
        assert_eq!(k.timers, "tierd:{g:purchases:3}:timers");
        assert_eq!(k.tier_counts, "tierd:{g:purchases:3}:tiers");
        assert_eq!(k.cutoffs, "tierd:{g:purchases:3}:cutoffs");
        assert_eq!(k.snapshot_lease, "tierd:{g:purchases:3}:snapshot:lease");
        assert_eq!(k.snapshot, "tierd:{g:purchases:3}:snapshot");
        assert_eq!(k.rank("value"), "tierd:{g:purchases:3}:rank:value");
        assert_eq!(k.customer("c1"), "tierd:{g:purchases:3}:c:c1");
        assert_eq!(k.customer_id("tierd:{g:purchases:3}:c:c1"), Some("c1"));
        assert_eq!(k.customer_pattern(), "tierd:{g:purchases:3}:c:*");
        // The shortcuts of the keyspace name the same keys.
        let ks = Keyspace::new("tierd", "g", "purchases");
        assert_eq!(ks.customer(3, "c1"), k.customer("c1"));
        assert_eq!(ks.rank(3, "value"), k.rank("value"));
        assert_eq!(ks.cutoffs(), ks.partition(0).cutoffs);
        let glob = Keyspace::new("t*[", "g", "in").partition(0);
        assert_eq!(glob.customer_pattern(), "t\\*\\[:{g:in:0}:c:*");
    }
}
