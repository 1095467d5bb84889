//! The HTTP edge: handlers (no SQL, no crypto), request extractors, idempotency keys,
//! and the OpenAPI document. Handlers receive the shared `state::AppState` and a
//! `Principal` that the route's guard (`auth::middleware`) has already admitted.
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
