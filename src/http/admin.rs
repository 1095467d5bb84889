//! Admin routes of the auth layer.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::auth::revocation;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::JsonBody;
use crate::http::problem;
use crate::jobs::model::rfc3339;
use crate::state::AppState;

/// `POST /admin/tokens/revoke`: the job token id to revoke.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevokeToken {
    /// The token's `jti` claim: 1–128 printable ASCII characters.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub jti: String,
    /// RFC 3339, in the future (else 400). Accepted for compatibility: a revocation
    /// always lasts now + 24 h + 61 s: the longest a token with this id (its renewed
    /// successors included) can live after it, with 60 s for the instances' clock
    /// differences. Revoking twice keeps the later expiry.
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

/// `POST /admin/tokens/revoke` [admin]
#[utoipa::path(
    post,
    path = "/admin/tokens/revoke",
    tag = "admin",
    operation_id = "revokeToken",
    summary = "Revoke a job token",
    description = "Takes effect at once on this instance and within a second on the others.",
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
    if !revocation::valid_jti(&body.jti) {
        return Err(ApiError::bad_request(
            "jti",
            "must be 1-128 printable characters",
        ));
    }
    let expires_at = revocation::revocation_expiry(body.expires_at.as_deref(), "expiresAt")?;
    state
        .auth
        .revocations
        .revoke(body.jti.clone(), expires_at)
        .await?;
    Ok(HttpResponse::Ok()
        .json(json!({"jti": body.jti, "revoked": true, "expiresAt": rfc3339(expires_at)})))
}
