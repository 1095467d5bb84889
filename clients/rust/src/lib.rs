//! A blocking client for the coordinator service: the `v1` and RFC 9421 signers,
//! one method per route with typed errors and retries, a worker loop, and Standard
//! Webhooks verification.
//!
//! ```no_run
//! use coordinator_client::{Client, JobError, Worker};
//! use serde_json::json;
//!
//! let client = Client::from_env()?; // COORDINATOR_URL, _CALLER, _HMAC_SECRET
//! let worker = Worker::new(client, "ci");
//! worker.run(
//!     |job| {
//!         job.progress(50, Some("compiling"))?;
//!         Ok(json!({ "artifact": "x.tar" }))
//!     },
//!     None,
//!     false,
//! )?;
//! # Ok::<(), coordinator_client::Error>(())
//! ```

pub mod client;
pub mod error;
pub mod signing;
pub mod watch;
pub mod webhooks;
pub mod worker;

pub use client::{
    encode_segment, Claim, Client, ClientOptions, Heartbeat, Job, JobFilter, Response,
};
pub use error::{Error, Problem, ProblemKind, Result};
pub use signing::Credentials;
pub use watch::{JobEvent, Watch};
pub use webhooks::{sign_webhook, verify_webhook, WebhookError};
pub use worker::{HandlerResult, JobContext, JobError, Worker};

impl From<JobError> for Error {
    fn from(e: JobError) -> Self {
        Error::Invalid(format!("{e:?}"))
    }
}
