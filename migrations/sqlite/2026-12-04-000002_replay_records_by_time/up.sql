-- Replay records keyed by the signed time. The old key (caller, signature_hash) put
-- every insert at a random place of the primary key (the hash is random), and the
-- purge deleted randomly placed entries of it and of the expires_at index: each commit
-- dirtied about one page per record. Keyed by signed_at first, inserts land at the end
-- of the one B-tree and the purge deletes its beginning. WITHOUT ROWID: the table is
-- that B-tree, with no second index.
--
-- A (caller, signature) pair always carries the same signed time (the signature covers
-- it), so the key is as unique as before. Legacy rows get the signed time their expiry
-- implies with the default window (skew 300 s + margin 60 s): exact for the default
-- setting; with another skew a request signed before the upgrade could be accepted once
-- more within one window after it (docs/decisions.md).
CREATE TABLE replay_records_new (
    signed_at BIGINT NOT NULL,
    caller TEXT NOT NULL,
    signature_hash TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (signed_at, caller, signature_hash)
) WITHOUT ROWID;
INSERT OR IGNORE INTO replay_records_new (signed_at, caller, signature_hash, expires_at)
    SELECT expires_at / 1000 - 360, caller, signature_hash, expires_at FROM replay_records
    ORDER BY 1, 2, 3;
-- Drops replay_records_expires with it.
DROP TABLE replay_records;
ALTER TABLE replay_records_new RENAME TO replay_records;
