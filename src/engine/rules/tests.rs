//! Rules engine tests: parsing and checks, and each policy option against a customer history
//! (each test fails without the option it tests).

use super::*;
use crate::engine::rules::rank::Cutoffs;
use crate::engine::{Applied, Outcome, Trigger};
use crate::model::calendar::{Calendar, DAY_MS};
use crate::model::change::ChangeReason;
use crate::model::state::{CustomerState, DedupPolicy, Pin, PinMode, PinRequest};
use crate::model::time::parse_rfc3339_ms;
use crate::model::{Event, EventKind};

const DEDUP: DedupPolicy = DedupPolicy {
    horizon_ms: 400 * DAY_MS,
    max_ids: 64,
};

fn at(s: &str) -> i64 {
    parse_rfc3339_ms(s).unwrap()
}

fn rules(text: &str) -> Rules {
    Rules::parse(text, "t.toml", 2).unwrap_or_else(|e| panic!("{e}"))
}

fn problems(text: &str) -> Vec<Problem> {
    match Rules::parse(text, "t.toml", 2) {
        Err(RulesError::Invalid { problems, .. }) => problems,
        other => panic!("expected invalid, got {other:?}"),
    }
}

/// A customer driven through purchases and timers in event time; records each change as
/// (tier, reason, when).
struct Sim<'r> {
    rules: &'r Rules,
    state: CustomerState,
    n: u32,
    log: Vec<(String, ChangeReason, String)>,
    notices: Vec<Outcome>,
}

impl<'r> Sim<'r> {
    fn new(rules: &'r Rules) -> Self {
        Self {
            rules,
            state: CustomerState::default(),
            n: 0,
            log: Vec::new(),
            notices: Vec::new(),
        }
    }

    fn note(&mut self, o: Outcome) {
        if let Some(t) = &o.transition {
            self.log.push((
                self.rules.tiers()[t.tier].name.clone(),
                t.reason,
                crate::model::time::format_ms(t.at)[..10].to_owned(),
            ));
        }
        if o.notice.is_some() {
            self.notices.push(o);
        }
    }

    /// Fires every timer due up to `until`.
    fn advance(&mut self, until: i64) {
        while let Some((due, cause)) = self.state.timer.filter(|(d, _)| *d <= until) {
            let o = self
                .state
                .evaluate(self.rules, due, Trigger::Time(cause), &Cutoffs::default());
            self.note(o);
        }
    }

    fn event(&mut self, when: &str, kind: EventKind, amount: i64, pin: Option<PinRequest>) {
        self.event_with(when, kind, amount, pin, 0, &[]);
    }

    /// An event with points and attributes.
    fn event_with(
        &mut self,
        when: &str,
        kind: EventKind,
        amount: i64,
        pin: Option<PinRequest>,
        points: i64,
        attributes: &[(&str, &str)],
    ) {
        let t = at(when);
        self.advance(t);
        self.n += 1;
        let e = Event {
            event_id: format!("e{}", self.n),
            customer_id: "c".into(),
            kind,
            amount_minor: amount,
            occurred_at_ms: t,
            pin,
            points,
            attributes: attributes
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        match self
            .state
            .apply(&e, self.rules, DEDUP, t, &Cutoffs::default())
        {
            Applied::Counted(o) => self.note(*o),
            other => panic!("{other:?}"),
        }
    }

    fn buy(&mut self, when: &str, units: i64) {
        self.event(when, EventKind::Purchase, units * 100, None);
    }

    fn refund(&mut self, when: &str, units: i64) {
        self.event(when, EventKind::Refund, units * 100, None);
    }

    fn tiers(&self) -> Vec<(&str, &str, &str)> {
        self.log
            .iter()
            .map(|(t, r, d)| (t.as_str(), r.as_str(), d.as_str()))
            .collect()
    }
}

const LADDER: &str = r#"
version = "l1"
[windows.d30]
length = "30 days"
[[tiers]]
name = "gold"
when = ["window.d30.sum >= 1000"]
[[tiers]]
name = "silver"
when = ["window.d30.sum >= 300"]
[[tiers]]
name = "basic"
"#;

fn with_policy(policy: &str) -> Rules {
    rules(&LADDER.replace(
        "[[tiers]]\nname = \"gold\"",
        &format!("[policy]\n{policy}\n[[tiers]]\nname = \"gold\""),
    ))
}

#[test]
fn every_preset_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let r = Rules::load(&path, 2).unwrap_or_else(|e| panic!("{e}"));
        assert!(r.tiers().len() >= 2, "{}", path.display());
        n += 1;
    }
    assert!(n >= 7);
}

#[test]
fn window_expiry_downgrades_with_no_event() {
    let r = rules(LADDER);
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T10:00:00Z", 600);
    s.buy("2026-01-10T10:00:00Z", 500);
    s.advance(at("2026-03-01T00:00:00Z"));
    // 1 Jan's bucket leaves on 31 Jan (day 30 after it), 10 Jan's on 9 Feb.
    assert_eq!(
        s.tiers(),
        [
            ("silver", "purchase", "2026-01-01"),
            ("gold", "purchase", "2026-01-10"),
            ("silver", "window_expiry", "2026-01-31"),
            ("basic", "window_expiry", "2026-02-09"),
        ]
    );
    assert_eq!(s.state.timer, None, "nothing left to expire");
    assert!(
        s.state.day_buckets.is_empty(),
        "expired buckets are dropped"
    );
}

