//! The authenticated principal, handed to handlers through an extractor.

use std::future::{ready, Ready};

use actix_web::{dev::Payload, FromRequest, HttpMessage, HttpRequest};

use super::model::Scheme;
use super::revocation::TokenRevoked;
use super::{fail, AuthContext, Scope};
use crate::db::now_millis;
use crate::error::ApiError;
use crate::jobs::JobId;

/// Who is calling, how they proved it, and what they may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub caller: String,
    pub scheme: Scheme,
    /// Shared with the credential cache where it comes from there.
    pub scopes: std::sync::Arc<[Scope]>,
    /// Key version (`v3`), API key display prefix, or token `jti`.
    pub key_ref: Option<std::sync::Arc<str>>,
    /// For job tokens: the one job this principal may touch.
    pub job_id: Option<JobId>,
    /// The credential it was proved with, to check again later (see [`Principal::recheck`]).
    pub held: Held,
    /// A client certificate that came with a header credential (which is `held`): the
    /// end of its validity (unix seconds, inclusive). Both were checked when the request
    /// came, and both are checked again (`None` without a certificate, and for a
    /// certificate alone, which is `held` itself).
    pub client_cert_until: Option<i64>,
}

/// The credential a principal was proved with, as much of it as checking it again
/// needs: never the secret, key or token itself.
#[derive(Clone)]
pub enum Held {
    /// A signature (HMAC or RFC 9421) under this version of the caller's secret.
    Secret { version: i32 },
    /// A Standard Webhooks signature under this version of the sender's webhook secret.
    WebhookSecret { version: i32 },
    /// An API key, by its SHA-256 (what the key table is keyed on).
    ApiKey { hash: std::sync::Arc<str> },
    /// A job token.
    Token {
        jti: String,
        attempt: i32,
        /// `exp`, seconds since the epoch.
        expires_at: i64,
        /// `iat`, seconds since the epoch: with `exp`, the lifetime a renewal keeps.
        issued_at: i64,
        /// The worker it names (`sub`), for a renewal (`auth::token::renewal_due`).
        worker: String,
        /// The version of the signing key that signed it (`kid`): retiring that key
        /// ends what the token keeps open too.
        key_version: i32,
    },
    /// The bootstrap key: valid while it is configured, which is for the process's life.
    Bootstrap,
    /// A client certificate, valid until `not_after` (unix seconds, inclusive).
    ClientCert { not_after: i64 },
}

/// How far a credential still holds ([`Principal::standing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Holds,
    /// A job token revoked only under its attempt's id, which a job change writes when
    /// the attempt ends (the job's end, a requeue, a lease expiry; an operator may too).
    /// Unexpired, its key active, its caller enabled, its own id not revoked.
    AttemptEnded,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Held::Secret { version } => write!(f, "Secret(v{version})"),
            Held::WebhookSecret { version } => write!(f, "WebhookSecret(v{version})"),
            Held::ApiKey { .. } => f.write_str("ApiKey([redacted])"),
            Held::Token { jti, .. } => write!(f, "Token({jti})"),
            Held::Bootstrap => f.write_str("Bootstrap"),
            Held::ClientCert { .. } => f.write_str("ClientCert"),
        }
    }
}

impl Principal {
    /// The attempt of the job a job token was issued for (`None` for other schemes):
    /// its writes apply only while the job is still on it (`jobs::repo::apply`).
    pub fn token_attempt(&self) -> Option<i32> {
        match self.held {
            Held::Token { attempt, .. } => Some(attempt),
            _ => None,
        }
    }

