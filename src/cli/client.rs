//! Client-side credentials for `sign` and `call`, and the signing they share with the
//! server (`auth::signing`, the one canonical-string builder).
//!
//! Credentials come from exactly one source, and the URL from the same one:
//!
//! - the environment (which `main` has filled from `./.env` or `--env-file`, never
//!   overriding what is set) as soon as any credential variable is set there; a
//!   missing one is then an error naming it, never filled in from elsewhere;
//! - otherwise `./.coordinator/dev-credentials.env` (written by `serve --dev`), as a
//!   whole, URL included. A `COORDINATOR_URL` in the environment that names another
//!   server is refused: the dev credentials go only where the dev file says.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::auth::signing::{self, CanonicalRequest};
use crate::config::ConfigError;
use crate::crypto::credential::{ApiKey, HmacSecret};

pub const VAR_URL: &str = "COORDINATOR_URL";
pub const VAR_CALLER: &str = "COORDINATOR_CALLER";
pub const VAR_HMAC_SECRET: &str = "COORDINATOR_HMAC_SECRET";
pub const VAR_KEY_VERSION: &str = "COORDINATOR_KEY_VERSION";
pub const VAR_API_KEY: &str = "COORDINATOR_CLIENT_API_KEY";
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// The variables that name a credential: any of them set in the environment makes the
/// environment the only source.
pub const CREDENTIAL_VARS: [&str; 4] = [VAR_CALLER, VAR_HMAC_SECRET, VAR_KEY_VERSION, VAR_API_KEY];

/// The signature headers as sent, in the order they are printed.
pub const H_CALLER: &str = "X-Coordinator-Caller";
pub const H_TIMESTAMP: &str = "X-Coordinator-Timestamp";
pub const H_NONCE: &str = "X-Coordinator-Nonce";
pub const H_KEY_VERSION: &str = "X-Coordinator-Key-Version";
pub const H_SIGNATURE: &str = "X-Coordinator-Signature";

/// The client's variables, all from one source.
pub struct ClientEnv {
    /// `None`: the process environment; `Some`: the dev credentials file's contents.
    file: Option<HashMap<String, String>>,
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn normalize_url(url: &str) -> String {
    url.trim().trim_end_matches('/').to_owned()
}

impl ClientEnv {
    /// Load for a command that needs every variable in `needed`.
    pub fn load(needed: &[&str]) -> anyhow::Result<Self> {
        let set: Vec<&str> = CREDENTIAL_VARS
            .iter()
            .copied()
            .filter(|n| env_var(n).is_some())
            .collect();
        if !set.is_empty() {
            if let Some(missing) = needed.iter().find(|n| env_var(n).is_none()) {
                return Err(ConfigError(format!(
                    "{missing} is not set: {} is set, so the credentials come from the \
                     environment only",
                    set.join(" and ")
                ))
                .into());
            }
            return Ok(ClientEnv { file: None });
        }
        let path = crate::cli::dev::credentials_path();
        if !path.exists() {
            return Err(ConfigError(format!(
                "{} is not set: set {} (or run `coordinator serve --dev` in this directory, \
                 which writes {})",
                needed.first().copied().unwrap_or(VAR_CALLER),
                needed.join(" and "),
                path.display()
            ))
            .into());
        }
        let mut file = HashMap::new();
        for item in dotenvy::from_path_iter(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
        {
            let (k, v) = item.with_context(|| format!("cannot parse {}", path.display()))?;
            file.insert(k, v);
        }
        let env = ClientEnv { file: Some(file) };
        if let Some(missing) = needed.iter().find(|n| env.get(n).is_none()) {
            return Err(ConfigError(format!(
                "{missing} is not set, and {} does not have it either",
                path.display()
            ))
            .into());
        }
        if let Some(other) = env_var(VAR_URL) {
            if normalize_url(&other) != env.url() {
                return Err(ConfigError(format!(
                    "{VAR_URL} is set to {other}, but the credentials come from {}, which is \
                     for {}: unset {VAR_URL}, or set the credentials in the environment too",
                    path.display(),
                    env.url()
                ))
                .into());
            }
        }
        eprintln!("using credentials from {}", path.display());
        Ok(env)
    }

    /// A variable from the one source the credentials come from.
    pub fn get(&self, name: &str) -> Option<String> {
        match &self.file {
            None => env_var(name),
            Some(file) => file.get(name).filter(|v| !v.trim().is_empty()).cloned(),
        }
    }

    /// `COORDINATOR_URL` without a trailing `/` (default `http://127.0.0.1:8080`), from
    /// the same source as the credentials.
    pub fn url(&self) -> String {
        normalize_url(&self.get(VAR_URL).unwrap_or_else(|| DEFAULT_URL.to_owned()))
    }

    /// The caller name, HMAC secret and optional key version, validated.
    pub fn hmac(&self) -> anyhow::Result<HmacCredentials> {
        let caller = self.get(VAR_CALLER).unwrap_or_default();
        if !signing::is_valid_caller_name(&caller) {
            return Err(invalid(VAR_CALLER, "must match ^[a-z][a-z0-9_-]{0,31}$"));
        }
        let secret_text = zeroize::Zeroizing::new(self.get(VAR_HMAC_SECRET).unwrap_or_default());
        let secret =
            HmacSecret::parse(secret_text.trim()).map_err(|e| invalid(VAR_HMAC_SECRET, e))?;
        let key_version = match self.get(VAR_KEY_VERSION) {
            None => None,
            Some(v) => match v.trim().parse::<i32>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(invalid(VAR_KEY_VERSION, "must be a positive integer")),
            },
        };
        Ok(HmacCredentials {
            caller,
            secret,
            key_version,
        })
    }

