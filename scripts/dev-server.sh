# Sourced by the CI scripts: start `coordinator serve --dev` in a fresh temporary
# directory and load its credentials.
#
#   dev_server_start NAME PORT [VAR=value ...]
#
# Leaves `$base` (http://127.0.0.1:PORT) and the COORDINATOR_* variables of the dev
# credentials set, the working directory in the temporary directory, and a trap that
# stops the server and removes the directory on exit. Builds nothing: it uses
# target/debug/coordinator, which `cargo test` has built.

dev_server_start() {
  local name=$1 port=$2
  shift 2
  local root bin
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  bin="${COORDINATOR_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/coordinator}"
  base="http://127.0.0.1:$port"
  if [ ! -x "$bin" ]; then
    echo "$name: $bin is missing; run cargo test (or cargo build) first" >&2
    exit 1
  fi

  # Nothing from the caller's environment may point the server or the clients elsewhere.
  local var
  for var in $(compgen -e); do
    case $var in COORDINATOR_* | DATABASE_URL) unset "$var" ;; esac
  done

  dev_server_work=$(mktemp -d)
  dev_server_pid=
  trap dev_server_cleanup EXIT
  cd "$dev_server_work"

  env "$@" "$bin" serve --dev --bind "127.0.0.1:$port" --workers 2 >server.out 2>server.log &
  dev_server_pid=$!

  local _
  for _ in $(seq 1 100); do
    if curl -fsS "$base/livez" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$dev_server_pid" 2>/dev/null; then
      echo "$name: the server exited:" >&2
      cat server.log >&2
      exit 1
    fi
    sleep 0.1
  done
  if ! curl -fsS "$base/livez" >/dev/null || ! kill -0 "$dev_server_pid" 2>/dev/null; then
    echo "$name: our server is not answering on $base (port taken?)" >&2
    cat server.log >&2
    exit 1
  fi

  set -a
  # shellcheck disable=SC1091
  . ./.coordinator/dev-credentials.env
  set +a
}

dev_server_cleanup() {
  if [ -n "${dev_server_pid:-}" ]; then
    kill "$dev_server_pid" 2>/dev/null || true
    wait "$dev_server_pid" 2>/dev/null || true
  fi
  rm -rf "${dev_server_work:-}"
}
