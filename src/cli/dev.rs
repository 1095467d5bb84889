//! `serve --dev`: a bootstrap caller `dev` with every scope and one credential of each
//! kind, printed once (when created) as `KEY=value` lines and written to
//! `./.coordinator/dev-credentials.env` (0600). `sign` and `call` read the same variables.

use std::path::{Path, PathBuf};

use crate::auth::credentials::{self, SecretKind};
use crate::auth::Scope;
use crate::crypto::seal::Sealer;
use crate::db::Db;
use crate::error::StoreError;

pub const DEV_CALLER: &str = "dev";

pub fn credentials_path() -> PathBuf {
    crate::config::Config::dev_dir().join("dev-credentials.env")
}

/// Hold `./.coordinator/serve.lock` for the life of this `serve --dev`. A second one in
/// the same directory is refused: it would share the database with the first and point
/// `dev-credentials.env` at its own address, which stays there after it stops, so
/// `call` and `jobs` would go to a port nobody listens on while the first still runs.
/// The kernel drops the lock when the process ends, however it ends.
pub fn lock_dev_dir() -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = crate::config::Config::dev_dir().join("serve.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let url = std::fs::read_to_string(credentials_path())
                .ok()
                .and_then(|text| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("COORDINATOR_URL=").map(str::to_owned))
                })
                .map(|url| format!(" at {url}"))
                .unwrap_or_default();
            Err(anyhow::anyhow!(
                "another `coordinator serve --dev` is running in this directory{url}: \
                 use that one, or stop it first (one dev server per directory; run \
                 another one in another directory)"
            ))
        }
        Err(e) => Err(anyhow::anyhow!("cannot lock {}: {e}", path.display())),
    }
}

/// Create the dev caller and its credentials unless they exist. Returns the lines of
/// the credentials file when they were created just now (to be shown once), `None`
/// when they existed already (they are in `file`, not shown again).
pub fn ensure_dev_caller(
    db: &Db,
    sealer: &Sealer,
    url: &str,
    file: &Path,
) -> anyhow::Result<Option<String>> {
    let exists = db
        .write_sync(|conn| crate::auth::repo::find_caller(conn, DEV_CALLER))?
        .is_some();
    if exists && file.exists() {
        return Ok(None);
    }
    if !exists {
        credentials::add_caller(db, DEV_CALLER, &Scope::ALL)?;
    }
    // With the caller there but its file gone, the file was the only copy of the old
    // credentials: the new ones end them (grace 0) instead of piling up beside them,
    // where after eight starts the limit on active secret versions stopped `serve --dev`.
    let grace = exists.then_some(std::time::Duration::ZERO);
    let hmac = credentials::add_secret(db, sealer, DEV_CALLER, SecretKind::Hmac, grace, None)?;
    let webhook =
        credentials::add_secret(db, sealer, DEV_CALLER, SecretKind::Webhook, grace, None)?;
    if exists {
        let now = crate::db::now_millis();
        for old in credentials::list_keys(db, Some(DEV_CALLER))? {
            if old.revoked_at.is_none() && old.expires_at.is_none_or(|t| t > now) {
                credentials::revoke_key(db, &old.id)?;
            }
        }
    }
    let key = credentials::issue_key(db, DEV_CALLER, None, None)
        .map_err(|e: StoreError| anyhow::anyhow!(e))?;
    let text = format!(
        "COORDINATOR_URL={url}\nCOORDINATOR_CALLER={DEV_CALLER}\nCOORDINATOR_CLIENT_API_KEY={}\nCOORDINATOR_HMAC_SECRET={}\nCOORDINATOR_WEBHOOK_SECRET={}\n",
        key.key.expose_secret(),
        hmac.plaintext.as_str(),
        webhook.plaintext.as_str(),
    );
    crate::config::write_private(file, text.as_bytes())?;
    Ok(Some(text))
}
