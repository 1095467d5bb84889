//! Following a job live: [`Client::watch`] reads `GET /coordinator/jobs/{id}/events`
//! as Server-Sent Events and yields each [`JobEvent`] once, in order, across
//! reconnects, until the job is terminal.

use std::io::{BufRead, Read as _};
use std::time::Duration;

use serde_json::{json, Value};

use crate::client::{encode_segment, Client};
use crate::error::{Error, ProblemKind, Result};

/// The longest a stream may stay silent before the connection is taken for dead and
/// opened again: the server sends a `: keep-alive` comment every 15 s on an idle stream.
pub const STREAM_IDLE: Duration = Duration::from_secs(45);

/// Failures in a row (without an event in between) after which a watch gives up.
pub const RECONNECTS: u32 = 10;

/// The statuses after which a job's stream ends.
pub const TERMINAL: [&str; 3] = ["COMPLETED", "FAILED", "CANCELLED"];

/// The longest SSE line read (as the client's answer bound).
const MAX_LINE: u64 = 16 * 1024 * 1024;

/// One job event, as `GET /coordinator/jobs/{id}` lists them.
#[derive(Clone, Debug, PartialEq)]
pub struct JobEvent {
    /// 1, 2, 3, … per job.
    pub seq: i64,
    /// `created`, `status`, `claimed`, `progress`, `completed`, `failed`, …
    pub kind: String,
    /// What changed (event-specific JSON).
    pub data: Value,
    /// RFC 3339.
    pub created_at: String,
    /// When events right before this one are no longer kept on the server (a job keeps
    /// only its newest `COORDINATOR_EVENTS_PER_JOB`) and so were never seen by this
    /// watch: their first and last `seq`.
    pub gap: Option<(i64, i64)>,
}

impl JobEvent {
    /// The job's status after this event, for an event that changes it (`data.to`).
    pub fn status(&self) -> Option<&str> {
        self.data.get("to").and_then(Value::as_str)
    }

    /// The event as the server sends it: `{seq, type, data, createdAt}`.
    pub fn to_json(&self) -> Value {
        json!({
            "seq": self.seq,
            "type": self.kind,
            "data": self.data,
            "createdAt": self.created_at,
        })
    }

    fn from_data(data: &str, path: &str) -> Result<Self> {
        let bad = |why: &str| Error::Invalid(format!("GET {path}: an event {why}"));
        let doc: Value = serde_json::from_str(data).map_err(|_| bad("is not JSON"))?;
        let seq = doc
            .get("seq")
            .and_then(Value::as_i64)
            .ok_or_else(|| bad("has no integer seq"))?;
        let kind = doc
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("has no type"))?;
        Ok(JobEvent {
            seq,
            kind: kind.to_owned(),
            data: doc.get("data").cloned().unwrap_or(Value::Null),
            created_at: doc
                .get("createdAt")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            gap: None,
        })
    }
}

/// What one read of a stream found.
enum Read {
    /// An event's `data:` lines (joined).
    Event(String),
    /// A block without data (a `: keep-alive` or `: gap: …` comment).
    Nothing,
    /// The stream ended.
    End,
}

pub(crate) type Reader = Box<dyn BufRead + Send + Sync>;

/// A job followed live ([`Client::watch`]): an iterator of its events. It ends (`None`)
/// once the job is terminal or the client's stop flag is set, and after yielding an
/// error.
pub struct Watch {
    client: Client,
    id: String,
    path: String,
    last: i64,
    /// The job's status after the newest event seen (`data.to`).
    status: Option<String>,
    /// `get_job` read the job terminal: the next end of a stream is the last.
    terminal_read: bool,
    failures: u32,
    reconnects: u32,
    reader: Option<Reader>,
    done: bool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("client", &self.client)
            .field("id", &self.id)
            .field("last", &self.last)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Follow job `id` live [jobs:read]: its events after `after` (a `seq`; `None` or a
    /// negative one: from the first kept), each once and in order, until the job is terminal. A dropped
    /// connection, a stream the server ended while the job is not terminal (the
    /// instance shut down) or one silent past [`STREAM_IDLE`] is opened again with
    /// `Last-Event-ID`, signed afresh, after a backoff (`backoff` doubled per failure,
    /// with jitter, capped at `max_backoff`; a 429's or 503's `Retry-After` honoured,
    /// capped too); [`RECONNECTS`] failures in a row without an event end it with the
    /// last one. A stream that ends cleanly without a terminal event is checked with
    /// [`Client::get_job`]. Events the server no longer keeps are reported in
    /// [`JobEvent::gap`] of the first event after them. Other error answers end it at
    /// once (401 also on a reconnect once the credential is revoked — for a job token,
    /// once its job ended, possibly before the terminal event was sent; 403; 404; 400
    /// naming `Last-Event-ID` for an `after` past the job's newest event). The stop flag
    /// ([`Client::with_stop`]) is looked at between events and at each keep-alive
    /// (within 15 s on an idle stream) and ends a pause between reconnects.
    pub fn watch(&self, id: &str, after: Option<i64>) -> Watch {
        Watch {
            client: self.clone(),
            id: id.to_owned(),
            path: format!("/coordinator/jobs/{}/events", encode_segment(id)),
            last: after.unwrap_or(0).max(0),
            status: None,
            terminal_read: false,
            failures: 0,
            reconnects: RECONNECTS,
            reader: None,
            done: false,
        }
    }
}

impl Watch {
    /// Failures in a row tolerated before the watch ends with the last one.
    pub fn reconnects(mut self, n: u32) -> Self {
        self.reconnects = n;
        self
    }

