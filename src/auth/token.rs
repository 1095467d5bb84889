//! Job tokens (JWT HS256). Placeholder until the job-token issue lands: every bearer
//! token is refused.

use super::audit::AuditRecord;
use super::model::Scheme;
use super::principal::Principal;
use super::{fail, AuthContext};
use crate::error::ApiError;

pub async fn verify_header(
    _ctx: &AuthContext,
    _value: &str,
    audit: &mut AuditRecord,
) -> Result<Principal, ApiError> {
    audit.scheme = Some(Scheme::Token);
    Err(fail("job tokens are not enabled"))
}
