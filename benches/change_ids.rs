//! The cost of a change id (a UUID v5 made for every tier change and at-risk notice): tierd's
//! `change_id` (RustCrypto `sha1`, SHA extensions where the CPU has them) against the same id
//! made with `uuid::Uuid::new_v5` (portable SHA-1), which it replaced. Wall time per id, best
//! of 5 rounds of 1,000,000 ids each.
//!
//! `cargo bench --bench change_ids`. Output: one line per implementation, nanoseconds per id.

use std::hint::black_box;
use std::time::{Duration, Instant};

const IDS: u64 = 1_000_000;

fn best_of(rounds: usize, mut f: impl FnMut() -> usize) -> Duration {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed()
        })
        .min()
        .expect("rounds")
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --all-targets` / nextest probing the bench: nothing to list.
    }
    let namespace = uuid::Uuid::from_u128(0x7d1e_4c2a_9b3f_4e61_a0c8_5f2d_3b9e_1a47);
    assert_eq!(
        tierd::model::change::change_id("customer-000123", Some(42), 7),
        {
            let mut name = b"customer-000123\0".to_vec();
            name.extend_from_slice(&7u64.to_be_bytes());
            name.extend_from_slice(&42u64.to_be_bytes());
            uuid::Uuid::new_v5(&namespace, &name).to_string()
        },
        "the namespace or the name layout here is not tierd's"
    );
    let tierd = best_of(5, || {
        (0..IDS)
            .map(|i| tierd::model::change::change_id("customer-000123", Some(42), i).len())
            .sum()
    });
    let reference = best_of(5, || {
        (0..IDS)
            .map(|i| {
                let mut name = Vec::with_capacity(40);
                name.extend_from_slice(b"customer-000123\0");
                name.extend_from_slice(&i.to_be_bytes());
                name.extend_from_slice(&42u64.to_be_bytes());
                uuid::Uuid::new_v5(&namespace, &name).to_string().len()
            })
            .sum()
    });
    let per = |d: Duration| d.as_nanos() as f64 / IDS as f64;
    println!("## change ids (UUID v5), best of 5 × {IDS}");
    println!("tierd change_id (sha1 crate): {:.0} ns per id", per(tierd));
    println!(
        "uuid new_v5 (portable SHA-1): {:.0} ns per id",
        per(reference)
    );
}
