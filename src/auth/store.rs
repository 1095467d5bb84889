//! The credential store: decrypted secrets and key lookups cached in memory, dropped on
//! every instance when the database's auth generation moves (polled every 250 ms), and
//! never trusted once the last successful poll is older than `MAX_STALENESS`.
//!
//! The generation is a counter the database increments under a row lock in the same
//! transaction as the credential change, so its order is commit order and no clock is
//! involved. Each entry is tagged with the generation read (before its rows) in the
//! same database round trip, and inserted only if the cache is still at that
//! generation: a change that lands between the read and the insert can never stay
//! cached. Each entry also carries its expiry (the earliest expiry of what it holds)
//! and is not used from then on, so an expired secret or key stops working at its
//! `expires_at` even while cached.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::model::{ApiKeyRow, CallerRow, Purpose, SecretRow};
use super::{repo, Scope};
use crate::crypto::seal::Sealer;
use crate::db::{now_millis, Db, DbConnection};
use crate::error::StoreError;

/// How often each instance polls the auth generation.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Cached entries are used only while the last successful poll is this recent.
pub const MAX_STALENESS: Duration = Duration::from_secs(2);
/// Upper bounds of the caches (cleared wholesale when exceeded).
const MAX_CALLERS: usize = 10_000;
const MAX_KEYS: usize = 200_000;
/// The directory is kept while it lists at most this many callers and as many keys.
const MAX_DIRECTORY: usize = 200_000;
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
    /// Shared with each request's audit record and last-used note (no copy per request).
    pub name: Arc<str>,
    pub scopes: Arc<[Scope]>,
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
    pub expires_at: Option<i64>,
}

impl WebhookKey {
    /// Not past its expiry (checked at each use, cached or not).
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.expires_at.is_none_or(|e| e > now_ms)
    }
}

/// A cached value and the moment (unix ms) from which it must not be used.
struct Entry<T> {
    value: T,
    valid_until: Option<i64>,
}

impl<T: Clone> Entry<T> {
    fn get(&self, now_ms: i64) -> Option<T> {
        self.valid_until
            .is_none_or(|u| now_ms < u)
            .then(|| self.value.clone())
    }
}

/// The earliest future expiry among these (the moment a cached entry goes stale).
fn earliest(expiries: impl IntoIterator<Item = Option<i64>>, now_ms: i64) -> Option<i64> {
    expiries.into_iter().flatten().filter(|e| *e > now_ms).min()
}

/// An API key with its caller, and the key's effective scopes (its own, limited to
/// what the caller holds; unknown names dropped), worked out once when read, as are
/// the shared copies of the row's texts each request hands on (its principal, audit
/// record and last-used note): cloning those is a count, not an allocation.
#[derive(Clone)]
pub struct KeyAndCaller {
    pub key: Arc<ApiKeyRow>,
    pub caller: Arc<CallerRow>,
    pub scopes: Arc<[Scope]>,
    /// `key.caller`.
    pub caller_name: Arc<str>,
    /// `key.display_prefix`.
    pub display_prefix: Arc<str>,
    /// `key.key_hash`.
    pub hash: Arc<str>,
    /// `key.id`.
    pub id: Arc<str>,
}

impl KeyAndCaller {
    fn new(key: ApiKeyRow, caller: CallerRow) -> Self {
        let held = caller.scope_list();
        let scopes = key
            .scopes
            .split(',')
            .filter_map(Scope::parse)
            .filter(|s| held.contains(s))
            .collect();
        KeyAndCaller {
            caller_name: key.caller.as_str().into(),
            display_prefix: key.display_prefix.as_str().into(),
            hash: key.key_hash.as_str().into(),
            id: key.id.as_str().into(),
            key: Arc::new(key),
            caller: Arc::new(caller),
            scopes,
        }
    }
}

/// Every caller name and API-key hash there was at the cache's generation (read after
/// it, so perhaps a few more). One missing from it did not exist then, so a request
/// from a blocked address naming it is refused without a database read
/// ([`CredentialStore::surely_unknown`]).
enum Directory {
    NotRead,
    Read {
        callers: HashSet<Box<str>>,
        keys: HashSet<Box<str>>,
    },
    /// More than `MAX_DIRECTORY` of either: lookups decide, as without a directory.
    TooLarge,
}

