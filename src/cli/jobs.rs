//! `coordinator jobs …` and `coordinator queues …`: the operator's view of the job
//! system over HTTP, through the same client as `call` (coordinator-client, the
//! credentials and URL of [`ClientEnv`], `--ca-file`). Tables on stdout by default,
//! the server's JSON with `--json`.

use anyhow::anyhow;
use clap::{Args, Subcommand};
use coordinator_client::{Client, Credentials, JobFilter};
use serde_json::Value;

use super::client::{self, ClientEnv, ConnArgs};
use super::client::{VAR_API_KEY, VAR_CALLER, VAR_HMAC_SECRET};
use super::common::{print_json, print_table, printable};

/// How `jobs` and `queues` reach the server, and print (accepted before or after the
/// subcommand).
#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// Authenticate with COORDINATOR_CLIENT_API_KEY instead of signing.
    #[arg(long, global = true)]
    pub api_key: bool,
    /// PEM file of the CA that issued the server's certificate, for an https://
    /// COORDINATOR_URL signed by a private CA (default: the public webpki roots).
    #[arg(long, global = true, env = "COORDINATOR_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Print the server's JSON document on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl RemoteArgs {
    fn client(&self) -> anyhow::Result<Client> {
        let (needed, what): (&[&str], &str) = if self.api_key {
            (&[VAR_API_KEY], "an API key")
        } else {
            (&[VAR_CALLER, VAR_HMAC_SECRET], "a signed request")
        };
        let env = ClientEnv::load(needed, true)?;
        let credentials = if self.api_key {
            Credentials::ApiKey(env.api_key()?.expose_secret().to_owned())
        } else {
            env.hmac()?.to_client()
        };
        let conn = ConnArgs {
            ca_file: self.ca_file.clone(),
        };
        let mut c = client::connect(&env, &conn, credentials, what)?;
        // An operator waits for one answer; a busy server is reported, not waited out.
        c.retries = 1;
        Ok(c)
    }
}

/// A failed request as one line: the status, the problem's title and detail; without
/// an answer, the URL it went to (from the environment or the dev credentials file,
/// which may name an address nobody listens on any more).
fn failed(base: &str, e: coordinator_client::Error) -> anyhow::Error {
    if let coordinator_client::Error::Transport(_) = e {
        return anyhow!(
            "no answer from {}: {e} (is `coordinator serve` running there? COORDINATOR_URL \
             sets the address)",
            client::without_user_info(base)
        );
    }
    match e.problem() {
        Some(p) => {
            let field = p
                .field()
                .map(|f| format!(" (field {f})"))
                .unwrap_or_default();
            anyhow!(
                "HTTP {} {}: {}{}",
                p.status,
                printable(p.title()),
                printable(p.detail()),
                printable(&field)
            )
        }
        None => anyhow!("{e}"),
    }
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub command: JobsCommand,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// One page of jobs, newest first (GET /coordinator/jobs, scope jobs:read).
    List(ListArgs),
    /// A job with its events (GET /coordinator/jobs/{id}, scope jobs:read).
    Get { id: String },
    /// Follow a job live: one line per event as it happens, until the job ends (exit
    /// 0). Reconnects with Last-Event-ID after a dropped connection or a server that
    /// ended the stream; events the server no longer keeps are said on stderr
    /// (GET /coordinator/jobs/{id}/events, scope jobs:read).
    Watch {
        id: String,
        /// Only events after this seq (default: from the first kept).
        #[arg(long, value_name = "SEQ", value_parser = clap::value_parser!(i64).range(0..))]
        after: Option<i64>,
    },
    /// Cancel a job that has not ended; its worker's token is revoked at once
    /// (scope jobs:update).
    Cancel {
        id: String,
        /// Why; kept as the job's message.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Put a FAILED or CANCELLED job back in its queue with a fresh attempt budget
    /// (scope jobs:update).
    Retry { id: String },
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only this status (repeat for several): PENDING, QUEUED, RUNNING, COMPLETED,
    /// FAILED, CANCELLED.
    #[arg(long, value_parser = parse_status)]
    pub status: Vec<String>,
    /// Only this kind.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only jobs created after this time (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    pub created_after: Option<String>,
    /// Only jobs created before this time (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    pub created_before: Option<String>,
    /// Page size (1-500).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub limit: u32,
    /// Continue after a previous page (its `nextCursor`).
    #[arg(long)]
    pub cursor: Option<String>,
}

fn parse_status(text: &str) -> Result<String, String> {
    const ALL: [&str; 6] = [
        "PENDING",
        "QUEUED",
        "RUNNING",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
    ];
    let up = text.to_ascii_uppercase();
    if ALL.contains(&up.as_str()) {
        Ok(up)
    } else {
        Err(format!("one of {}", ALL.join(", ")))
    }
}

/// A string member as it may be printed ([`printable`]); `-` when absent.
fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .map_or_else(|| "-".to_owned(), printable)
}

fn number(v: &Value, key: &str) -> String {
    v.get(key)
        .filter(|x| !x.is_null())
        .map_or_else(|| "-".to_owned(), Value::to_string)
}

