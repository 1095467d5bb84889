ALTER TABLE jobs DROP COLUMN tokens_until;