/// A caller name or an API key's hash (hex), as [`CredentialStore::surely_unknown`]
/// looks it up.
#[derive(Clone, Copy)]
pub enum Lookup<'a> {
    Caller(&'a str),
    ApiKey(&'a str),
}

struct Cache {
    /// The auth generation every entry was read at; `i64::MIN` until the first poll
    /// (and after a local invalidation), when nothing is cached.
    generation: i64,
    directory: Directory,
    callers: HashMap<String, Entry<Arc<CallerEntry>>>,
    keys: HashMap<String, Entry<KeyAndCaller>>,
    webhook: Option<Entry<Arc<Vec<WebhookKey>>>>,
    token_keys: Option<Entry<Arc<Vec<super::token::TokenKey>>>>,
}

impl Cache {
    fn empty(generation: i64) -> Self {
        Cache {
            generation,
            directory: Directory::NotRead,
            callers: HashMap::new(),
            keys: HashMap::new(),
            webhook: None,
            token_keys: None,
        }
    }
}

/// What one database round trip read, with the auth generation read before it.
pub struct Fetched<T> {
    pub generation: i64,
    pub value: T,
}

pub struct CredentialStore {
    db: Db,
    sealer: Arc<Sealer>,
    cache: Mutex<Cache>,
    synced_at: Mutex<Option<Instant>>,
    touched: Mutex<HashMap<Touch, Instant>>,
    /// When each caller's entry was last re-read because a request named a key version
    /// the cache did not know (at most once per `REREAD_EVERY` per caller).
    reread: Mutex<HashMap<String, Instant>>,
    /// When the token-signing keys were last re-read because a token named a version
    /// newer than any cached (at most once per `REREAD_EVERY`).
    keys_reread: Mutex<Option<Instant>>,
    /// Database reads of one caller or one API key so far (a cache miss each).
    lookups: AtomicU64,
    /// Woken when the cache is dropped (a poll saw a new generation, or a local
    /// change): open streams check their credential again then.
    dropped: tokio::sync::Notify,
    /// When the last read of the generation for a directory miss started, and what it
    /// read ([`Self::surely_unknown`]).
    confirmed: tokio::sync::Mutex<Option<(Instant, i64)>>,
}

/// Directory misses read the generation at most this often (shared by all of them).
const CONFIRM_EVERY: Duration = Duration::from_millis(20);

/// A known caller's secrets are re-read at most this often on an unknown key version,
/// so "rotate, then use" works at once on every instance without letting
/// unauthenticated requests drive database reads.
const REREAD_EVERY: Duration = Duration::from_secs(1);

fn poisoned<T>(e: std::sync::PoisonError<T>) -> StoreError {
    StoreError::Internal(format!("credential cache lock: {e}"))
}

impl CredentialStore {
    pub fn new(db: Db, sealer: Arc<Sealer>) -> Self {
        CredentialStore {
            db,
            sealer,
            cache: Mutex::new(Cache::empty(i64::MIN)),
            synced_at: Mutex::new(None),
            touched: Mutex::new(HashMap::new()),
            reread: Mutex::new(HashMap::new()),
            keys_reread: Mutex::new(None),
            lookups: AtomicU64::new(0),
            dropped: tokio::sync::Notify::new(),
            confirmed: tokio::sync::Mutex::new(None),
        }
    }

    /// Woken each time the cache is dropped, after the change that dropped it.
    pub fn dropped(&self) -> &tokio::sync::Notify {
        &self.dropped
    }

    /// Database reads of one caller or one API key so far.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// Whether a lookup of this caller or key would surely find nothing: it is not
    /// cached, the directory read at the cache's generation lacks it, and the
    /// generation has not moved since (a credential created since, on any instance or
    /// by the CLI, moved it: then a lookup decides, so a new credential is never
    /// refused for the directory's age; review, 2026-12-06). That last check is one
    /// read of the generation shared by every miss that arrived before it started, at
    /// most one per `CONFIRM_EVERY`: a miss waits for the next such read, so misses
    /// cost the database at most 50 reads a second however many arrive. `false` when
    /// there is no current directory: only a lookup can tell then.
    pub async fn surely_unknown(&self, what: Lookup<'_>) -> bool {
        let Some(generation) = self.directory_lacks(what) else {
            return false;
        };
        let arrived = Instant::now();
        let mut last = self.confirmed.lock().await;
        match *last {
            // A read that started after this miss arrived answers for it too.
            Some((started, read)) if started >= arrived => return read == generation,
            Some((started, _)) => {
                actix_web::rt::time::sleep_until((started + CONFIRM_EVERY).into()).await;
            }
            None => {}
        }
        let started = Instant::now();
        match self.db.read(repo::generation).await {
            Ok(read) => {
                *last = Some((started, read));
                read == generation
            }
            // The database cannot say: nor could a lookup, which then answers 503.
            Err(_) => false,
        }
    }

    /// The cache's generation, when its directory lacks `what` and no entry holds it.
    fn directory_lacks(&self, what: Lookup<'_>) -> Option<i64> {
        if !self.cache_usable() {
            return None;
        }
        let c = self.cache.lock().ok()?;
        let Directory::Read { callers, keys } = &c.directory else {
            return None;
        };
        let lacks = match what {
            Lookup::Caller(name) => !c.callers.contains_key(name) && !callers.contains(name),
            Lookup::ApiKey(hash) => !c.keys.contains_key(hash) && !keys.contains(hash),
        };
        lacks.then_some(c.generation)
    }

    pub fn sealer(&self) -> &Arc<Sealer> {
        &self.sealer
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Drop every cached credential (after a local change). Nothing is cached again
    /// until the next poll has read the generation that change produced.
    pub fn invalidate(&self) {
        if let Ok(mut c) = self.cache.lock() {
            *c = Cache::empty(i64::MIN);
        }
        self.dropped.notify_waiters();
    }

    fn cache_usable(&self) -> bool {
        self.synced_at
            .lock()
            .ok()
            .and_then(|g| *g)
            .is_some_and(|t| t.elapsed() < MAX_STALENESS)
    }

    /// A cache hit, if the cache is current and the entry has not expired.
    fn cached<T>(&self, get: impl FnOnce(&Cache) -> Option<T>) -> Result<Option<T>, StoreError> {
        if !self.cache_usable() {
            return Ok(None);
        }
        let c = self.cache.lock().map_err(poisoned)?;
        Ok(get(&c))
    }

    /// Run `f` after reading the auth generation, in one database round trip.
    async fn fetch<T, F>(&self, f: F) -> Result<Fetched<T>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    {
        self.db
            .read(move |conn| {
                let generation = repo::generation(conn)?;
                let value = f(conn)?;
                Ok(Fetched { generation, value })
            })
            .await
    }

    /// Insert what was read at `generation`, only if the cache is still at it (a poll
    /// that saw a newer generation has emptied the cache, and this read may predate
    /// the change). Returns whether it was inserted.
    fn admit(&self, generation: i64, put: impl FnOnce(&mut Cache)) -> Result<bool, StoreError> {
        let mut c = self.cache.lock().map_err(poisoned)?;
        if c.generation != generation || generation == i64::MIN {
            return Ok(false);
        }
        put(&mut c);
        Ok(true)
    }

    /// One poll: read the generation, drop the cache when it moved, and read the
    /// directory of the new generation.
    pub async fn poll(&self) -> Result<(), StoreError> {
        // Current as of the moment the generation was asked for (on the connection,
        // after any wait for one), not the moment the answer came: an answer held up on
        // its way back (a congested or hostile path from the database) must not make a
        // cache that old usable for another `MAX_STALENESS` (third security review,
        // 2026-12-07: an API key revoked while the answer was on its way was accepted
        // again).
        let (asked, g) = self
            .db
            .read(|conn| Ok((Instant::now(), repo::generation(conn)?)))
            .await?;
        let (moved, unread) = {
            let mut c = self.cache.lock().map_err(poisoned)?;
            let moved = c.generation != g;
            if moved {
                *c = Cache::empty(g);
            }
            (moved, matches!(c.directory, Directory::NotRead))
        };
        if moved {
            self.dropped.notify_waiters();
        }
        if let Ok(mut s) = self.synced_at.lock() {
            *s = Some(asked);
        }
        if unread {
            self.read_directory().await?;
        }
        Ok(())
    }

    /// Every caller name and key hash, kept if the cache is still at the generation
    /// read with them.
    async fn read_directory(&self) -> Result<(), StoreError> {
        let limit = i64::try_from(MAX_DIRECTORY + 1).unwrap_or(i64::MAX);
        let fetched = self.fetch(move |conn| repo::directory(conn, limit)).await?;
        let (names, hashes) = fetched.value;
        let directory = if names.len() > MAX_DIRECTORY || hashes.len() > MAX_DIRECTORY {
            log::warn!(
                "more than {MAX_DIRECTORY} callers or API keys: unknown ones from blocked \
                 addresses are looked up one by one"
            );
            Directory::TooLarge
        } else {
            Directory::Read {
                callers: names.into_iter().map(String::into_boxed_str).collect(),
                keys: hashes.into_iter().map(String::into_boxed_str).collect(),
            }
        };
        self.admit(fetched.generation, |c| c.directory = directory)?;
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
    /// The caller read again from the database, bypassing the cache, when a request
    /// named a key version its cached entry lacks (a secret rotated on another instance
    /// moments ago). `None` when a re-read for this caller happened within
    /// `REREAD_EVERY` (the caller of this function then refuses the request as before).
    pub async fn caller_reread(&self, name: &str) -> Result<Option<Arc<CallerEntry>>, StoreError> {
        {
            let mut r = self.reread.lock().map_err(poisoned)?;
            if r.get(name).is_some_and(|t| t.elapsed() < REREAD_EVERY) {
                return Ok(None);
            }
            if r.len() >= MAX_CALLERS {
                r.retain(|_, t| t.elapsed() < REREAD_EVERY);
            }
            if r.len() >= MAX_CALLERS {
                return Ok(None);
            }
            r.insert(name.to_owned(), Instant::now());
        }
        if let Ok(mut c) = self.cache.lock() {
            c.callers.remove(name);
        }
        self.caller(name).await
    }

    pub async fn caller(&self, name: &str) -> Result<Option<Arc<CallerEntry>>, StoreError> {
        let now = now_millis();
        if let Some(e) = self.cached(|c| c.callers.get(name).and_then(|e| e.get(now)))? {
            return Ok(Some(e));
        }
        let owned = name.to_owned();
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let fetched = self
            .fetch(move |conn| {
                let Some(caller) = repo::find_caller(conn, &owned)? else {
                    return Ok(None);
                };
                let secrets = repo::secrets_for(conn, &owned, Purpose::HmacSecret.as_str())?;
                Ok(Some((caller, secrets)))
            })
            .await?;
        let Some((caller, rows)) = fetched.value else {
            return Ok(None);
        };
        let entry = Arc::new(CallerEntry {
            scopes: caller.scope_list().into(),
            disabled: caller.disabled_at.is_some(),
            name: caller.name.into(),
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
        let valid_until = earliest(entry.hmac.iter().map(|s| s.expires_at), now_millis());
        let cached = Entry {
            value: entry.clone(),
            valid_until,
        };
        self.admit(fetched.generation, |c| {
            if c.callers.len() >= MAX_CALLERS {
                c.callers.clear();
            }
            c.callers.insert(entry.name.to_string(), cached);
        })?;
        Ok(Some(entry))
    }

    /// An API key row and its caller by key hash; `None` when unknown.
    /// The cached entry of an API key, if there is one (no database read).
    pub fn cached_api_key(&self, hash: &str) -> Result<Option<KeyAndCaller>, StoreError> {
        let now = now_millis();
        self.cached(|c| c.keys.get(hash).and_then(|e| e.get(now)))
    }

    pub async fn api_key(&self, hash: &str) -> Result<Option<KeyAndCaller>, StoreError> {
        if let Some(k) = self.cached_api_key(hash)? {
            return Ok(Some(k));
        }
        let fetched = self.fetch_api_key(hash).await?;
        self.admit_api_key(hash, &fetched)?;
        Ok(fetched.value)
    }

    /// The database half of [`Self::api_key`] (public so the race with a revocation
    /// can be tested).
    pub async fn fetch_api_key(
        &self,
        hash: &str,
    ) -> Result<Fetched<Option<KeyAndCaller>>, StoreError> {
        let owned = hash.to_owned();
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let fetched = self
            .fetch(move |conn| {
                let Some(key) = repo::find_api_key(conn, &owned)? else {
                    return Ok(None);
                };
                let caller = repo::find_caller(conn, &key.caller)?;
                Ok(caller.map(|c| (key, c)))
            })
            .await?;
        Ok(Fetched {
            generation: fetched.generation,
            value: fetched.value.map(|(k, c)| KeyAndCaller::new(k, c)),
        })
    }

    /// The cache half of [`Self::api_key`]: inserted only if the generation read with
    /// it is still current. Returns whether it was inserted.
    pub fn admit_api_key(
        &self,
        hash: &str,
        fetched: &Fetched<Option<KeyAndCaller>>,
    ) -> Result<bool, StoreError> {
        let Some(found) = &fetched.value else {
            return Ok(false);
        };
        let entry = Entry {
            value: found.clone(),
            valid_until: earliest([found.key.expires_at], now_millis()),
        };
        self.admit(fetched.generation, |c| {
            if c.keys.len() >= MAX_KEYS {
                c.keys.clear();
            }
            c.keys.insert(hash.to_owned(), entry);
        })
    }

    /// Active webhook secrets of enabled callers holding `stitcher:webhook`.
    pub async fn webhook_keys(&self) -> Result<Arc<Vec<WebhookKey>>, StoreError> {
        let now = now_millis();
        if let Some(w) = self.cached(|c| c.webhook.as_ref().and_then(|e| e.get(now)))? {
            return Ok(w);
        }
        let fetched = self
            .fetch(|conn| {
                let callers = repo::list_callers(conn)?;
                let rows = repo::secrets_with_purpose(conn, Purpose::WebhookSecret.as_str())?;
                Ok((callers, rows))
            })
            .await?;
        let (callers, rows) = fetched.value;
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
                    expires_at: r.expires_at,
                })
            })
            .collect();
        let valid_until = earliest(keys.iter().map(|k| k.expires_at), now);
        let keys = Arc::new(keys);
        let entry = Entry {
            value: keys.clone(),
            valid_until,
        };
        self.admit(fetched.generation, |c| c.webhook = Some(entry))?;
        Ok(keys)
    }

    /// The token-signing keys read again from the database, bypassing the cache, when a
    /// token names a version newer than any cached: a key rotated moments ago (by
    /// `token rotate-key`), whose tokens another instance or `token issue` already
    /// hands out. `None` when a re-read happened within `REREAD_EVERY` (the token is
    /// then refused as before), so made-up versions cannot drive database reads.
    pub async fn token_keys_reread(
        &self,
    ) -> Result<Option<Arc<Vec<super::token::TokenKey>>>, StoreError> {
        {
            let mut last = self.keys_reread.lock().map_err(poisoned)?;
            if last.is_some_and(|t| t.elapsed() < REREAD_EVERY) {
                return Ok(None);
            }
            *last = Some(Instant::now());
        }
        if let Ok(mut c) = self.cache.lock() {
            c.token_keys = None;
        }
        self.token_keys().await.map(Some)
    }

    /// The job-token signing keys, newest first.
    pub async fn token_keys(&self) -> Result<Arc<Vec<super::token::TokenKey>>, StoreError> {
        let now = now_millis();
        if let Some(k) = self.cached(|c| c.token_keys.as_ref().and_then(|e| e.get(now)))? {
            return Ok(k);
        }
        let sealer = self.sealer.clone();
        let fetched = self
            .fetch(move |conn| super::token::load_keys(conn, &sealer))
            .await?;
        let keys = Arc::new(fetched.value);
        let entry = Entry {
            value: keys.clone(),
            valid_until: earliest(keys.iter().map(|k| k.expires_at), now_millis()),
        };
        self.admit(fetched.generation, |c| c.token_keys = Some(entry))?;
        Ok(keys)
    }

    /// Note that a credential was used; writes `last_used_at` at most once a minute per
    /// credential, off the request path.
    pub fn touch(&self, what: Touch) {
        {
            let Ok(mut t) = self.touched.lock() else {
                return;
            };
            if t.get(&what).is_some_and(|at| at.elapsed() < TOUCH_EVERY) {
                return;
            }
            if t.len() >= MAX_TOUCH_ENTRIES {
                t.retain(|_, at| at.elapsed() < TOUCH_EVERY);
                if t.len() >= MAX_TOUCH_ENTRIES {
                    return;
                }
            }
            t.insert(what.clone(), Instant::now());
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

/// A credential whose `last_used_at` should move (also the key of the once-a-minute
/// map, so the common case, a recent touch, allocates nothing).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Touch {
    Secret {
        caller: Arc<str>,
        purpose: Purpose,
        version: i32,
    },
    ApiKey {
        id: Arc<str>,
    },
}
