//! `coordinator call`: sign (or use the API key), send, print the response. The status
//! line goes to stderr and the body to stdout, so `call … | jq` works; any status of
//! 300 or more exits non-zero (a redirect is not followed; its Location goes to stderr). `--explain` on a 401 puts the server's signed string
//! beside this client's, component by component.

use anyhow::bail;
use clap::Args;
use coordinator_client::signing::V1Signature;
use coordinator_client::Credentials;
use serde_json::{json, Value};

use super::client::{self, BodyArgs, ClientEnv, ConnArgs, HmacCredentials};
use super::client::{VAR_API_KEY, VAR_CALLER, VAR_HMAC_SECRET, VAR_URL};
use super::common::{print_json, OutputArgs};
use crate::config::ConfigError;
use crate::crypto::credential::ApiKey;

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
    pub conn: ConnArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// One component of the signed string on both sides.
struct Comparison {
    name: &'static str,
    client: String,
    server: String,
}

/// What was signed, for `--explain`.
struct Signed {
    signature: V1Signature,
    caller: String,
    key_version: Option<u32>,
    secret_prefix: String,
    timestamp: String,
}

pub fn run(args: CallArgs) -> anyhow::Result<()> {
    let needed: &[&str] = if args.api_key {
        &[VAR_API_KEY]
    } else {
        &[VAR_CALLER, VAR_HMAC_SECRET]
    };
    let env = ClientEnv::load(needed, true)?;
    let body = args.body.read()?;
    let (auth, what) = if args.api_key {
        (Auth::ApiKey(env.api_key()?), "an API key")
    } else {
        (Auth::Hmac(env.hmac()?), "a signed request")
    };
    // Signed below, in `send_once`, for the exact target sent.
    let client = client::connect(&env, &args.conn, Credentials::None, what)?;
    // For messages: never a `user:password@` of the URL.
    let url = client::without_user_info(&format!("{}{}", client.base(), args.path));

    let mut signed: Option<Signed> = None;
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if !body.is_empty() {
        headers.push(("Content-Type", &args.content_type));
    }
    let answer = client.send_once(&args.method, &args.path, &body, &headers, |_, target| {
        if target != args.path && !args.output.json {
            eprintln!("note: the request target is sent as {target}");
        }
        Ok(match &auth {
            Auth::ApiKey(key) => vec![("X-API-Key".to_owned(), key.expose_secret().to_owned())],
            Auth::Hmac(creds) => {
                let timestamp = client::now_timestamp();
                let signature = creds.sign(
                    &args.method,
                    target,
                    &timestamp,
                    &client::random_nonce(),
                    &body,
                );
                let headers = signature.headers.clone();
                signed = Some(Signed {
                    signature,
                    caller: creds.caller.clone(),
                    key_version: creds.key_version,
                    secret_prefix: creds.secret_prefix(),
                    timestamp,
                });
                headers
            }
        })
    });
    let resp = match answer {
        Ok(r) => r,
        Err(coordinator_client::Error::Invalid(why)) => {
            return Err(ConfigError(format!("invalid {VAR_URL} or path: {why}")).into())
        }
        Err(e) => bail!("request to {url} failed: {e}"),
    };
    let status = resp.status;
    let status_text = status_text(status);
    let text = resp.text();
    let parsed: Option<Value> = serde_json::from_str(&text).ok();

    let comparison = match (&signed, &parsed) {
        (Some(s), Some(problem)) if args.explain && status == 401 => problem
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
    if (300..400).contains(&status) {
        // Not followed (a credential is never sent on to another URL): the request did
        // not happen where it was meant to, so it is no success.
        match resp.header("location") {
            Some(to) => eprintln!(
                "not followed: Location: {}",
                to.chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect::<String>()
            ),
            None => eprintln!("not followed: the response has no Location header"),
        }
        bail!("HTTP {status} {status_text}: a redirect, which `call` does not follow");
    }
    if status >= 400 {
        bail!("HTTP {status} {status_text}");
    }
    Ok(())
}

enum Auth {
    ApiKey(ApiKey),
    Hmac(HmacCredentials),
}

/// The reason phrase of a status this service sends (the client keeps none).
fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// Pair the client's components with the server's signed string split on `\n`.
fn compare(signed: &Signed, server_canonical: &str) -> Vec<Comparison> {
    let mut server = server_canonical.split('\n');
    let mut out: Vec<Comparison> = signed
        .signature
        .components()
        .into_iter()
        .map(|(name, client)| Comparison {
            name,
            client: client.to_owned(),
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
    signed: Option<&Signed>,
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
        if let (true, Some(s)) = (cmp.iter().all(|c| c.client == c.server), signed) {
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
    let client_time = signed.and_then(|s| s.timestamp.parse::<i64>().ok());
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
    use crate::crypto::credential::HmacSecret;

    #[test]
    fn compare_marks_the_differing_component() {
        let creds = HmacCredentials {
            caller: "svc".into(),
            secret: HmacSecret::generate(),
            key_version: None,
        };
        let signature = creds.sign("GET", "/a?b=1", "1700000000", "n1", b"");
        // A proxy that rewrote the path: the server saw another target.
        let server = signature.canonical.replace("/a?b=1", "/api/a?b=1");
        let s = Signed {
            signature,
            caller: "svc".into(),
            key_version: None,
            secret_prefix: String::new(),
            timestamp: "1700000000".into(),
        };
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

    #[test]
    fn status_texts() {
        assert_eq!(status_text(401), "Unauthorized");
        assert_eq!(status_text(299), "");
    }
}
