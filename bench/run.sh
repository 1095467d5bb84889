#!/usr/bin/env bash
# Build the release server and the load generator, copy both out of the target directory
# (it may be shared with builds of other branches), and run coordinator-bench with the
# given arguments. Each mode rewrites only its own section of docs/BENCHMARKS.md:
#   bench/run.sh                    every scenario on SQLite and PostgreSQL
#   bench/run.sh --webhooks         bogus/valid Standard Webhooks deliveries (issue 22)
#   bench/run.sh --peer DIR         side by side with the Node peer in DIR (issue 14)
#   bench/run.sh --soak MINUTES     signed progress soak on SQLite (issue 14)
#   bench/run.sh --soak MINUTES --backend postgres   the same on PostgreSQL, with table bloat
#   bench/run.sh --pgbench          PostgreSQL progress updates vs pgbench doing the same write
#   bench/run.sh --tls              HTTPS vs plain HTTP: keep-alive req/s, new connections/s (issue 21)
#   bench/run.sh --push             idle waiters, long-poll cycles, 1 000 streams (issue 16)
#   bench/run.sh --lifecycle        list pages at 10 k / 1 M jobs, claims/s ± maxRunning, batch creates (issue 15)
#   bench/run.sh --life             a job's whole life over HTTP (create, queue, claim, complete) ÷ /livez
#   bench/run.sh --life --soak MINUTES [--backend postgres]   whole lives for MINUTES, the table growing
set -euo pipefail
cd "$(dirname "$0")/.."
export TEST_POSTGRES_URL="${TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --bin coordinator -p coordinator
cargo build --release -p coordinator-bench
bin_dir="${BENCH_BIN_DIR:-/tmp/bench-bin}"
mkdir -p "$bin_dir"
cp "$target/release/coordinator" "$target/release/coordinator-bench" "$bin_dir/"
COORDINATOR_BIN="$bin_dir/coordinator" exec "$bin_dir/coordinator-bench" "$@"
