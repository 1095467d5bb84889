DROP TABLE queues;
DROP INDEX jobs_list_kind;
DROP INDEX jobs_list_queue;
DROP INDEX jobs_list_status;
ALTER TABLE jobs DROP COLUMN attempt_budget;
ALTER TABLE jobs DROP COLUMN retry_cap_ms;
ALTER TABLE jobs DROP COLUMN retry_base_ms;
ALTER TABLE jobs DROP COLUMN run_at;