#[test]
fn recency_bins_move_scores_and_tiers() {
    let r = Rules::load(
        std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/rules/rfm-segments.toml"
        )),
        2,
    )
    .unwrap();
    let mut s = Sim::new(&r);
    for d in 1..=5 {
        s.buy(&format!("2026-01-0{d}T10:00:00Z"), 1200);
    }
    s.advance(at("2026-12-01T00:00:00Z"));
    // Five purchases: F = 3, M = 5 (6000). 5 Jan: cell 535 → loyal (R ≥ 3, F ≥ 3). R drops
    // to 4 on day 8 and 3 on day 31 (still loyal), to 2 on day 61 after 5 Jan 10:00
    // (7 Mar 10:00: at risk) and to 1 on day 121 (6 May: hibernating, cell 135).
    assert_eq!(
        s.tiers(),
        [
            ("promising", "purchase", "2026-01-01"),
            ("loyal", "purchase", "2026-01-05"),
            ("at_risk", "recency", "2026-03-07"),
            ("hibernating", "recency", "2026-05-06"),
        ]
    );
    assert_eq!(
        s.state.timer.map(|(t, _)| t),
        Some(at("2027-01-01T00:00:00Z")),
        "next: January leaves the window"
    );
}

#[test]
fn grace_period_delays_and_requalifying_cancels() {
    let r = with_policy("grace_days = 5");
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T10:00:00Z", 1000);
    s.advance(at("2026-02-10T00:00:00Z"));
    assert_eq!(
        s.tiers(),
        [
            ("gold", "purchase", "2026-01-01"),
            ("basic", "grace_ended", "2026-02-05")
        ]
    );
    // Requalifying inside the grace period cancels the downgrade.
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T10:00:00Z", 1000);
    s.buy("2026-02-02T10:00:00Z", 1000);
    s.advance(at("2026-02-20T00:00:00Z"));
    assert_eq!(s.tiers(), [("gold", "purchase", "2026-01-01")]);
    // Without grace it would have dropped on 31 Jan.
    let plain = rules(LADDER);
    let mut s = Sim::new(&plain);
    s.buy("2026-01-01T10:00:00Z", 1000);
    s.buy("2026-02-02T10:00:00Z", 1000);
    assert_eq!(s.tiers()[1], ("basic", "window_expiry", "2026-01-31"));
}

#[test]
fn minimum_stay_holds_a_tier() {
    let r = with_policy("min_stay_days = 45");
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T10:00:00Z", 1000);
    s.advance(at("2026-04-01T00:00:00Z"));
    assert_eq!(
        s.tiers(),
        [
            ("gold", "purchase", "2026-01-01"),
            ("basic", "min_stay_ended", "2026-02-15")
        ]
    );
}

#[test]
fn hysteresis_keeps_a_tier_on_a_lower_bar() {
    let text = LADDER.replace(
        "when = [\"window.d30.sum >= 1000\"]",
        "when = [\"window.d30.sum >= 1000\"]\nstay = [\"window.d30.sum >= 800\"]",
    );
    let r = rules(&text);
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T10:00:00Z", 200);
    s.buy("2026-01-05T10:00:00Z", 800);
    s.advance(at("2026-02-01T00:00:00Z"));
    // 1 Jan's 200 leaves on 31 Jan: 800 left, enough to stay gold (not to enter it).
    assert_eq!(
        s.tiers(),
        [
            ("basic", "purchase", "2026-01-01"),
            ("gold", "purchase", "2026-01-05")
        ]
    );
    s.refund("2026-02-01T10:00:00Z", 1);
    assert_eq!(s.tiers()[2], ("silver", "refund", "2026-02-01"));
}

