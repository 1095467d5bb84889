//! `.env`: read from the working directory only (never a parent's), or from the file
//! named by `--env-file`. Loaded before the command line is parsed, since clap reads
//! the environment while parsing; never overrides a variable that is already set.
//!
//! A file that another user could have written is refused: one that is group- or
//! world-writable, or not owned by the user running the command.

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
    check_trusted(&path)
        .map_err(|why| ConfigError(format!("refusing {}: {why}", shown.display())))?;
    dotenvy::from_path(&path).map_err(|e| match e {
        dotenvy::Error::LineParse(line, index) => ConfigError(format!(
            "cannot parse {} at `{line}` (position {index})",
            shown.display()
        )),
        other => ConfigError(format!("cannot read {}: {other}", shown.display())),
    })?;
    Ok(Some(shown))
}

/// A file we may take settings from: a regular file (after following a symlink) that
/// only its owner can write, and that owner is us.
fn check_trusted(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
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
}