    /// Is the credential this principal was proved with still good: its caller enabled,
    /// its key, secret version or token neither revoked nor expired? For what outlives
    /// its request's authentication (an event stream, a waiting claim), so that
    /// disabling a caller or revoking a credential also ends those. Answers from the
    /// credential store and the revocation set (cached, polled every 250 ms); a store
    /// that cannot answer counts as a failure (the stream ends; the client reconnects
    /// and is authenticated afresh).
    /// Resolves once something [`Self::recheck`] reads may have changed: the credential
    /// cache was dropped (a credential changed, here or on another instance, seen by the
    /// 250 ms poll) or a token revocation new to this instance was added. A stream
    /// waiting for events waits for this too, so an idle one ends within a poll of a
    /// revocation rather than at its next keep-alive. Registered when called: a change
    /// after the call and before the first poll of the future is not missed.
    pub fn credentials_changed(ctx: &AuthContext) -> impl std::future::Future<Output = ()> + '_ {
        let dropped = ctx.store.dropped().notified();
        let added = ctx.revocations.added().notified();
        async move {
            futures_util::future::select(Box::pin(dropped), Box::pin(added)).await;
        }
    }

    pub async fn recheck(&self, ctx: &AuthContext) -> Result<(), ApiError> {
        match self.standing(ctx).await? {
            Standing::Holds => Ok(()),
            Standing::AttemptEnded => Err(fail("revoked")),
        }
    }

    /// [`Self::recheck`], telling apart a job token revoked only under its attempt's
    /// id (everything else about it holds): an event stream of its own job may then
    /// still send what led up to the job's end (`http::push`), if the job has ended on
    /// that attempt.
    pub async fn standing(&self, ctx: &AuthContext) -> Result<Standing, ApiError> {
        let caller_enabled = || async {
            match ctx.store.caller(&self.caller).await? {
                Some(c) if c.disabled => Err(fail("caller disabled")),
                Some(c) => Ok(Some(c)),
                None => Err(fail("unknown caller")),
            }
        };
        let cert_holds = |not_after: i64| async move {
            caller_enabled().await?;
            if now_millis() / 1000 > not_after {
                return Err(fail("client certificate expired"));
            }
            Ok(())
        };
        // A certificate next to a header credential: either one no longer holding ends
        // what they opened together.
        if let Some(not_after) = self.client_cert_until {
            cert_holds(not_after).await?;
        }
        let holds = match &self.held {
            Held::Bootstrap => Ok(()),
            Held::ClientCert { not_after } => cert_holds(*not_after).await,
            Held::Secret { version } => {
                let entry = caller_enabled().await?;
                let now = now_millis();
                match entry.and_then(|c| {
                    c.hmac
                        .iter()
                        .find(|s| s.version == *version)
                        .map(|s| s.is_active(now))
                }) {
                    Some(true) => Ok(()),
                    _ => Err(fail("revoked")),
                }
            }
            Held::WebhookSecret { version } => {
                caller_enabled().await?;
                let now = now_millis();
                let keys = ctx.store.webhook_keys().await?;
                let held = keys
                    .iter()
                    .any(|k| k.caller == self.caller && k.version == *version && k.is_active(now));
                if held {
                    Ok(())
                } else {
                    Err(fail("revoked"))
                }
            }
            Held::ApiKey { hash } => {
                let found = ctx
                    .store
                    .api_key(hash)
                    .await?
                    .ok_or_else(|| fail("unknown api key"))?;
                if found.key.revoked_at.is_some() {
                    return Err(fail("revoked"));
                }
                if found.key.expires_at.is_some_and(|e| e <= now_millis()) {
                    return Err(fail("expired"));
                }
                if found.caller.disabled_at.is_some() {
                    return Err(fail("caller disabled"));
                }
                Ok(())
            }
            Held::Token {
                jti,
                attempt,
                expires_at,
                key_version,
                ..
            } => {
                let now = now_millis();
                if expires_at.saturating_mul(1000) <= now {
                    return Err(fail("expired"));
                }
                // A signing key retired (its grace over, or `rotate-key --grace 0s` after
                // a leak) ends open streams as it refuses new requests (review finding,
                // 2026-12-06: a stream kept delivering).
                let keys = ctx.store.token_keys().await?;
                if !keys
                    .iter()
                    .any(|k| k.version == *key_version && k.is_active(now))
                {
                    return Err(fail("expired"));
                }
                let job = self.job_id.as_ref().map_or("", JobId::as_str);
                let ended = match ctx.revocations.token_revoked(jti, job, *attempt).await? {
                    TokenRevoked::Yes => return Err(fail("revoked")),
                    TokenRevoked::AttemptOnly => Standing::AttemptEnded,
                    TokenRevoked::No => Standing::Holds,
                };
                if self.caller != super::api_key::BOOTSTRAP_CALLER
                    || ctx.settings.bootstrap_key_hash.is_none()
                {
                    caller_enabled().await?;
                }
                return Ok(ended);
            }
        };
        holds.map(|()| Standing::Holds)
    }

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
            scopes: [Scope::JobsUpdate].into(),
            key_ref: None,
            job_id: job.map(|j| JobId::parse(j, "id").expect("uuid")),
            held: Held::Bootstrap,
            client_cert_until: None,
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
