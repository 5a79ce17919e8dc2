//! The deployment files of `deploy/` (issue 14), checked by the tools that can run here: the
//! compose file by Debian's `docker-compose config` (no Docker engine runs here), the
//! Kubernetes manifests by two schema validators — kubernetes-validate (PyPI, strict: unknown
//! fields refused) for the core kinds, kubernetes-models (npm) for those and the KEDA and
//! Prometheus Operator kinds — and both by checks that their pieces fit together, that tierd
//! accepts the configuration they give it (`tierd check-config`), and that the compose
//! services use the configuration the tests use.

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use support::{py_tool, tools_dir};

const K8S: &str = "deploy/kubernetes";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd` from the project root: (success, stdout + stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.current_dir(root()).output().expect("the tool runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The YAML documents of `text`, as JSON (PyYAML of the tools' virtualenv).
fn yaml_docs(text: &str) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.yaml");
    std::fs::write(&file, text).unwrap();
    let (ok, out) = run(Command::new(py_tool("python")).args([
        "-c",
        "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
        file.to_str().unwrap(),
    ]));
    assert!(ok, "{out}");
    serde_json::from_str(&out).unwrap()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap()
}

/// `tierd check-config --config config/tierd.toml` with `env` (the deployment's overrides).
fn check_config(env: &BTreeMap<String, String>) -> (bool, String) {
    run(Command::new(env!("CARGO_BIN_EXE_tierd"))
        .args(["check-config", "--config", "config/tierd.toml"])
        .envs(env))
}

/// The repository's config/tierd.toml.
fn base_config() -> toml::Table {
    toml::from_str(&read("config/tierd.toml")).unwrap()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("{v} is not a string"))
}

/// The compose file is accepted by `docker-compose config`, publishes nothing beyond loopback,
/// never serves the API on a reachable address without a token, restarts tierd when it exits,
/// keeps Kafka's and Redis's data together, and keeps the build directory and the token out of
/// the image's build context. tierd runs config/tierd.toml (the file scripts/demo.sh runs)
/// with overrides that `tierd check-config` accepts (and refuses without the token); the other
/// services use what the tests use: Kafka the broker settings of scripts/kafka/broker.sh,
/// Redis the arguments of the tests' persistent Redis, Prometheus the alert rules promtool
/// tests (its configuration passes `promtool check config`), Grafana the dashboard
/// tests/operate.rs checks, through a provisioned Prometheus data source.
#[test]
fn the_compose_file_passes_docker_compose_config_and_uses_the_tested_configurations() {
    let (ok, out) =
        run(Command::new("docker-compose").args(["-f", "deploy/compose.yaml", "config"]));
    assert!(
        ok,
        "docker-compose config refused deploy/compose.yaml:\n{out}"
    );
    let compose = yaml_docs(&out).remove(0);
    let services = compose["services"].as_object().unwrap();
    for name in ["kafka", "topics", "redis", "tierd", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "no service {name}");
    }
    for (name, service) in services {
        for port in service["ports"].as_array().into_iter().flatten() {
            let port = s(port);
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} beyond loopback"
            );
        }
    }

    // tierd: the API on 0.0.0.0 inside its container only with a token from a secret, and
    // config/tierd.toml accepts these overrides.
    let tierd = &services["tierd"];
    let env: BTreeMap<String, String> = tierd["environment"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), s(v).to_owned()))
        .collect();
    assert_eq!(env["TIERD_API__LISTEN"], "0.0.0.0:8080");
    let secret = s(&tierd["secrets"][0]["source"]);
    assert_eq!(
        env["TIERD_API__TOKEN_FILE"],
        format!("/run/secrets/{secret}")
    );
    assert!(compose["secrets"][secret]["file"].is_string());
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("api-token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let mut accepted = env.clone();
    accepted.insert("TIERD_API__TOKEN_FILE".into(), token.display().to_string());
    let (ok, out) = check_config(&accepted);
    assert!(
        ok,
        "tierd check-config refused the compose settings:\n{out}"
    );
    let mut without_token = env.clone();
    without_token.remove("TIERD_API__TOKEN_FILE");
    let (ok, out) = check_config(&without_token);
    assert!(!ok && out.contains("`api.token_file`"), "{out}");
    assert_eq!(env["TIERD_KAFKA__BROKERS"], "kafka:29092");
    for name in ["tierd", "kafka", "redis"] {
        assert_eq!(services[name]["restart"], "unless-stopped", "{name}");
    }
    let kafka_dir = s(&services["kafka"]["environment"]["KAFKA_LOG_DIRS"]);
    let kafka_volume = s(&services["kafka"]["volumes"][0]);
    assert!(
        kafka_volume.starts_with("kafka-data:") && kafka_volume.contains(&format!(":{kafka_dir}")),
        "Kafka's logs on a volume: {kafka_volume}"
    );
    let ignored = read(".dockerignore");
    for path in ["target/", "deploy/secrets/", ".git/"] {
        assert!(
            ignored.lines().any(|l| l == path),
            ".dockerignore lacks {path}"
        );
    }
    assert!(env["TIERD_REDIS__URL"].starts_with("redis://redis:"));

    // Kafka: every setting that is not about this node's listeners is one the tests' brokers
    // get from scripts/kafka/broker.sh (its literal `echo "key=value"` lines; those computed
    // from the node's ports or the cluster size are node-specific).
    let script = read("scripts/kafka/broker.sh");
    let tested: BTreeMap<&str, &str> = script
        .lines()
        .filter_map(|l| l.trim().strip_prefix("echo \"")?.strip_suffix('"'))
        .filter(|l| !l.contains('$'))
        .filter_map(|l| l.split_once('='))
        .collect();
    assert!(tested.len() >= 10, "{tested:?}");
    let node_specific = [
        "node.id",
        "process.roles",
        "listeners",
        "advertised.listeners",
        "listener.security.protocol.map",
        "inter.broker.listener.name",
        "controller.listener.names",
        "controller.quorum.voters",
        "log.dirs",
    ];
    let mut compared = 0;
    for (key, value) in services["kafka"]["environment"].as_object().unwrap() {
        let property = key
            .strip_prefix("KAFKA_")
            .unwrap()
            .to_lowercase()
            .replace('_', ".");
        if node_specific.contains(&property.as_str()) {
            continue;
        }
        assert_eq!(
            tested.get(property.as_str()).copied(),
            Some(s(value)),
            "compose sets {property}={} but the tests' broker {:?}",
            s(value),
            tested.get(property.as_str())
        );
        compared += 1;
    }
    assert!(compared >= 8, "only {compared} broker settings compared");
    let topics = s(&services["topics"]["command"][0]);
    assert!(topics.contains("cleanup.policy=delete"), "{topics}");

    // Redis: AOF with everysec, as `Redis::start_everysec`; tierd refuses evicting policies.
    let redis: Vec<&str> = services["redis"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    for pair in [
        ["--save", ""],
        ["--appendonly", "yes"],
        ["--appendfsync", "everysec"],
        ["--maxmemory-policy", "noeviction"],
    ] {
        assert!(
            redis.windows(2).any(|w| w == pair),
            "redis {pair:?}: {redis:?}"
        );
    }

    // Prometheus: the tested alert rules, a configuration promtool accepts, tierd scraped.
    let mounts = |service: &str| -> Vec<String> {
        services[service]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| s(v).to_owned())
            .collect()
    };
    let here = root().join("deploy").display().to_string();
    let prometheus = mounts("prometheus");
    assert!(
        prometheus.contains(&format!(
            "{here}/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro"
        )),
        "{prometheus:?}"
    );
    assert!(
        prometheus.contains(&format!(
            "{here}/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        )),
        "{prometheus:?}"
    );
    let (ok, out) =
        run(Command::new("promtool").args(["check", "config", "deploy/prometheus/prometheus.yml"]));
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 17 rules found"), "{out}");
    let scrape = yaml_docs(&read("deploy/prometheus/prometheus.yml")).remove(0);
    assert_eq!(scrape["scrape_configs"][0]["job_name"], "tierd");
    assert_eq!(
        scrape["scrape_configs"][0]["static_configs"][0]["targets"][0],
        "tierd:8080"
    );

    // Grafana: the tested dashboard, where the provider reads, and the data source it uses.
    let grafana = mounts("grafana");
    let provider = yaml_docs(&read("deploy/grafana/provisioning/dashboards/tierd.yaml")).remove(0);
    let path = s(&provider["providers"][0]["options"]["path"]);
    assert!(
        grafana.contains(&format!("{here}/grafana/tierd.json:{path}/tierd.json:ro")),
        "{grafana:?} {path}"
    );
    assert!(
        grafana.contains(&format!(
            "{here}/grafana/provisioning:/etc/grafana/provisioning:ro"
        )),
        "{grafana:?}"
    );
    let datasource = yaml_docs(&read(
        "deploy/grafana/provisioning/datasources/prometheus.yaml",
    ))
    .remove(0);
    let source = &datasource["datasources"][0];
    assert_eq!(
        (
            source["type"].as_str(),
            source["url"].as_str(),
            source["isDefault"].as_bool()
        ),
        (
            Some("prometheus"),
            Some("http://prometheus:9090"),
            Some(true)
        )
    );
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/tierd.json")).unwrap();
    assert_eq!(
        dashboard["templating"]["list"][0]["query"], "prometheus",
        "the dashboard picks the default Prometheus source"
    );
}

/// The resource files of the kustomization, in its order.
fn k8s_files() -> Vec<String> {
    let kustomization = yaml_docs(&read(&format!("{K8S}/kustomization.yaml"))).remove(0);
    kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{K8S}/{}", s(r)))
        .collect()
}

/// kubernetes-validate (strict) on the files of core kinds, kubernetes-models on all: (ok,
/// output).
fn validate_k8s(files: &[String]) -> (bool, String) {
    let core: Vec<&String> = files
        .iter()
        .filter(|f| {
            yaml_docs(&std::fs::read_to_string(root().join(f)).unwrap())
                .iter()
                .all(|d| {
                    !s(&d["apiVersion"]).contains(".sh/") && !s(&d["apiVersion"]).contains(".com/")
                })
        })
        .collect();
    let (strict, strict_out) = if core.is_empty() {
        (true, String::new())
    } else {
        run(Command::new(py_tool("kubernetes-validate"))
            .args(["--strict", "--no-warn"])
            .args(&core))
    };
    let tools = tools_dir("NODE_TOOLS_DIR", ".cache/tierd/node-tools");
    let (models, models_out) = run(Command::new("node")
        .arg("scripts/k8s/validate-models.mjs")
        .arg(&tools)
        .args(files));
    (strict && models, format!("{strict_out}\n{models_out}"))
}

/// Every manifest passes both validators — and each refuses a broken copy (a misspelt probe
/// field; a replica count that is not a number; a misspelt field of a KEDA and of a Prometheus
/// Operator resource, which their CRDs' schemas alone would let through and kubernetes-models'
/// TypeScript types refuse), so the check cannot pass vacuously.
#[test]
fn the_kubernetes_manifests_pass_both_schema_validators() {
    let files = k8s_files();
    assert_eq!(files.len(), 7, "{files:?}");
    let (ok, out) = validate_k8s(&files);
    assert!(ok, "{out}");
    assert!(
        out.contains("types: 8 resources checked, no unknown field"),
        "{out}"
    );
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "ScaledObject",
        "TriggerAuthentication",
        "ConfigMap",
    ] {
        assert!(
            out.contains(&format!(" {kind} ")),
            "{kind} not validated:\n{out}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    for (file, from, to, validator) in [
        (
            "deployment.yaml",
            "periodSeconds: 10",
            "periodSecond: 10",
            "did not validate",
        ),
        (
            "scaledobject.yaml",
            "maxReplicaCount: 8",
            "maxReplicaCount: eight",
            "INVALID",
        ),
        // Unknown fields of the CRD kinds: refused by the type check.
        (
            "scaledobject.yaml",
            "maxReplicaCount: 8",
            "maxReplicaCounts: 8",
            "does not exist in type",
        ),
        (
            "servicemonitor.yaml",
            "interval: 15s",
            "intervall: 15s",
            "does not exist in type",
        ),
    ] {
        let text = read(&format!("{K8S}/{file}"));
        assert!(text.contains(from), "{file}: {from}");
        let broken = dir.path().join(file);
        std::fs::write(&broken, text.replacen(from, to, 1)).unwrap();
        let (ok, out) = validate_k8s(&[broken.display().to_string()]);
        assert!(
            !ok && out.contains(validator),
            "{file} with {to:?} passed:\n{out}"
        );
    }
}

/// The manifests fit together — probes on routes the API serves, selectors that select the
/// pods, the token and rules files where the configuration says, the rules those of
/// config/rules/b2b.toml, KEDA on tierd's group and input topic and never above the partition
/// count — and `tierd check-config` accepts the configuration they give.
#[test]
fn the_kubernetes_manifests_fit_together_and_tierd_accepts_their_configuration() {
    let mut docs: BTreeMap<String, Value> = BTreeMap::new();
    for file in k8s_files() {
        for doc in yaml_docs(&read(&file)) {
            docs.insert(
                format!("{}/{}", s(&doc["kind"]), s(&doc["metadata"]["name"])),
                doc,
            );
        }
    }
    let deployment = &docs["Deployment/tierd"];
    let pod = &deployment["spec"]["template"];
    let labels = pod["metadata"]["labels"].as_object().unwrap();
    let selects = |selector: &Value| {
        selector
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(selects(&deployment["spec"]["selector"]["matchLabels"]));
    // KEDA owns the replica count; a rollout starts a new pod before stopping an old one, and
    // at least two run (a drain or a crash never leaves lookups unanswered).
    assert!(
        deployment["spec"]["replicas"].is_null(),
        "replicas would fight KEDA"
    );
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    assert!(selects(&docs["Service/tierd"]["spec"]["selector"]));
    assert!(selects(
        &docs["PodDisruptionBudget/tierd"]["spec"]["selector"]["matchLabels"]
    ));
    let service_labels = docs["Service/tierd"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    let monitor = &docs["ServiceMonitor/tierd"]["spec"];
    assert!(monitor["selector"]["matchLabels"]
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| service_labels.get(k) == Some(v)));
    assert_eq!(
        monitor["endpoints"][0]["port"],
        docs["Service/tierd"]["spec"]["ports"][0]["name"]
    );
    assert_eq!(monitor["endpoints"][0]["path"], "/metrics");

    let container = &pod["spec"]["containers"][0];
    let config = docs["ConfigMap/tierd-config"]["data"].as_object().unwrap();
    let env: BTreeMap<String, String> = config
        .iter()
        .map(|(k, v)| (k.clone(), s(v).to_owned()))
        .collect();
    assert_eq!(
        container["envFrom"][0]["configMapRef"]["name"],
        "tierd-config"
    );
    let port = &container["ports"][0];
    assert_eq!(
        (port["name"].as_str(), port["containerPort"].as_u64()),
        (Some("http"), Some(8080))
    );
    assert_eq!(env["TIERD_API__LISTEN"], "0.0.0.0:8080");
    assert_eq!(
        docs["Service/tierd"]["spec"]["ports"][0]["targetPort"],
        "http"
    );
    let openapi: Value = serde_json::from_str(tierd::api::OPENAPI).unwrap();
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(
            (get["path"].as_str(), get["port"].as_str()),
            (Some(path), Some("http")),
            "{probe}"
        );
        assert!(
            openapi["paths"][path].is_object(),
            "{probe}: {path} is not a route"
        );
    }
    assert!(
        container["resources"]["requests"]["cpu"].is_string()
            && container["resources"]["requests"]["memory"].is_string()
    );

    // Files where the configuration points.
    let mount = |volume: &str| -> String {
        let m = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume)
            .unwrap();
        s(&m["mountPath"]).to_owned()
    };
    let volume = |name: &str| {
        pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
            .clone()
    };
    let token = volume("api-token");
    assert_eq!(
        env["TIERD_API__TOKEN_FILE"],
        format!(
            "{}/{}",
            mount("api-token"),
            s(&token["secret"]["items"][0]["path"])
        )
    );
    let secret = s(&token["secret"]["secretName"]).to_owned();
    for e in container["env"].as_array().unwrap() {
        assert_eq!(s(&e["valueFrom"]["secretKeyRef"]["name"]), secret, "{e}");
    }
    assert_eq!(volume("rules")["configMap"]["name"], "tierd-rules");
    assert_eq!(
        env["TIERD_RULES__PATH"],
        format!("{}/rules.toml", mount("rules"))
    );
    let rules = s(&docs["ConfigMap/tierd-rules"]["data"]["rules.toml"]);
    assert_eq!(
        rules,
        read("config/rules/b2b.toml"),
        "the rules ConfigMap differs from config/rules/b2b.toml"
    );

    // KEDA: tierd's group and input topic, at most one replica per partition.
    let base = base_config();
    let scaled = &docs["ScaledObject/tierd"]["spec"];
    assert_eq!(
        scaled["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let trigger = &scaled["triggers"][0];
    assert_eq!(trigger["type"], "kafka");
    assert_eq!(
        s(&trigger["metadata"]["consumerGroup"]),
        base["kafka"]["group_id"].as_str().unwrap()
    );
    assert_eq!(
        s(&trigger["metadata"]["topic"]),
        base["kafka"]["input_topic"].as_str().unwrap()
    );
    assert_eq!(
        s(&trigger["metadata"]["bootstrapServers"]),
        env["TIERD_KAFKA__BROKERS"]
    );
    assert_eq!(trigger["metadata"]["allowIdleConsumers"], "false");
    let partitions: u64 = read("deploy/compose.yaml")
        .split("--partitions ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(scaled["maxReplicaCount"].as_u64().unwrap() <= partitions);
    assert!(scaled["minReplicaCount"].as_u64().unwrap() >= 2);
    assert_eq!(
        docs["PodDisruptionBudget/tierd"]["spec"]["maxUnavailable"],
        1
    );
    assert!(docs.contains_key(&format!(
        "TriggerAuthentication/{}",
        s(&trigger["authenticationRef"]["name"])
    )));

    // tierd accepts it (the Secret's values are the operator's: a Redis URL and a token here).
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("api-token");
    std::fs::write(&token_file, "0123456789abcdef0123456789abcdef\n").unwrap();
    let rules_file = dir.path().join("rules.toml");
    std::fs::write(&rules_file, rules).unwrap();
    let mut settings: BTreeMap<String, String> = env.clone();
    settings.remove("TIERD_LOG_FORMAT");
    settings.insert(
        "TIERD_API__TOKEN_FILE".into(),
        token_file.display().to_string(),
    );
    settings.insert("TIERD_RULES__PATH".into(), rules_file.display().to_string());
    settings.insert(
        "TIERD_REDIS__URL".into(),
        "redis://:secret@redis.example:6379".into(),
    );
    let (ok, out) = check_config(&settings);
    assert!(
        ok,
        "tierd check-config refused the Kubernetes configuration:\n{out}"
    );
}
