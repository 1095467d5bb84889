CREATE TABLE revoked_tokens_old (
    jti TEXT PRIMARY KEY NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL
);
INSERT INTO revoked_tokens_old (jti, expires_at, revoked_at)
    SELECT jti, expires_at, revoked_at FROM revoked_tokens;
DROP TABLE revoked_tokens;
ALTER TABLE revoked_tokens_old RENAME TO revoked_tokens;
CREATE INDEX revoked_tokens_expires ON revoked_tokens (expires_at);
CREATE INDEX revoked_tokens_revoked ON revoked_tokens (revoked_at);
