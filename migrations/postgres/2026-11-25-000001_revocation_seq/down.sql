CREATE INDEX revoked_tokens_revoked ON revoked_tokens (revoked_at);
DROP INDEX revoked_tokens_seq;
ALTER TABLE revoked_tokens DROP COLUMN seq;
