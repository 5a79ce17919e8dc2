//! Security that users' clusters require: tierd consumes and produces through an Apache Kafka
//! SASL_SSL listener (SCRAM-SHA-512, a certificate made here with openssl), decodes
//! zstd-compressed input, and keeps its state in a Redis that speaks only TLS and admits only an
//! ACL user (`rediss://user:password@…` with `redis.tls_ca_file`). A config that cannot work is
//! refused by `tierd check-config`, naming the field. The API's customer routes need a bearer
//! token once `api.token_file` is set, and an API reachable from other hosts needs one.

mod support;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use std::time::Duration;
use support::{purchase, Broker, Certs, Redis, Tierd, World};

const SCRAM_USER: &str = "tierd";
const SCRAM_PASSWORD: &str = "tierd-scram-secret";

/// A broker with a SASL_SSL listener (SCRAM-SHA-512 credentials created at format time) next to
/// its PLAINTEXT one; returns it and the SASL_SSL bootstrap address.
fn sasl_ssl_broker(certs: &Certs) -> (Broker, String) {
    let sasl_port = support::free_port();
    let props = format!(
        "listeners=PLAINTEXT://127.0.0.1:{{port}},CONTROLLER://127.0.0.1:{{controller_port}},SASL_SSL://127.0.0.1:{sasl_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{{port}},CONTROLLER://127.0.0.1:{{controller_port}},SASL_SSL://127.0.0.1:{sasl_port}
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location={}
ssl.keystore.password={pw}
ssl.key.password={pw}
",
        certs.keystore.display(),
        pw = Certs::STORE_PASSWORD
    );
    let broker = Broker::start_with(
        &props,
        &[
            "--add-scram".into(),
            format!("SCRAM-SHA-512=[name={SCRAM_USER},password={SCRAM_PASSWORD}]"),
        ],
    );
    (broker, format!("127.0.0.1:{sasl_port}"))
}

/// The librdkafka properties of a SASL_SSL client.
fn sasl_props(certs: &Certs, password: &str) -> Vec<(&'static str, String)> {
    vec![
        ("security.protocol", "SASL_SSL".into()),
        ("sasl.mechanisms", "SCRAM-SHA-512".into()),
        ("sasl.username", SCRAM_USER.into()),
        ("sasl.password", password.into()),
        ("ssl.ca.location", certs.ca.display().to_string()),
    ]
}

fn toml_table(props: &[(&str, String)]) -> String {
    props
        .iter()
        .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
        .collect()
}

