//! Admin routes of the auth layer.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::db::now_millis;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::JsonBody;
use crate::http::problem;
use crate::jobs::model::rfc3339;
use crate::state::AppState;

/// Default lifetime of a revocation when no expiry is given: 24 h (the longest a job
/// token can live).
pub const DEFAULT_REVOCATION_MS: i64 = 24 * 3600 * 1000;

/// `POST /admin/tokens/revoke`: the job token id to revoke.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevokeToken {
    /// The token's `jti` claim: 1–128 printable ASCII characters.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub jti: String,
    /// RFC 3339, in the future; default and at most now + 24 h (the longest a job token
    /// lives; a later time is capped). Revoking twice keeps the later expiry.
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
}

// For the OpenAPI document only: `revoke_token` writes this as a JSON literal.
/// The revocation, as recorded.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRevoked {
    pub jti: String,
    /// Always `true`.
    pub revoked: bool,
    /// Until when this request keeps the id revoked.
    #[schema(format = DateTime)]
    pub expires_at: String,
}

/// Parse an optional RFC 3339 expiry (must lie in the future), default now + 24 h. A
/// later expiry is capped at now + 24 h: no job token lives longer, so a revocation
/// never needs to, and the revocation set cannot be filled with ids kept for ever.
pub fn revocation_expiry(raw: Option<&str>, field: &str) -> Result<i64, ApiError> {
    let now = now_millis();
    let longest = now.saturating_add(DEFAULT_REVOCATION_MS);
    match raw {
        None => Ok(longest),
        Some(s) => {
            let t = chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|e| {
                    ApiError::bad_request(field, format!("must be an RFC 3339 timestamp ({e})"))
                })?
                .timestamp_millis();
            if t <= now {
                return Err(ApiError::bad_request(field, "must be in the future"));
            }
            Ok(t.min(longest))
        }
    }
}

pub fn valid_jti(jti: &str) -> bool {
    (1..=128).contains(&jti.len()) && jti.bytes().all(|b| b.is_ascii_graphic())
}

/// `POST /admin/tokens/revoke` [admin]
#[utoipa::path(
    post,
    path = "/admin/tokens/revoke",
    tag = "admin",
    operation_id = "revokeToken",
    summary = "Revoke a job token",
    description = "Takes effect at once on this instance and within a second on the others. \
        Refused (409) while the instance already holds its maximum of active revocations.",
    request_body(content = RevokeToken, content_type = "application/json"),
    responses(
        (status = 200, description = "The token id is revoked.", body = TokenRevoked),
        problem::WriteErrors,
    ),
)]
pub async fn revoke_token(
    state: web::Data<AppState>,
    JsonBody(body): JsonBody<RevokeToken>,
) -> ApiResult<HttpResponse> {
    if !valid_jti(&body.jti) {
        return Err(ApiError::bad_request(
            "jti",
            "must be 1-128 printable characters",
        ));
    }
    let expires_at = revocation_expiry(body.expires_at.as_deref(), "expiresAt")?;
    state
        .auth
        .revocations
        .revoke(body.jti.clone(), expires_at)
        .await?;
    Ok(HttpResponse::Ok()
        .json(json!({"jti": body.jti, "revoked": true, "expiresAt": rfc3339(expires_at)})))
}
