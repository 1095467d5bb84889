//! The authenticated principal, handed to handlers through an extractor.

use std::future::{ready, Ready};

use actix_web::{dev::Payload, FromRequest, HttpMessage, HttpRequest};

use super::model::Scheme;
use super::Scope;
use crate::error::ApiError;
use crate::jobs::JobId;

/// Who is calling, how they proved it, and what they may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub caller: String,
    pub scheme: Scheme,
    pub scopes: Vec<Scope>,
    /// Key version (`v3`), API key display prefix, or token `jti`.
    pub key_ref: Option<String>,
    /// For job tokens: the one job this principal may touch.
    pub job_id: Option<JobId>,
}

impl Principal {
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// A job token may only touch its own job; other principals any job.
    pub fn authorize_job(&self, id: &JobId) -> Result<(), ApiError> {
        match &self.job_id {
            Some(own) if own != id => Err(ApiError::Forbidden("this token is for another job")),
            _ => Ok(()),
        }
    }
}

impl FromRequest for Principal {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        // A missing principal is an internal error, never an anonymous caller.
        ready(req.extensions().get::<Principal>().cloned().ok_or_else(|| {
            ApiError::internal(anyhow::anyhow!("route reached without a principal"))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(job: Option<&str>) -> Principal {
        Principal {
            caller: "w".into(),
            scheme: Scheme::Token,
            scopes: vec![Scope::JobsUpdate],
            key_ref: None,
            job_id: job.map(|j| JobId::parse(j, "id").expect("uuid")),
        }
    }

    #[test]
    fn tokens_touch_only_their_job() {
        let a = "0192f0c1-7c1e-7aaa-8bbb-123456789abc";
        let b = "0192f0c1-7c1e-7aaa-8bbb-123456789abd";
        let ja = JobId::parse(a, "id").expect("uuid");
        let jb = JobId::parse(b, "id").expect("uuid");
        assert!(p(Some(a)).authorize_job(&ja).is_ok());
        assert!(p(Some(a)).authorize_job(&jb).is_err());
        assert!(p(None).authorize_job(&jb).is_ok());
    }
}