    /// The `seq` of the last event yielded (or the `after` it started from).
    pub fn last_seq(&self) -> i64 {
        self.last
    }

    /// A failure to connect or read: back off, or end with `err` past the bound.
    fn failed(&mut self, err: Error, retry_after: Option<Duration>) -> Option<Result<JobEvent>> {
        self.reader = None;
        self.failures += 1;
        if self.failures > self.reconnects {
            self.done = true;
            return Some(Err(err));
        }
        let wait = self.client.reconnect_delay(self.failures - 1, retry_after);
        if !self.client.pause_for_watch(wait) {
            self.done = true;
        }
        None
    }

    fn read(&mut self) -> std::io::Result<Read> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(Read::End);
        };
        let mut data: Option<String> = None;
        let mut seen_any = false;
        loop {
            let mut line = Vec::new();
            let n = reader
                .by_ref()
                .take(MAX_LINE + 1)
                .read_until(b'\n', &mut line)?;
            if n == 0 {
                if seen_any {
                    // Cut inside an event: a dropped connection, not an end.
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                return Ok(Read::End);
            }
            if u64::try_from(line.len()).unwrap_or(u64::MAX) > MAX_LINE {
                return Err(std::io::Error::other(
                    "a line of the stream is longer than 16 MiB",
                ));
            }
            if line.last() != Some(&b'\n') {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                return Ok(data.map_or(Read::Nothing, Read::Event));
            }
            seen_any = true;
            if line.starts_with(':') {
                continue;
            }
            let (name, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            if name == "data" {
                match data.as_mut() {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                }
            }
        }
    }

    /// The stream ended cleanly: the job is done, or the server ended it early.
    fn ended(&mut self) -> Option<Result<JobEvent>> {
        self.reader = None;
        let terminal = |s: Option<&str>| s.is_some_and(|s| TERMINAL.contains(&s));
        if self.terminal_read || terminal(self.status.as_deref()) {
            self.done = true;
            return None;
        }
        match self.client.get_job(&self.id) {
            Ok(job) if terminal(job.get("status").and_then(Value::as_str)) => {
                // Read what is left: the stream then ends at once.
                self.terminal_read = true;
                None
            }
            Ok(_) => self.failed(
                Error::Transport(format!(
                    "GET {}: the stream kept ending without an event",
                    self.path
                )),
                None,
            ),
            Err(e) if retryable(&e) => {
                let after = retry_after(&e);
                self.failed(e, after)
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

fn retryable(e: &Error) -> bool {
    match e {
        Error::Transport(_) => true,
        Error::Problem(p) => matches!(
            p.kind,
            ProblemKind::TooManyRequests | ProblemKind::Unavailable
        ),
        Error::Invalid(_) => false,
    }
}

fn retry_after(e: &Error) -> Option<Duration> {
    e.problem()
        .and_then(|p| p.retry_after)
        .map(Duration::from_secs)
}

impl Iterator for Watch {
    type Item = Result<JobEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done || self.client.is_stopping() {
                self.done = true;
                self.reader = None;
                return None;
            }
            if self.reader.is_none() {
                match self.client.open_stream(&self.path, self.last) {
                    Ok(r) => self.reader = Some(r),
                    Err(e) if retryable(&e) => {
                        let after = retry_after(&e);
                        if let Some(out) = self.failed(e, after) {
                            return Some(out);
                        }
                        continue;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
            match self.read() {
                Ok(Read::Event(data)) => {
                    let mut event = match JobEvent::from_data(&data, &self.path) {
                        Ok(e) => e,
                        Err(e) => {
                            self.done = true;
                            self.reader = None;
                            return Some(Err(e));
                        }
                    };
                    if event.seq <= self.last {
                        continue; // sent already: never yielded twice
                    }
                    if event.seq > self.last.saturating_add(1) {
                        event.gap = Some((self.last + 1, event.seq - 1));
                    }
                    self.last = event.seq;
                    if let Some(s) = event.status() {
                        self.status = Some(s.to_owned());
                    }
                    self.failures = 0;
                    return Some(Ok(event));
                }
                Ok(Read::Nothing) => continue,
                Ok(Read::End) => {
                    if let Some(out) = self.ended() {
                        return Some(out);
                    }
                }
                Err(e) => {
                    let err = Error::Transport(format!("GET {}: the stream broke: {e}", self.path));
                    if let Some(out) = self.failed(err, None) {
                        return Some(out);
                    }
                }
            }
        }
    }
}

/// The stream of an answer (boxed, so a [`Watch`] holds no `ureq` type).
pub(crate) fn reader(resp: ureq::Response) -> Reader {
    Box::new(std::io::BufReader::new(resp.into_reader()))
}
