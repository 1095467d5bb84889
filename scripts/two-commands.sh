#!/usr/bin/env bash
# The README's first command, exactly as written: `cargo run --release -- serve --dev`,
# in a fresh copy of the repository (tracked files only, no .coordinator/, no .env),
# as a new user runs it. Then it calls the service with the credentials that first
# start wrote, and checks that a wrong key is refused. (The second command, `cargo
# test`, is what .ci/run runs itself.)
#
# The copy's target/ is a link to the checkout's (CARGO_TARGET_DIR if set), so the
# release build is shared with later runs; the first one compiles for 4–10
# minutes on 2 cores. The server listens on TWO_COMMANDS_PORT (default 18484) instead
# of 8080 (through COORDINATOR_BIND, the command itself is unchanged), so a dev server
# already running on this machine does not get in the way. Nothing secret is printed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
port=${TWO_COMMANDS_PORT:-18484}
base="http://127.0.0.1:$port"
build_minutes=${TWO_COMMANDS_BUILD_MINUTES:-40}

if curl -s -o /dev/null "$base/livez"; then
  echo "two-commands: port $port is taken; set TWO_COMMANDS_PORT" >&2
  exit 1
fi
# Nothing from the caller's environment may point the command elsewhere.
for var in $(compgen -e); do
  case $var in COORDINATOR_* | DATABASE_URL) unset "$var" ;; esac
done
export COORDINATOR_BIND="127.0.0.1:$port"
export RUST_LOG=warn

work=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ]; then
    kill -TERM -- "-$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

(cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$work")
ln -s "$target_dir" "$work/target"
cd "$work"

echo "two-commands: cargo run --release -- serve --dev (in a fresh copy)"
# Its own process group, so that the server cargo starts goes with it.
setsid cargo run --release -- serve --dev >"$work/out.log" 2>"$work/err.log" &
server=$!

end=$((SECONDS + build_minutes * 60))
until curl -s -o /dev/null -f "$base/readyz"; do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "two-commands: FAIL: the command exited before the service was ready" >&2
    grep -v -E '^[A-Z_]+=' "$work/err.log" | tail -n 30 >&2 || true
    exit 1
  fi
  if [ "$SECONDS" -ge "$end" ]; then
    echo "two-commands: FAIL: not ready after $build_minutes minutes" >&2
    exit 1
  fi
  sleep 2
done
echo "two-commands: ready after ${SECONDS} s"

fail() { echo "two-commands: FAIL: $*" >&2; exit 1; }
# The first start prints the dev caller's credentials as KEY=value lines on stdout and
# writes them to ./.coordinator/dev-credentials.env.
grep -q '^COORDINATOR_CLIENT_API_KEY=' "$work/out.log" || fail "no credentials on stdout"
[ -f .coordinator/dev-credentials.env ] || fail "no .coordinator/dev-credentials.env"
[ "$(stat -c %a .coordinator)" = 700 ] || fail ".coordinator/ is not 0700"
key=$(sed -n 's/^COORDINATOR_CLIENT_API_KEY=//p' .coordinator/dev-credentials.env)
[ -n "$key" ] || fail "dev-credentials.env has no API key"

status() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
[ "$(status "$base/livez")" = 200 ] || fail "/livez"
[ "$(status -H "X-API-Key: $key" "$base/coordinator/health")" = 200 ] ||
  fail "GET /coordinator/health with the dev caller's API key"
[ "$(status -X POST -H "X-API-Key: $key" -d '{"kind":"build","queue":"two-commands"}' \
  "$base/coordinator/jobs")" = 201 ] || fail "POST /coordinator/jobs with the dev caller's API key"
[ "$(status -H "X-API-Key: cok_not_a_key" "$base/coordinator/health")" = 401 ] ||
  fail "a wrong API key was not refused"
[ "$(status "$base/coordinator/health")" = 401 ] || fail "no credential was not refused"
echo "two-commands: ok (the service runs as the README's first command starts it)"
