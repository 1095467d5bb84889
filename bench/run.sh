#!/usr/bin/env bash
# Build the release server and the load generator, run every scenario on SQLite and
# PostgreSQL, and write docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export TEST_POSTGRES_URL="${TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
cargo build --release --bin coordinator -p coordinator
cargo build --release -p coordinator-bench
exec target/release/coordinator-bench "$@"