#[test]
fn downgrade_modes_step_replace_base() {
    let three = |mode: &str| {
        let r = rules(&format!(
            r#"
version = "m"
[policy]
downgrade = "{mode}"
review = "days:10"
[[tiers]]
name = "t1"
when = ["sum >= 300"]
[[tiers]]
name = "t2"
when = ["sum >= 200"]
[[tiers]]
name = "t3"
when = ["sum >= 100"]
[[tiers]]
name = "t4"
"#
        ));
        let mut s = Sim::new(&r);
        s.buy("2026-01-01T10:00:00Z", 300);
        s.refund("2026-01-02T10:00:00Z", 250);
        s.advance(at("2026-03-01T00:00:00Z"));
        s.tiers()
            .iter()
            .map(|(t, r, d)| format!("{t} {r} {d}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        three("replace"),
        ["t1 purchase 2026-01-01", "t4 validity_expired 2026-01-11"]
    );
    assert_eq!(
        three("step"),
        [
            "t1 purchase 2026-01-01",
            "t2 validity_expired 2026-01-11",
            "t3 validity_expired 2026-01-21",
            "t4 validity_expired 2026-01-31"
        ]
    );
    assert_eq!(
        three("base"),
        ["t1 purchase 2026-01-01", "t4 validity_expired 2026-01-11"]
    );
}

#[test]
fn validity_renews_when_still_qualified_and_upgrades_restart_it() {
    let r = rules(
        r#"
version = "v"
[windows.d365]
length = "365 days"
[policy]
review = "days:60"
[[tiers]]
name = "gold"
when = ["window.d365.sum >= 5000"]
[[tiers]]
name = "silver"
when = ["window.d365.sum >= 1000"]
[[tiers]]
name = "member"
"#,
    );
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T00:00:00Z", 1000); // silver until 2 Mar (60 days)
    s.buy("2026-02-01T00:00:00Z", 4000); // gold, valid until 2 Apr
    s.advance(at("2027-06-01T00:00:00Z"));
    // Gold is reviewed every 60 days from 1 Feb: 2 Apr, 1 Jun, 31 Jul, 29 Sep, 28 Nov (still
    // 5000 in the window each time: renewed, no event), 27 Jan 2027 — the 1 Jan 2026
    // purchase left the window on 1 Jan 2027, the 4000 alone is silver. Silver's review on
    // 28 Mar 2027 finds nothing (the 4000 left on 1 Feb 2027): member.
    assert_eq!(
        s.tiers(),
        [
            ("silver", "purchase", "2026-01-01"),
            ("gold", "purchase", "2026-02-01"),
            ("silver", "validity_expired", "2027-01-27"),
            ("member", "validity_expired", "2027-03-28"),
        ]
    );
    // With upgrade_restarts_review = false the gold upgrade keeps silver's review date.
    let r2 = rules(&r_text_no_restart());
    let mut s = Sim::new(&r2);
    s.buy("2026-01-01T00:00:00Z", 1000);
    s.buy("2026-02-01T00:00:00Z", 4000);
    assert_eq!(s.state.review, Some(at("2026-03-02T00:00:00Z")));
}

fn r_text_no_restart() -> String {
    r#"
version = "v"
[windows.d365]
length = "365 days"
[policy]
review = "days:60"
upgrade_restarts_review = false
[[tiers]]
name = "gold"
when = ["window.d365.sum >= 5000"]
[[tiers]]
name = "silver"
when = ["window.d365.sum >= 1000"]
[[tiers]]
name = "member"
"#
    .into()
}

#[test]
fn quarterly_review_judges_the_closing_quarter() {
    let r = rules(
        r#"
version = "q"
[windows.q]
calendar = "quarter"
[policy]
review = "quarter"
[[tiers]]
name = "vip"
when = ["window.q.sum >= 1000"]
[[tiers]]
name = "normal"
"#,
    );
    let mut s = Sim::new(&r);
    s.buy("2026-02-10T00:00:00Z", 1000); // vip, reviewed 1 Apr on Q1
    s.buy("2026-05-10T00:00:00Z", 1000); // Q2 also qualifies
    s.advance(at("2026-12-31T00:00:00Z"));
    // 1 Apr: Q1 had 1000 → renewed; 1 Jul: Q2 had 1000 → renewed; 1 Oct: Q3 had 0 → down.
    assert_eq!(
        s.tiers(),
        [
            ("vip", "purchase", "2026-02-10"),
            ("normal", "validity_expired", "2026-10-01")
        ]
    );
}

#[test]
fn anniversary_and_fixed_date_reviews() {
    assert_eq!(
        Review::parse("anniversary").unwrap().next(
            &Calendar::utc(),
            at("2026-05-01T00:00:00Z"),
            Some(at("2024-07-15T08:00:00Z"))
        ),
        Some(at("2026-07-15T00:00:00Z"))
    );
    assert_eq!(
        Review::parse("date:04-01").unwrap().next(
            &Calendar::utc(),
            at("2026-05-01T00:00:00Z"),
            None
        ),
        Some(at("2027-04-01T00:00:00Z"))
    );
    assert!(Review::parse("date:02-30").is_err());
    assert!(Review::parse("weekly").is_err());
}

#[test]
fn at_risk_notice_comes_before_the_downgrade_with_what_is_missing() {
    let r = with_policy("review = \"days:60\"\nat_risk_days = 7");
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T00:00:00Z", 1000);
    s.advance(at("2026-03-10T00:00:00Z"));
    assert_eq!(s.notices.len(), 1);
    let n = s.notices[0].notice.as_ref().unwrap();
    assert_eq!(
        (n.at, n.now),
        (at("2026-03-02T00:00:00Z"), at("2026-02-23T00:00:00Z"))
    );
    assert_eq!(
        (
            r.tiers()[n.tier].name.as_str(),
            r.tiers()[n.falls_to].name.as_str()
        ),
        ("gold", "basic")
    );
    assert_eq!(n.shortfall[0]["missing"], "1000.00");
    assert_eq!(n.shortfall[0]["condition"], "window.d30.sum >= 1000.00");
    assert_eq!(s.tiers()[1], ("basic", "validity_expired", "2026-03-02"));
    // Without a lead time, no notice.
    let r = with_policy("review = \"days:60\"");
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T00:00:00Z", 1000);
    s.advance(at("2026-03-10T00:00:00Z"));
    assert!(s.notices.is_empty());
}

#[test]
fn manual_pins_floor_fixed_and_expiry() {
    let r = rules(LADDER);
    let pin = |tier: &str, mode, until: Option<&str>| {
        Some(PinRequest::Set(Pin {
            tier: tier.into(),
            mode,
            until: until.map(at),
            by: "rm-1".into(),
        }))
    };
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T00:00:00Z", 100);
    s.event(
        "2026-01-02T00:00:00Z",
        EventKind::Override,
        0,
        pin("gold", PinMode::Floor, Some("2026-02-01T00:00:00Z")),
    );
    s.buy("2026-01-03T00:00:00Z", 100);
    s.advance(at("2026-03-01T00:00:00Z"));
    assert_eq!(
        s.tiers(),
        [
            ("basic", "purchase", "2026-01-01"),
            ("gold", "manual", "2026-01-02"),
            ("basic", "manual_expired", "2026-02-01"),
        ]
    );
    // Fixed pins hold a customer below what the rules say; clearing releases them.
    let mut s = Sim::new(&r);
    s.event(
        "2026-01-01T00:00:00Z",
        EventKind::Override,
        0,
        pin("silver", PinMode::Fixed, None),
    );
    s.buy("2026-01-02T00:00:00Z", 2000);
    s.event(
        "2026-01-03T00:00:00Z",
        EventKind::Override,
        0,
        Some(PinRequest::Clear),
    );
    assert_eq!(
        s.tiers(),
        [
            ("silver", "manual", "2026-01-01"),
            ("gold", "manual", "2026-01-03")
        ]
    );
}

#[test]
fn time_can_raise_when_a_refund_leaves_the_window() {
    let r = rules(LADDER);
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T00:00:00Z", 2000);
    s.refund("2026-01-20T00:00:00Z", 1800);
    s.buy("2026-02-05T00:00:00Z", 400);
    s.advance(at("2026-03-01T00:00:00Z"));
    // The refund's bucket leaves on 19 Feb: 400 alone is silver again.
    assert_eq!(
        s.tiers(),
        [
            ("gold", "purchase", "2026-01-01"),
            ("basic", "refund", "2026-01-20"),
            ("silver", "window_expiry", "2026-02-19"),
        ]
    );
}

#[test]
fn checks_name_file_line_and_field() {
    let p = problems(
        r#"version = "x"
[windows.w]
length = "10 days"
bucket = "month"
[scores.R]
metric = "recency_days"
bins = [
  { score = 5, max = 7 },
  { score = 4, max = 5 },
  { score = 1, max = 9 },
]
[[tiers]]
name = "a"
when = ["mood >= 3"]
[[tiers]]
name = "b"
when = ["sum >= 10"]
[[tiers]]
name = "c"
when = ["sum >= 20"]
[[tiers]]
name = "d"
when = ["sum >= 1"]
"#,
    );
    let find = |field: &str| {
        p.iter()
            .find(|x| x.field == field)
            .unwrap_or_else(|| panic!("no {field} in {p:?}"))
    };
    assert!(find("windows.w").message.contains("shorter than"));
    assert_eq!(find("windows.w").line, Some(2));
    assert!(find("scores.R.bins[1]").message.contains("unreachable"));
    assert_eq!(find("scores.R.bins[1]").line, Some(9));
    assert!(find("tiers[0].when[0]")
        .message
        .contains("unknown metric \"mood\""));
    assert_eq!(find("tiers[0].when[0]").line, Some(14));
    assert!(find("tiers[2].when")
        .message
        .contains("taken first by tiers[1]"));
    assert!(find("tiers[3].when").message.contains("remove `when`"));
    let text = Rules::parse("version = \"x\"\n[[tiers]]\nname = \"a\"\nwhen = [\"sum >= 1\"]\n[[tiers]]\nname = \"b\"\nwhen = 3\n", "f.toml", 2)
        .unwrap_err()
        .to_string();
    assert!(text.contains("f.toml") && text.contains("line 7"), "{text}");
    // Score gaps, contradictions, monthly averages over day windows, unused windows.
    let p = problems(
        r#"version = "x"
[windows.d]
length = "30 days"
[windows.unused]
length = "3 months"
[scores.F]
metric = "count"
bins = [{ score = 5, min = 10 }, { score = 1, min = 0 }]
[[tiers]]
name = "a"
when = ["sum >= 10", "sum < 5"]
[[tiers]]
name = "b"
when = ["window.d.monthly_avg >= 3"]
[[tiers]]
name = "c"
"#,
    );
    assert!(
        p.iter()
            .any(|x| x.field == "scores.F.bins[1]" && x.message.contains("gap")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|x| x.field == "tiers[0].when" && x.message.contains("contradict")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|x| x.field == "tiers[1].when[0]" && x.message.contains("monthly_avg")),
        "{p:?}"
    );
    assert!(p.iter().any(|x| x.field == "windows.unused"), "{p:?}");
}

#[test]
fn averages_are_exact_and_undefined_without_purchases() {
    let r = rules(
        r#"
version = "a"
[[tiers]]
name = "big"
when = ["avg >= 33.34"]
[[tiers]]
name = "small"
"#,
    );
    let mut s = Sim::new(&r);
    s.refund("2026-01-01T00:00:00Z", 1);
    s.event("2026-01-02T00:00:00Z", EventKind::Purchase, 3334, None);
    s.event("2026-01-03T00:00:00Z", EventKind::Purchase, 3334, None);
    s.event("2026-01-04T00:00:00Z", EventKind::Purchase, 3434, None);
    // (33.34 + 33.34 + 34.34 − 1.00) / 3 = 33.34 exactly: big.
    assert_eq!(s.tiers().last().unwrap().0, "big");
    assert_eq!(s.tiers()[0], ("small", "refund", "2026-01-01"));
    assert_eq!(
        s.tiers().len(),
        2,
        "33.34 is reached only by the third purchase"
    );
}

/// Per-customer state size for each preset, for a customer active every day of the longest
/// window (the worst case for bucket counts) with a full dedup memory: bounded by the window
/// length in buckets, never by the number of events.
#[test]
fn state_size_per_preset_is_bounded_by_buckets() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        let r = Rules::load(&path, 2).unwrap();
        let mut s = CustomerState::default();
        let start = at("2025-01-01T10:00:00Z");
        let days = 800;
        for d in 0..days {
            let t = start + d * DAY_MS;
            let e = Event {
                event_id: format!("order-{d:08}-{:x}", d * 7919),
                customer_id: "customer-000123".into(),
                kind: EventKind::Purchase,
                amount_minor: 12_345,
                occurred_at_ms: t,
                pin: None,
                points: 0,
                attributes: Vec::new(),
            };
            s.apply(
                &e,
                &r,
                DedupPolicy {
                    horizon_ms: 7 * DAY_MS,
                    max_ids: 64,
                },
                t,
                &Cutoffs::default(),
            );
        }
        let typical = crate::model::stored::to_vec(&s).len();
        let buckets = s.day_buckets.len() + s.month_buckets.len();
        let keep = (r.keep_buckets(Unit::Day) + r.keep_buckets(Unit::Month)) as usize;
        assert!(
            buckets <= keep,
            "{}: {buckets} buckets > {keep}",
            path.display()
        );
        eprintln!(
            "{:<22} buckets kept {:>3} (max {:>3})  state {:>5} B  (ids {:>2})",
            path.file_name().unwrap().to_string_lossy(),
            buckets,
            keep,
            typical,
            s.ids.len()
        );
    }
}

