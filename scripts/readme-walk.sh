#!/usr/bin/env bash
# Walks README.md top to bottom, as a new user would: every ```sh block, in order, in
# one shell, in a fresh copy of the repository (tracked files only, no .coordinator/,
# no .env). ```sh-norun blocks are not run; ```python and ```bash blocks are file
# listings. Then it checks that the walkthrough did what it says, and runs the curl
# walkthrough a second time (it must be safe to re-run).
#
# Builds nothing: `cargo build` and `cargo test` in the README are what .ci/run has just
# done in the checkout, so here they only check that the binary is there; the copy's
# target/ is a link to the checkout's (CARGO_TARGET_DIR if set). The server listens on
# README_WALK_PORT (default 18383) instead of 8080, so a dev server already running on
# this machine does not get in the way.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
bin="$target_dir/debug/coordinator"
port=${README_WALK_PORT:-18383}

if [ ! -x "$bin" ]; then
  echo "readme-walk: $bin is missing; run cargo test (or cargo build) first" >&2
  exit 1
fi
for tool in curl jq python3 openssl; do
  command -v "$tool" >/dev/null || { echo "readme-walk: $tool is missing (README prerequisites)" >&2; exit 1; }
done
if curl -s -o /dev/null "http://127.0.0.1:$port/livez"; then
  echo "readme-walk: port $port is taken; set README_WALK_PORT" >&2
  exit 1
fi

# Nothing from the caller's environment may point the commands elsewhere.
for var in $(compgen -e); do
  case $var in COORDINATOR_* | DATABASE_URL) unset "$var" ;; esac
done

work=$(mktemp -d)
cleanup() {
  local pids
  pids=$(jobs -p)
  if [ -n "$pids" ]; then
    kill $pids 2>/dev/null || true
    wait $pids 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

(cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$work")
ln -s "$target_dir" "$work/target"

# The runnable blocks, one file each, with the port moved.
python3 - "$root/README.md" "$work/.walk" "$port" <<'PY'
import os, re, sys
readme, out, port = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out)
blocks, current, lang = [], None, None
for number, line in enumerate(open(readme, encoding="utf-8"), 1):
    fence = re.match(r"^```(\S*)\s*$", line)
    if fence and current is None:
        lang, current, start = fence.group(1), [], number
    elif line.startswith("```") and current is not None:
        if lang == "sh":
            blocks.append((start, "".join(current)))
        current = None
    elif current is not None:
        current.append(line)
if current is not None:
    sys.exit(f"README.md: unclosed code block at line {start}")
if not blocks:
    sys.exit("README.md: no sh blocks found")
for i, (start, text) in enumerate(blocks):
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    with open(os.path.join(out, f"{i:02d}-line-{start}.sh"), "w") as f:
        f.write(text)
PY

# `cargo build` / `cargo test`: done by .ci/run in the checkout (see above).
cargo() {
  case "${1-}" in
    build | test) echo "readme-walk: \`cargo $*\` already done by .ci/run; $bin is there" ;;
    *) command cargo "$@" ;;
  esac
}
export COORDINATOR_BIND="127.0.0.1:$port"
export RUST_LOG=warn  # the server shares this terminal: keep its access log out of CI output

cd "$work"
for block in .walk/*.sh; do
  echo "readme-walk: README.md ${block#.walk/??-} ($(wc -l <"$block") lines)"
  # shellcheck disable=SC1090
  . "$block"
done

# What the walkthrough claims, checked.
fail() { echo "readme-walk: FAIL: $*" >&2; exit 1; }
check_job_completed() {
  local status
  [ -n "${ID:-}" ] && [ "$ID" != null ] || fail "the curl walkthrough created no job"
  status=$(curl -s "$URL/coordinator/jobs/$ID" -H "$KEY" | jq -r .status)
  [ "$status" = COMPLETED ] || fail "job $ID is $status, not COMPLETED"
}
check_job_completed
grep -q '^COORDINATOR_HMAC_SECRET=coh_' builder.env || fail "builder.env has no HMAC secret"
[ -s headers.txt ] || fail "coordinator sign wrote no headers"

# Run the curl walkthrough again, as a user re-running it would.
again=$(grep -l 'Idempotency-Key' .walk/*.sh | head -n1)
[ -n "$again" ] || fail "no block with the curl walkthrough"
first=$ID
echo "readme-walk: the curl walkthrough again (${again#.walk/??-})"
# shellcheck disable=SC1090
. "$again"
[ "$ID" != "$first" ] || fail "the second run reused job $first"
check_job_completed

echo "readme-walk: every sh block of README.md ran ($(ls .walk | wc -l) blocks)"