#[test]
fn tierd_runs_over_kafka_sasl_ssl_scram_and_redis_tls_with_an_acl_user_and_decodes_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let (broker, sasl_addr) = sasl_ssl_broker(&certs);

    // The listener really authenticates: with the right password a client gets metadata
    // over TLS, with a wrong one (same listener, same CA) it gets none.
    let client = |password: &str| -> BaseConsumer {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &sasl_addr);
        for (k, v) in sasl_props(&certs, password) {
            c.set(k, v);
        }
        c.create().unwrap()
    };
    client(SCRAM_PASSWORD)
        .fetch_metadata(None, Duration::from_secs(20))
        .expect("the SASL_SSL listener serves the right SCRAM password");
    assert!(
        client("wrong-password")
            .fetch_metadata(None, Duration::from_secs(5))
            .is_err(),
        "a wrong SCRAM password must be refused"
    );

    let redis = Redis::start_tls(&certs, "tierd-app", "redis-acl-secret");
    // Redis really requires TLS and the ACL user: the default user is refused.
    let default_user = redis.url.replace("tierd-app:redis-acl-secret@", "");
    let refused = {
        let cfg = tierd::config::RedisConfig {
            url: default_user,
            ..redis.config("tierd")
        };
        tierd::store::client::client(&cfg)
            .unwrap()
            .sync_connection(std::time::Duration::from_secs(5))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
    };
    assert!(refused.is_err(), "the default user must be refused");

    let mut world = World::start_on(2, redis, broker);
    world.tierd_brokers = Some(sasl_addr);
    // The input arrives zstd-compressed.
    world.producer_props = vec![("compression.type".into(), "zstd".into())];
    let props = sasl_props(&certs, SCRAM_PASSWORD);
    let producer_table = format!("[kafka.producer]\n{}", toml_table(&props));
    let tierd = Tierd::spawn_with(&world, &toml_table(&props), &producer_table);
    tierd.wait_partitions(2, Duration::from_secs(90));

    let events: Vec<_> = (0..40)
        .map(|i| {
            purchase(
                &format!("e{i}"),
                &format!("c{}", i % 4),
                "300000.00",
                "2026-11-01T10:00:00Z",
            )
        })
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(90));

    // State went through TLS to Redis (read back over TLS as the ACL user).
    for c in 0..4 {
        let s = world.customer_state(&format!("c{c}")).unwrap();
        assert_eq!((s.count, s.sum), (10, 300_000_000), "c{c}");
    }
    // Tier changes were produced through SASL_SSL: each customer rose to the top tier.
    let changes = world.read_all(&world.output);
    assert!(!changes.is_empty());
    for c in 0..4 {
        let last = changes
            .iter()
            .map(|r| r.json())
            .rfind(|v| v["customer_id"] == format!("c{c}"))
            .unwrap_or_else(|| panic!("no change for c{c}"));
        assert_eq!(last["tier"], "A", "c{c}: {last}");
    }
    assert!(world.read_all(&world.dlq).is_empty(), "zstd input decoded");
}

fn check_config(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tierd.toml");
    std::fs::write(&path, config).unwrap();
    let (code, _, stderr) =
        support::tierd_cli(&["check-config", "--config", &path.display().to_string()]);
    (code == 0, stderr)
}

#[test]
fn check_config_builds_both_clients_and_names_what_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let rules = "[rules]\npath = \"config/rules/b2b-lifetime.toml\"\n";

    // A working SASL_SSL + rediss config is accepted.
    let good = format!(
        "{rules}[kafka.consumer]\n{}[kafka.producer]\n{}[redis]\nurl = \"rediss://u:p@127.0.0.1:6380\"\ntls_ca_file = \"{}\"\n",
        toml_table(&sasl_props(&certs, "x")),
        toml_table(&sasl_props(&certs, "x")),
        certs.ca.display()
    );
    let (ok, stderr) = check_config(&good);
    assert!(ok, "{stderr}");

    // A CA file librdkafka cannot read: refused, naming the consumer table.
    let missing = dir.path().join("missing-ca.pem").display().to_string();
    let bad_ca = good.replacen(&certs.ca.display().to_string(), &missing, 1);
    let (ok, stderr) = check_config(&bad_ca);
    assert!(!ok && stderr.contains("kafka.consumer"), "{stderr}");

    // The same for the producer table (the consumer's CA is fine), and a mechanism that
    // does not exist.
    let producer_ca = good
        .rsplit_once("[kafka.producer]")
        .map(|(head, tail)| {
            format!(
                "{head}[kafka.producer]{}",
                tail.replacen(&certs.ca.display().to_string(), &missing, 1)
            )
        })
        .unwrap();
    let (ok, stderr) = check_config(&producer_ca);
    assert!(!ok && stderr.contains("kafka.producer"), "{stderr}");
    let bad_mechanism = format!(
        "{rules}[kafka.producer]\n\"sasl.mechanisms\" = \"NO-SUCH-MECHANISM\"\n\"security.protocol\" = \"SASL_SSL\"\n"
    );
    let (ok, stderr) = check_config(&bad_mechanism);
    assert!(!ok && stderr.contains("kafka.producer"), "{stderr}");

    // Redis: an unreadable CA file, a CA file without TLS, a garbage certificate.
    let (ok, stderr) = check_config(&format!(
        "{rules}[redis]\nurl = \"rediss://127.0.0.1:6380\"\ntls_ca_file = \"{missing}\"\n"
    ));
    assert!(!ok && stderr.contains("redis.tls_ca_file"), "{stderr}");
    let (ok, stderr) = check_config(&format!(
        "{rules}[redis]\nurl = \"redis://127.0.0.1:6379\"\ntls_ca_file = \"{}\"\n",
        certs.ca.display()
    ));
    assert!(!ok && stderr.contains("redis.tls_ca_file"), "{stderr}");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let (ok, stderr) = check_config(&format!(
        "{rules}[redis]\nurl = \"rediss://127.0.0.1:6380\"\ntls_ca_file = \"{}\"\n",
        garbage.display()
    ));
    assert!(!ok && stderr.contains("redis.tls_ca_file"), "{stderr}");
}

