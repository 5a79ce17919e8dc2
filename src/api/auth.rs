//! Bearer-token authentication of the routes that serve customer data (`/v1/…`): the tokens
//! come from `api.token_file`, one per line, and a request must present one as
//! `Authorization: Bearer <token>`. Health, readiness, metrics and the OpenAPI document carry
//! no customer data and stay open (probes and scrapers need no secret).

use crate::config::ConfigError;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::path::Path;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The shortest token accepted: 32 characters (e.g. `openssl rand -hex 16`).
pub const MIN_TOKEN_LEN: usize = 32;

/// The tokens a request may present.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<Vec<u8>>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.0.len())
    }
}

impl Tokens {
    /// Reads `path` (`api.token_file`): one token per line; blank lines and lines starting
    /// with `#` are ignored; each token is printable ASCII without spaces, at least
    /// [`MIN_TOKEN_LEN`] characters.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `api.token_file`: unreadable, no token, or a token too
    /// short or with characters a header cannot carry (its line number).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            field: "api.token_file",
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        let mut tokens = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(format!(
                    "{} line {}: a token is printable ASCII without spaces",
                    path.display(),
                    i + 1
                )));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(bad(format!(
                    "{} line {}: a token of {} characters is too short to guess safely; use at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 16`)",
                    path.display(),
                    i + 1,
                    token.len()
                )));
            }
            tokens.push(token.as_bytes().to_vec());
        }
        if tokens.is_empty() {
            return Err(bad(format!("{} holds no token", path.display())));
        }
        Ok(Self(Arc::new(tokens)))
    }

    /// Whether `presented` is one of the tokens (compared in constant time per token: the
    /// time taken does not tell how much of a guess matched).
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.0.iter().fold(false, |found, token| {
            found | bool::from(token.ct_eq(presented))
        })
    }
}

/// The token of an `Authorization` value `Bearer <token>` (the scheme is case-insensitive,
/// RFC 7235), if it is one.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
}

/// Middleware: answers 401 `unauthorized` (with `WWW-Authenticate: Bearer`) unless the
/// request carries one of the tokens.
pub async fn require_token(State(tokens): State<Tokens>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()));
    match presented {
        Some(token) if tokens.accepts(token) => next.run(request).await,
        other => {
            let message = if other.is_some() {
                "the bearer token is not one of api.token_file's"
            } else {
                "this route needs `Authorization: Bearer <token>` (api.token_file)"
            };
            let mut response = (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({"error": "unauthorized", "message": message})),
            )
                .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tierd\""),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn tokens_are_read_one_per_line_and_bad_files_are_refused_naming_the_field_and_line() {
        let a = "a".repeat(32);
        let b = "b".repeat(40);
        let f = file(&format!("# rotated 2026-12\n\n{a}\n  {b}  \n"));
        let tokens = Tokens::load(f.path()).unwrap();
        assert!(tokens.accepts(a.as_bytes()));
        assert!(tokens.accepts(b.as_bytes()));
        assert!(!tokens.accepts(&a.as_bytes()[..31]));
        assert!(!tokens.accepts(b""));
        assert!(!tokens.accepts(format!("{a}x").as_bytes()));

        for (text, wanted) in [
            ("# only a comment\n".to_owned(), "holds no token"),
            (
                format!("{a}\nshort\n"),
                "line 2: a token of 5 characters is too short",
            ),
            (
                format!("{a} {a}\n"),
                "line 1: a token is printable ASCII without spaces",
            ),
        ] {
            let f = file(&text);
            let e = Tokens::load(f.path()).unwrap_err().to_string();
            assert!(
                e.starts_with("configuration field `api.token_file`: ") && e.contains(wanted),
                "{e}"
            );
        }
        assert_eq!(bearer_token(b"Bearer abc"), Some(b"abc".as_slice()));
        assert_eq!(bearer_token(b"bearer  abc "), Some(b"abc".as_slice()));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearerabc"), None);
        let e = Tokens::load(Path::new("/nonexistent/token"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`api.token_file`: cannot read /nonexistent/token"),
            "{e}"
        );
    }
}
