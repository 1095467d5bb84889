CREATE INDEX jobs_lease ON jobs (lease_expires_at);
