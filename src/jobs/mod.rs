//! Coordinator jobs: the job's own types (`model`), storage rows (`row`), what clients
//! send (`request`) and are shown (`view`), the state machine, the repository (the HTTP
//! handlers are in `http::jobs`).
pub mod creates;
pub mod model;
pub mod notify;
pub mod progress;
pub mod repo;
pub mod request;
pub mod row;
pub mod state;
pub mod statements;
pub mod view;

pub use model::JobId;
pub use state::JobStatus;
