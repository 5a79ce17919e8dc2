//! HTTPS for the API, with optional client certificates (mutual TLS): `api.tls_cert_file` and
//! `api.tls_key_file` make it serve TLS; `api.tls_client_ca_file` makes it admit only
//! clients presenting a certificate signed by that CA. rustls with the `ring` provider (the
//! one tierd already builds for Redis's TLS).

use crate::config::{ApiConfig, ConfigError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;

fn invalid(field: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { field, message }
}

/// The certificates of a PEM file (at least one).
fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| {
            invalid(
                field,
                format!("cannot read certificates from {}: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(invalid(
            field,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// The API's TLS configuration, if `api.tls_cert_file` is set.
///
/// # Errors
/// [`ConfigError::Invalid`] naming the field whose file is unreadable or unusable (no
/// certificate, no key, a key that does not match the certificate).
pub fn server_config(api: &ApiConfig) -> Result<Option<Arc<ServerConfig>>, ConfigError> {
    let (Some(cert_path), Some(key_path)) = (&api.tls_cert_file, &api.tls_key_file) else {
        return Ok(None);
    };
    let certs = certificates("api.tls_cert_file", cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        invalid(
            "api.tls_key_file",
            format!(
                "cannot read a PEM private key from {}: {e}",
                key_path.display()
            ),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("api.tls_cert_file", e.to_string()))?;
    let builder = match &api.tls_client_ca_file {
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates("api.tls_client_ca_file", ca_path)? {
                roots.add(ca).map_err(|e| {
                    invalid(
                        "api.tls_client_ca_file",
                        format!("{}: not a usable CA certificate: {e}", ca_path.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid("api.tls_client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        invalid(
            "api.tls_key_file",
            format!(
                "{} cannot serve {}: {e}",
                key_path.display(),
                cert_path.display()
            ),
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}
