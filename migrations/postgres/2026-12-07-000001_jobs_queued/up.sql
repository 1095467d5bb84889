-- The claim's pick reads the QUEUED jobs of a queue in its own order (priority, age,
-- id), from an index of the QUEUED jobs only: its first due entry is the job. Before, no
-- index had the claim's whole order, and without column statistics (autovacuum off) the
-- planner read every QUEUED job of the queue through any index on (queue, status) and
-- sorted them, on every claim. Partial: a job's other states write no entry, and the
-- claim's query names the status as this literal. Built CONCURRENTLY, alone in its
-- migration, outside a transaction (metadata.toml): writes to jobs go on meanwhile.
CREATE INDEX CONCURRENTLY jobs_queued ON jobs (queue, priority DESC, created_at, id) WHERE status = 'QUEUED';