#[test]
fn calendar_review_judges_the_whole_closing_period() {
    // A purchase in the first month of the quarter still counts at the quarter's review.
    let r = rules(
        r#"
version = "q"
[windows.q]
calendar = "quarter"
[policy]
review = "quarter"
[[tiers]]
name = "vip"
when = ["window.q.sum >= 1000"]
[[tiers]]
name = "normal"
"#,
    );
    let mut s = Sim::new(&r);
    s.buy("2026-01-10T00:00:00Z", 1000);
    s.advance(at("2026-08-01T00:00:00Z"));
    // Q1 qualifies (renewed 1 Apr); Q2 is empty: down on 1 Jul.
    assert_eq!(
        s.tiers(),
        [
            ("vip", "purchase", "2026-01-10"),
            ("normal", "validity_expired", "2026-07-01")
        ]
    );
}

#[test]
fn step_downgrades_paced_by_grace_keep_stepping() {
    let r = rules(
        r#"
version = "g"
[policy]
downgrade = "step"
grace_days = 5
[[tiers]]
name = "t1"
when = ["sum >= 300"]
[[tiers]]
name = "t2"
when = ["sum >= 200"]
[[tiers]]
name = "t3"
when = ["sum >= 100"]
[[tiers]]
name = "t4"
"#,
    );
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T00:00:00Z", 300);
    s.refund("2026-01-02T00:00:00Z", 300);
    s.advance(at("2026-03-01T00:00:00Z"));
    assert_eq!(
        s.tiers(),
        [
            ("t1", "purchase", "2026-01-01"),
            ("t2", "grace_ended", "2026-01-07"),
            ("t3", "grace_ended", "2026-01-12"),
            ("t4", "grace_ended", "2026-01-17"),
        ]
    );
}

