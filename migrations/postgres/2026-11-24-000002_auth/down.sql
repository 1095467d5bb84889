DROP TABLE auth_state;
DROP TABLE revoked_tokens;
DROP TABLE replay_records;
DROP TABLE api_keys;
DROP TABLE sealed_secrets;
DROP TABLE callers;
