CREATE TABLE callers (
    name TEXT PRIMARY KEY,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    disabled_at BIGINT
);

-- Sealed secrets: HMAC secrets, webhook secrets and token-signing keys, versioned per
-- (caller, purpose). The plaintext never touches the database.
CREATE TABLE sealed_secrets (
    caller TEXT NOT NULL,
    purpose TEXT NOT NULL,
    version INTEGER NOT NULL,
    ciphertext BYTEA NOT NULL,
    nonce BYTEA NOT NULL,
    master_key_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    last_used_at BIGINT,
    PRIMARY KEY (caller, purpose, version)
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    caller TEXT NOT NULL REFERENCES callers (name),
    key_hash TEXT NOT NULL,
    display_prefix TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    last_used_at BIGINT
);
CREATE UNIQUE INDEX api_keys_hash ON api_keys (key_hash);
CREATE INDEX api_keys_caller ON api_keys (caller);

-- (caller, SHA-256 of the signature) seen within the timestamp window: a replay.
CREATE TABLE replay_records (
    caller TEXT NOT NULL,
    signature_hash TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (caller, signature_hash)
);
CREATE INDEX replay_records_expires ON replay_records (expires_at);

CREATE TABLE revoked_tokens (
    jti TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL
);
CREATE INDEX revoked_tokens_expires ON revoked_tokens (expires_at);
CREATE INDEX revoked_tokens_revoked ON revoked_tokens (revoked_at);

-- One row: bumped by every credential change so every instance drops its cache.
CREATE TABLE auth_state (
    id INTEGER PRIMARY KEY,
    generation BIGINT NOT NULL
);
INSERT INTO auth_state (id, generation) VALUES (1, 0);
