#!/usr/bin/env bash
# Runs the "First production deploy" sequence of docs/operations.md: every ```sh block
# between the first-deploy:begin and first-deploy:end markers, in order, in one shell,
# against the local PostgreSQL, with a throwaway database and role (dropped afterwards)
# and a temporary directory for the settings. ```sh-norun blocks (building and
# installing the release binary) are not run: `coordinator` is the binary `cargo test`
# built (target/debug, or CARGO_TARGET_DIR).
#
# env: PG_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres),
#      FIRST_DEPLOY_PORT_A / _B (default 18391 / 18392)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
bin_dir="$target_dir/debug"
if [ ! -x "$bin_dir/coordinator" ]; then
  echo "first-deploy: $bin_dir/coordinator is missing; run cargo test (or cargo build) first" >&2
  exit 1
fi

# Nothing from the caller's environment may point the commands elsewhere.
for var in $(compgen -e); do
  case $var in COORDINATOR_* | DATABASE_URL) unset "$var" ;; esac
done

export PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export DB_NAME="coordinator_deploy_$$_$RANDOM"
pg_hostport=$(printf '%s' "$PG_ADMIN_URL" | sed -E 's|^[a-z]+://([^@/]*@)?([^/?]*).*|\2|')
export DB_HOSTPORT=$pg_hostport
export INSTANCE_A="127.0.0.1:${FIRST_DEPLOY_PORT_A:-18391}"
export INSTANCE_B="127.0.0.1:${FIRST_DEPLOY_PORT_B:-18392}"
for instance in "$INSTANCE_A" "$INSTANCE_B"; do
  if curl -s -o /dev/null "http://$instance/livez"; then
    echo "first-deploy: $instance is taken; set FIRST_DEPLOY_PORT_A/_B" >&2
    exit 1
  fi
done
psql "$PG_ADMIN_URL" -qAtc 'SELECT 1' >/dev/null ||
  { echo "first-deploy: PostgreSQL does not answer at $PG_ADMIN_URL" >&2; exit 1; }

work=$(mktemp -d)
export CONF_DIR="$work/etc"
cleanup() {
  local pids
  pids=$(jobs -p)
  if [ -n "$pids" ]; then
    kill $pids 2>/dev/null || true
    wait $pids 2>/dev/null || true
  fi
  psql "$PG_ADMIN_URL" -q -c "DROP DATABASE IF EXISTS \"$DB_NAME\" WITH (FORCE)" \
    -c "DROP ROLE IF EXISTS \"$DB_NAME\"" >/dev/null 2>&1 ||
    echo "first-deploy: could not drop database/role $DB_NAME" >&2
  rm -rf "$work"
}
trap cleanup EXIT

python3 - "$root/docs/operations.md" "$work/blocks" <<'PY'
import os, re, sys
doc, out = sys.argv[1], sys.argv[2]
os.makedirs(out)
text = open(doc, encoding="utf-8").read()
begin = text.find("<!-- first-deploy:begin")
end = text.find("<!-- first-deploy:end -->")
if begin < 0 or end < begin:
    sys.exit("docs/operations.md: first-deploy markers not found")
blocks, current, lang = [], None, None
for line in text[begin:end].splitlines(keepends=True):
    fence = re.match(r"^```(\S*)\s*$", line)
    if fence and current is None:
        lang, current = fence.group(1), []
    elif line.startswith("```") and current is not None:
        if lang == "sh":
            blocks.append("".join(current))
        current = None
    elif current is not None:
        current.append(line)
if current is not None or not blocks:
    sys.exit("docs/operations.md: bad first-deploy blocks")
for i, block in enumerate(blocks):
    open(os.path.join(out, f"{i:02d}.sh"), "w").write(block)
PY

export PATH="$bin_dir:$PATH"
export RUST_LOG=warn
cd "$work"
for block in "$work"/blocks/*.sh; do
  echo "first-deploy: block $(basename "$block" .sh): $(grep -m1 -v '^[:#]' "$block" | cut -c1-70)"
  # shellcheck disable=SC1090
  . "$block"
done

# What the sequence claims, checked beyond the exit codes above.
fail() { echo "first-deploy: FAIL: $*" >&2; tail -n 20 "$work"/instance-*.log >&2 || true; exit 1; }
[ "$(stat -c %a "$CONF_DIR/master.key")" = 600 ] || fail "master.key is not 0600"
[ "$(stat -c %a "$CONF_DIR/coordinator.env")" = 600 ] || fail "coordinator.env is not 0600"
[ "$(stat -c %a builder.env)" = 600 ] || fail "builder.env is not 0600"
for instance in "$INSTANCE_A" "$INSTANCE_B"; do
  ready=$(curl -s "http://$instance/readyz")
  [ "$(printf '%s' "$ready" | jq -r .status)" = ready ] || fail "$instance: /readyz says $ready"
done
# Both instances share one database: a job created through A is read through B.
id=$(set -a; . ./builder.env; set +a
  COORDINATOR_URL="http://$INSTANCE_A" coordinator call POST /coordinator/jobs \
    --body '{"kind":"first-deploy"}' 2>/dev/null | jq -r .id)
got=$(set -a; . ./builder.env; set +a
  COORDINATOR_URL="http://$INSTANCE_B" coordinator call GET "/coordinator/jobs/$id" 2>/dev/null | jq -r .id)
[ "$got" = "$id" ] || fail "job $id created through A is not visible through B"
echo "first-deploy: all blocks ran; two instances on database $DB_NAME answer (dropping it)"
