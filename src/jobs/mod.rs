//! Coordinator jobs: model, state machine, repository (the HTTP handlers are in `http::jobs`).
pub mod model;
pub mod notify;
pub mod repo;
pub mod state;

pub use model::JobId;
pub use state::JobStatus;
