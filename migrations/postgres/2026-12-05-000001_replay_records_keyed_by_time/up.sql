-- Key the replay records by signed time first, as SQLite's already are. Keyed by
-- (caller, signature_hash) every insert lands on a random page of the key's index
-- (the hash is random): at thousands of signed requests per second over a table of
-- millions of records, each commit dirties pages all over an index larger than the
-- buffer cache, and after every checkpoint each of them is written to the WAL whole.
-- Keyed by (signed_at, caller, signature_hash) inserts land at the index's end. The
-- key is as unique as before: a signature always carries the same signed time, since
-- it covers it.
--
-- Records written by the release before 2026-12-04 carry no signed time; they get the
-- one the default window implies (skew 300 s + margin 60 s), as SQLite's did. Instances
-- of the release before this one write `signed_at`, insert with ON CONFLICT DO NOTHING
-- (any unique key) and purge by `expires_at`, whose index stays: they keep working
-- during a rolling upgrade. Instances older than 2026-12-04 write no `signed_at` and
-- cannot insert once this has run (docs/decisions.md).
UPDATE replay_records SET signed_at = expires_at / 1000 - 360 WHERE signed_at IS NULL;
ALTER TABLE replay_records ALTER COLUMN signed_at SET NOT NULL;
ALTER TABLE replay_records DROP CONSTRAINT replay_records_pkey;
ALTER TABLE replay_records ADD PRIMARY KEY (signed_at, caller, signature_hash);
