//! Client-side credentials for `sign`, `call`, `jobs` and `queues`, and the `v1`
//! signing `sign` and `call` share: the coordinator-client crate's signer
//! (`coordinator_client::signing`), never the server's `auth::hmac::wire` (of which it
//! uses only the caller-name rule, `is_valid_caller_name`). The unit test
//! `signs_like_the_server` below and tests/api/signing_vectors.rs hold the two to the
//! same signed string.
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

pub use coordinator_client::client::without_user_info;
use coordinator_client::signing::{self, V1Params, V1Signature};
use coordinator_client::{Client, ClientOptions, Credentials};

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
    /// Load for a command that needs every variable in `needed`. `api_key_flag`: the
    /// command has `--api-key` (`call`, `jobs`, `queues`), so an error can name it.
    pub fn load(needed: &[&str], api_key_flag: bool) -> anyhow::Result<Self> {
        let set: Vec<&str> = CREDENTIAL_VARS
            .iter()
            .copied()
            .filter(|n| env_var(n).is_some())
            .collect();
        if !set.is_empty() {
            if let Some(missing) = needed.iter().find(|n| env_var(n).is_none()) {
                // The other credential is there: say which flag uses it.
                let has = |n: &str| env_var(n).is_some();
                let hint = match api_key_flag {
                    true if !needed.contains(&VAR_API_KEY) && has(VAR_API_KEY) => {
                        format!("; to send {VAR_API_KEY}, add --api-key")
                    }
                    true if needed.contains(&VAR_API_KEY)
                        && has(VAR_CALLER)
                        && has(VAR_HMAC_SECRET) =>
                    {
                        format!("; to sign with {VAR_HMAC_SECRET}, leave out --api-key")
                    }
                    _ => String::new(),
                };
                return Err(ConfigError(format!(
                    "{missing} is not set: {} is set, so the credentials come from the \
                     environment only{hint}",
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
        // Never dotenvy's own parse error: it holds the line, secret and all.
        let parse_error = |e| crate::cli::env_file::parse_error(&path, &path, e);
        for item in dotenvy::from_path_iter(&path).map_err(parse_error)? {
            let (k, v) = item.map_err(parse_error)?;
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
                    "{VAR_URL} is set to {}, but the credentials come from {}, which is \
                     for {}: unset {VAR_URL}, or set the credentials in the environment too",
                    without_user_info(&other),
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
        if !crate::auth::hmac::wire::is_valid_caller_name(&caller) {
            return Err(invalid(VAR_CALLER, "must match ^[a-z][a-z0-9_-]{0,31}$"));
        }
        let secret_text = zeroize::Zeroizing::new(self.get(VAR_HMAC_SECRET).unwrap_or_default());
        let secret =
            HmacSecret::parse(secret_text.trim()).map_err(|e| invalid(VAR_HMAC_SECRET, e))?;
        let key_version = match self.get(VAR_KEY_VERSION) {
            None => None,
            Some(v) => match v.trim().parse::<u32>() {
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
    pub key_version: Option<u32>,
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

/// `--ca-file`, taken by every command that calls the server.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// PEM file of the CA that issued the server's certificate, for an https://
    /// COORDINATOR_URL signed by a private CA (default: the public webpki roots).
    #[arg(long, env = "COORDINATOR_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// The coordinator-client [`Client`] for `env`'s URL with `credentials`: the one HTTP
/// client and signer of the Rust code. `http://` and `https://` only; sending `what`
/// (e.g. "a signed request") over plain http to another machine gets a warning on
/// stderr.
pub fn connect(
    env: &ClientEnv,
    conn: &ConnArgs,
    credentials: Credentials,
    what: &str,
) -> anyhow::Result<Client> {
    let base = env.url();
    let scheme = base.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("https") => {}
        Some("http") => {
            let host = host_of(&base);
            if !is_loopback_host(host) {
                // Nothing protects the request on the way: an API key can be replayed by
                // anyone who sees it, a signed request within the timestamp window
                // elsewhere.
                eprintln!(
                    "warning: sending {what} to {} over plain http: anyone on the \
                     path can read it; use an https:// {VAR_URL} (with --ca-file for a \
                     private CA)",
                    without_user_info(&base)
                );
            }
        }
        _ => {
            return Err(ConfigError(format!(
                "invalid {VAR_URL}: expected http://HOST:PORT or https://HOST:PORT"
            ))
            .into())
        }
    }
    if let Some(path) = &conn.ca_file {
        if !path.is_file() {
            return Err(ConfigError(format!(
                "invalid COORDINATOR_CA_FILE: {} is not a readable file",
                path.display()
            ))
            .into());
        }
    }
    let options = ClientOptions {
        timeout: TIMEOUT,
        ca_file: conn.ca_file.clone(),
    };
    Client::with_options(&base, credentials, &options)
        .map_err(|e| ConfigError(format!("cannot set up the client: {e}")).into())
}

const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The host of an `http(s)://host:port/…` URL, as spelled.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let hostport = authority.rsplit('@').next().unwrap_or(authority);
    if hostport.starts_with('[') {
        return hostport.split_inclusive(']').next().unwrap_or(hostport);
    }
    hostport.split(':').next().unwrap_or(hostport)
}

/// `localhost` (or a name under it) or a loopback address: traffic that never leaves
/// the machine.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

impl HmacCredentials {
    /// As coordinator-client credentials (`v1` signatures).
    pub fn to_client(&self) -> Credentials {
        Credentials::V1 {
            caller: self.caller.clone(),
            secret: self.secret.expose_secret().to_owned(),
            key_version: self.key_version,
        }
    }

    /// The secret's display prefix (never the secret), for `--explain`.
    pub fn secret_prefix(&self) -> String {
        super::secret::display_prefix(self.secret.expose_secret())
    }

    /// Sign one request with the client crate's `v1` signer.
    pub fn sign(
        &self,
        method: &str,
        target: &str,
        timestamp: &str,
        nonce: &str,
        body: &[u8],
    ) -> V1Signature {
        let params = V1Params {
            caller: &self.caller,
            secret: self.secret.expose_secret(),
            key_version: self.key_version,
            timestamp,
            nonce,
        };
        signing::v1_sign(method, target, body, &params)
    }
}

/// A fresh nonce: 32 random hex characters.
pub fn random_nonce() -> String {
    signing::new_nonce()
}

/// The current unix time in seconds, as the timestamp header carries it.
pub fn now_timestamp() -> String {
    signing::now_secs().to_string()
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

/// Clap value parser for `sign`: a request target exactly as it goes on the request
/// line, so ASCII only. `call` percent-encodes what it sends (and says so); `sign`
/// cannot, and a signature over `/é` would match no request the server accepts (it
/// refuses a raw non-ASCII target with a bare 400).
pub fn parse_sent_target(text: &str) -> Result<String, String> {
    let target = parse_target(text)?;
    if !target.is_ascii() {
        return Err(
            "the path must be ASCII, as sent: percent-encode other characters as \
                    UTF-8 (e.g. é as %C3%A9)"
                .into(),
        );
    }
    Ok(target)
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
    use crate::auth::hmac::wire as server;
    use crate::crypto::credential::HmacSecret;

    #[test]
    fn header_names_match_the_server() {
        for (client, srv) in [
            (signing::HEADER_CALLER, server::HEADER_CALLER),
            (signing::HEADER_TIMESTAMP, server::HEADER_TIMESTAMP),
            (signing::HEADER_NONCE, server::HEADER_NONCE),
            (signing::HEADER_KEY_VERSION, server::HEADER_KEY_VERSION),
            (signing::HEADER_SIGNATURE, server::HEADER_SIGNATURE),
        ] {
            assert!(client.eq_ignore_ascii_case(srv), "{client}");
        }
    }

    /// The client crate's signer, as the CLI uses it, builds the server's signed string
    /// and component names, and the server's verifier accepts its signature.
    #[test]
    fn signs_like_the_server() {
        let creds = HmacCredentials {
            caller: "svc".into(),
            secret: HmacSecret::parse("coh_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefg1rvF0S")
                .unwrap(),
            key_version: Some(2),
        };
        let body = br#"{"kind":"build"}"#;
        let target = "/coordinator/jobs?b=2&a=1";
        let s = creds.sign("post", target, "1700000000", "n-1_abc", body);
        let server_req =
            server::CanonicalRequest::new("POST", target, "svc", "1700000000", "n-1_abc", body);
        assert_eq!(s.canonical, server_req.to_signed_string());
        let ours: Vec<(&str, String)> = s
            .components()
            .into_iter()
            .map(|(n, v)| (n, v.to_owned()))
            .collect();
        assert_eq!(ours, server_req.components());
        let names: Vec<_> = s.headers.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(
            names,
            [
                signing::HEADER_CALLER,
                signing::HEADER_TIMESTAMP,
                signing::HEADER_NONCE,
                signing::HEADER_KEY_VERSION,
                signing::HEADER_SIGNATURE
            ]
        );
        let sig = s.headers.last().map(|(_, v)| v.as_str()).unwrap();
        assert_eq!(
            sig,
            "4bfc5bbd579d98fd67445a802a82004eb2d80ba6302568aa6499062f92027957"
        );
        assert!(server::verify(
            creds.secret.expose_secret(),
            &s.canonical,
            sig
        ));
        let no_nonce = creds.sign("GET", "/", "1", "", b"");
        assert!(no_nonce
            .headers
            .iter()
            .all(|(h, _)| h != signing::HEADER_NONCE));
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1",
            "127.8.9.1",
            "localhost",
            "LOCALHOST",
            "a.localhost",
            "[::1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "10.0.0.1",
            "0.0.0.0",
            "example.com",
            "localhost.example.com",
            "[::]",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
        assert_eq!(host_of("http://127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_of("https://u@Example.com/x"), "Example.com");
        assert_eq!(host_of("http://[::1]:80"), "[::1]");
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
        assert!(parse_target("/caf\u{e9}").is_ok()); // `call` encodes it
        assert!(parse_sent_target("/caf\u{e9}").is_err());
        assert!(parse_sent_target("/caf%C3%A9?x=%E2%9C%93").is_ok());
    }
}
