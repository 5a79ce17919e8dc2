//! What an operator's tools read from tierd, checked by those tools (issue 14): the metrics a
//! running tierd exposes pass `promtool check metrics` and show what dashboards need, and the
//! alert rules in `deploy/prometheus/` pass `promtool check rules` and their unit tests
//! (`promtool test rules`), every alert tested firing, on metrics tierd really registers.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{purchase, py_tool, Tierd, World};

const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERT_TESTS: &str = "deploy/prometheus/alerts.test.yml";

/// Runs `promtool args…` (with `stdin` on its input); returns (success, stdout + stderr).
fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (Debian package prometheus; bash scripts/install-deps.sh installs it)");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The alert rules are valid, each fires in its unit tests (with the labels and annotations an
/// operator reads), and they use only metrics tierd registers: an alert on a misspelled or
/// removed metric would never fire, and no tool would say so.
#[test]
fn alert_rules_pass_promtool_and_each_fires_in_its_unit_tests_on_real_metrics() {
    let (ok, out) = promtool(&["check", "rules", ALERTS], None);
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(&["test", "rules", ALERT_TESTS], None);
    assert!(ok, "promtool test rules:\n{out}");

    let alerts = alert_names();
    assert!(alerts.len() >= 10, "{alerts:?}");
    // Alerts some test expects firing: an `exp_labels` under its `alertname`.
    let mut fired = BTreeSet::new();
    let mut current = "";
    for line in read(ALERT_TESTS).lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("alertname: ") {
            current = name;
        } else if line.starts_with("- exp_labels:") {
            fired.insert(current.to_owned());
        }
    }
    for alert in &alerts {
        assert!(
            fired.contains(alert),
            "{alert} has no unit test in which it fires"
        );
    }

    let used = tierd_metrics_in(&read(ALERTS));
    assert!(!used.is_empty());
    let unknown = unregistered(&used);
    assert!(
        unknown.is_empty(),
        "{ALERTS} uses {unknown:?}, which tierd does not register"
    );
}

/// The names of the alerts in the rule file.
fn alert_names() -> Vec<String> {
    read(ALERTS)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::to_owned)
        .collect()
}

/// The `tierd_*` names `text` uses (comment lines left out).
fn tierd_metrics_in(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| w.starts_with("tierd_"))
        .map(str::to_owned)
        .collect()
}

/// Those of `metrics` tierd exposes no series under: a series name is one of its metric
/// names other than a histogram's (a histogram has none under its bare name), or a
/// histogram's with its `_bucket`, `_sum` or `_count` suffix.
fn unregistered(metrics: &BTreeSet<String>) -> Vec<String> {
    let telemetry = tierd::telemetry::Telemetry::new();
    let histograms = telemetry.histogram_names();
    let registered = |metric: &str| {
        (telemetry.metric_names().iter().any(|n| n == metric)
            && !histograms.iter().any(|h| h == metric))
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                metric
                    .strip_suffix(suffix)
                    .is_some_and(|base| histograms.iter().any(|h| h == base))
            })
    };
    metrics
        .iter()
        .filter(|m| !registered(m.as_str()))
        .cloned()
        .collect()
}