#[test]
fn time_can_raise_a_customer_out_of_the_base_tier() {
    let r = rules(
        r#"
version = "d"
[[tiers]]
name = "dormant"
when = ["recency_days >= 30"]
[[tiers]]
name = "active"
"#,
    );
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T00:00:00Z", 1);
    s.advance(at("2026-03-01T00:00:00Z"));
    assert_eq!(
        s.tiers(),
        [
            ("active", "purchase", "2026-01-01"),
            ("dormant", "recency", "2026-01-31")
        ]
    );
}

#[test]
fn a_lapsed_pin_re_places_at_once_even_under_reviews() {
    let r = with_policy("review = \"days:60\"");
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T00:00:00Z", 10);
    s.event(
        "2026-01-02T00:00:00Z",
        EventKind::Override,
        0,
        Some(PinRequest::Set(Pin {
            tier: "gold".into(),
            mode: PinMode::Floor,
            until: Some(at("2026-01-10T00:00:00Z")),
            by: "rm".into(),
        })),
    );
    s.advance(at("2026-03-01T00:00:00Z"));
    assert_eq!(
        s.tiers(),
        [
            ("basic", "purchase", "2026-01-01"),
            ("gold", "manual", "2026-01-02"),
            ("basic", "manual_expired", "2026-01-10"),
        ]
    );
}

#[test]
fn a_late_event_is_never_evaluated_before_an_evaluation_that_already_ran() {
    let r = rules(LADDER);
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T10:00:00Z", 1000);
    s.advance(at("2026-02-01T00:00:00Z")); // window expiry on 31 Jan: basic
    s.buy("2026-01-30T10:00:00Z", 1000); // arrives late, within the dedup horizon
    assert_eq!(
        s.tiers(),
        [
            ("gold", "purchase", "2026-01-01"),
            ("basic", "window_expiry", "2026-01-31"),
            ("gold", "purchase", "2026-01-31"),
        ],
        "the late purchase counts, at the customer's engine time (never backwards)"
    );
}

#[test]
fn an_evaluation_is_never_stamped_before_the_customers_engine_time() {
    let r1 = rules(LADDER);
    let r2 = rules(&LADDER.replace("l1", "l2").replace(">= 1000", ">= 400"));
    let mut s = Sim::new(&r1);
    s.buy("2026-01-10T10:00:00Z", 500); // silver under l1
                                        // A sweep at a wall time before the customer's (future-dated) event time.
    let o = s.state.evaluate(
        &r2,
        at("2026-01-09T00:00:00Z"),
        Trigger::RulesChanged,
        &Cutoffs::default(),
    );
    let t = o.transition.expect("gold under l2");
    assert_eq!(
        (t.tier, t.reason, t.at),
        (0, ChangeReason::RulesChanged, at("2026-01-10T10:00:00Z"))
    );
    assert_eq!(s.state.since, at("2026-01-10T10:00:00Z"));
}

#[test]
fn erasing_leaves_nothing_of_the_customer() {
    let r = rules(LADDER);
    let mut state = CustomerState::default();
    let event = |id: &str, kind: EventKind| Event {
        event_id: id.into(),
        customer_id: "c".into(),
        kind,
        amount_minor: if kind == EventKind::Erase { 0 } else { 50_000 },
        occurred_at_ms: at("2026-05-01T10:00:00Z"),
        pin: None,
        points: 0,
        attributes: Vec::new(),
    };
    let none = Cutoffs::default();
    // Nothing stored: nothing to erase.
    assert!(matches!(
        state.apply(&event("x0", EventKind::Erase), &r, DEDUP, 0, &none),
        Applied::Erased {
            tier: None,
            existed: false
        }
    ));
    assert!(matches!(
        state.apply(&event("p1", EventKind::Purchase), &r, DEDUP, 0, &none),
        Applied::Counted(_)
    ));
    assert!(state.timer.is_some() && !state.is_new());
    match state.apply(&event("x1", EventKind::Erase), &r, DEDUP, 0, &none) {
        Applied::Erased { tier, existed } => {
            assert_eq!((tier.as_deref(), existed), (Some("silver"), true));
        }
        other => panic!("{other:?}"),
    }
    assert!(state.is_new(), "no metric, timer, id or sequence is kept");
    // The same purchase id again is a new customer's first purchase (the ids went too).
    assert!(matches!(
        state.apply(&event("p1", EventKind::Purchase), &r, DEDUP, 0, &none),
        Applied::Counted(_)
    ));
    assert_eq!(state.seq, 1);
    // An erase dated before the incarnation began (a re-sent copy of the first erase) is about
    // the earlier one: nothing happens to this one.
    state.born = Some(at("2026-05-01T10:00:00Z"));
    let mut late = event("x1", EventKind::Erase);
    late.occurred_at_ms = at("2026-04-30T10:00:00Z");
    let before = state.clone();
    assert!(matches!(
        state.apply(&late, &r, DEDUP, 0, &none),
        Applied::Erased {
            tier: None,
            existed: false
        }
    ));
    assert_eq!(state, before);
}

