//! `coordinator sign`: print the `X-Coordinator-*` headers for one request, as
//! `Header: value` lines (ready for `curl -H @file` or a test).

use clap::Args;
use serde_json::{json, Map, Value};

use super::client::{self, BodyArgs, ClientEnv, VAR_CALLER, VAR_HMAC_SECRET};
use super::common::{print_json, OutputArgs};

#[derive(Debug, Args)]
pub struct SignArgs {
    /// HTTP method (signed in upper case).
    #[arg(long, value_parser = client::parse_method)]
    pub method: String,
    /// Request target exactly as it will be sent: path and `?query`, not re-encoded
    /// (ASCII: percent-encode anything else).
    #[arg(long, value_parser = client::parse_sent_target)]
    pub path: String,
    #[command(flatten)]
    pub body: BodyArgs,
    /// Nonce to sign (default: 32 random hex characters).
    #[arg(long, value_parser = client::parse_nonce, conflicts_with = "no_nonce")]
    pub nonce: Option<String>,
    /// Sign without a nonce (the nonce line of the signed string stays empty).
    #[arg(long)]
    pub no_nonce: bool,
    /// Unix seconds to sign (default: now).
    #[arg(long, value_parser = client::parse_timestamp)]
    pub timestamp: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(args: SignArgs) -> anyhow::Result<()> {
    let env = ClientEnv::load(&[VAR_CALLER, VAR_HMAC_SECRET], false)?;
    let creds = env.hmac()?;
    let body = args.body.read()?;
    let nonce = match (args.no_nonce, args.nonce) {
        (true, _) => String::new(),
        (false, Some(n)) => n,
        (false, None) => client::random_nonce(),
    };
    let timestamp = args.timestamp.unwrap_or_else(client::now_timestamp);
    let signed = creds.sign(&args.method, &args.path, &timestamp, &nonce, &body);
    if args.output.json {
        let headers: Map<String, Value> = signed
            .headers
            .iter()
            .map(|(h, v)| (h.clone(), Value::String(v.clone())))
            .collect();
        return print_json(&json!({
            "method": args.method,
            "path": args.path,
            "headers": headers,
            "canonical": signed.canonical,
        }));
    }
    for (h, v) in &signed.headers {
        outln!("{h}: {v}")?;
    }
    Ok(())
}
