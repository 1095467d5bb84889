//! The HTTP edge: the route table (`routes`: every route's method, path, handler and
//! access, from which routes are registered behind their guards), handlers (no SQL, no
//! crypto: `jobs`, `push` for long-poll claims and event streams, `stitcher`, `admin`,
//! `health`, and `ui` for the dashboard's static files), request extractors,
//! idempotency keys, problem+json response sets (`problem`) and the OpenAPI document
//! (`openapi`). Handlers receive the shared `state::AppState` and a `Principal` that
//! the route's guard (`auth::middleware`) has already admitted.
pub mod admin;
pub mod extract;
pub mod health;
pub mod idempotency;
pub mod jobs;
pub mod openapi;
pub mod problem;
pub mod push;
pub mod routes;
pub mod stitcher;
pub mod ui;
