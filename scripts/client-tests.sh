#!/usr/bin/env bash
# The Python client's tests (clients/python): installs the package with its test extras
# into a fresh virtual environment, checks docs/signing-vectors.json is what
# scripts/signing_vectors.py writes, starts `coordinator serve --dev` and runs pytest
# against it, then stops the server. Nothing is skipped: a missing server or package
# is a failure. Builds nothing: it uses target/debug/coordinator, which `cargo test`
# has built.
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
dev_server_start client-tests "$port"
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
echo "client-tests: all passed"
