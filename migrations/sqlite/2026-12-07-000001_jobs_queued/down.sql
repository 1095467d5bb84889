DROP INDEX jobs_queued;