impl JobsArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let client = self.remote.client()?;
        let base = client.base().to_owned();
        let failed = |e| failed(&base, e);
        let json = self.remote.json;
        match self.command {
            JobsCommand::List(a) => {
                let filter = JobFilter {
                    queue: a.queue,
                    statuses: a.status,
                    kind: a.kind,
                    created_after: a.created_after,
                    created_before: a.created_before,
                    limit: Some(a.limit),
                    cursor: a.cursor,
                };
                let page = client.list_jobs(&filter).map_err(failed)?;
                if json {
                    return print_json(&page);
                }
                let items = page
                    .get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let rows: Vec<Vec<String>> = items
                    .iter()
                    .map(|j| {
                        vec![
                            text(j, "id"),
                            text(j, "status"),
                            text(j, "queue"),
                            text(j, "kind"),
                            format!("{}/{}", number(j, "attempts"), number(j, "maxAttempts")),
                            format!("{}%", number(j, "progress")),
                            text(j, "createdAt"),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID", "STATUS", "QUEUE", "KIND", "ATTEMPTS", "PROGRESS", "CREATED",
                    ],
                    &rows,
                )?;
                match page.get("nextCursor").and_then(Value::as_str) {
                    Some(c) => {
                        eprintln!("{} job(s); more with --cursor {}", rows.len(), printable(c))
                    }
                    None => eprintln!("{} job(s)", rows.len()),
                }
                Ok(())
            }
            JobsCommand::Get { id } => {
                let job = client.get_job(&id).map_err(failed)?;
                if json {
                    return print_json(&job);
                }
                print_job(&job)
            }
            JobsCommand::Watch { id, after } => {
                for event in client.watch(&id, after) {
                    let event = event.map_err(failed)?;
                    if let Some((first, last)) = event.gap {
                        eprintln!("events {first} to {last} are no longer kept on the server");
                    }
                    if json {
                        let line = serde_json::to_string(&event.to_json())
                            .map_err(|e| anyhow!("cannot encode JSON output: {e}"))?;
                        outln!("{line}")?;
                    } else {
                        let cells = event_row(&event.to_json());
                        let cells: Vec<&str> = cells
                            .iter()
                            .map(String::as_str)
                            .filter(|c| !c.is_empty())
                            .collect();
                        outln!("{}", cells.join("  "))?;
                    }
                }
                Ok(())
            }
            JobsCommand::Cancel { id, reason } => {
                let job = client.cancel_job(&id, reason.as_deref()).map_err(failed)?;
                if json {
                    return print_json(&job);
                }
                outln!("{} {}", text(&job, "id"), text(&job, "status"))
            }
            JobsCommand::Retry { id } => {
                let job = client.retry_job(&id).map_err(failed)?;
                if json {
                    return print_json(&job);
                }
                outln!("{} {}", text(&job, "id"), text(&job, "status"))
            }
        }
    }
}

/// A job as `key: value` lines, then its events as a table.
fn print_job(job: &Value) -> anyhow::Result<()> {
    for (label, key) in [
        ("id", "id"),
        ("status", "status"),
        ("queue", "queue"),
        ("kind", "kind"),
        ("message", "message"),
        ("error", "error"),
        ("runAt", "runAt"),
        ("leaseExpiresAt", "leaseExpiresAt"),
        ("createdAt", "createdAt"),
        ("updatedAt", "updatedAt"),
    ] {
        outln!("{label:<15} {}", text(job, key))?;
    }
    outln!("{:<15} {}", "priority", number(job, "priority"))?;
    outln!("{:<15} {}%", "progress", number(job, "progress"))?;
    outln!(
        "{:<15} {}/{}",
        "attempts",
        number(job, "attempts"),
        number(job, "maxAttempts")
    )?;
    let events = job
        .get("events")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if events.is_empty() {
        return Ok(());
    }
    outln!("")?;
    let rows: Vec<Vec<String>> = events.iter().map(event_row).collect();
    print_table(&["SEQ", "EVENT", "CHANGE", "AT"], &rows)
}

/// An event's cells, as `jobs get` lists them and `jobs watch` prints them: seq, type,
/// `from -> to` for a status change, time; server text made [`printable`].
fn event_row(e: &Value) -> Vec<String> {
    let data = e.get("data").cloned().unwrap_or(Value::Null);
    let change = match (data.get("from"), data.get("to")) {
        (Some(f), Some(t)) => format!(
            "{} -> {}",
            printable(f.as_str().unwrap_or("-")),
            printable(t.as_str().unwrap_or("-"))
        ),
        // A progress report: what it reported, else a live watch shows only its time.
        _ => match data.get("percent").and_then(Value::as_u64) {
            Some(p) => match data.get("message").and_then(Value::as_str) {
                Some(m) => format!("{p}% {}", printable(m)),
                None => format!("{p}%"),
            },
            None => String::new(),
        },
    };
    vec![
        number(e, "seq"),
        text(e, "type"),
        change,
        text(e, "createdAt"),
    ]
}

#[derive(Debug, Args)]
pub struct QueuesArgs {
    #[command(subcommand)]
    pub command: QueuesCommand,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Subcommand)]