/// A Redis that admits only clients presenting a certificate signed by its CA
/// (`tls-auth-clients yes`): tierd connects with `redis.tls_cert_file` / `redis.tls_key_file`
/// and runs the pipeline; the same settings without the client certificate are refused by
/// Redis.
#[test]
fn tierd_presents_its_client_certificate_to_a_redis_that_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let redis = Redis::start_mutual_tls(&certs, "tierd-app", "redis-acl-secret");
    let ping = |cfg: &tierd::config::RedisConfig| {
        tierd::store::client::client(cfg)
            .unwrap()
            .sync_connection(std::time::Duration::from_secs(5))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
    };
    let with_cert = redis.config("tierd");
    assert!(with_cert.tls_cert_file.is_some() && with_cert.tls_key_file.is_some());
    assert_eq!(ping(&with_cert).unwrap(), "PONG");
    let without_cert = tierd::config::RedisConfig {
        tls_cert_file: None,
        tls_key_file: None,
        ..with_cert
    };
    assert!(
        ping(&without_cert).is_err(),
        "Redis must refuse a client without a certificate"
    );

    let world = World::start_on(1, redis, Broker::shared());
    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let ends = world.produce_json(&[purchase("m1", "mia", "10", "2026-11-01T10:00:00Z")]);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_eq!(world.customer_state("mia").unwrap().count, 1);
}

