//! `coordinator call`: sign (or use the API key), send, print the response. The status
//! line goes to stderr and the body to stdout, so `call … | jq` works; any status of
//! 400 or more exits non-zero. `--explain` on a 401 puts the server's signed string
//! beside this client's, component by component.

use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::Args;
use serde_json::{json, Value};

use super::client::{self, BodyArgs, ClientEnv, Signed};
use super::client::{VAR_API_KEY, VAR_CALLER, VAR_HMAC_SECRET, VAR_URL};
use super::common::{print_json, OutputArgs};
use crate::config::ConfigError;

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct CallArgs {
    /// HTTP method.
    #[arg(value_parser = client::parse_method)]
    pub method: String,
    /// Path and `?query`, appended to COORDINATOR_URL.
    #[arg(value_parser = client::parse_target)]
    pub path: String,
    #[command(flatten)]
    pub body: BodyArgs,
    /// Content-Type sent with a body.
    #[arg(long, default_value = "application/json")]
    pub content_type: String,
    /// Authenticate with COORDINATOR_CLIENT_API_KEY instead of signing.
    #[arg(long)]
    pub api_key: bool,
    /// On a 401, show the server's signed string beside this client's.
    #[arg(long, conflicts_with = "api_key")]
    pub explain: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// One component of the signed string on both sides.
struct Comparison {
    name: &'static str,
    client: String,
    server: String,
}

pub fn run(args: CallArgs) -> anyhow::Result<()> {
    let needed: &[&str] = if args.api_key {
        &[VAR_API_KEY]
    } else {
        &[VAR_CALLER, VAR_HMAC_SECRET]
    };
    let env = ClientEnv::load(needed)?;
    let base = env.url();
    if !base.starts_with("http://") {
        return Err(ConfigError(format!(
            "invalid {VAR_URL}: expected http://HOST:PORT (this client has no TLS; \
             put it behind a TLS-terminating proxy or use curl)"
        ))
        .into());
    }
    let body = args.body.read()?;
    let agent = ureq::AgentBuilder::new()
        .redirects(0) // a redirect would send the signature for another target
        .timeout(TIMEOUT)
        .build();
    let url = format!("{base}{}", args.path);
    let mut req = agent.request(&args.method, &url);
    // Sign the target exactly as ureq will put it on the request line.
    let sent = req
        .request_url()
        .map_err(|e| ConfigError(format!("invalid {VAR_URL} or path: {e}")))?;
    let target = match sent.as_url().query() {
        Some(q) if !q.is_empty() => format!("{}?{q}", sent.path()),
        _ => sent.path().to_owned(),
    };
    if target != args.path && !args.output.json {
        eprintln!("note: the request target is sent as {target}");
    }
    if !is_loopback_host(sent.host()) {
        // Nothing protects the request on the way: an API key can be replayed by anyone
        // who sees it, a signed request within the timestamp window elsewhere.
        eprintln!(
            "warning: sending {} to {base} over plain http: anyone on the path can read it; \
             put the service behind TLS and call it through a local proxy",
            if args.api_key {
                "an API key"
            } else {
                "a signed request"
            }
        );
    }

    let mut signed: Option<(Signed, String)> = None;
    if args.api_key {
        let key = env.api_key()?;
        req = req.set("X-API-Key", key.expose_secret());
    } else {
        let creds = env.hmac()?;
        let ts = client::now_timestamp();
        let s = client::sign_request(
            &creds,
            &args.method,
            &target,
            &ts,
            &client::random_nonce(),
            &body,
        );
        for (h, v) in &s.headers {
            req = req.set(h, v);
        }
        signed = Some((s, ts));
    }
    if !body.is_empty() {
        req = req.set("Content-Type", &args.content_type);
    }

    let resp = match req.send_bytes(&body) {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => bail!("request to {url} failed: {t}"),
    };
    let status = resp.status();
    let status_text = resp.status_text().to_owned();
    let text = resp
        .into_string()
        .map_err(|e| anyhow!("cannot read the response body: {e}"))?;
    let parsed: Option<Value> = serde_json::from_str(&text).ok();

    let comparison = match (&signed, &parsed) {
        (Some((s, _)), Some(problem)) if args.explain && status == 401 => problem
            .get("canonical")
            .and_then(Value::as_str)
            .map(|c| compare(s, c)),
        _ => None,
    };

    if args.output.json {
        let mut out = json!({
            "status": status,
            "statusText": status_text,
            "body": parsed.clone().unwrap_or(Value::String(text.clone())),
        });
        if let (Some(cmp), Some(obj)) = (&comparison, out.as_object_mut()) {
            let rows: Vec<Value> = cmp
                .iter()
                .map(|c| {
                    json!({
                        "component": c.name,
                        "client": c.client,
                        "server": c.server,
                        "same": c.client == c.server,
                    })
                })
                .collect();
            obj.insert("explain".into(), Value::Array(rows));
        }
        print_json(&out)?;
    } else {
        eprintln!("HTTP {status} {status_text}");
        if text.ends_with('\n') || text.is_empty() {
            super::common::write_stdout(format_args!("{text}"))?;
        } else {
            outln!("{text}")?;
        }
        if args.explain && status == 401 {
            explain_text(comparison.as_deref(), parsed.as_ref(), signed.as_ref());
        }
    }
    if status >= 400 {
        bail!("HTTP {status} {status_text}");
    }
    Ok(())
}

/// `localhost` (or a name under it) or a loopback address: traffic that never leaves
/// the machine.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Pair the client's components with the server's signed string split on `\n`.
fn compare(signed: &Signed, server_canonical: &str) -> Vec<Comparison> {
    let mut server = server_canonical.split('\n');
    let mut out: Vec<Comparison> = signed
        .components
        .iter()
        .map(|(name, client)| Comparison {
            name,
            client: client.clone(),
            server: server.next().unwrap_or_default().to_owned(),
        })
        .collect();
    // More lines than components would mean a different scheme version: show them.
    for extra in server {
        out.push(Comparison {
            name: "(extra)",
            client: String::new(),
            server: extra.to_owned(),
        });
    }
    out
}

fn explain_text(
    comparison: Option<&[Comparison]>,
    problem: Option<&Value>,
    signed: Option<&(Signed, String)>,
) {
    let reason = problem
        .and_then(|p| p.get("reason").or_else(|| p.get("detail")))
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    eprintln!();
    eprintln!("explain: the server refused the request: {reason}");
    if let Some(cmp) = comparison {
        eprintln!("signed string, component by component (* = differs):");
        let width = cmp.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in cmp {
            if c.client == c.server {
                eprintln!("  {:<width$}  {}", c.name, c.client);
            } else {
                eprintln!("* {:<width$}  client: {}", c.name, c.client);
                eprintln!("  {:<width$}  server: {}", "", c.server);
            }
        }
        if let (true, Some((s, _))) = (cmp.iter().all(|c| c.client == c.server), signed) {
            let version = match s.key_version {
                Some(v) => format!("version {v} (COORDINATOR_KEY_VERSION)"),
                None => "no version (the server tried its active versions)".to_owned(),
            };
            eprintln!(
                "every component matches, so the secret differs: this client signed as `{}` \
                 with a secret starting `{}`, {version}. Compare with the VERSION and PREFIX \
                 columns of `coordinator secret list {}` (PREFIX needs the master key)",
                s.caller, s.secret_prefix, s.caller
            );
        }
        return;
    }
    let server_time = problem
        .and_then(|p| p.get("server_time"))
        .and_then(Value::as_i64);
    let client_time = signed.and_then(|(_, ts)| ts.parse::<i64>().ok());
    if let (Some(server), Some(client)) = (server_time, client_time) {
        eprintln!(
            "server time {server}, client timestamp {client}: the clocks differ by {}s",
            client.saturating_sub(server)
        );
    } else if signed.is_some() {
        eprintln!("the server sent no signed string to compare (it refused before checking the signature)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::client::HmacCredentials;
    use crate::crypto::credential::HmacSecret;

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
    }

    #[test]
    fn compare_marks_the_differing_component() {
        let creds = HmacCredentials {
            caller: "svc".into(),
            secret: HmacSecret::generate(),
            key_version: None,
        };
        let s = client::sign_request(&creds, "GET", "/a?b=1", "1700000000", "n1", b"");
        // A proxy that rewrote the path: the server saw another target.
        let server = s.canonical.replace("/a?b=1", "/api/a?b=1");
        let cmp = compare(&s, &server);
        let differing: Vec<&str> = cmp
            .iter()
            .filter(|c| c.client != c.server)
            .map(|c| c.name)
            .collect();
        assert_eq!(differing, ["target"]);
        assert_eq!(cmp.len(), 7);
        // Extra or missing lines are shown, never dropped.
        assert_eq!(compare(&s, &format!("{server}\nx")).len(), 8);
        let short = compare(&s, "v1\nGET");
        assert_eq!(short.len(), 7);
        assert_eq!(short.last().map(|c| c.server.as_str()), Some(""));
    }
}
