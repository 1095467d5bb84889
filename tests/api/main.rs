//! Black-box tests: the real server over HTTP, on SQLite and on PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic on a missing value or an out-of-range index is the failed assertion"
)]
mod helpers;

mod auth;
mod credentials;
mod faults;
mod health;
mod http_sig;
mod jobs;
mod lifecycle;
mod logs;
mod openapi;
mod ops;
mod outage;
mod pg_tls;
mod push;
mod routing;
mod stitcher;
mod tls;
mod tokens;
mod ui;
mod writes;
