#!/usr/bin/env bash
# The clients' tests against one `coordinator serve --dev`. Python (clients/python):
# checks docs/signing-vectors.json is what scripts/signing_vectors.py writes, installs
# the package with its test extras into a fresh virtual environment and runs pytest.
# Rust (clients/rust): cargo test, live tests included. Nothing is skipped: a missing
# server, credential or package is a failure. The server is target/debug/coordinator,
# which `cargo test` has built (under $CARGO_TARGET_DIR when set, or $COORDINATOR_BIN);
# then the server is stopped.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
port=${CLIENT_TESTS_PORT:-18183}

python3 "$root/scripts/signing_vectors.py" --check

venv_dir=$(mktemp -d)
trap 'rm -rf "$venv_dir"' EXIT
python3 -m venv "$venv_dir/venv"
py="$venv_dir/venv/bin/python"
# pip builds a local directory in place: build into a copy so the tree stays clean.
cp -r "$root/clients/python" "$venv_dir/src"
"$py" -m pip install --quiet --disable-pip-version-check "$venv_dir/src[test]"

# shellcheck source=scripts/dev-server.sh
. "$root/scripts/dev-server.sh"
# Job tokens live 6 s here: a worker test runs a job longer than that, which only a
# token renewed by a heartbeat can finish. A job keeps its newest 16 events (the
# least allowed): the watch tests make a gap with a few dozen.
dev_server_start client-tests "$port" COORDINATOR_TOKEN_TTL_SECS=6 COORDINATOR_EVENTS_PER_JOB=16
trap 'dev_server_cleanup; rm -rf "$venv_dir"' EXIT
[ "$COORDINATOR_URL" = "$base" ] || { echo "unexpected COORDINATOR_URL=$COORDINATOR_URL" >&2; exit 1; }

export PYTHONDONTWRITEBYTECODE=1
export COORDINATOR_SIGNING_VECTORS="$root/docs/signing-vectors.json"
status=0
"$py" -m pytest -q -p no:cacheprovider -rfE "$root/clients/python/tests" || status=$?
if [ "$status" -ne 0 ]; then
  echo "client-tests: pytest failed ($status); server log:" >&2
  tail -n 20 server.log >&2
  exit "$status"
fi
# The Rust client (clients/rust): its unit tests, and the live ones against this server.
cargo test --quiet -p coordinator-client --manifest-path "$root/Cargo.toml" -- --include-ignored || status=$?
if [ "$status" -ne 0 ]; then
  echo "client-tests: the Rust client's tests failed ($status); server log:" >&2
  tail -n 20 server.log >&2
  exit "$status"
fi
echo "client-tests: all passed"
