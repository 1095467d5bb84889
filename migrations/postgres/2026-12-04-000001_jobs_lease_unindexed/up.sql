-- A worker's progress and heartbeat renew the lease on every call. With lease_expires_at
-- indexed, each of those updates also wrote a new entry in every index of `jobs` on
-- PostgreSQL (no HOT update is possible once an indexed column changes), and one index
-- entry on SQLite. The lease sweep finds RUNNING jobs through jobs_status (status, queue)
-- instead: RUNNING jobs are as many as the workers holding them.
DROP INDEX jobs_lease;
