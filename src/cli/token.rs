//! `coordinator token issue|revoke|rotate-key`: job tokens. A token is printed once, by
//! `issue`; `revoke` takes effect on every instance within a second.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use super::common::{
    parse_positive_duration, print_json, rfc3339, store_error, OutputArgs, StoreArgs,
};
use super::common::{undelivered, write_secret, write_secret_json};
use crate::auth::{revocation, token};
use crate::config::KeyArgs;
use crate::jobs::JobId;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a job token for one job and worker (printed once).
    Issue(IssueArgs),
    /// Revoke a token by its id (`jti`).
    Revoke(RevokeArgs),
    /// Add a new token-signing key; older keys keep verifying for the grace period.
    RotateKey(RotateArgs),
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The job the token may read and update.
    #[arg(long)]
    pub job: String,
    /// The worker's name (the token's `sub`).
    #[arg(long)]
    pub worker: String,
    /// The caller the token acts for (default: the job's creator); refused once it
    /// is disabled.
    #[arg(long)]
    pub caller: Option<String>,
    /// Lifetime, e.g. 30m (default 1h, at most 24h).
    #[arg(long, value_parser = parse_token_ttl)]
    pub ttl: Option<Duration>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The token id (`jti` claim).
    pub jti: String,
    /// Accepted for compatibility (RFC 3339, in the future), but a revocation always
    /// lasts 24 h + 61 s: the longest a token with that id, renewed successors
    /// included, can live after it, with 60 s for the instances' clock differences.
    #[arg(long)]
    pub expires_at: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// How long tokens signed with the older keys stay valid (default 24h).
    #[arg(long, value_parser = super::common::parse_duration, default_value = "24h")]
    pub grace: Duration,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl TokenCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            TokenCommand::Issue(a) => issue(a),
            TokenCommand::Revoke(a) => revoke(a),
            TokenCommand::RotateKey(a) => rotate(a),
        }
    }
}

/// A token's lifetime: positive and at most 24 h, refused rather than cut short (a
/// review saw `--ttl 30d` print a 24 h expiry and exit 0).
fn parse_token_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_positive_duration(text)?;
    if ttl > token::MAX_TTL {
        return Err(format!(
            "`{text}` is longer than 24h, the longest a job token lives"
        ));
    }
    Ok(ttl)
}

fn issue(a: IssueArgs) -> anyhow::Result<()> {
    let job = JobId::parse(&a.job, "job")
        .map_err(|e| anyhow::anyhow!("--job must be a job id (UUID): {e}"))?;
    let db = a.store.open()?;
    let sealer = a.store.sealer(&a.keys)?;
    let ttl = a.ttl.unwrap_or(token::DEFAULT_TTL);
    token::ensure_signing_key(&db, &sealer).map_err(|e| store_error(e, "token-signing key"))?;
    let t = token::issue(&db, &sealer, &job, &a.worker, a.caller.as_deref(), ttl)
        .map_err(|e| store_error(e, format!("job {job}")))?;
    let written = if a.output.json {
        write_secret_json(&json!({
            "token": t.token.as_str(),
            "jti": t.jti,
            "job": job.as_str(),
            "worker": a.worker,
            "expiresAt": rfc3339(t.expires_at),
        }))?
    } else {
        eprintln!(
            "issued a token for job {job}, worker `{}`, expiring {}; it is shown only this once",
            a.worker,
            rfc3339(t.expires_at)
        );
        write_secret(&zeroize::Zeroizing::new(format!(
            "COORDINATOR_JOB_TOKEN={}\nCOORDINATOR_TOKEN_ID={}\n",
            t.token.as_str(),
            t.jti
        )))
    };
    written.map_err(|e| {
        let mut again = format!("coordinator token issue --job {job} --worker {}", a.worker);
        if let Some(c) = &a.caller {
            again.push_str(&format!(" --caller {c}"));
        }
        if let Some(ttl) = a.ttl {
            again.push_str(&format!(" --ttl {}s", ttl.as_secs()));
        }
        undelivered(
            &e,
            &format!("job token {} (job {job}, worker `{}`)", t.jti, a.worker),
            || {
                let until = revocation::revocation_expiry(None, "--expires-at")
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                revocation::revoke_in_db(&db, &t.jti, until).map_err(|e| store_error(e, "token"))
            },
            &format!("coordinator token revoke {}", t.jti),
            &again,
        )
    })
}

fn revoke(a: RevokeArgs) -> anyhow::Result<()> {
    if !revocation::valid_jti(&a.jti) {
        anyhow::bail!("the token id must be 1-128 printable characters");
    }
    let expires_at = revocation::revocation_expiry(a.expires_at.as_deref(), "--expires-at")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let db = a.store.open()?;
    revocation::revoke_in_db(&db, &a.jti, expires_at).map_err(|e| store_error(e, "token"))?;
    if a.output.json {
        return print_json(
            &json!({"jti": a.jti, "revoked": true, "expiresAt": rfc3339(expires_at)}),
        );
    }
    eprintln!("revoked token {} until {}", a.jti, rfc3339(expires_at));
    Ok(())
}

fn rotate(a: RotateArgs) -> anyhow::Result<()> {
    let db = a.store.open()?;
    let sealer = a.store.sealer(&a.keys)?;
    let version = token::rotate_signing_key(&db, &sealer, a.grace)
        .map_err(|e| store_error(e, "token-signing key"))?;
    if a.output.json {
        return print_json(&json!({"version": version, "graceSecs": a.grace.as_secs()}));
    }
    eprintln!(
        "token-signing key v{version} is now used for new tokens; older keys verify for {}s more",
        a.grace.as_secs()
    );
    Ok(())
}
