//! Coordinator jobs: model, state machine, repository, routes.
pub mod model;
pub mod repo;
pub mod routes;
pub mod state;

pub use model::JobId;
pub use state::JobStatus;
