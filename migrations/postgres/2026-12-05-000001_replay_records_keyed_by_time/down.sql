ALTER TABLE replay_records DROP CONSTRAINT replay_records_pkey;
ALTER TABLE replay_records ADD PRIMARY KEY (caller, signature_hash);
ALTER TABLE replay_records ALTER COLUMN signed_at DROP NOT NULL;
