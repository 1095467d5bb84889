-- Job lifecycle: scheduled jobs (run_at), retries with backoff, redrive budget,
-- list indexes (newest first per status, queue and kind), queue controls.
ALTER TABLE jobs ADD COLUMN run_at BIGINT NOT NULL DEFAULT 0;
UPDATE jobs SET run_at = created_at;
ALTER TABLE jobs ADD COLUMN retry_base_ms BIGINT NOT NULL DEFAULT 5000;
ALTER TABLE jobs ADD COLUMN retry_cap_ms BIGINT NOT NULL DEFAULT 3600000;
ALTER TABLE jobs ADD COLUMN attempt_budget INTEGER NOT NULL DEFAULT 3;
UPDATE jobs SET attempt_budget = max_attempts;

CREATE INDEX jobs_list_status ON jobs (status, created_at, id);
CREATE INDEX jobs_list_queue ON jobs (queue, status, created_at, id);
CREATE INDEX jobs_list_kind ON jobs (kind, status, created_at, id);

CREATE TABLE queues (
    queue TEXT PRIMARY KEY NOT NULL,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    max_running INTEGER,
    updated_at BIGINT NOT NULL
);
