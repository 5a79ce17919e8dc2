//! The one place the Redis client is built: the URL, and for `rediss://` the TLS trust
//! (`redis.tls_ca_file`) and an optional client certificate (`redis.tls_cert_file` +
//! `redis.tls_key_file`). Used by the service and the operator tools alike.

use crate::config::{ConfigError, RedisConfig};
use std::path::Path;

/// Builds the Redis client (no connection yet): a bad URL or an unreadable certificate file is
/// refused here, naming the field.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `redis.url`, `redis.tls_ca_file`, `redis.tls_cert_file` or
/// `redis.tls_key_file`.
pub fn client(cfg: &RedisConfig) -> Result<redis::Client, ConfigError> {
    // rustls needs a process-wide crypto provider; only `ring` is built in. Installing it
    // twice is harmless (the second call reports the first and changes nothing).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let invalid = |field, message: String| ConfigError::Invalid { field, message };
    let tls_files = cfg.tls_ca_file.is_some() || cfg.tls_cert_file.is_some();
    let tls_url = cfg
        .url
        .get(..9)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss://"));
    if tls_files && !tls_url {
        let field = if cfg.tls_ca_file.is_some() {
            "redis.tls_ca_file"
        } else {
            "redis.tls_cert_file"
        };
        return Err(invalid(
            field,
            "is set but redis.url is not rediss:// (TLS)".into(),
        ));
    }
    if cfg.tls_cert_file.is_some() != cfg.tls_key_file.is_some() {
        return Err(invalid(
            "redis.tls_key_file",
            "redis.tls_cert_file and redis.tls_key_file are set together (client certificate)"
                .into(),
        ));
    }
    let read = |field, path: &Path| {
        std::fs::read(path)
            .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))
    };
    let url_error = |e: redis::RedisError| invalid("redis.url", e.to_string());
    if !tls_files {
        return redis::Client::open(cfg.url.as_str()).map_err(url_error);
    }
    let root_cert = cfg
        .tls_ca_file
        .as_deref()
        .map(|p| read("redis.tls_ca_file", p))
        .transpose()?;
    // redis-rs silently trusts nothing (or presents no certificate) when a file holds no PEM
    // certificate at all: refuse that here rather than at the first handshake.
    let has_pem_cert = |pem: &[u8]| {
        pem.windows(b"-----BEGIN CERTIFICATE-----".len())
            .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    };
    if let (Some(pem), Some(path)) = (&root_cert, &cfg.tls_ca_file) {
        if !has_pem_cert(pem) {
            return Err(invalid(
                "redis.tls_ca_file",
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
    }
    let client_tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(cert), Some(key)) => {
            let client_cert = read("redis.tls_cert_file", cert)?;
            if !has_pem_cert(&client_cert) {
                return Err(invalid(
                    "redis.tls_cert_file",
                    format!("{} holds no PEM certificate", cert.display()),
                ));
            }
            Some(redis::ClientTlsConfig {
                client_cert,
                client_key: read("redis.tls_key_file", key)?,
            })
        }
        _ => None,
    };
    redis::Client::build_with_tls(
        cfg.url.as_str(),
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| {
        let message = e.to_string();
        let field = if message.contains("root certificate") || message.contains("trust") {
            "redis.tls_ca_file"
        } else if message.contains("client certificate") {
            "redis.tls_cert_file"
        } else if message.contains("private key") {
            "redis.tls_key_file"
        } else {
            "redis.url"
        };
        invalid(field, message)
    })
}

/// Redis's `maxmemory-policy` (from `INFO memory`, which managed Redis services keep even when
/// they rename or block `CONFIG`).
///
/// # Errors
/// The Redis error.
pub async fn eviction_policy<C: redis::aio::ConnectionLike>(
    conn: &mut C,
) -> Result<String, redis::RedisError> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("maxmemory_policy:"))
        .unwrap_or("unknown")
        .trim()
        .to_owned())
}

/// Whether a `maxmemory-policy` may evict tierd's keys. They carry no TTL, so `noeviction` and
/// the `volatile-*` policies never touch them; the `allkeys-*` policies may drop a customer's
/// state, a partition's offset or its outbox without a trace.
pub fn may_evict_tierd_keys(policy: &str) -> bool {
    policy.starts_with("allkeys-")
}

#[cfg(test)]
mod tests {
    use super::may_evict_tierd_keys;

    #[test]
    fn only_allkeys_policies_can_evict_keys_without_ttl() {
        for p in ["allkeys-lru", "allkeys-lfu", "allkeys-random"] {
            assert!(may_evict_tierd_keys(p), "{p}");
        }
        for p in [
            "noeviction",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
        ] {
            assert!(!may_evict_tierd_keys(p), "{p}");
        }
    }
}