    /// `COORDINATOR_CLIENT_API_KEY`, validated (prefix, length, checksum).
    pub fn api_key(&self) -> anyhow::Result<ApiKey> {
        let text = zeroize::Zeroizing::new(self.get(VAR_API_KEY).unwrap_or_default());
        ApiKey::parse(text.trim()).map_err(|e| invalid(VAR_API_KEY, e))
    }
}

fn invalid(var: &str, why: impl std::fmt::Display) -> anyhow::Error {
    ConfigError(format!("invalid {var}: {why}")).into()
}

/// What a client signs with.
pub struct HmacCredentials {
    pub caller: String,
    pub secret: HmacSecret,
    pub key_version: Option<i32>,
}

/// A request body from `--body` or `--body-file` (at most one; none is empty).
#[derive(Debug, Clone, Args)]
#[group(multiple = false)]
pub struct BodyArgs {
    /// The request body, exactly these bytes.
    #[arg(long)]
    pub body: Option<String>,
    /// Read the request body from a file (`-` for stdin), byte for byte.
    #[arg(long, value_name = "FILE")]
    pub body_file: Option<PathBuf>,
}

impl BodyArgs {
    pub fn read(&self) -> anyhow::Result<Vec<u8>> {
        match (&self.body, &self.body_file) {
            (Some(b), _) => Ok(b.clone().into_bytes()),
            (None, Some(p)) if p.as_os_str() == "-" => {
                let mut buf = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .context("cannot read the body from stdin")?;
                Ok(buf)
            }
            (None, Some(p)) => {
                std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
            }
            (None, None) => Ok(Vec::new()),
        }
    }
}

/// The signature headers of one request, and what was signed.
pub struct Signed {
    /// `(header, value)` in the order of [`H_CALLER`] … [`H_SIGNATURE`].
    pub headers: Vec<(&'static str, String)>,
    pub canonical: String,
    /// The signed string's seven components, for `--explain`.
    pub components: Vec<(&'static str, String)>,
    /// Who signed, with which version and which secret (its display prefix only), for
    /// `--explain`.
    pub caller: String,
    pub key_version: Option<i32>,
    pub secret_prefix: String,
}

/// Sign a request exactly as the server will check it: the same
/// [`CanonicalRequest`] the middleware builds, then HMAC-SHA256 keyed by the secret.
/// `nonce` is `""` for none.
pub fn sign_request(
    creds: &HmacCredentials,
    method: &str,
    target: &str,
    timestamp: &str,
    nonce: &str,
    body: &[u8],
) -> Signed {
    let req = CanonicalRequest::new(method, target, &creds.caller, timestamp, nonce, body);
    let canonical = req.to_signed_string();
    let signature = signing::sign(creds.secret.expose_secret(), &canonical);
    let mut headers = vec![
        (H_CALLER, creds.caller.clone()),
        (H_TIMESTAMP, timestamp.to_owned()),
    ];
    if !nonce.is_empty() {
        headers.push((H_NONCE, nonce.to_owned()));
    }
    if let Some(v) = creds.key_version {
        headers.push((H_KEY_VERSION, v.to_string()));
    }
    headers.push((H_SIGNATURE, signature));
    Signed {
        headers,
        components: req.components(),
        canonical,
        caller: creds.caller.clone(),
        key_version: creds.key_version,
        secret_prefix: super::secret::display_prefix(creds.secret.expose_secret()),
    }
}

/// A fresh nonce: 32 random hex characters.
pub fn random_nonce() -> String {
    hex::encode(crate::crypto::random_bytes::<16>())
}

/// The current unix time in seconds, as the timestamp header carries it.
pub fn now_timestamp() -> String {
    (crate::db::now_millis() / 1000).to_string()
}

/// Clap value parser: a nonce the server accepts (1–64 of `[A-Za-z0-9_-]`).
pub fn parse_nonce(text: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(text.to_owned())
    } else {
        Err("a nonce is 1-64 characters of A-Z a-z 0-9 _ -".into())
    }
}

/// Clap value parser: unix seconds as ASCII digits.
pub fn parse_timestamp(text: &str) -> Result<String, String> {
    if (1..=12).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit()) {
        Ok(text.to_owned())
    } else {
        Err("a timestamp is unix seconds, 1-12 ASCII digits".into())
    }
}

/// Clap value parser: an HTTP method (letters; sent and signed in upper case).
pub fn parse_method(text: &str) -> Result<String, String> {
    if (1..=16).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphabetic()) {
        Ok(text.to_ascii_uppercase())
    } else {
        Err("an HTTP method is letters only, e.g. GET or POST".into())
    }
}

