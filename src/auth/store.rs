//! The credential store: decrypted secrets and key lookups cached in memory, dropped on
//! every instance when the database's auth generation moves (polled every 250 ms), and
//! never trusted once the last successful poll is older than `MAX_STALENESS`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::model::{ApiKeyRow, CallerRow, Purpose, SecretRow};
use super::{repo, Scope};
use crate::crypto::seal::Sealer;
use crate::db::{now_millis, Db};
use crate::error::StoreError;

/// How often each instance polls the auth generation.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Cached entries are used only while the last successful poll is this recent.
pub const MAX_STALENESS: Duration = Duration::from_secs(2);
/// Upper bounds of the caches (cleared wholesale when exceeded).
const MAX_CALLERS: usize = 10_000;
const MAX_KEYS: usize = 200_000;
/// At most this many secret versions are tried per request.
pub const MAX_VERSIONS_TRIED: usize = 8;
/// `last_used_at` is written at most once a minute per credential.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
const MAX_TOUCH_ENTRIES: usize = 100_000;

/// One decrypted secret version. The plaintext is zeroized on drop.
pub struct SecretVersion {
    pub version: i32,
    pub secret: Zeroizing<String>,
    pub expires_at: Option<i64>,
    pub revoked: bool,
}

impl std::fmt::Debug for SecretVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretVersion")
            .field("version", &self.version)
            .field("secret", &"[redacted]")
            .finish()
    }
}

impl SecretVersion {
    pub fn is_active(&self, now_ms: i64) -> bool {
        !self.revoked && self.expires_at.is_none_or(|e| e > now_ms)
    }
}

/// A caller with its HMAC secrets, newest first.
#[derive(Debug)]
pub struct CallerEntry {
    pub name: String,
    pub scopes: Vec<Scope>,
    pub disabled: bool,
    pub hmac: Vec<SecretVersion>,
}

/// A webhook secret of a caller holding `stitcher:webhook`.
#[derive(Debug)]
pub struct WebhookKey {
    pub caller: String,
    pub scopes: Vec<Scope>,
    pub version: i32,
    pub key: Zeroizing<Vec<u8>>,
}

#[derive(Default)]
struct Cache {
    callers: HashMap<String, Arc<CallerEntry>>,
    keys: HashMap<String, Arc<ApiKeyRow>>,
    key_callers: HashMap<String, Arc<CallerRow>>,
    webhook: Option<Arc<Vec<WebhookKey>>>,
    token_keys: Option<Arc<Vec<super::token::TokenKey>>>,
}

pub struct CredentialStore {
    db: Db,
    sealer: Arc<Sealer>,
    cache: Mutex<Cache>,
    generation: AtomicI64,
    synced_at: Mutex<Option<Instant>>,
    touched: Mutex<HashMap<String, Instant>>,
}

fn poisoned() -> StoreError {
    StoreError::Internal("credential cache lock poisoned".into())
}

impl CredentialStore {
    pub fn new(db: Db, sealer: Arc<Sealer>) -> Self {
        CredentialStore {
            db,
            sealer,
            cache: Mutex::new(Cache::default()),
            generation: AtomicI64::new(i64::MIN),
            synced_at: Mutex::new(None),
            touched: Mutex::new(HashMap::new()),
        }
    }

