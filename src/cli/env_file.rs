//! `.env`: read from the working directory only (never a parent's), or from the file
//! named by `--env-file`. Loaded before the command line is parsed, since clap reads
//! the environment while parsing; never overrides a variable that is already set (for
//! an explicit `--env-file`, a different value in the environment is named on stderr).
//!
//! A file that another user could have written is refused: one that is group- or
//! world-writable, or not owned by the user running the command. So is one that sets a
//! variable twice (a shell sourcing it would take the other value). One that holds a
//! secret and that other users can read is used, with a warning.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::config::ConfigError;

/// The flag naming an explicit file.
pub const FLAG: &str = "--env-file";

/// The `--env-file` value on the command line, found before clap parses it (the file
/// has to be loaded first). Stops at `--`. `main` checks afterwards that clap saw the
/// same value, so an `--env-file` that was really another option's value is refused.
pub fn requested(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy();
        if text == "--" {
            break;
        }
        if text == FLAG {
            return iter.next().map(PathBuf::from);
        }
        if let Some(value) = text.strip_prefix("--env-file=") {
            return Some(PathBuf::from(value));
        }
    }
    None
}

/// Load `explicit`, or `./.env` when it exists. Returns the file loaded, if any; the
/// caller says so on stderr.
pub fn load(explicit: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let p = PathBuf::from(".env");
            match std::fs::symlink_metadata(&p) {
                Ok(_) => p,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(ConfigError(format!("cannot read ./.env: {e}"))),
            }
        }
    };
    let shown = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
    let refused = |why: String| ConfigError(format!("refusing {}: {why}", shown.display()));
    // One open file for the checks and the text: checked by path and then read by path,
    // the file could be swapped in between by whoever can write its directory.
    let mut file = open_no_wait(&path).map_err(|e| refused(e.to_string()))?;
    let meta = file.metadata().map_err(|e| refused(e.to_string()))?;
    check_trusted(&meta).map_err(refused)?;
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    std::io::Read::read_to_end(&mut file, &mut bytes)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", shown.display())))?;
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let parse_error = |e: dotenvy::Error| parse_error_in(body, &shown, e);
    let entries = dotenvy::from_read_iter(body)
        .collect::<Result<Vec<(String, String)>, _>>()
        .map_err(parse_error)?;
    let entries: Vec<(String, zeroize::Zeroizing<String>)> = entries
        .into_iter()
        .map(|(k, v)| (k, zeroize::Zeroizing::new(v)))
        .collect();
    refuse_duplicates(&entries).map_err(|name| {
        ConfigError(format!(
            "{}: {name} is set more than once; which value counts would differ between \
             a shell sourcing the file (the last) and a reader taking the first, so keep \
             only one",
            shown.display()
        ))
    })?;
    warn_if_readable(&meta, &shown, &entries);
    if explicit.is_some() {
        warn_overridden(&shown, &entries);
    }
    dotenvy::from_read(body).map_err(parse_error)?;
    Ok(Some(shown))
}

/// Open `path` for reading without waiting: a FIFO or a device opened plainly would
/// block until something writes to it, before its type could be checked.
fn open_no_wait(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut opts, libc::O_NONBLOCK);
    opts.open(path)
}

/// A dotenvy error for the file at `path` (named `shown`), without its text: dotenvy's
/// error holds the text it failed on, which may be a secret, so name the line and its
/// variable instead.
pub(crate) fn parse_error(path: &Path, shown: &Path, e: dotenvy::Error) -> ConfigError {
    // Secrets, likely: wiped when dropped.
    let text = zeroize::Zeroizing::new(std::fs::read(path).unwrap_or_default());
    parse_error_in(&text, shown, e)
}

/// [`parse_error`] for a file whose text is `text`.
fn parse_error_in(text: &[u8], shown: &Path, e: dotenvy::Error) -> ConfigError {
    match e {
        dotenvy::Error::LineParse(..) => ConfigError(format!(
            "cannot parse {}{} (values are not shown)",
            shown.display(),
            first_bad_line(text).map_or_else(String::new, |(n, name)| match name {
                Some(name) => format!(": line {n} ({name})"),
                None => format!(": line {n}"),
            })
        )),
        other => ConfigError(format!("cannot read {}: {other}", shown.display())),
    }
}

/// The first variable the file sets twice. dotenvy takes the first value, a shell's
/// `. file` the last: one file, two meanings.
fn refuse_duplicates<V>(entries: &[(String, V)]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    match entries.iter().find(|(name, _)| !seen.insert(name.as_str())) {
        Some((name, _)) => Err(name.clone()),
        None => Ok(()),
    }
}

/// Variables whose value is a secret (beside a `DATABASE_URL` with a password).
const SECRET_VARS: [&str; 6] = [
    "COORDINATOR_MASTER_KEY",
    "COORDINATOR_MASTER_KEY_PREVIOUS",
    "COORDINATOR_API_KEY",
    super::client::VAR_API_KEY,
    super::client::VAR_HMAC_SECRET,
    "COORDINATOR_WEBHOOK_SECRET",
];

/// Does this variable hold a secret: one of [`SECRET_VARS`], or a database URL with a
/// password (`user:password@` or `password=`)?
fn holds_secret(name: &str, value: &str) -> bool {
    if SECRET_VARS.contains(&name) {
        return !value.trim().is_empty();
    }
    if name != "DATABASE_URL" {
        return false;
    }
    let rest = value.split_once("://").map_or(value, |(_, r)| r);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or_default();
    let in_userinfo = authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.split_once(':').is_some_and(|(_, p)| !p.is_empty()));
    in_userinfo
        || query
            .split('&')
            .any(|pair| pair.to_ascii_lowercase().starts_with("password="))
}

