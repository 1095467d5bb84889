-- Revocations are polled by a database-assigned sequence, not by the writer's clock.
-- SQLite cannot add an AUTOINCREMENT column, so the table is rebuilt. AUTOINCREMENT
-- never reuses a number, and SQLite has one writer at a time, so `seq` order is
-- commit order.
CREATE TABLE revoked_tokens_new (
    seq INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    jti TEXT NOT NULL UNIQUE,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL
);
INSERT INTO revoked_tokens_new (jti, expires_at, revoked_at)
    SELECT jti, expires_at, revoked_at FROM revoked_tokens ORDER BY revoked_at;
DROP TABLE revoked_tokens;
ALTER TABLE revoked_tokens_new RENAME TO revoked_tokens;
CREATE INDEX revoked_tokens_expires ON revoked_tokens (expires_at);
