-- One row per webhook delivery: the primary key makes processing exactly-once.
CREATE TABLE webhook_deliveries (
    caller TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    payload TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (caller, delivery_id)
);
CREATE INDEX jobs_finished ON jobs (queue, status, finished_at);
