#!/usr/bin/env bash
# Send one signed request to coordinator (bash, openssl, curl).
#
# usage: sign_example.sh METHOD PATH [BODY]
# env:   COORDINATOR_URL (default http://127.0.0.1:8080), COORDINATOR_CALLER,
#        COORDINATOR_HMAC_SECRET, optional COORDINATOR_KEY_VERSION
# Prints "HTTP <status>" and the response body; exits 1 on a status of 400 or more.
set -euo pipefail

method=$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')
target=$2            # path and ?query exactly as sent
body=${3-}           # the exact bytes sent ("" for none)
url=${COORDINATOR_URL:-http://127.0.0.1:8080}
url=${url%/}
: "${COORDINATOR_CALLER:?set COORDINATOR_CALLER}"
: "${COORDINATOR_HMAC_SECRET:?set COORDINATOR_HMAC_SECRET}"

timestamp=$(date +%s)
nonce=$(openssl rand -hex 16)
body_sha256=$(printf '%s' "$body" | openssl dgst -sha256 | awk '{print $NF}')
# Seven lines joined by \n, no trailing newline.
signed=$(printf 'v1\n%s\n%s\n%s\n%s\n%s\n%s' \
  "$method" "$target" "$COORDINATOR_CALLER" "$timestamp" "$nonce" "$body_sha256")
signature=$(printf '%s' "$signed" |
  openssl dgst -sha256 -hmac "$COORDINATOR_HMAC_SECRET" | awk '{print $NF}')

args=(-sS --path-as-is -X "$method" -w '\n%{http_code}'
  -H "X-Coordinator-Caller: $COORDINATOR_CALLER"
  -H "X-Coordinator-Timestamp: $timestamp"
  -H "X-Coordinator-Nonce: $nonce"
  -H "X-Coordinator-Signature: $signature")
if [ -n "${COORDINATOR_KEY_VERSION:-}" ]; then
  args+=(-H "X-Coordinator-Key-Version: $COORDINATOR_KEY_VERSION")
fi
if [ -n "$body" ]; then
  args+=(-H 'Content-Type: application/json' --data-binary @-)  # body from stdin
fi

response=$(printf '%s' "$body" | curl "${args[@]}" "$url$target")
status=${response##*$'\n'}
echo "HTTP $status"
printf '%s\n' "${response%$'\n'*}"
[ "$status" -lt 400 ]