/// The routes serving customer data need a bearer token from `api.token_file` once one is set
/// (401 with `WWW-Authenticate: Bearer` without it or with another); health, readiness,
/// metrics stay open. `check-config` refuses a `listen` reachable from other hosts without a
/// token and a token file it cannot use, naming `api.token_file`.
#[test]
fn the_customer_routes_need_a_bearer_token_from_the_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (
        "0123456789abcdef0123456789abcdef",
        "fedcba9876543210fedcba9876543210ff",
    );
    let tokens = dir.path().join("api-tokens");
    std::fs::write(&tokens, format!("# rotating: both valid\n{old}\n{new}\n")).unwrap();
    let world = World::start(1);
    let tierd = Tierd::spawn(
        &world,
        &format!("[api]\ntoken_file = \"{}\"\n", tokens.display()),
    );
    tierd.wait_partitions(1, std::time::Duration::from_secs(60));
    let ends = world.produce_json(&[purchase("k1", "kim", "10", "2026-11-01T10:00:00Z")]);
    world.wait_applied(&ends, std::time::Duration::from_secs(60));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let get = |path: &str, token: Option<&str>| {
        rt.block_on(async {
            let mut request = reqwest::Client::new().get(format!("{}{path}", tierd.api));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let r = request.send().await.unwrap();
            let challenge = r
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), challenge, r.text().await.unwrap())
        })
    };
    for path in ["/v1/customers/kim", "/v1/tiers"] {
        let (status, challenge, body) = get(path, None);
        assert_eq!(status, 401, "{path} without a token: {body}");
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"tierd\""));
        assert!(body.contains("\"error\":\"unauthorized\""), "{body}");
        let (status, _, body) = get(path, Some(&old[..31]));
        assert_eq!(status, 401, "{path} with a wrong token: {body}");
        assert!(body.contains("not one of api.token_file's"), "{body}");
        for token in [old, new] {
            let (status, _, body) = get(path, Some(token));
            assert_eq!(status, 200, "{path} with a token of the file: {body}");
        }
        // The scheme is case-insensitive (RFC 7235).
        let lower = rt.block_on(async {
            reqwest::Client::new()
                .get(format!("{}{path}", tierd.api))
                .header("authorization", format!("bearer {new}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
        assert_eq!(lower, 200, "{path} with `bearer`");
    }
    let (_, _, body) = get("/v1/customers/kim", Some(new));
    assert!(body.contains("\"customer_id\":\"kim\""), "{body}");
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/status",
    ] {
        let (status, _, body) = get(path, None);
        assert_eq!(status, 200, "{path} stays open: {body}");
    }
    // Open too (its answer depends on the partitions' lag being known yet).
    let (status, challenge, body) = get("/readyz/ingest", None);
    assert!(
        matches!(status, 200 | 503) && challenge.is_none(),
        "{status} {body}"
    );
    let (status, _, body) = get("/v1/status", None);
    assert_eq!(status, 401, "/v1/status holds customer ids: {body}");

    let rules = "[rules]\npath = \"config/rules/b2b-lifetime.toml\"\n";
    let (ok, stderr) = check_config(&format!("{rules}[api]\nlisten = \"0.0.0.0:8080\"\n"));
    assert!(
        !ok && stderr.contains("`api.token_file`") && stderr.contains("reachable from other hosts"),
        "{stderr}"
    );
    let (ok, stderr) = check_config(&format!(
        "{rules}[api]\nlisten = \"0.0.0.0:8080\"\ntoken_file = \"{}\"\n",
        tokens.display()
    ));
    assert!(ok, "{stderr}");
    let (ok, stderr) = check_config(&format!(
        "{rules}[api]\nlisten = \"0.0.0.0:8080\"\nallow_unauthenticated = true\n"
    ));
    assert!(ok, "an explicit opt-out is accepted: {stderr}");
    let short = dir.path().join("short-token");
    std::fs::write(&short, "secret\n").unwrap();
    let (ok, stderr) = check_config(&format!(
        "{rules}[api]\ntoken_file = \"{}\"\n",
        short.display()
    ));
    assert!(
        !ok && stderr.contains("`api.token_file`") && stderr.contains("too short"),
        "{stderr}"
    );
}

/// `curl` over HTTPS to the API (`extra` arguments: the client certificate or not): the HTTP
/// status, or `None` when no answer came (a refused handshake).
fn curl_https(tierd: &Tierd, certs: &Certs, path: &str, extra: &[&str]) -> (Option<u16>, String) {
    let url = format!("{}{path}", tierd.api.replacen("http://", "https://", 1));
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .arg("--cacert")
        .arg(&certs.ca)
        .args(extra)
        .arg(&url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    let code: u16 = code.trim().parse().unwrap_or(0);
    (
        (code != 0).then_some(code),
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// With `api.tls_cert_file`/`tls_key_file` the API serves HTTPS only; with
/// `api.tls_client_ca_file` it admits only clients presenting a certificate of that CA
/// (mutual TLS, every route), and such an API may listen beyond loopback without a token.
/// Files it cannot use are refused by `check-config`, naming the field.
#[test]
fn the_api_serves_https_and_admits_only_clients_with_a_certificate_of_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let tls = format!(
        "[api]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_client_ca_file = \"{}\"\n",
        certs.server_cert.display(),
        certs.server_key.display(),
        certs.ca.display()
    );
    let world = World::start(1);
    // Tokens too: both apply.
    let token = "0123456789abcdef0123456789abcdef";
    let tokens = dir.path().join("api-tokens");
    std::fs::write(&tokens, format!("{token}\n")).unwrap();
    let tierd = Tierd::spawn(
        &world,
        &format!("{tls}token_file = \"{}\"\n", tokens.display()),
    );
    let ends = world.produce_json(&[purchase("m1", "mia", "10", "2026-11-01T10:00:00Z")]);
    world.wait_applied(&ends, Duration::from_secs(60));

    let client = [
        "--cert",
        certs.client_cert.to_str().unwrap(),
        "--key",
        certs.client_key.to_str().unwrap(),
    ];
    let bearer = format!("Authorization: Bearer {token}");
    let with_token = [&client[..], &["-H", bearer.as_str()]].concat();
    let (code, body) = curl_https(&tierd, &certs, "/v1/customers/mia", &with_token);
    assert_eq!(code, Some(200), "{body}");
    assert!(body.contains("\"customer_id\":\"mia\""), "{body}");
    let (code, body) = curl_https(&tierd, &certs, "/v1/customers/mia", &client);
    assert_eq!(
        code,
        Some(401),
        "a client certificate without the token: {body}"
    );
    let (code, body) = curl_https(&tierd, &certs, "/healthz", &client);
    assert_eq!((code, body.trim()), (Some(200), "ok"));
    // No client certificate: no answer, on any route.
    for path in ["/v1/customers/mia", "/healthz", "/metrics"] {
        let (code, body) = curl_https(&tierd, &certs, path, &[]);
        assert_eq!(
            code, None,
            "{path} answered without a client certificate: {body}"
        );
    }
    // A certificate of another CA: refused too.
    let other = tempfile::tempdir().unwrap();
    let stranger = Certs::make(other.path());
    let foreign = [
        "--cert",
        stranger.client_cert.to_str().unwrap(),
        "--key",
        stranger.client_key.to_str().unwrap(),
    ];
    let (code, body) = curl_https(&tierd, &certs, "/healthz", &foreign);
    assert_eq!(
        code, None,
        "a foreign client certificate was admitted: {body}"
    );
    // Plain HTTP gets no HTTP answer.
    assert_eq!(tierd.get("/healthz").0, 0);
    drop(tierd);

    // Server-only TLS: any client over HTTPS, none over HTTP.
    let server_only = tls
        .lines()
        .filter(|l| !l.starts_with("tls_client_ca_file"))
        .collect::<Vec<_>>()
        .join("\n");
    let tierd = Tierd::spawn(&world, &format!("{server_only}\n"));
    let (code, body) = curl_https(&tierd, &certs, "/v1/customers/mia", &[]);
    assert_eq!(code, Some(200), "{body}");
    assert_eq!(tierd.get("/healthz").0, 0);

    let rules = "[rules]\npath = \"config/rules/b2b-lifetime.toml\"\n";
    let open = tls.replacen("[api]\n", "[api]\nlisten = \"0.0.0.0:8080\"\n", 1);
    let (ok, stderr) = check_config(&format!("{rules}{open}"));
    assert!(ok, "client certificates suffice beyond loopback: {stderr}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    for (config, field) in [
        (
            format!(
                "[api]\ntls_cert_file = \"{}\"\n",
                certs.server_cert.display()
            ),
            "`api.tls_key_file`",
        ),
        (
            tls.replacen(
                &certs.server_cert.display().to_string(),
                "/nonexistent/api.crt",
                1,
            ),
            "`api.tls_cert_file`",
        ),
        (
            tls.replacen(
                &certs.server_cert.display().to_string(),
                &empty.display().to_string(),
                1,
            ),
            "`api.tls_cert_file`",
        ),
        (
            format!("[api]\ntls_client_ca_file = \"{}\"\n", certs.ca.display()),
            "`api.tls_client_ca_file`",
        ),
        (
            tls.replacen(
                &certs.server_key.display().to_string(),
                &certs.client_key.display().to_string(),
                1,
            ),
            "`api.tls_key_file`",
        ),
        (
            tls.replacen(
                &certs.ca.display().to_string(),
                &certs.server_key.display().to_string(),
                1,
            ),
            "`api.tls_client_ca_file`",
        ),
    ] {
        let (ok, stderr) = check_config(&format!("{rules}{config}"));
        assert!(!ok && stderr.contains(field), "{config}: {stderr}");
    }
}

/// `scripts/kafka/acl.sh BOOTSTRAP BINDING…` (as the broker's super user, on its PLAINTEXT
/// listener): each binding `PRINCIPAL|RESOURCE_TYPE|PATTERN_TYPE|NAME|OPERATION|PERMISSION`.
fn create_acls(bootstrap: &str, bindings: &[String]) {
    let out = std::process::Command::new("bash")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka/acl.sh"))
        .arg(bootstrap)
        .args(bindings)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "acl.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A topic of the world that tierd's principal is not allowed to write at first.
#[derive(Clone, Copy)]
enum NoWrite {
    DeadLetters,
    History,
}

impl NoWrite {
    fn topic(self, world: &World) -> &str {
        match self {
            Self::DeadLetters => &world.dlq,
            Self::History => &world.history,
        }
    }
}

/// The ACL bindings `User:tierd` is allowed `operations` on a resource.
fn allow(resource: &str, pattern: &str, name: &str, operations: &[&str]) -> Vec<String> {
    operations
        .iter()
        .map(|op| format!("User:{SCRAM_USER}|{resource}|{pattern}|{name}|{op}|ALLOW"))
        .collect()
}

/// A broker that enforces ACLs (KRaft's StandardAuthorizer; tierd authenticates as
/// `User:tierd` over SASL_PLAINTEXT SCRAM-SHA-512; the test's own clients are the super user
/// on the PLAINTEXT listener) and a world on it where `User:tierd` holds the ACLs the README
/// lists under `kafka.producer`, but Write on the `no_write` topic; tierd started on it.
fn under_acls(no_write: NoWrite) -> (World, Tierd) {
    let sasl_port = support::free_port();
    let props = format!(
        "listeners=PLAINTEXT://127.0.0.1:{{port}},CONTROLLER://127.0.0.1:{{controller_port}},SASL_PLAINTEXT://127.0.0.1:{sasl_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{{port}},CONTROLLER://127.0.0.1:{{controller_port}},SASL_PLAINTEXT://127.0.0.1:{sasl_port}
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS
"
    );
    let broker = Broker::start_with(
        &props,
        &[
            "--add-scram".into(),
            format!("SCRAM-SHA-512=[name={SCRAM_USER},password={SCRAM_PASSWORD}]"),
        ],
    );
    let mut world = World::start_on(1, Redis::start(), broker);
    let written = ["WRITE", "READ", "DESCRIBE", "DESCRIBE_CONFIGS"];
    let mut bindings = Vec::new();
    bindings.extend(allow(
        "TOPIC",
        "LITERAL",
        &world.input,
        &["READ", "DESCRIBE", "DESCRIBE_CONFIGS"],
    ));
    for topic in [&world.output, &world.history, &world.dlq] {
        let refused = topic.as_str() == no_write.topic(&world);
        bindings.extend(allow(
            "TOPIC",
            "LITERAL",
            topic,
            &written[usize::from(refused)..],
        ));
    }
    bindings.extend(allow(
        "GROUP",
        "PREFIXED",
        &world.group,
        &["READ", "DESCRIBE"],
    ));
    bindings.extend(allow(
        "TRANSACTIONAL_ID",
        "PREFIXED",
        &format!("{}:", world.prefix),
        &["WRITE", "DESCRIBE"],
    ));
    bindings.extend(allow(
        "CLUSTER",
        "LITERAL",
        "kafka-cluster",
        &["DESCRIBE_CONFIGS"],
    ));
    create_acls(&world.broker.addr, &bindings);

    world.tierd_brokers = Some(format!("127.0.0.1:{sasl_port}"));
    let client = vec![
        ("security.protocol", "SASL_PLAINTEXT".to_owned()),
        ("sasl.mechanisms", "SCRAM-SHA-512".into()),
        ("sasl.username", SCRAM_USER.into()),
        ("sasl.password", SCRAM_PASSWORD.into()),
    ];
    let producer_table = format!("[kafka.producer]\n{}", toml_table(&client));
    let tierd = Tierd::spawn_with(&world, &toml_table(&client), &producer_table);
    (world, tierd)
}

/// Grants `User:tierd` Write on the `no_write` topic.
fn grant_write(world: &World, no_write: NoWrite) {
    create_acls(
        &world.broker.addr,
        &allow("TOPIC", "LITERAL", no_write.topic(world), &["WRITE"]),
    );
}

/// tierd against a broker that enforces ACLs (KRaft's StandardAuthorizer; tierd
/// authenticates as `User:tierd` over SASL_PLAINTEXT SCRAM-SHA-512; the test's own clients
/// are the super user on the PLAINTEXT listener), holding only the ACLs the README lists:
/// it starts, consumes, commits, publishes its changes transactionally and keeps its
/// published position. Write on the dead-letter topic is left out: a dead letter Kafka
/// refuses as not authorized is isolated like one refused for its size — parked with the
/// reason, `/readyz/ingest` 503 and `tierd_outbox_parked` 1, every change around it
/// published once — and delivered once the permission is granted.
#[test]
fn tierd_runs_under_an_authorizer_with_the_documented_acls_and_parks_a_refused_dead_letter() {
    let (world, tierd) = under_acls(NoWrite::DeadLetters);
    tierd.wait_partitions(1, Duration::from_secs(90));

    let records = support::ten_purchases_around(vec![(Some("c9".into()), b"{not json".to_vec())]);
    let ends = world.produce(&records);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(90));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_parked") < 1.0 || world.outbox_len(0) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "not parked:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, body) = tierd.get("/readyz/ingest");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("parked"), "{body}");
    assert!(body.to_lowercase().contains("authoriz"), "{body}");
    // The retries go on a while: nothing around the refused record is produced again.
    std::thread::sleep(Duration::from_secs(3));
    world.assert_changes_once(10);
    assert!(world.read_all(&world.dlq).is_empty());

    // The permission is granted: the parked dead letter goes out on its next retry.
    grant_write(&world, NoWrite::DeadLetters);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_parked") > 0.0 || tierd.get("/readyz/ingest").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "parked letter never delivered:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let letters = world.read_all(&world.dlq);
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].value, b"{not json");
    world.assert_changes_once(10);
}

