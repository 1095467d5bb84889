//! Black-box tests: the real server over HTTP, on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod helpers;

mod auth;
mod faults;
mod health;
mod jobs;
mod logs;
mod openapi;
mod ops;
mod outage;
mod stitcher;
mod tokens;
