#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: a figure that does not drift
# with the host's load, for A/B comparisons of per-request work that timing cannot
# resolve (a change of a few hundred nanoseconds is lost in the closed-loop runs' noise).
#
#   bench/instructions.sh [BIN ...]      each server binary (default: target/release/coordinator)
#
# Scenarios: /livez, health with an API key and signed (HMAC), a job-token GET of a
# claimed job (created and claimed through the API with the dev key first), and a job
# create with the dev key.
#
# For each binary and scenario: `serve --dev` (SQLite, one HTTP worker) in a fresh
# directory under callgrind with instrumentation off; 300 unmeasured requests on one
# keep-alive connection; then N measured requests (BENCH_REQUESTS, default 2000), one at a
# time. The count covers every thread of the server (for a signed request that includes
# the replay-log writer's SQLite insert and commit, one request per batch here), divided
# by N. Prints a markdown table; under callgrind SHA-256 runs in software, so hashing
# weighs more here than on a CPU with SHA extensions.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is needed (apt install valgrind)" >&2; exit 1; }
n="${BENCH_REQUESTS:-2000}"
port="${BENCH_PORT:-18181}"
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(target/release/coordinator)

# One run: prints instructions per request.
measure() {
  local bin="$1" path="$2" auth="$3" dir
  dir="$(mktemp -d)"
  (
    cd "$dir"
    COORDINATOR_WORKERS=1 RUST_LOG=info valgrind --tool=callgrind --instr-atstart=no \
      --callgrind-out-file="$dir/cg.out" "$bin" serve --dev --bind "127.0.0.1:$port" \
      >out.txt 2>err.txt &
    echo $! >pid
  )
  for _ in $(seq 1 180); do
    grep -q COORDINATOR_WEBHOOK_SECRET "$dir/out.txt" 2>/dev/null \
      && curl -sf "http://127.0.0.1:$port/livez" >/dev/null && break
    sleep 1
  done
  python3 - "$port" "$path" "$auth" "$dir/out.txt" "$n" "$(cat "$dir/pid")" <<'PY'
import hashlib, hmac, http.client, json, subprocess, sys, time, uuid
port, path, auth, creds, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
# callgrind_control without a process id steers every callgrind run of the user.
pid = sys.argv[6]
env = dict(l.strip().split("=", 1) for l in open(creds) if "=" in l)
conn = http.client.HTTPConnection("127.0.0.1", int(port))
def call(method, target, body, hdrs):
    h = dict(hdrs, **({"content-type": "application/json"} if body is not None else {}))
    conn.request(method, target, body=json.dumps(body) if body is not None else None, headers=h)
    r = conn.getresponse()
    data = r.read()
    if r.status not in (200, 201):
        sys.exit(f"{method} {target}: {r.status} {data[:200]!r}")
    return json.loads(data)
token = None
if auth == "token":
    # A claimed job and its token, through the API with the dev key.
    key = {"x-api-key": env["COORDINATOR_CLIENT_API_KEY"]}
    job = call("POST", "/coordinator/jobs", {"kind": "bench", "queue": "instr"}, key)["id"]
    call("PATCH", f"/coordinator/jobs/{job}/status", {"status": "QUEUED"}, key)
    token = call("POST", "/coordinator/queues/instr/claim", {"worker": "w"}, key)["token"]
    path = path.replace("{id}", job)
def headers():
    if auth == "create":
        return {"x-api-key": env["COORDINATOR_CLIENT_API_KEY"], "content-type": "application/json"}
    if auth == "token":
        return {"authorization": "Bearer " + token}
    if auth == "apikey":
        return {"x-api-key": env["COORDINATOR_CLIENT_API_KEY"]}
    if auth == "hmac":
        ts, nonce = str(int(time.time())), uuid.uuid4().hex
        signed = "\n".join(["v1", "GET", path, env["COORDINATOR_CALLER"], ts, nonce,
                            hashlib.sha256(b"").hexdigest()])
        sig = hmac.new(env["COORDINATOR_HMAC_SECRET"].encode(), signed.encode(),
                       hashlib.sha256).hexdigest()
        return {"x-coordinator-caller": env["COORDINATOR_CALLER"],
                "x-coordinator-timestamp": ts, "x-coordinator-nonce": nonce,
                "x-coordinator-signature": sig}
    return {}
def send(k):
    for _ in range(k):
        if auth == "create":
            conn.request("POST", path, body=b'{"kind":"bench","queue":"instr"}', headers=headers())
        else:
            conn.request("GET", path, headers=headers())
        r = conn.getresponse()
        r.read()
        if r.status not in (200, 201):
            sys.exit(f"{path}: {r.status}")
send(300)
subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
send(n)
subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
PY
  callgrind_control -d "$(cat "$dir/pid")" >/dev/null 2>&1 || true
  kill "$(cat "$dir/pid")" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$(cat "$dir/pid")" 2>/dev/null || break; sleep 1; done
  local total=0 f ir
  for f in "$dir"/cg.out*; do
    ir="$(callgrind_annotate "$f" 2>/dev/null | grep -m1 'PROGRAM TOTALS' | tr -d ',' | awk '{print $1}')"
    [[ "$ir" =~ ^[0-9]+$ ]] || ir=0
    total=$((total + ir))
  done
  rm -rf "$dir"
  echo $((total / n))
}

echo "| binary | GET /livez | GET /coordinator/health (API key) | GET /coordinator/health (HMAC) | GET /coordinator/jobs/{id} (job token) | POST /coordinator/jobs (API key) |"
echo "|---|---:|---:|---:|---:|---:|"
for bin in "${bins[@]}"; do
  bin="$(realpath "$bin")"
  livez="$(measure "$bin" /livez none)"
  key="$(measure "$bin" /coordinator/health apikey)"
  signed="$(measure "$bin" /coordinator/health hmac)"
  token="$(measure "$bin" '/coordinator/jobs/{id}' token)"
  create="$(measure "$bin" /coordinator/jobs create)"
  echo "| \`$bin\` | $livez | $key | $signed | $token | $create |"
done
echo
echo "Instructions per request (callgrind, every server thread, $n requests one at a time after 300 unmeasured)."