/// Clap value parser: a request target, `/path` with an optional `?query`.
pub fn parse_target(text: &str) -> Result<String, String> {
    if text.starts_with('/') && !text.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        Ok(text.to_owned())
    } else {
        Err("the path must start with `/` and contain no spaces or control characters".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_match_the_server() {
        for (shown, server) in [
            (H_CALLER, signing::HEADER_CALLER),
            (H_TIMESTAMP, signing::HEADER_TIMESTAMP),
            (H_NONCE, signing::HEADER_NONCE),
            (H_KEY_VERSION, signing::HEADER_KEY_VERSION),
            (H_SIGNATURE, signing::HEADER_SIGNATURE),
        ] {
            assert!(shown.eq_ignore_ascii_case(server), "{shown}");
        }
    }

    #[test]
    fn signs_like_the_server() {
        let creds = HmacCredentials {
            caller: "svc".into(),
            secret: HmacSecret::parse("coh_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefg1rvF0S")
                .unwrap(),
            key_version: Some(2),
        };
        let body = br#"{"kind":"build"}"#;
        let s = sign_request(
            &creds,
            "post",
            "/coordinator/jobs?b=2&a=1",
            "1700000000",
            "n-1_abc",
            body,
        );
        let expected = signing::canonical(
            "POST",
            "/coordinator/jobs?b=2&a=1",
            "svc",
            "1700000000",
            "n-1_abc",
            body,
        );
        assert_eq!(s.canonical, expected);
        let names: Vec<_> = s.headers.iter().map(|(h, _)| *h).collect();
        assert_eq!(
            names,
            [H_CALLER, H_TIMESTAMP, H_NONCE, H_KEY_VERSION, H_SIGNATURE]
        );
        assert_eq!(
            s.headers.last().map(|(_, v)| v.as_str()),
            Some("4bfc5bbd579d98fd67445a802a82004eb2d80ba6302568aa6499062f92027957")
        );
        let no_nonce = sign_request(&creds, "GET", "/", "1", "", b"");
        assert!(no_nonce.headers.iter().all(|(h, _)| *h != H_NONCE));
    }

    #[test]
    fn value_parsers() {
        assert_eq!(random_nonce().len(), 32);
        assert!(parse_nonce(&random_nonce()).is_ok());
        assert!(parse_nonce("").is_err());
        assert!(parse_nonce("a.b").is_err());
        assert!(parse_timestamp("1700000000").is_ok());
        assert!(parse_timestamp("-1").is_err());
        assert_eq!(parse_method("post"), Ok("POST".to_owned()));
        assert!(parse_method("GE T").is_err());
        assert!(parse_target("/a?b=1").is_ok());
        assert!(parse_target("a").is_err());
        assert!(parse_target("/a b").is_err());
    }
}