/// `/metrics` of a tierd that applied purchases and answered lookups passes `promtool check
/// metrics` (exposition format and Prometheus naming conventions), and has what dashboards
/// need: the build, the process (CPU, memory, open files), HTTP request times by route and
/// status, the pyramid (customers per tier, summing to the customers stored) and the pending
/// timers of the partitions it owns.
#[test]
fn metrics_pass_promtool_and_show_build_process_http_pyramid_and_timers() {
    let mut world = World::start(2);
    // Spend over a yearly window: a customer above the base tier has a timer for when the
    // purchase leaves the window.
    world.rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/b2b.toml");
    // Lookups may wait long for Redis; a scrape waits 2 s at most.
    let tierd = Tierd::spawn(&world, "[api]\nredis_timeout_ms = 8000\n");
    tierd.wait_partitions(2, Duration::from_secs(60));
    let customers = world.customer_per_partition();
    let at = "2026-11-01T10:00:00Z";
    let events = vec![
        purchase("e1", &customers[0], "300000", at),
        purchase("e2", &customers[1], "100", at),
        purchase("e3", "m-small", "50", at),
    ];
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));

    assert_eq!(tierd.get(&format!("/v1/customers/{}", customers[0])).0, 200);
    assert_eq!(tierd.get("/v1/customers/nobody").0, 404);
    assert_eq!(tierd.get("/v1/tiers").0, 200);
    assert_eq!(tierd.get("/no/such/route").0, 404);

    let (status, text) = tierd.get("/metrics");
    assert_eq!(status, 200);
    let (ok, out) = promtool(&["check", "metrics"], Some(&text));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}"
    );

    let series = |name: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| {
                let (labels, value) = l.rsplit_once(' ')?;
                Some((labels.to_owned(), value.parse().ok()?))
            })
            .collect()
    };
    let build = series("tierd_build_info");
    assert_eq!(build.len(), 1, "{build:?}");
    assert!(
        build[0]
            .0
            .contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build[0].0.contains("rules_version=\"b2b-")
            && build[0].1 == 1.0,
        "{build:?}"
    );
    // The crate counts CPU in whole seconds: present, maybe 0 this early.
    assert_eq!(series("process_cpu_seconds_total").len(), 1);
    for process in [
        "process_threads",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            series(process).first().is_some_and(|(_, v)| *v > 0.0),
            "{process} missing or 0"
        );
    }
    let http = series("tierd_http_request_duration_seconds_count");
    let count = |route: &str, code: &str| -> f64 {
        http.iter()
            .filter(|(l, _)| {
                l.contains(&format!("route=\"{route}\"")) && l.contains(&format!("code=\"{code}\""))
            })
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(count("/v1/customers/{customer_id}", "200"), 1.0, "{http:?}");
    assert_eq!(count("/v1/customers/{customer_id}", "404"), 1.0, "{http:?}");
    assert_eq!(count("/v1/tiers", "200"), 1.0, "{http:?}");
    assert_eq!(count("unmatched", "404"), 1.0, "{http:?}");

    // The pyramid: every tier of the rules has a series per owned partition, and they sum to
    // the customers stored, tier by tier (as `/v1/tiers` counts them).
    let tiers: serde_json::Value = serde_json::from_str(&tierd.get("/v1/tiers").1).unwrap();
    let mut want: HashMap<String, f64> = HashMap::new();
    for t in tiers["tiers"].as_array().unwrap() {
        want.insert(
            t["name"].as_str().unwrap().to_owned(),
            t["customers"].as_f64().unwrap(),
        );
    }
    let pyramid = series("tierd_tier_customers");
    assert_eq!(pyramid.len(), 2 * want.len(), "{pyramid:?}");
    let mut got: HashMap<String, f64> = HashMap::new();
    for (labels, n) in &pyramid {
        let tier = labels
            .split("tier=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        *got.entry(tier.to_owned()).or_default() += n;
    }
    assert_eq!(got, want);
    assert_eq!(got.values().sum::<f64>(), 3.0, "{got:?}");

    let timers: f64 = series("tierd_timers_pending").iter().map(|(_, v)| v).sum();
    let stored: i64 = (0..2)
        .map(|p| {
            redis::cmd("ZCARD")
                .arg(world.keys(p).timers)
                .query::<i64>(&mut world.redis.conn())
                .unwrap()
        })
        .sum();
    assert!(stored > 0, "the customer above the base tier has a timer");
    assert_eq!(timers, stored as f64);

    // Redis frozen: the scrape still answers, within its 2 s wait for Redis (not the lookups'
    // 8 s), without the series it reads there rather than with stale ones.
    world.redis.pause();
    let started = Instant::now();
    let (status, frozen) = tierd.get("/metrics");
    let took = started.elapsed();
    world.redis.resume();
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(6), "a scrape took {took:?}");
    assert!(frozen.contains("tierd_build_info{"), "{frozen}");
    for read_from_redis in ["tierd_tier_customers{", "tierd_timers_pending{"] {
        assert!(
            !frozen.contains(read_from_redis),
            "{read_from_redis} shown stale"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tierd.get("/metrics").1.contains("tierd_tier_customers{") {
        assert!(Instant::now() < deadline, "not back once Redis answers");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A Prometheus server (the Debian package's binary) scraping `target` every second, with
/// the alert rules loaded; killed on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: tierd\n    static_configs:\n      - targets: ['{target}']\n",
                Path::new(env!("CARGO_MANIFEST_DIR")).join(ALERTS).display()
            ),
        )
        .unwrap();
        let port = support::free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus must be installed (Debian package prometheus; bash scripts/install-deps.sh installs it)");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>` with `params`; the JSON answer (`Null` while not answering).
    fn api(&self, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let answer = reqwest::Client::new()
                .get(format!("{}/api/v1/{path}", self.url))
                .query(params)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            match answer {
                Ok(r) => r.json().await.unwrap_or(serde_json::Value::Null),
                Err(_) => serde_json::Value::Null,
            }
        })
    }

    /// The series an instant query returns (`None`: Prometheus refused the query).
    fn query(&self, expr: &str) -> Option<Vec<serde_json::Value>> {
        let answer = self.api("query", &[("query", expr)]);
        (answer["status"] == "success").then(|| {
            answer["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Grafana dashboard (`deploy/grafana/tierd.json`) shows data: a real Prometheus scrapes
/// a tierd ingesting purchases under the pyramid rules, and every query of every panel
/// returns series. The dashboard's queries use only metrics tierd registers, and that
/// Prometheus loads the alert rules and evaluates each without an error.
#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus_scraping_tierd_under_load() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/tierd.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut queries: Vec<(String, String)> = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap().to_owned();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "{title}: id reused"
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            queries.push((title.clone(), t["expr"].as_str().unwrap().to_owned()));
        }
    }
    for (title, expr) in &queries {
        let unknown = unregistered(&tierd_metrics_in(expr));
        assert!(
            unknown.is_empty(),
            "panel {title:?} queries {unknown:?}, which tierd does not register"
        );
    }

    let mut world = World::start(2);
    world.rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/pyramid.toml");
    let tierd = Tierd::spawn(
        &world,
        "[ranks]\nrecompute_interval_ms = 500\ncheck_interval_ms = 100\n",
    );
    tierd.wait_partitions(2, Duration::from_secs(60));
    let prometheus = Prometheus::start(tierd.api.trim_start_matches("http://"));

    // Purchases of 60 customers (and one message tierd refuses) every 300 ms while the
    // queries are asked.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, producer) = (std::sync::Arc::clone(&stop), world.producer());
        let input = world.input.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                rt.block_on(async {
                    for c in 0..60 {
                        let event = purchase(
                            &format!("r{round}-c{c}"),
                            &format!("c{c}"),
                            &((c * 37 + round * 11) % 5000 + 1).to_string(),
                            "2026-11-01T10:00:00Z",
                        )
                        .to_string();
                        let key = format!("c{c}");
                        let record = rdkafka::producer::FutureRecord::to(&input)
                            .key(&key)
                            .payload(&event);
                        let _ = producer.send(record, Duration::from_secs(5)).await;
                    }
                    let bad = rdkafka::producer::FutureRecord::to(&input)
                        .key("c0")
                        .payload("not json");
                    let _ = producer.send(bad, Duration::from_secs(5)).await;
                });
                round += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };

    // Every query returns series with finite values; those of what the load exercises, a
    // value above zero (not just the zero series of a counter nothing increments).
    let exercised = [
        "tierd_tier_customers",
        "tierd_tier_changes_total",
        "tierd_events_consumed_total",
        "tierd_events_applied_total",
        "tierd_outbox_published_total",
        "tierd_batch_apply_duration_seconds_bucket",
        "tierd_events_dead_lettered_total",
        "tierd_http_request_duration_seconds_bucket",
        "tierd_partitions_assigned",
        "tierd_rank_recompute_seconds_bucket",
        "tierd_rank_cutoffs_computed_timestamp_seconds",
        "process_resident_memory_bytes",
    ];
    let shows_data = |expr: &str| -> bool {
        // Grafana's interval variable, as Grafana would fill it in for a 1 s scrape.
        let expr = expr.replace("$__rate_interval", "1m");
        let Some(series) = prometheus.query(&expr) else {
            return false;
        };
        let values: Vec<f64> = series
            .iter()
            .filter_map(|s| s["value"][1].as_str()?.parse().ok())
            .collect();
        !values.is_empty()
            && values.len() == series.len()
            && values.iter().all(|v| v.is_finite())
            && (!exercised.iter().any(|m| expr.contains(m)) || values.iter().any(|v| *v > 0.0))
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut empty: Vec<&(String, String)> = queries.iter().collect();
    while !empty.is_empty() && Instant::now() < deadline {
        empty.retain(|(_, expr)| !shows_data(expr));
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
    assert!(
        empty.is_empty(),
        "dashboard queries without data after 90 s: {:#?}\nprometheus log:\n{}",
        empty
            .iter()
            .map(|(title, expr)| (
                title,
                expr,
                prometheus.query(&expr.replace("$__rate_interval", "1m"))
            ))
            .collect::<Vec<_>>(),
        prometheus.log()
    );

    let rules = prometheus.api("rules", &[]);
    let loaded: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(loaded.len(), alert_names().len(), "{rules}");
    for rule in loaded {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
}

/// The bearer token of [`with_token`].
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// A tierd over 2 partitions with the rules `config/rules/RULES`, rank cut-offs recomputed
/// every 500 ms, requiring [`TOKEN`] (its token file in the returned directory), and `extra`
/// configuration; it owns both partitions.
fn with_token(rules: &str, extra: &str) -> (tempfile::TempDir, World, Tierd) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("api-tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    let mut world = World::start(2);
    world.rules = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/rules")
        .join(rules);
    let tierd = Tierd::spawn(
        &world,
        &format!(
            "[api]\ntoken_file = \"{}\"\nhistory_changes = 5\n[ranks]\nrecompute_interval_ms = 500\ncheck_interval_ms = 100\n{extra}",
            tokens.display()
        ),
    );
    tierd.wait_partitions(2, Duration::from_secs(60));
    (dir, world, tierd)
}

/// The OpenAPI document tierd serves at `/openapi.json` describes the real server:
/// schemathesis (PyPI) generates requests from it — documented examples, boundary values, then
/// random ones, valid and invalid — against a tierd that ingested purchases under rules with
/// ranks, scores and time-driven moves and requires a bearer token, and runs every check it has
/// (status codes, content types, headers and bodies as documented, no server error, invalid
/// input refused, the token enforced, unsupported methods refused). The documented example id
/// is a stored customer, so a full customer view is checked too.
#[test]
fn the_openapi_document_matches_the_real_server_under_schemathesis() {
    let (dir, world, tierd) = with_token("rfm-quintiles.toml", "");
    let token = TOKEN;
    let now = time_now_rfc3339();
    let events: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            purchase(
                &format!("e{i}"),
                &format!("c-{}", i % 10),
                &(i * 13 + 5).to_string(),
                &now,
            )
        })
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));

    let junit = dir.path().join("schemathesis.xml");
    let out = Command::new(py_tool("schemathesis"))
        .args(["run", &format!("{}/openapi.json", tierd.api)])
        .args(["--checks", "all", "--max-examples", "40", "--seed", "7"])
        .args(["--phases", "examples,coverage,fuzzing", "--no-color"])
        .args(["--request-timeout", "10", "--workers", "1"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["--report", "junit", "--report-junit-path"])
        .arg(&junit)
        // Its cache (`.schemathesis/`) goes to the test's directory, not the repository.
        .current_dir(dir.path())
        .output()
        .expect("schemathesis runs");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}"
    );
    let tested = std::fs::read_to_string(&junit).unwrap();
    // Not vacuous: every operation was tested (schemathesis leaves out the document's own
    // route), and the full customer view was among the answers.
    for operation in [
        "/v1/customers/{customer_id}",
        "/v1/customers/{customer_id}/history",
        "/v1/tiers",
        "/v1/status",
        "/status",
        "/healthz",
        "/readyz",
        "/readyz/ingest",
        "/metrics",
    ] {
        assert!(
            tested.contains(&format!("GET {operation}\"")),
            "{operation} not tested:\n{tested}"
        );
    }
    let metrics = tierd.get("/metrics").1;
    let answered = |code: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("tierd_http_request_duration_seconds_count{")
                    && l.contains("route=\"/v1/customers/{customer_id}\"")
                    && l.contains(&format!("code=\"{code}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        answered("200") > 0.0,
        "no customer view answered 200:\n{report}"
    );
    let refused = answered("401");
    assert!(refused > 0.0, "the token was never checked:\n{report}");
}