/// `time_zone`: a calendar quarter starts at local midnight. In Shanghai, 31 March 16:30 UTC
/// is already 1 April: two purchases half an hour before and after it fall in two quarters
/// there, in one in UTC.
#[test]
fn a_calendar_window_counts_the_program_time_zones_quarters() {
    let text = |zone: &str| {
        format!(
            r#"
version = "q1"
{zone}
[windows.q]
calendar = "quarter"
[[tiers]]
name = "gold"
when = ["window.q.sum >= 1000"]
[[tiers]]
name = "basic"
"#
        )
    };
    let run = |rules: &Rules| {
        let mut sim = Sim::new(rules);
        sim.buy("2026-03-31T15:30:00Z", 600);
        sim.buy("2026-03-31T16:30:00Z", 600);
        sim.advance(at("2026-12-31T00:00:00Z"));
        sim.log.clone()
    };
    let utc = rules(&text(""));
    let shanghai = rules(&text("time_zone = \"Asia/Shanghai\""));
    assert_eq!(shanghai.calendar().name(), "Asia/Shanghai");
    let tiers = |log: Vec<(String, ChangeReason, String)>| -> Vec<(String, String)> {
        log.into_iter()
            .map(|(t, r, d)| (t, format!("{} {d}", r.as_str())))
            .collect()
    };
    assert_eq!(
        tiers(run(&utc)),
        [
            ("basic".into(), "purchase 2026-03-31".into()),
            ("gold".into(), "purchase 2026-03-31".into()),
            // The UTC quarter ends 1 April 00:00 UTC.
            ("basic".into(), "window_expiry 2026-04-01".into()),
        ]
    );
    assert_eq!(
        tiers(run(&shanghai)),
        [("basic".into(), "purchase 2026-03-31".into())]
    );
    let p = problems(&text("time_zone = \"Asia/Beijing\""));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].field, "time_zone");
    assert!(
        p[0].message.contains("not an IANA time zone name"),
        "{}",
        p[0].message
    );
}

/// An airline-style ladder: a tier by points OR segments, or by both at lower bars (`any`
/// groups with a nested `all`).
const MILES: &str = r#"
version = "air-1"
[windows.year]
length = "12 months"
[[tiers]]
name = "gold"
when = [{ any = ["window.year.points >= 50000", "window.year.count >= 30", { all = ["window.year.points >= 25000", "window.year.count >= 15"] }] }]
[[tiers]]
name = "silver"
when = [{ any = ["window.year.points >= 25000", "window.year.count >= 15"] }]
[[tiers]]
name = "member"
"#;

#[test]
fn any_groups_qualify_by_points_or_segments() {
    let r = rules(MILES);
    assert_eq!(
        r.rule(0),
        "tiers[0] gold: (window.year.points >= 50000 or window.year.count >= 30 or (window.year.points >= 25000 and window.year.count >= 15))"
    );
    // Points alone.
    let mut flyer = Sim::new(&r);
    flyer.event_with(
        "2026-01-05T10:00:00Z",
        EventKind::Purchase,
        100,
        None,
        30_000,
        &[],
    );
    flyer.event_with(
        "2026-02-05T10:00:00Z",
        EventKind::Purchase,
        100,
        None,
        20_000,
        &[],
    );
    assert_eq!(
        flyer.tiers(),
        [
            ("silver", "purchase", "2026-01-05"),
            ("gold", "purchase", "2026-02-05")
        ]
    );
    assert_eq!(flyer.state.points_earned, 50_000);
    // A refund takes points back: below 50,000 and one segment, silver.
    flyer.event_with("2026-03-01T10:00:00Z", EventKind::Refund, 100, None, 1, &[]);
    assert_eq!(flyer.tiers()[2], ("silver", "refund", "2026-03-01"));
    // The year's points leave the window: member, by time alone.
    flyer.advance(at("2027-03-01T00:00:00Z"));
    assert_eq!(
        flyer.tiers()[3..],
        [("member", "window_expiry", "2027-01-01"),],
        "{:?}",
        flyer.tiers()
    );
    // Segments alone: 15 cheap flights with no points.
    let mut commuter = Sim::new(&r);
    for day in 1..=15 {
        commuter.buy(&format!("2026-01-{day:02}T08:00:00Z"), 1);
    }
    assert_eq!(commuter.tiers().last().unwrap().0, "silver");
    // Both at the lower bars (the nested `all`): 15 segments and 25,000 points.
    commuter.event_with(
        "2026-01-20T08:00:00Z",
        EventKind::Purchase,
        100,
        None,
        25_000,
        &[],
    );
    assert_eq!(
        commuter.tiers().last().unwrap(),
        &("gold", "purchase", "2026-01-20")
    );
    // What a silver flyer misses for gold: the group, with each alternative's shortfall.
    let mut silver = Sim::new(&r);
    silver.event_with(
        "2026-01-05T10:00:00Z",
        EventKind::Purchase,
        100,
        None,
        26_000,
        &[],
    );
    let eval = r.evaluate(
        &silver.state.facts(),
        at("2026-01-06T00:00:00Z"),
        &Cutoffs::default(),
    );
    assert_eq!(eval.tier, 1);
    let missing = r.shortfall(0, &eval);
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert_eq!(
        missing[0]["condition"],
        r.rule(0).split(": ").nth(1).unwrap()
    );
    let any = missing[0]["any"].as_array().unwrap();
    assert_eq!(any.len(), 3, "every alternative fails: {any:?}");
    assert_eq!(any[0]["missing"], 24_000);
    assert_eq!(any[1]["missing"], 29);
    assert_eq!(
        any[2]["all"].as_array().unwrap().len(),
        1,
        "only the count fails"
    );
    assert_eq!(any[2]["all"][0]["missing"], 14);
}