    pub fn sealer(&self) -> &Arc<Sealer> {
        &self.sealer
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Drop every cached credential (after a local change, or a generation move).
    pub fn invalidate(&self) {
        if let Ok(mut c) = self.cache.lock() {
            *c = Cache::default();
        }
    }

    fn cache_usable(&self) -> bool {
        self.synced_at
            .lock()
            .ok()
            .and_then(|g| *g)
            .is_some_and(|t| t.elapsed() < MAX_STALENESS)
    }

    /// One poll: read the generation, drop the cache when it moved.
    pub async fn poll(&self) -> Result<(), StoreError> {
        let g = self.db.read(repo::generation).await?;
        if self.generation.swap(g, Ordering::AcqRel) != g {
            self.invalidate();
        }
        if let Ok(mut s) = self.synced_at.lock() {
            *s = Some(Instant::now());
        }
        Ok(())
    }

    /// Poll forever (spawned once per application instance).
    pub async fn run_poller(self: Arc<Self>) {
        let mut tick = actix_web::rt::time::interval(POLL_INTERVAL);
        loop {
            tick.tick().await;
            if let Err(e) = self.poll().await {
                log::warn!("auth generation poll failed: {e}");
            }
        }
    }

    fn open(&self, row: &SecretRow) -> Option<Zeroizing<Vec<u8>>> {
        let purpose = super::model::purpose_from_str(&row.purpose)?;
        let sealed = row.sealed();
        match self.sealer.open(purpose, &row.caller, row.version, &sealed) {
            Ok(p) => Some(p),
            Err(e) => {
                log::error!(
                    "cannot open sealed {} v{} of caller {}: {e}",
                    row.purpose,
                    row.version,
                    row.caller
                );
                None
            }
        }
    }

    fn open_string(&self, row: &SecretRow) -> Option<Zeroizing<String>> {
        let bytes = self.open(row)?;
        std::str::from_utf8(&bytes)
            .ok()
            .map(|s| Zeroizing::new(s.to_owned()))
    }

    /// The caller with its HMAC secrets; `None` when no such caller exists.
    pub async fn caller(&self, name: &str) -> Result<Option<Arc<CallerEntry>>, StoreError> {
        if self.cache_usable() {
            let c = self.cache.lock().map_err(|_| poisoned())?;
            if let Some(e) = c.callers.get(name) {
                return Ok(Some(e.clone()));
            }
        }
        let owned = name.to_owned();
        let loaded = self
            .db
            .read(move |conn| {
                let Some(caller) = repo::find_caller(conn, &owned)? else {
                    return Ok(None);
                };
                let secrets = repo::secrets_for(conn, &owned, Purpose::HmacSecret.as_str())?;
                Ok(Some((caller, secrets)))
            })
            .await?;
        let Some((caller, rows)) = loaded else {
            return Ok(None);
        };
        let entry = Arc::new(CallerEntry {
            scopes: caller.scope_list(),
            disabled: caller.disabled_at.is_some(),
            name: caller.name,
            hmac: rows
                .iter()
                .filter_map(|r| {
                    Some(SecretVersion {
                        version: r.version,
                        secret: self.open_string(r)?,
                        expires_at: r.expires_at,
                        revoked: r.revoked_at.is_some(),
                    })
                })
                .collect(),
        });
        let mut c = self.cache.lock().map_err(|_| poisoned())?;
        if c.callers.len() >= MAX_CALLERS {
            c.callers.clear();
        }
        c.callers.insert(entry.name.clone(), entry.clone());
        Ok(Some(entry))
    }

    /// An API key row and its caller by key hash; `None` when unknown.
    pub async fn api_key(
        &self,
        hash: &str,
    ) -> Result<Option<(Arc<ApiKeyRow>, Arc<CallerRow>)>, StoreError> {
        if self.cache_usable() {
            let c = self.cache.lock().map_err(|_| poisoned())?;
            if let Some(k) = c.keys.get(hash) {
                if let Some(caller) = c.key_callers.get(&k.caller) {
                    return Ok(Some((k.clone(), caller.clone())));
                }
            }
        }
        let owned = hash.to_owned();
        let loaded = self
            .db
            .read(move |conn| {
                let Some(key) = repo::find_api_key(conn, &owned)? else {
                    return Ok(None);
                };
                let caller = repo::find_caller(conn, &key.caller)?;
                Ok(caller.map(|c| (key, c)))
            })
            .await?;
        let Some((key, caller)) = loaded else {
            return Ok(None);
        };
        let (key, caller) = (Arc::new(key), Arc::new(caller));
        let mut c = self.cache.lock().map_err(|_| poisoned())?;
        if c.keys.len() >= MAX_KEYS {
            c.keys.clear();
            c.key_callers.clear();
        }
        c.keys.insert(hash.to_owned(), key.clone());
        c.key_callers.insert(caller.name.clone(), caller.clone());
        Ok(Some((key, caller)))
    }

    /// Active webhook secrets of enabled callers holding `stitcher:webhook`.
    pub async fn webhook_keys(&self) -> Result<Arc<Vec<WebhookKey>>, StoreError> {
        if self.cache_usable() {
            let c = self.cache.lock().map_err(|_| poisoned())?;
            if let Some(w) = &c.webhook {
                return Ok(w.clone());
            }
        }
        let (callers, rows) = self
            .db
            .read(|conn| {
                let callers = repo::list_callers(conn)?;
                let rows = repo::secrets_with_purpose(conn, Purpose::WebhookSecret.as_str())?;
                Ok((callers, rows))
            })
            .await?;
        let now = now_millis();
        let holders: HashMap<String, Vec<Scope>> = callers
            .into_iter()
            .filter(|c| c.disabled_at.is_none())
            .map(|c| (c.name.clone(), c.scope_list()))
            .filter(|(_, s)| s.contains(&Scope::StitcherWebhook))
            .collect();
        let keys: Vec<WebhookKey> = rows
            .iter()
            .filter(|r| r.is_active(now))
            .filter_map(|r| {
                let scopes = holders.get(&r.caller)?.clone();
                let text = self.open_string(r)?;
                let secret = crate::crypto::credential::WebhookSecret::parse(&text).ok()?;
                Some(WebhookKey {
                    caller: r.caller.clone(),
                    scopes,
                    version: r.version,
                    key: secret.key_bytes(),
                })
            })
            .collect();
        let keys = Arc::new(keys);
        let mut c = self.cache.lock().map_err(|_| poisoned())?;
        c.webhook = Some(keys.clone());
        Ok(keys)
    }

    /// The job-token signing keys, newest first.
    pub async fn token_keys(&self) -> Result<Arc<Vec<super::token::TokenKey>>, StoreError> {
        if self.cache_usable() {
            let c = self.cache.lock().map_err(|_| poisoned())?;
            if let Some(k) = &c.token_keys {
                return Ok(k.clone());
            }
        }
        let sealer = self.sealer.clone();
        let keys = Arc::new(
            self.db
                .read(move |conn| super::token::load_keys(conn, &sealer))
                .await?,
        );
        let mut c = self.cache.lock().map_err(|_| poisoned())?;
        c.token_keys = Some(keys.clone());
        Ok(keys)
    }

    /// Note that a credential was used; writes `last_used_at` at most once a minute per
    /// credential, off the request path.
    pub fn touch(&self, what: Touch) {
        let id = match &what {
            Touch::Secret {
                caller,
                purpose,
                version,
            } => format!("s:{caller}:{}:{version}", purpose.as_str()),
            Touch::ApiKey { id } => format!("k:{id}"),
        };
        {
            let Ok(mut t) = self.touched.lock() else {
                return;
            };
            if t.get(&id).is_some_and(|at| at.elapsed() < TOUCH_EVERY) {
                return;
            }
            if t.len() >= MAX_TOUCH_ENTRIES {
                t.retain(|_, at| at.elapsed() < TOUCH_EVERY);
                if t.len() >= MAX_TOUCH_ENTRIES {
                    return;
                }
            }
            t.insert(id, Instant::now());
        }
        let db = self.db.clone();
        actix_web::rt::spawn(async move {
            let now = now_millis();
            let r = db
                .write(move |conn| match what {
                    Touch::Secret {
                        caller,
                        purpose,
                        version,
                    } => repo::touch_secret(conn, &caller, purpose.as_str(), version, now),
                    Touch::ApiKey { id } => repo::touch_api_key(conn, &id, now),
                })
                .await;
            if let Err(e) = r {
                log::debug!("last_used_at not written: {e}");
            }
        });
    }
}

/// A credential whose `last_used_at` should move.
pub enum Touch {
    Secret {
        caller: String,
        purpose: Purpose,
        version: i32,
    },
    ApiKey {
        id: String,
    },
}
