-- The claim's pick reads the QUEUED jobs of a queue in its own order (priority, age,
-- id), from an index of the QUEUED jobs only (the claim's query names the status as
-- this literal). See the PostgreSQL twin.
CREATE INDEX jobs_queued ON jobs (queue, priority DESC, created_at, id) WHERE status = 'QUEUED';
