//! Trigger: a new rules version. The partition's customers last evaluated under another
//! version are re-evaluated a page at a time (`rules.sweep_per_second`), one commit per page.
//! Restartable: customers already evaluated under this version are skipped, so a crash
//! mid-sweep neither loses nor repeats a change; the completed sweep is recorded in the
//! partition's meta so a restart does not scan again.

use super::draft::Working;
use super::runner::Runner;
use crate::engine::Trigger;
use crate::model::state::rules_hash;
use crate::store::partition::ApplyError;
use crate::telemetry::events;
use std::sync::Arc;

impl Runner {
    /// Re-evaluates the next page of the sweep, if one is under way.
    pub(super) async fn sweep_step(&mut self) -> Result<(), ApplyError> {
        let Some(cursor) = self.sweep else {
            return Ok(());
        };
        let p = Arc::clone(&self.pipeline);
        let (next, ids) = self.store.scan_customer_ids(cursor, p.sweep_page).await?;
        let mut work = Working::new();
        self.load(ids.iter().cloned(), &mut work).await?;
        let hash = rules_hash(p.rules.version());
        let mut draft = self.new_draft();
        let mut swept = 0u64;
        for id in &ids {
            let loaded = work.get_mut(id.as_str()).expect("loaded above");
            if loaded.state.rules_hash == hash {
                continue;
            }
            self.reevaluate(&mut draft, id, loaded, Trigger::RulesChanged);
            swept += 1;
        }
        let done = next == 0;
        if swept > 0 || done {
            draft.swept_rules = done.then_some(hash);
            self.commit(&mut draft, &mut work).await?;
        }
        self.keep(work);
        self.sweep = (!done).then_some(next);
        events::RulesSwept {
            partition: self.partition,
            customers: swept,
            completed: done.then(|| p.rules.version().to_owned()),
        }
        .emit(&p.telemetry);
        Ok(())
    }
}