#[test]
fn groups_are_checked_and_named_by_their_path() {
    let p = problems(
        r#"version = "x"
[windows.y]
length = "12 months"
[[tiers]]
name = "a"
when = [{ any = [] }]
[[tiers]]
name = "b"
when = [{ any = ["window.y.count >= 3", { all = ["window.y.miles >= 5"] }] }]
[[tiers]]
name = "c"
"#,
    );
    let find = |f: &str| {
        p.iter()
            .find(|x| x.field == f)
            .unwrap_or_else(|| panic!("{f}: {p:?}"))
    };
    assert!(find("tiers[0].when[0].any")
        .message
        .contains("at least one condition"));
    assert_eq!(find("tiers[0].when[0].any").line, Some(6));
    assert!(find("tiers[1].when[0].any[1].all[0]")
        .message
        .contains("unknown window metric"));
    // An unknown group key is a schema error, with its line.
    let Err(RulesError::Parse { message, .. }) = Rules::parse(
        "version = \"x\"\n[[tiers]]\nname = \"a\"\nwhen = [{ either = [\"count >= 1\"] }]\n[[tiers]]\nname = \"b\"\n",
        "t.toml",
        2,
    ) else {
        panic!("expected a parse error")
    };
    assert!(
        message.contains("unknown key `either`") && message.contains("line 4"),
        "{message}"
    );
    // Both keys in one table, and groups nested deeper than 4.
    let Err(RulesError::Parse { message, .. }) = Rules::parse(
        "version = \"x\"\n[[tiers]]\nname = \"a\"\nwhen = [{ any = [\"count >= 1\"], all = [\"count >= 2\"] }]\n[[tiers]]\nname = \"b\"\n",
        "t.toml",
        2,
    ) else {
        panic!("expected a parse error")
    };
    assert!(
        message.contains("a condition group has one key"),
        "{message}"
    );
    let deep = (0..5).fold("\"count >= 1\"".to_owned(), |inner, _| {
        format!("{{ any = [{inner}] }}")
    });
    let p = problems(&format!(
        "version = \"x\"\n[[tiers]]\nname = \"a\"\nwhen = [{deep}]\n[[tiers]]\nname = \"b\"\n"
    ));
    assert!(
        p.iter().any(|x| x.message.contains("nest at most 4 deep")
            && x.field == "tiers[0].when[0].any[0].any[0].any[0].any[0]"),
        "{p:?}"
    );
    // A later tier whose conditions imply an earlier tier's `any` group is unreachable; one
    // that does not is fine.
    let implied = |gold: &str| {
        Rules::parse(
            &format!(
                "version = \"x\"\n[windows.y]\nlength = \"12 months\"\n[[tiers]]\nname = \"gold\"\nwhen = [{{ any = [\"window.y.count >= {gold}\", \"points >= 100\"] }}]\n[[tiers]]\nname = \"silver\"\nwhen = [\"window.y.count >= 10\"]\n[[tiers]]\nname = \"base\"\n"
            ),
            "t.toml",
            2,
        )
    };
    let Err(RulesError::Invalid { problems, .. }) = implied("5") else {
        panic!("expected unreachable")
    };
    assert!(
        problems[0].message.contains("taken first by tiers[0]"),
        "{problems:?}"
    );
    assert!(implied("20").is_ok());
}

const FILTERED: &str = r#"
version = "f-1"
[windows.qualifying]
length = "12 months"
exclude = { category = ["gift_card"] }
[windows.store]
length = "30 days"
only = { channel = ["store"] }
[[tiers]]
name = "gold"
when = ["window.qualifying.sum >= 1000", "window.store.count >= 2"]
[[tiers]]
name = "silver"
when = ["window.qualifying.sum >= 500"]
[[tiers]]
name = "basic"
"#;

#[test]
fn attribute_filters_leave_events_out_of_a_window() {
    let r = rules(FILTERED);
    assert_eq!(r.series().len(), 2);
    let mut s = Sim::new(&r);
    let buy = |s: &mut Sim<'_>, when: &str, units: i64, attrs: &[(&str, &str)]| {
        s.event_with(when, EventKind::Purchase, units * 100, None, 0, attrs);
    };
    buy(
        &mut s,
        "2026-01-02T10:00:00Z",
        2000,
        &[("category", "gift_card"), ("channel", "store")],
    );
    buy(
        &mut s,
        "2026-01-03T10:00:00Z",
        600,
        &[("category", "fuel"), ("channel", "web")],
    );
    buy(&mut s, "2026-01-04T10:00:00Z", 300, &[("channel", "store")]);
    buy(&mut s, "2026-01-05T10:00:00Z", 200, &[("channel", "app")]);
    // The gift card counts in the store window only; the store window has two purchases.
    assert_eq!(
        s.tiers(),
        [
            ("basic", "purchase", "2026-01-02"),
            ("silver", "purchase", "2026-01-03"),
            ("gold", "purchase", "2026-01-05"),
        ]
    );
    // Refunding the gift card changes nothing the qualifying window counts.
    s.event_with(
        "2026-01-06T10:00:00Z",
        EventKind::Refund,
        200_000,
        None,
        0,
        &[("category", "gift_card"), ("channel", "store")],
    );
    assert_eq!(s.tiers().len(), 3);
    // 30 days after the store purchases the store window empties: silver, with no event.
    s.advance(at("2026-03-01T00:00:00Z"));
    assert_eq!(s.tiers()[3], ("silver", "window_expiry", "2026-02-01"));
    // Only series are kept (no plain window): the store series lost its expired days.
    assert!(s.state.day_buckets.is_empty() && s.state.month_buckets.is_empty());
    assert_eq!(s.state.series.len(), 1, "{:?}", s.state.series);
    // Rules without the filters drop the series at the next evaluation.
    let plain = rules(LADDER);
    s.state.evaluate(
        &plain,
        at("2026-03-02T00:00:00Z"),
        Trigger::RulesChanged,
        &Cutoffs::default(),
    );
    assert!(s.state.series.is_empty());
}