/// A history topic tierd's principal may not write: the first round that records a rules
/// sweep (the partition's first rules) needs its history record, which the topic refuses as
/// not authorized. The outbox is held, visibly (`/readyz/ingest` 503 naming the history topic,
/// `tierd_outbox_blocked` 1), tierd keeps running, and once Write is granted every change
/// goes out once. (Before, the abort after the refusal failed fatally and each retry
/// recreated the producer until the service stopped.)
#[test]
fn a_history_topic_tierd_may_not_write_holds_the_outbox_visibly_until_granted() {
    let (world, mut tierd) = under_acls(NoWrite::History);
    tierd.wait_partitions(1, Duration::from_secs(90));
    let ends = world.produce(&support::ten_purchases_around(Vec::new()));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = tierd.get("/readyz/ingest");
        if code == 503 && body.contains("history topic") {
            assert!(body.to_lowercase().contains("authoriz"), "{body}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not held: {code} {body}\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(tierd.metric("tierd_outbox_blocked"), 1.0);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        tierd.wait_exit(Duration::from_millis(10)),
        None,
        "tierd keeps running"
    );
    assert!(
        world.read_all(&world.output).is_empty(),
        "nothing goes out without its history"
    );

    grant_write(&world, NoWrite::History);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(60));
    world.assert_changes_once(10);
    assert_eq!(tierd.get("/readyz/ingest").0, 200);
}
