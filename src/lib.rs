//! coordinator: jobs and stitcher ingestion behind signed-request authentication.
//!
//! Layers (docs/architecture.md): `error`, `crypto`, `db` at the bottom; the domain
//! (`jobs`, `stitcher`, `auth`, `health`, `metrics`, `telemetry`) above them; `config`
//! and the shared `state`; the HTTP edge in `http`; `startup` builds the server (with `tls` for HTTPS) and
//! `cli` drives everything.
pub mod auth;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod db;
pub mod error;
pub mod health;
pub mod housekeeping;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod request_id;
pub mod startup;
pub mod state;
pub mod stitcher;
pub mod telemetry;
pub mod tls;
