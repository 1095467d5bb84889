CREATE TABLE jobs (
    id TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    message TEXT,
    payload TEXT NOT NULL,
    result TEXT,
    error TEXT,
    gate_results TEXT,
    created_by TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 3,
    version BIGINT NOT NULL DEFAULT 1,
    worker TEXT,
    lease_expires_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (created_by, idempotency_key);
CREATE INDEX jobs_claim ON jobs (queue, status, priority DESC, created_at);
CREATE INDEX jobs_status ON jobs (status, queue);
CREATE INDEX jobs_lease ON jobs (lease_expires_at);

CREATE TABLE job_events (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
