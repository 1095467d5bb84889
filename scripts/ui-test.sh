#!/usr/bin/env bash
# The /ui/ dashboard in a real browser: playwright-core (npm, pinned in ui-test/) drives
# Debian's chromium against a `serve --dev`. Installs what is missing; never skips.
#
#   COORDINATOR_BIN=/path/to/coordinator bash scripts/ui-test.sh   # default: target/debug
#
# Screenshots go to docs/ui/ (UI_TEST_SHOTS overrides); the README shows them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shots=${UI_TEST_SHOTS:-$root/docs/ui}

if [ ! -x /usr/bin/chromium ]; then
  echo "ui-test: installing chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
/usr/bin/chromium --version

(cd "$root/ui-test" && npm ci --no-audit --no-fund --loglevel=error)

# shellcheck source=scripts/dev-server.sh
. "$root/scripts/dev-server.sh"
bin="${COORDINATOR_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/coordinator}"
dev_server_start ui-test 18093

# A key with jobs:read and health:read only: the page must offer it no pause button.
"$bin" caller add ro --scopes jobs:read,health:read --dev >/dev/null
ro_key=$("$bin" key issue ro --dev | sed -n 's/^COORDINATOR_CLIENT_API_KEY=//p')
[ -n "$ro_key" ] || { echo "ui-test: no read-only key issued" >&2; exit 1; }

UI_TEST_RO_KEY=$ro_key UI_TEST_SHOTS=$shots node "$root/ui-test/ui.test.mjs"
