//! One schema for both backends (types both SQLite and PostgreSQL have).
//! Timestamps are unix milliseconds (`BigInt`); JSON documents are `Text`.

diesel::table! {
    jobs (id) {
        id -> Text,
        kind -> Text,
        queue -> Text,
        priority -> Integer,
        status -> Text,
        progress -> Integer,
        message -> Nullable<Text>,
        payload -> Text,
        result -> Nullable<Text>,
        error -> Nullable<Text>,
        gate_results -> Nullable<Text>,
        created_by -> Text,
        idempotency_key -> Nullable<Text>,
        request_hash -> Nullable<Text>,
        attempts -> Integer,
        max_attempts -> Integer,
        version -> BigInt,
        worker -> Nullable<Text>,
        lease_expires_at -> Nullable<BigInt>,
        created_at -> BigInt,
        updated_at -> BigInt,
        started_at -> Nullable<BigInt>,
        finished_at -> Nullable<BigInt>,
        tokens_until -> Nullable<BigInt>,
        run_at -> BigInt,
        retry_base_ms -> BigInt,
        retry_cap_ms -> BigInt,
        attempt_budget -> Integer,
    }
}

diesel::table! {
    job_events (job_id, seq) {
        job_id -> Text,
        seq -> BigInt,
        event_type -> Text,
        data -> Text,
        created_at -> BigInt,
    }
}

diesel::joinable!(job_events -> jobs (job_id));
diesel::allow_tables_to_appear_in_same_query!(jobs, job_events, callers, sealed_secrets, api_keys);

diesel::table! {
    callers (name) {
        name -> Text,
        scopes -> Text,
        created_at -> BigInt,
        disabled_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    sealed_secrets (caller, purpose, version) {
        caller -> Text,
        purpose -> Text,
        version -> Integer,
        ciphertext -> Binary,
        nonce -> Binary,
        master_key_id -> Text,
        created_at -> BigInt,
        expires_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
        last_used_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    api_keys (id) {
        id -> Text,
        caller -> Text,
        key_hash -> Text,
        display_prefix -> Text,
        scopes -> Text,
        created_at -> BigInt,
        expires_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
        last_used_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    /// The key declared here is the identity of a record; the stored primary key is
    /// (`signed_at`, `caller`, `signature_hash`) on SQLite (a pair always carries the
    /// same signed time) and (`caller`, `signature_hash`) on PostgreSQL. `signed_at` is
    /// in seconds, NOT NULL on SQLite and NULL on PostgreSQL in rows written by the
    /// release before it (rolling upgrades). Always read with explicit selects.
    replay_records (caller, signature_hash) {
        caller -> Text,
        signature_hash -> Text,
        expires_at -> BigInt,
        signed_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    revoked_tokens (jti) {
        jti -> Text,
        expires_at -> BigInt,
        revoked_at -> BigInt,
        /// Assigned by the database on insert (SQLite AUTOINCREMENT, PostgreSQL
        /// identity); the incremental revocation poll follows it.
        seq -> BigInt,
    }
}

diesel::table! {
    auth_state (id) {
        id -> Integer,
        generation -> BigInt,
    }
}

diesel::table! {
    webhook_deliveries (caller, delivery_id) {
        caller -> Text,
        delivery_id -> Text,
        received_at -> BigInt,
        payload -> Text,
        job_id -> Text,
    }
}

diesel::table! {
    queues (queue) {
        queue -> Text,
        paused -> Bool,
        max_running -> Nullable<Integer>,
        updated_at -> BigInt,
    }
}