/// A file with secrets that other users can read: one line on stderr, as for a
/// readable `COORDINATOR_MASTER_KEY_FILE` (write access is refused above).
fn warn_if_readable<V: AsRef<str>>(
    meta: &std::fs::Metadata,
    shown: &Path,
    entries: &[(String, V)],
) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let mode = meta.mode() & 0o7777;
        if mode & 0o044 == 0 {
            return;
        }
        if let Some((name, _)) = entries.iter().find(|(k, v)| holds_secret(k, v.as_ref())) {
            eprintln!(
                "coordinator: warning: {} holds a secret ({name}) and is readable by other \
                 users (mode {mode:04o}); chmod 600 it",
                shown.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (meta, shown, entries);
}

/// Variables of an explicit `--env-file` that the environment sets to something else:
/// the environment wins, so say so, once per variable, naming it (never a value).
fn warn_overridden<V: AsRef<str>>(shown: &Path, entries: &[(String, V)]) {
    for (name, value) in entries {
        if let Some(set) = std::env::var_os(name) {
            if set != std::ffi::OsStr::new(value.as_ref()) {
                eprintln!(
                    "coordinator: warning: {name} is set in the environment, which wins over \
                     its different value in {}",
                    shown.display()
                );
            }
        }
    }
}

/// The first line of the file that does not parse on its own, and the variable it
/// sets: where the file's parse error most likely is (a quoted value over several lines
/// is valid in the file but not line by line, so this is looked up only once the file
/// as a whole failed).
fn first_bad_line(text: &[u8]) -> Option<(usize, Option<String>)> {
    let text = std::str::from_utf8(text).ok()?;
    text.lines().enumerate().find_map(|(i, line)| {
        let bad = dotenvy::from_read_iter(line.as_bytes()).any(|item| item.is_err());
        bad.then(|| (i + 1, variable_of(line).map(str::to_owned)))
    })
}

/// The variable a line that failed to parse sets, when its name is plain; never any of
/// the value, which is likely a secret.
fn variable_of(line: &str) -> Option<&str> {
    let line = line.trim_start();
    let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
    let (name, _) = line.split_once('=')?;
    let name = name.trim_end();
    // Upper case, digits and `_`, as every variable this reads: a line without a name
    // may start with a (base64) value, which has lower case letters.
    let plain = name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_uppercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    plain.then_some(name)
}

/// A file we may take settings from (`meta` of the open file): a regular file (after
/// following a symlink) that only its owner can write, and that owner is us.
fn check_trusted(meta: &std::fs::Metadata) -> Result<(), String> {
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(format!(
                "it is writable by other users (mode {mode:04o}); chmod go-w it"
            ));
        }
        if let Some(uid) = crate::config::current_uid() {
            if meta.uid() != uid {
                return Err(format!(
                    "it is owned by uid {}, not by the user running this command (uid {uid})",
                    meta.uid()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        std::iter::once("coordinator")
            .chain(list.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn finds_the_flag_in_both_forms() {
        assert_eq!(requested(&args(&["serve"])), None);
        assert_eq!(
            requested(&args(&["--env-file", "a.env", "serve"])),
            Some(PathBuf::from("a.env"))
        );
        assert_eq!(
            requested(&args(&["serve", "--env-file=b.env"])),
            Some(PathBuf::from("b.env"))
        );
        assert_eq!(requested(&args(&["call", "--", "--env-file", "x"])), None);
        assert_eq!(requested(&args(&["serve", "--env-file"])), None);
    }

    #[test]
    fn a_line_that_does_not_parse_is_named_by_its_variable_never_its_value() {
        let dir = tempfile::tempdir().expect("dir");
        let secret = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=";
        for (text, name) in [
            (
                format!("COORD_TEST_UNSET_A=\"{secret}\n"),
                Some("COORD_TEST_UNSET_A"),
            ),
            (
                format!("export COORD_TEST_UNSET_B={secret} x y\n"),
                Some("COORD_TEST_UNSET_B"),
            ),
            (
                format!("COORD_TEST_UNSET_C='{secret}\\'\n"),
                Some("COORD_TEST_UNSET_C"),
            ),
            (format!("{secret} no name\n"), None),
        ] {
            let path = dir.path().join("bad.env");
            std::fs::write(&path, format!("# settings\n{text}")).expect("write");
            let Err(ConfigError(msg)) = load(Some(&path)) else {
                panic!("parsed: {text}");
            };
            assert!(msg.starts_with("cannot parse "), "{msg}");
            assert!(!msg.contains(&secret[..12]), "the value shown: {msg}");
            match name {
                Some(n) => assert!(msg.contains(&format!(": line 2 ({n})")), "{msg}"),
                None => assert!(msg.contains(": line 2 (values"), "{msg}"),
            }
        }
        assert_eq!(variable_of("  export  A_1 = x"), Some("A_1"));
        assert_eq!(variable_of("A-B=x"), None);
        assert_eq!(variable_of("abcDEF0="), None);
        assert_eq!(variable_of("no equals sign"), None);
    }

    /// The file is opened before its type is checked (checks and text come from one
    /// open file), so the open must not wait: a FIFO opened plainly blocks until a
    /// writer comes.
    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("fifo.env");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(load(Some(&path)).map_err(|ConfigError(m)| m));
        });
        let answer = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("load waited for a writer");
        let Err(msg) = answer else {
            panic!("a FIFO was loaded")
        };
        assert!(msg.contains("not a regular file"), "{msg}");
    }
}