#[test]
fn attribute_filters_are_checked() {
    let p = problems(
        r#"version = "x"
[windows.a]
length = "3 months"
only = { "sales channel" = ["store"], category = [] }
exclude = { category = ["gift_card"] }
[windows.b]
length = "3 months"
exclude = {}
[[tiers]]
name = "gold"
when = ["window.a.sum >= 10", "window.b.points >= 3"]
[[tiers]]
name = "base"
"#,
    );
    let find = |f: &str| {
        p.iter()
            .find(|x| x.field == f)
            .unwrap_or_else(|| panic!("{f}: {p:?}"))
    };
    assert!(find("windows.a.only.sales channel")
        .message
        .contains("no whitespace"));
    assert!(find("windows.a.only.category")
        .message
        .contains("lists no value"));
    assert!(find("windows.a.exclude.category")
        .message
        .contains("also in `only`"));
    assert!(find("windows.b.exclude")
        .message
        .contains("lists no attribute"));
    assert_eq!(p.len(), 4, "{p:?}");
}

/// Reading a window's points (a rules change) keeps what the window counted: its count and
/// sum stay on the plain buckets, only the points start from the change; the tool warns.
#[test]
fn reading_a_windows_points_keeps_what_it_counted() {
    let v1 = rules(
        r#"
version = "v1"
[windows.year]
length = "12 months"
[[tiers]]
name = "gold"
when = ["window.year.count >= 3"]
[[tiers]]
name = "member"
"#,
    );
    let v2_text = r#"
version = "v2"
[windows.year]
length = "12 months"
[[tiers]]
name = "gold"
when = [{ any = ["window.year.count >= 3", "window.year.points >= 100"] }]
[[tiers]]
name = "member"
"#;
    let v2 = rules(v2_text);
    let mut s = Sim::new(&v1);
    for day in 1..=3 {
        s.event_with(
            &format!("2026-01-0{day}T10:00:00Z"),
            EventKind::Purchase,
            100,
            None,
            40,
            &[],
        );
    }
    assert_eq!(s.tiers().last().unwrap().0, "gold");
    let o = s.state.evaluate(
        &v2,
        at("2026-01-05T00:00:00Z"),
        Trigger::RulesChanged,
        &Cutoffs::default(),
    );
    assert_eq!(o.transition, None, "still gold by its three purchases");
    let eval = v2.evaluate(
        &s.state.facts(),
        at("2026-01-05T00:00:00Z"),
        &Cutoffs::default(),
    );
    let value = |name: &str| {
        eval.values
            .iter()
            .find(|(op, _)| v2.operand_name(*op) == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(value("window.year.count").num().unwrap().floor(), 3);
    assert_eq!(
        value("window.year.points").num().unwrap().floor(),
        0,
        "points start now"
    );
    // Lifetime points were counted all along (events carried them).
    assert_eq!(s.state.points_earned, 120);
    let warned = crate::tools::simulate::warnings(&v1, &v2);
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].contains("window year counts points"),
        "{}",
        warned[0]
    );
    // Back to v1: the plain buckets were kept all along.
    s.state.evaluate(
        &v1,
        at("2026-01-06T00:00:00Z"),
        Trigger::RulesChanged,
        &Cutoffs::default(),
    );
    assert!(s.state.series.is_empty());
    assert_eq!(s.state.month_buckets.len(), 1);
    // Filters with values that would read alike as text are different series.
    let f = |values: &str| {
        rules(&format!(
            "version = \"f\"\n[windows.w]\nlength = \"3 months\"\nonly = {{ channel = {values} }}\n[[tiers]]\nname = \"a\"\nwhen = [\"window.w.count >= 1\"]\n[[tiers]]\nname = \"b\"\n"
        ))
        .series()[0]
        .key
    };
    assert_ne!(f(r#"["app|store"]"#), f(r#"["app", "store"]"#));
}

/// A recency bound inside a group moves customers by time like any other: its flip point is
/// a timer (the recency points are gathered from every group's members).
#[test]
fn recency_inside_a_group_sets_its_timer() {
    let r = rules(
        r#"
version = "g1"
[[tiers]]
name = "active"
when = [{ any = ["recency_days < 30", { all = ["count >= 5", "recency_days < 90"] }] }]
[[tiers]]
name = "lapsed"
"#,
    );
    let mut s = Sim::new(&r);
    s.buy("2026-01-01T10:00:00Z", 10);
    s.advance(at("2026-06-01T00:00:00Z"));
    assert_eq!(
        s.tiers(),
        [
            ("active", "purchase", "2026-01-01"),
            ("lapsed", "recency", "2026-01-31"),
        ]
    );
    // Five purchases: the `all` member holds until day 90 after the last.
    let mut loyal = Sim::new(&r);
    for day in 1..=5 {
        loyal.buy(&format!("2026-01-0{day}T10:00:00Z"), 10);
    }
    loyal.advance(at("2026-06-01T00:00:00Z"));
    assert_eq!(
        loyal.tiers(),
        [
            ("active", "purchase", "2026-01-01"),
            ("lapsed", "recency", "2026-04-05"),
        ]
    );
}
