CREATE TABLE replay_records_old (
    caller TEXT NOT NULL,
    signature_hash TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (caller, signature_hash)
);
INSERT OR IGNORE INTO replay_records_old (caller, signature_hash, expires_at)
    SELECT caller, signature_hash, expires_at FROM replay_records;
DROP TABLE replay_records;
ALTER TABLE replay_records_old RENAME TO replay_records;
CREATE INDEX replay_records_expires ON replay_records (expires_at);