/// Now as RFC 3339 (UTC, seconds).
fn time_now_rfc3339() -> String {
    tierd::model::time::format_ms(tierd::model::time::now_ms())
}

/// Runs headless Chromium (Debian's) on `url`: the DOM once the page's script has run
/// (`--dump-dom`), or a screenshot into `screenshot`.
fn chromium(url: &str, screenshot: Option<&Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(["--virtual-time-budget=8000", "--window-size=1280,1000"]);
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("chromium must be installed (bash scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The attribute values `name="…"` of the DOM, in order.
fn attributes(dom: &str, name: &str) -> Vec<String> {
    dom.split(&format!(" {name}=\""))
        .skip(1)
        .filter_map(|rest| rest.split('"').next().map(str::to_owned))
        .collect()
}

/// The status page, rendered by headless Chromium from a running tierd that requires a token
/// (taken from the URL fragment), shows the right numbers: each tier's count as the customers'
/// stored states place them, every customer counted once, the rules version, the cut-offs, the
/// partitions' offsets and lag, its flows (summing to the changes it decided), its latest 20
/// changes (of these customers), the page's Content-Security-Policy, and a wrong token
/// refused. A screenshot is written (to docs/status-page.png with `UPDATE_SCREENSHOT=1`).
#[test]
fn the_status_page_shows_the_right_numbers_in_headless_chromium() {
    // Log ends read every second (`ingest.stall_alarm_s` / 6).
    let (dir, world, tierd) = with_token("pyramid.toml", "[ingest]\nstall_alarm_s = 6\n");
    let token = TOKEN;
    let now = time_now_rfc3339();
    let customers = 40;
    let events: Vec<serde_json::Value> = (0..customers)
        .map(|i| {
            purchase(
                &format!("s{i}"),
                &format!("vip-{i:02}"),
                &((i * i * 97) % 20_000 + 10).to_string(),
                &now,
            )
        })
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));
    // Let the cut-offs settle (recomputed every 500 ms) and the re-rankings apply.
    std::thread::sleep(Duration::from_secs(3));
    let placed = || -> HashMap<String, usize> {
        let mut placed = HashMap::new();
        for i in 0..customers {
            let state = world
                .customer_state(&format!("vip-{i:02}"))
                .expect("stored");
            *placed.entry(state.tier.unwrap_or_default()).or_default() += 1;
        }
        placed
    };
    let settle = Instant::now() + Duration::from_secs(30);
    let truth = loop {
        let first = placed();
        std::thread::sleep(Duration::from_millis(1500));
        if first == placed() || Instant::now() > settle {
            break first;
        }
    };
    assert_eq!(truth.values().sum::<usize>(), customers);

    // The log ends the page shows were read after the purchases (every second here).
    std::thread::sleep(Duration::from_secs(2));
    let url = format!("{}/status#token={token}", tierd.api);
    let dom = chromium(&url, None);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page did not load its data:\n{dom}"
    );
    assert!(
        dom.contains("<div id=\"error\" hidden=\"\">"),
        "an error is shown:\n{dom}"
    );
    assert!(
        dom.contains(&format!(
            "id=\"rules-version\">{}<",
            rules_version_of(&world)
        )),
        "rules version not shown:\n{dom}"
    );

    // The pyramid: tier by tier as the stored states place the customers.
    let tiers = attributes(&dom, "data-tier");
    let counts: Vec<usize> = attributes(&dom, "data-count")
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(tiers.len(), counts.len(), "{dom}");
    assert!(tiers.len() >= 3, "{tiers:?}");
    for (tier, count) in tiers.iter().zip(&counts) {
        assert_eq!(
            *count,
            truth.get(tier).copied().unwrap_or(0),
            "tier {tier}: the page shows {count}, the states {truth:?}"
        );
    }
    assert_eq!(counts.iter().sum::<usize>(), customers);
    assert!(
        dom.contains(&format!("id=\"population\">{customers}<")),
        "{dom}"
    );

    // Every input partition's lag: applied to the end of each log (read after the purchases).
    assert_eq!(attributes(&dom, "data-partition"), ["0", "1"]);
    for (p, end) in &ends {
        let row = dom
            .split(&format!("data-partition=\"{p}\">"))
            .nth(1)
            .unwrap()
            .split("</tr>")
            .next()
            .unwrap();
        let want = format!(
            "<td>{p}</td><td class=\"num\">0</td><td class=\"num\">{end}</td><td class=\"num\">{end}</td><td>processing</td>"
        );
        assert_eq!(row, want, "partition {p}");
    }
    // Flows and latest changes: this instance's.
    let decided = tierd.metric("tierd_tier_changes_total");
    let flows: f64 = dom
        .split("data-flow=\"")
        .skip(1)
        .map(|row| {
            let cells: Vec<&str> = row.split("<td").skip(1).collect();
            cells[2]
                .split('>')
                .nth(1)
                .and_then(|c| c.split('<').next())
                .unwrap()
                .parse::<f64>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        flows, decided,
        "flows on the page vs tierd_tier_changes_total\n{dom}"
    );
    assert!(decided >= 40.0, "{decided}");
    let recent = attributes(&dom, "data-customer");
    assert_eq!(recent.len(), 20, "{dom}");
    assert!(recent.iter().all(|c| c.starts_with("vip-")), "{recent:?}");
    // The cut-offs table: the cut-offs in force, as /v1/status gives them.
    let status: serde_json::Value = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            reqwest::Client::new()
                .get(format!("{}/v1/status", tierd.api))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        })
    };
    let points = status["cutoffs"]["points"].as_array().unwrap();
    assert_eq!(points.len(), 3, "{status}");
    let table = dom
        .split("id=\"cutoffs\"")
        .nth(1)
        .unwrap()
        .split("</tbody>")
        .next()
        .unwrap();
    for p in points {
        let row = format!(
            "<td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>",
            p["rank"].as_str().unwrap(),
            p["top"].as_str().unwrap(),
            p["cutoff"].as_str().unwrap(),
            p["at_or_above"]
        );
        assert!(table.contains(&row), "cut-off {row} not shown:\n{table}");
    }
    // The page's own policy: its inline script and style, requests to its origin only.
    let policy = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            reqwest::get(format!("{}/status", tierd.api))
                .await
                .unwrap()
                .headers()
                .get("content-security-policy")
                .map(|v| v.to_str().unwrap().to_owned())
        })
    };
    assert_eq!(
        policy.as_deref(),
        Some("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:")
    );
    // A wrong token: the page says so and asks for one.
    let refused = chromium(&format!("{}/status#token=not-the-token", tierd.api), None);
    assert!(
        refused.contains("the token was refused") && refused.contains("<form id=\"token-form\">"),
        "{refused}"
    );

    // A screenshot, for the docs.
    let shot = if std::env::var("UPDATE_SCREENSHOT").is_ok() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png")
    } else {
        dir.path().join("status-page.png")
    };
    chromium(&url, Some(&shot));
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
}

/// The `version` of the world's rules file.
fn rules_version_of(world: &World) -> String {
    let rules: toml::Table =
        toml::from_str(&std::fs::read_to_string(&world.rules).unwrap()).unwrap();
    rules["version"].as_str().unwrap().to_owned()
}
