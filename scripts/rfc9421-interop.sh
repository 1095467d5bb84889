#!/usr/bin/env bash
# RFC 9421 interop against a real `coordinator serve --dev`: requests signed by the
# PyPI packages requests-http-signature and http-message-signatures (unmodified) pass,
# tampered ones fail (scripts/rfc9421_interop.py). Never skips: a missing package is
# installed, and an import error fails the run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
port=${RFC9421_INTEROP_PORT:-18183}
python3 -m pip install --quiet --disable-pip-version-check requests requests-http-signature http-message-signatures
# shellcheck source=scripts/dev-server.sh
. "$root/scripts/dev-server.sh"
dev_server_start rfc9421-interop "$port"
if ! python3 "$root/scripts/rfc9421_interop.py"; then
  tail -n 20 server.log >&2
  exit 1
fi
