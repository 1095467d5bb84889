#!/usr/bin/env bash
# Runs the README's signing examples (scripts/sign_example.py and sign_example.sh) and
# `coordinator call` against a real `coordinator serve --dev`, started in a fresh
# temporary directory. Builds nothing: it uses target/debug/coordinator, which
# `cargo test` has built.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin="${CARGO_TARGET_DIR:-$root/target}/debug/coordinator"
port=${SIGNING_EXAMPLES_PORT:-18181}

# shellcheck source=scripts/dev-server.sh
. "$root/scripts/dev-server.sh"
dev_server_start signing-examples "$port"
[ "$COORDINATOR_URL" = "$base" ] || { echo "unexpected COORDINATOR_URL=$COORDINATOR_URL" >&2; exit 1; }

failures=0
# expect STATUS LABEL COMMAND...: run it and check the "HTTP <status>" line it prints.
# Only the label is echoed, never the command line (it may carry a secret).
expect() {
  local want=$1 label=$2
  shift 2
  local out got
  out=$("$@" 2>&1) || true
  got=$(printf '%s\n' "$out" | sed -n 's/^HTTP \([0-9][0-9][0-9]\).*/\1/p' | head -n1)
  if [ "$got" = "$want" ]; then
    echo "ok   $want  $label"
  else
    echo "FAIL $label: want HTTP $want, got ${got:-nothing}" >&2
    printf '%s\n' "$out" >&2
    failures=$((failures + 1))
  fi
}

# Not the caller's secret: the same examples must then be refused, which
# proves the requests above were really authenticated.
wrong_secret=coh_0000000000000000000000000000000000000000000000000

job='{"kind":"signing-example","payload":{"from":"README"}}'
for example in python shell; do
  case $example in
    python) run=(python3 "$root/scripts/sign_example.py") ;;
    shell) run=(bash "$root/scripts/sign_example.sh") ;;
  esac
  expect 200 "$example example: GET /coordinator/health" "${run[@]}" GET /coordinator/health
  expect 201 "$example example: POST /coordinator/jobs" "${run[@]}" POST /coordinator/jobs "$job"
  expect 401 "$example example with a wrong secret" \
    env COORDINATOR_HMAC_SECRET="$wrong_secret" "${run[@]}" GET /coordinator/health
done
expect 200 "coordinator call GET /coordinator/health" "$bin" call GET /coordinator/health
expect 201 "coordinator call POST /coordinator/jobs" "$bin" call POST /coordinator/jobs --body "$job"

if [ "$failures" -ne 0 ]; then
  echo "signing-examples: $failures check(s) failed; server log:" >&2
  tail -n 20 server.log >&2
  exit 1
fi
echo "signing-examples: all checks passed"
