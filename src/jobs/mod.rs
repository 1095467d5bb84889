//! Coordinator jobs: the job's own types (`model`), storage rows (`row`), what clients
//! send (`request`) and are shown (`view`), the state machine (`state`), the repository
//! (`repo`: jobs and their events; `queues`: a queue's controls and figures; `upkeep`:
//! housekeeping's lease expiry, retention purge and event vacuum) and the write path's
//! prepared statements (`statements`), the group commit of
//! progress reports (`progress`) and of creates (`creates`) on PostgreSQL, and the
//! wake-ups of long-poll claims and event streams (`notify`). The HTTP handlers are in
//! `http::jobs` and `http::push`.
pub mod creates;
pub mod model;
pub mod notify;
pub mod progress;
pub mod queues;
pub mod repo;
pub mod request;
pub mod row;
pub mod state;
pub mod statements;
pub mod upkeep;
pub mod view;

pub use model::JobId;
pub use state::JobStatus;
