//! Credential rows and the small enums of authentication.

use diesel::prelude::*;
use serde::Serialize;

use super::Scope;
use crate::db::schema::{api_keys, callers, sealed_secrets};

/// How a request authenticated (explicit string per variant for logs and JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Scheme {
    #[serde(rename = "hmac")]
    Hmac,
    /// The HMAC scheme in its RFC 9421 encoding (same secrets, window, replay record).
    #[serde(rename = "rfc9421")]
    Rfc9421,
    #[serde(rename = "webhook")]
    Webhook,
    #[serde(rename = "token")]
    Token,
    #[serde(rename = "api_key")]
    ApiKey,
    /// A client certificate verified in the TLS handshake (mutual TLS).
    #[serde(rename = "client_cert")]
    ClientCert,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Hmac => "hmac",
            Scheme::Rfc9421 => "rfc9421",
            Scheme::Webhook => "webhook",
            Scheme::Token => "token",
            Scheme::ApiKey => "api_key",
            Scheme::ClientCert => "client_cert",
        }
    }
}

/// What a sealed secret is for; also the HKDF purpose of its seal.
pub use crate::crypto::seal::Purpose;

pub fn purpose_from_str(s: &str) -> Option<Purpose> {
    [
        Purpose::HmacSecret,
        Purpose::WebhookSecret,
        Purpose::TokenSigning,
    ]
    .into_iter()
    .find(|p| p.as_str() == s)
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable, Serialize)]
#[diesel(table_name = callers)]
#[serde(rename_all = "camelCase")]
pub struct CallerRow {
    pub name: String,
    pub scopes: String,
    pub created_at: i64,
    pub disabled_at: Option<i64>,
}

impl CallerRow {
    /// Scopes as stored; an unknown scope in the database fails closed (dropped).
    pub fn scope_list(&self) -> Vec<Scope> {
        self.scopes.split(',').filter_map(Scope::parse).collect()
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = sealed_secrets)]
pub struct SecretRow {
    pub caller: String,
    pub purpose: String,
    pub version: i32,
    pub ciphertext: Vec<u8>,
    pub nonce: Vec<u8>,
    pub master_key_id: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

impl SecretRow {
    /// The sealed form of this row, as `Sealer::open` takes it.
    pub fn sealed(&self) -> crate::crypto::seal::SealedSecret {
        crate::crypto::seal::SealedSecret {
            key_id: self.master_key_id.clone(),
            nonce: self.nonce.clone(),
            ciphertext: self.ciphertext.clone(),
        }
    }

    pub fn is_active(&self, now_ms: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now_ms)
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = api_keys)]
pub struct ApiKeyRow {
    pub id: String,
    pub caller: String,
    pub key_hash: String,
    pub display_prefix: String,
    pub scopes: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}
