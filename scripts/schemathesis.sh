#!/usr/bin/env bash
# Runs schemathesis against a real `coordinator serve --dev`, started in a fresh
# temporary directory, with the dev caller's API key. Fails on any 5xx and on any
# response that contradicts GET /openapi.json (status documented but body off-schema).
#
# Installs nothing (.ci/run does `python3 -m pip install schemathesis` first) and builds
# nothing: it uses target/debug/coordinator, which `cargo test` has built.
#
# Knobs: SCHEMATHESIS_PORT (18282), SCHEMATHESIS_MAX_EXAMPLES per operation (100),
# SCHEMATHESIS_SEED (random; the run prints the seed it used, for reproducing).
set -euo pipefail

port=${SCHEMATHESIS_PORT:-18282}
max_examples=${SCHEMATHESIS_MAX_EXAMPLES:-100}
seed=${SCHEMATHESIS_SEED:-}

if ! python3 -m schemathesis.cli --version >/dev/null 2>&1; then
  echo "schemathesis: not installed; python3 -m pip install schemathesis" >&2
  exit 1
fi

# shellcheck source=scripts/dev-server.sh
. "$(dirname "$0")/dev-server.sh"
# schemathesis sends bad credentials on purpose; don't let the failure throttle (429)
# turn the rest of the run into 429s.
dev_server_start schemathesis "$port" COORDINATOR_AUTH_FAILURES_PER_MINUTE=100000

# The dev API key as the credential of the document's `apiKey` security scheme: it is
# sent as `X-API-Key`, and schemathesis then drops the random values it would otherwise
# generate for the other schemes (HMAC headers, Bearer), which only get a 401 (two
# schemes at once). It still sends requests without credentials, or with the
# Standard Webhooks headers the webhook documents, and checks those 401s too.
cat >schemathesis.toml <<'EOF'
[auth.openapi.apiKey]
api_key = "${COORDINATOR_CLIENT_API_KEY}"
EOF

# Three operations hold a request open by design: a long-poll claim waits up to `wait`
# seconds (60 at most), a job's event stream lasts until the job ends and a queue's
# until the client leaves. Generated inputs would only time out there;
# tests/api/push.rs covers them on both backends.
args=(
  run "$base/openapi.json"
  --exclude-operation-id claimJob
  --exclude-operation-id jobEvents
  --exclude-operation-id queueEvents
  --checks not_a_server_error,response_schema_conformance
  --max-examples "$max_examples"
  --request-timeout 30
)
if [ -n "$seed" ]; then
  args+=(--seed "$seed")
fi

status=0
timeout 1200 python3 -m schemathesis.cli --config-file schemathesis.toml "${args[@]}" || status=$?
if [ "$status" -ne 0 ]; then
  echo "schemathesis: failed (exit $status); server errors logged:" >&2
  grep '"level":"ERROR"' server.log | tail -n 40 >&2 || true
  exit 1
fi
echo "schemathesis: passed"
