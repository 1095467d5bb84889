//! coordinator: jobs and stitcher ingestion behind signed-request authentication.
//!
//! Layout (docs/design.md §8): `config` → `startup::Application` → routes in `jobs`, `health`;
//! storage in `db`; one error type in `error`; crypto primitives in `crypto`;
//! authentication in `auth`.
pub mod auth;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod db;
pub mod error;
pub mod extract;
pub mod health;
pub mod housekeeping;
pub mod jobs;
pub mod metrics;
pub mod openapi;
pub mod startup;
pub mod stitcher;
pub mod telemetry;
