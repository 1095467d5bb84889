-- The signed time of each replay record (seconds). On PostgreSQL only the column is
-- added: instances of the previous release keep running during a rolling upgrade and
-- insert (caller, signature_hash, expires_at) with ON CONFLICT DO NOTHING on the
-- primary key, and purge by expires_at, so the key and the expires_at index stay.
-- Rows written by them have no signed time (NULL). SQLite rebuilds the table keyed by
-- signed_at instead (one process, migrated at startup).
ALTER TABLE replay_records ADD COLUMN signed_at BIGINT;