pub enum QueuesCommand {
    /// Every queue: depth per status, oldest due job, controls (scope health:read).
    List,
    /// Stop handing out jobs of a queue (scope admin).
    Pause { queue: String },
    /// Hand out jobs of a paused queue again (scope admin).
    Resume { queue: String },
    /// At most N jobs of a queue RUNNING at once, or `none` for no limit (scope admin).
    Limit {
        queue: String,
        #[arg(value_parser = parse_limit, value_name = "N|none")]
        max_running: Limit,
    },
}

/// `N` (1-1000000) or `none`.
#[derive(Debug, Clone, Copy)]
pub struct Limit(Option<u32>);

fn parse_limit(text: &str) -> Result<Limit, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(Limit(None));
    }
    match text.parse::<u32>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(Limit(Some(n))),
        _ => Err("a whole number from 1 to 1000000, or `none`".into()),
    }
}

impl QueuesArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let client = self.remote.client()?;
        let base = client.base().to_owned();
        let failed = |e| failed(&base, e);
        let json = self.remote.json;
        let changed = match self.command {
            QueuesCommand::List => {
                let all = client.list_queues().map_err(failed)?;
                if json {
                    return print_json(&all);
                }
                let rows: Vec<Vec<String>> = all
                    .get("queues")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(queue_row)
                    .collect();
                return print_table(
                    &[
                        "QUEUE",
                        "PENDING",
                        "QUEUED",
                        "RUNNING",
                        "OLDEST_QUEUED",
                        "PAUSED",
                        "MAX_RUNNING",
                    ],
                    &rows,
                );
            }
            QueuesCommand::Pause { queue } => client.patch_queue(&queue, Some(true), None),
            QueuesCommand::Resume { queue } => client.patch_queue(&queue, Some(false), None),
            QueuesCommand::Limit { queue, max_running } => {
                client.patch_queue(&queue, None, Some(max_running.0))
            }
        }
        .map_err(failed)?;
        if json {
            return print_json(&changed);
        }
        outln!(
            "{} paused={} maxRunning={}",
            text(&changed, "queue"),
            number(&changed, "paused"),
            number(&changed, "maxRunning")
        )
    }
}

fn queue_row(q: &Value) -> Vec<String> {
    let depth = q.get("depth").cloned().unwrap_or(Value::Null);
    let age = q
        .get("oldestQueuedAgeMs")
        .and_then(Value::as_i64)
        .map_or_else(|| "-".to_owned(), |ms| format!("{}s", ms / 1000));
    vec![
        text(q, "queue"),
        number(&depth, "PENDING"),
        number(&depth, "QUEUED"),
        number(&depth, "RUNNING"),
        age,
        number(q, "paused"),
        number(q, "maxRunning"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parsers() {
        assert_eq!(parse_status("failed"), Ok("FAILED".to_owned()));
        assert!(parse_status("done").is_err());
        assert_eq!(parse_limit("none").map(|l| l.0), Ok(None));
        assert_eq!(parse_limit("3").map(|l| l.0), Ok(Some(3)));
        for bad in ["0", "-1", "1000001", "x", ""] {
            assert!(parse_limit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn queue_rows() {
        let q = json!({"queue": "ci", "depth": {"PENDING": 1, "QUEUED": 2, "RUNNING": 3},
            "oldestQueuedAgeMs": 61_500, "paused": true, "maxRunning": null});
        assert_eq!(queue_row(&q), ["ci", "1", "2", "3", "61s", "true", "-"]);
    }

    /// A job's `message` and `error` come from whoever holds its token: printed for an
    /// operator, no escape sequence, carriage return or bidi override gets through.
    #[test]
    fn server_text_reaches_the_terminal_without_control_characters() {
        let job = json!({
            "id": "j1",
            "message": "ok\u{1b}]52;c;ZXZpbA==\u{7}\rDONE\u{1b}[2K",
            "error": "a\u{202e}b\u{9b}c\nd",
            "events": [{"seq": 1, "type": "status", "data": {"from": "RUNNING", "to": "x\u{1b}[8m"}}],
        });
        assert_eq!(text(&job, "message"), "ok?]52;c;ZXZpbA==??DONE?[2K");
        assert_eq!(text(&job, "error"), "a?b?c?d");
        assert_eq!(text(&job, "kind"), "-");
        assert_eq!(text(&job, "id"), "j1");
        // As `jobs get` lists an event, so `jobs watch` prints it.
        let row = event_row(&job["events"][0]);
        assert_eq!(row, ["1", "status", "RUNNING -> x?[8m", "-"]);
        let p = coordinator_client::Problem::new(
            400,
            json!({"title": "Bad\u{1b}[31m", "detail": "x\ry", "field": "f\u{7}"}),
            None,
        );
        let shown = failed("", coordinator_client::Error::Problem(p)).to_string();
        assert_eq!(shown, "HTTP 400 Bad?[31m: x?y (field f?)");
        assert_eq!(printable("naïve ✓ 日本"), "naïve ✓ 日本");
    }
}
