//! `tierd rules explain CUSTOMER_ID`: the customer's metrics, scores, the rule that placed
//! them, and when and why they would move next — as the API shows it.

use super::{Store, ToolError};
use crate::config::{ClockMode, Config};
use crate::engine::rules::Rules;
use crate::model::change::MoneyFormat;

/// Explains one stored customer under `rules` at engine time now (wall mode) or the
/// customer's own engine time (event mode): the API's customer view, rank positions included.
///
/// # Errors
/// [`ToolError`] when Redis cannot be read or the customer is unknown.
pub fn run(
    config: &Config,
    rules: &Rules,
    customer_id: &str,
) -> Result<serde_json::Value, ToolError> {
    let mut store = Store::open(config)?;
    let now = match config.clock.mode {
        ClockMode::Wall => crate::model::time::now_ms(),
        ClockMode::Event => i64::MIN,
    };
    let money = MoneyFormat {
        currency: config.money.currency.clone(),
        fraction_digits: config.money.fraction_digits,
    };
    store.explained_customer(rules, &money, now, customer_id)
}
