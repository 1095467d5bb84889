ALTER TABLE replay_records DROP COLUMN signed_at;
