//! Configuration: `.env.example` lists exactly the variables the command line knows,
//! with their defaults, and bad values end the real binary with one line and exit
//! code 2 before anything is started or written.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic on a missing value or an out-of-range index is the failed assertion"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use clap::{CommandFactory, Parser};
use coordinator::cli::Cli;

const BIN: &str = env!("CARGO_BIN_EXE_coordinator");

/// Variables `.env.example` documents that are not clap arguments: the log filter, and
/// the client-side variables `sign` and `call` read (also written by `serve --dev`).
const NOT_CLAP: &[&str] = &[
    "RUST_LOG",
    "COORDINATOR_URL",
    "COORDINATOR_CALLER",
    "COORDINATOR_HMAC_SECRET",
    "COORDINATOR_KEY_VERSION",
    "COORDINATOR_CLIENT_API_KEY",
    // Secrets: environment only, never a flag (`coordinator::config::SECRET_ENV_VARS`).
    "COORDINATOR_MASTER_KEY",
    "COORDINATOR_MASTER_KEY_PREVIOUS",
    "COORDINATOR_API_KEY",
];

/// Every environment variable of every argument of every subcommand, with the
/// argument's default value (`""` when it has none).
fn clap_env_vars() -> BTreeMap<String, String> {
    fn walk(cmd: &clap::Command, out: &mut BTreeMap<String, String>) {
        for arg in cmd.get_arguments() {
            let Some(name) = arg.get_env() else {
                continue;
            };
            let name = name.to_str().unwrap().to_owned();
            let default: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            let default = default.join(",");
            // Shared argument groups appear under several subcommands: they must agree.
            if let Some(seen) = out.insert(name.clone(), default.clone()) {
                assert_eq!(
                    seen, default,
                    "{name} has different defaults under different commands"
                );
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = BTreeMap::new();
    walk(&Cli::command(), &mut out);
    out
}

/// `NAME=value` and `# NAME=value` lines of `.env.example` (prose comments are skipped:
/// the text before `=` must be a variable name).
fn env_example() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(".env.example");
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix('#').unwrap_or(line).trim_start();
            let (name, value) = line.split_once('=')?;
            let is_name = name.starts_with(|c: char| c.is_ascii_uppercase())
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            is_name.then(|| (name.to_owned(), value.trim().to_owned()))
        })
        .collect()
}

fn env_example_lists_every_variable_with_its_default() {
    let clap = clap_env_vars();
    assert!(clap.contains_key("DATABASE_URL"), "{clap:?}");
    let listed = env_example();

    let mut seen = BTreeSet::new();
    for (name, _) in &listed {
        assert!(seen.insert(name.clone()), ".env.example lists {name} twice");
    }
    let documented: BTreeSet<String> = seen
        .iter()
        .filter(|n| !NOT_CLAP.contains(&n.as_str()))
        .cloned()
        .collect();
    let known: BTreeSet<String> = clap.keys().cloned().collect();
    let missing: Vec<_> = known.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&known).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        ".env.example is out of date: missing {missing:?}, not a clap variable {unknown:?}"
    );

    for (name, value) in &listed {
        if let Some(default) = clap.get(name) {
            assert_eq!(
                value, default,
                ".env.example shows {name}={value}, but its default is `{default}`"
            );
        }
    }
}

/// The binary in an empty temporary directory with only `vars` set (no `.env`, no
/// `./.coordinator`, nothing inherited), and the database file it was pointed at.
fn run(args: &[&str], vars: &[(&str, &str)]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .current_dir(dir.path())
        .stdin(Stdio::null());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    (cmd.output().unwrap(), dir)
}

/// Exit code 2 and exactly one line on stderr that names `var`; nothing on stdout and
/// nothing written to the working directory (no database, no `.coordinator`).
fn assert_config_error(out: &Output, dir: &tempfile::TempDir, var: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{what}: stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{what}: one line, got: {stderr}");
    assert!(stderr.contains(var), "{what}: should name {var}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(out.stdout.is_empty(), "{what}: stdout: {:?}", out.stdout);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{what}: wrote {left:?} before refusing");
}

const SQLITE_URL: &str = "sqlite://./coordinator.db";
/// 32 zero bytes in base64: a valid master key.
const MASTER_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

fn serve_without_a_database_url_names_it() {
    let (out, dir) = run(&["serve"], &[]);
    assert_config_error(&out, &dir, "DATABASE_URL", "no DATABASE_URL");
}

fn serve_with_an_unknown_scheme_names_database_url() {
    let (out, dir) = run(&["serve", "--database-url", "mysql://x"], &[]);
    assert_config_error(&out, &dir, "DATABASE_URL", "mysql://x");
    // The variable is refused the same way as the flag.
    let (out, dir) = run(&["serve"], &[("DATABASE_URL", "mysql://x")]);
    assert_config_error(&out, &dir, "DATABASE_URL", "DATABASE_URL=mysql://x");
}

fn a_short_bootstrap_key_is_refused() {
    let (out, dir) = run(
        &["serve"],
        &[
            ("DATABASE_URL", SQLITE_URL),
            ("COORDINATOR_MASTER_KEY", MASTER_KEY),
            ("COORDINATOR_API_KEY", "short"),
        ],
    );
    assert_config_error(&out, &dir, "COORDINATOR_API_KEY", "short API key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("short"), "echoed the key: {stderr}");
}

fn a_value_that_is_not_a_number_exits_2() {
    let (out, _dir) = run(
        &["serve"],
        &[
            ("DATABASE_URL", SQLITE_URL),
            ("COORDINATOR_MASTER_KEY", MASTER_KEY),
            ("COORDINATOR_BODY_LIMIT", "abc"),
        ],
    );
    assert_config_error(&out, &_dir, "COORDINATOR_BODY_LIMIT", "not a number");
    // A flag of the wrong type, and a boolean that is not true/false, likewise.
    let (out, dir) = run(
        &["serve", "--workers", "many"],
        &[
            ("DATABASE_URL", SQLITE_URL),
            ("COORDINATOR_MASTER_KEY", MASTER_KEY),
        ],
    );
    assert_config_error(&out, &dir, "COORDINATOR_WORKERS", "flag not a number");
    let (out, dir) = run(
        &["serve"],
        &[
            ("DATABASE_URL", SQLITE_URL),
            ("COORDINATOR_MASTER_KEY", MASTER_KEY),
            ("COORDINATOR_REQUIRE_SIGNATURE", "1"),
        ],
    );
    assert_config_error(&out, &dir, "COORDINATOR_REQUIRE_SIGNATURE", "bad boolean");
}

/// Every range check in `ServeArgs::validate` / `DbArgs::validate`, at the first value
/// outside the documented range (docs/operations.md#configuration).
fn out_of_range_values_name_their_variable() {
    let cases: &[(&str, &str)] = &[
        ("COORDINATOR_BIND", "localhost"),
        ("COORDINATOR_DB_POOL_SIZE", "0"),
        ("COORDINATOR_DB_POOL_SIZE", "513"),
        ("COORDINATOR_DB_TIMEOUT_SECS", "0"),
        ("COORDINATOR_DB_TIMEOUT_SECS", "301"),
        ("COORDINATOR_SQLITE_BUSY_TIMEOUT_MS", "600001"),
        ("COORDINATOR_BODY_LIMIT", "1023"),
        ("COORDINATOR_BODY_LIMIT", "268435457"),
        ("COORDINATOR_WORKERS", "257"),
        ("COORDINATOR_MAX_CONNECTIONS", "1000001"),
        ("COORDINATOR_MAX_CONNECTIONS_PER_PEER", "1000001"),
        ("COORDINATOR_SHUTDOWN_TIMEOUT_SECS", "3601"),
        ("COORDINATOR_SIGNATURE_SKEW_SECS", "0"),
        ("COORDINATOR_SIGNATURE_SKEW_SECS", "3601"),
        ("COORDINATOR_AUTH_FAILURES_PER_MINUTE", "0"),
        ("COORDINATOR_AUTH_FAILURES_PER_MINUTE", "100001"),
        ("COORDINATOR_LEASE_SECS", "0"),
        ("COORDINATOR_LEASE_SECS", "86401"),
        ("COORDINATOR_EVENTS_PER_JOB", "15"),
        ("COORDINATOR_EVENTS_PER_JOB", "100001"),
        ("COORDINATOR_TOKEN_TTL_SECS", "0"),
        ("COORDINATOR_TOKEN_TTL_SECS", "86401"),
        ("COORDINATOR_WEBHOOK_QUEUE", "no spaces"),
        ("COORDINATOR_HOUSEKEEPING_SECS", "0"),
        ("COORDINATOR_HOUSEKEEPING_SECS", "3601"),
        ("COORDINATOR_METRICS_BIND", "nowhere"),
        ("COORDINATOR_METRICS_BIND", "127.0.0.1:8080"),
        ("COORDINATOR_JOB_RETENTION_DAYS", "0"),
        ("COORDINATOR_JOB_RETENTION_DAYS", "36501"),
        ("COORDINATOR_MAX_WAITING_CLAIMS", "0"),
        ("COORDINATOR_MAX_WAITING_CLAIMS", "100001"),
        ("COORDINATOR_MAX_WAITING_CLAIMS_PER_CALLER", "1025"),
        ("COORDINATOR_MAX_STREAMS", "0"),
        ("COORDINATOR_MAX_STREAMS_PER_CALLER", "0"),
        ("COORDINATOR_MAX_STREAMS_PER_CALLER", "1025"),
        ("COORDINATOR_MASTER_KEY", "not-base64"),
        ("COORDINATOR_MASTER_KEY_PREVIOUS", "AAAA"),
    ];
    for (var, value) in cases {
        let mut vars = vec![("DATABASE_URL", SQLITE_URL)];
        if *var != "COORDINATOR_MASTER_KEY" {
            vars.push(("COORDINATOR_MASTER_KEY", MASTER_KEY));
        }
        vars.push((var, value));
        let (out, dir) = run(&["serve"], &vars);
        assert_config_error(&out, &dir, var, &format!("{var}={value}"));
    }
}

fn a_missing_master_key_is_a_config_error() {
    let (out, dir) = run(&["serve"], &[("DATABASE_URL", SQLITE_URL)]);
    assert_config_error(&out, &dir, "COORDINATOR_MASTER_KEY", "no master key");
    let (out, dir) = run(
        &["serve"],
        &[
            ("DATABASE_URL", SQLITE_URL),
            ("COORDINATOR_MASTER_KEY_FILE", "/nonexistent/master.key"),
        ],
    );
    assert_config_error(
        &out,
        &dir,
        "COORDINATOR_MASTER_KEY_FILE",
        "unreadable key file",
    );
}

fn flags_win_over_the_environment() {
    // A bad variable is overridden by a good flag: the error is then about what comes
    // next (the missing master key), not about the variable.
    let (out, dir) = run(
        &["serve", "--body-limit", "2048"],
        &[
            ("DATABASE_URL", SQLITE_URL),
            ("COORDINATOR_BODY_LIMIT", "1"),
        ],
    );
    assert_config_error(&out, &dir, "COORDINATOR_MASTER_KEY", "flag over variable");
}

/// `--dev` never touches the database or master key named in the environment (a
/// production URL left in `.env` must not get an all-scopes `dev` caller).
fn dev_mode_ignores_database_url_and_master_key_in_the_environment() {
    let (out, dir) = run(
        &["caller", "add", "probe", "--scopes", "jobs:read", "--dev"],
        &[
            ("DATABASE_URL", "sqlite://./production.db"),
            ("COORDINATOR_MASTER_KEY", MASTER_KEY),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("production.db").exists());
    assert!(dir.path().join(".coordinator/coordinator.db").exists());
    // And it says so, as `serve --dev` does.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--dev ignores DATABASE_URL"), "{stderr}");
}

/// An operator command without a database points to its own `--dev` flag.
fn operator_commands_without_a_database_name_their_dev_flag() {
    let (out, dir) = run(&["caller", "list"], &[]);
    assert_config_error(&out, &dir, "DATABASE_URL", "caller list");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("add --dev"), "{stderr}");
}

/// The repository is complete on its own: no document points outside it (the design
/// lives in docs/design.md), and every relative Markdown link names a file that exists.
fn docs_are_self_contained() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![
        root.join("README.md"),
        root.join(".env.example"),
        root.join(".ci/run"),
    ];
    fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, files);
            } else {
                files.push(path);
            }
        }
    }
    for dir in ["docs", "scripts", "src", "tests", "bench/src"] {
        walk(&root.join(dir), &mut files);
    }
    // Spelled in pieces so that this file does not match itself.
    let needles = [
        ["shared", "/"].concat(),
        ["DESIGN", ".md"].concat(),
        ["DESIGN", " §"].concat(),
    ];
    let mut problems = Vec::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue; // not text
        };
        for needle in &needles {
            if text.contains(needle) {
                problems.push(format!("{} mentions `{needle}`", file.display()));
            }
        }
        if file.extension().is_some_and(|e| e == "md") {
            let dir = file.parent().unwrap();
            for link in markdown_links(&text) {
                let target = link.split('#').next().unwrap_or_default();
                if target.is_empty() || link.contains("://") || link.starts_with("mailto:") {
                    continue;
                }
                if !dir.join(target).exists() {
                    problems.push(format!("{}: broken link ({link})", file.display()));
                }
            }
            // Every `#fragment` (in this file or another Markdown file) names a heading.
            for link in markdown_links(&text) {
                let Some((target, fragment)) = link.split_once('#') else {
                    continue;
                };
                if link.contains("://") || !(target.is_empty() || target.ends_with(".md")) {
                    continue;
                }
                let heading_text = if target.is_empty() {
                    text.clone()
                } else {
                    std::fs::read_to_string(dir.join(target)).unwrap_or_default()
                };
                if !heading_slugs(&heading_text).iter().any(|s| s == fragment) {
                    problems.push(format!("{}: no heading for ({link})", file.display()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The anchors GitHub gives a Markdown file's headings: lower case, spaces to `-`,
/// everything but letters, digits, `-` and `_` dropped (a repeated heading's `-1`
/// suffixes are not made; none is linked).
fn heading_slugs(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        let Some(title) = line.strip_prefix('#') else {
            continue;
        };
        if fenced {
            continue;
        }
        let title = title.trim_start_matches('#');
        if !title.starts_with(' ') {
            continue;
        }
        out.push(
            title
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect(),
        );
    }
    out
}

/// docs/decisions.md opens with a list of its sections: every `## ` heading is in it.
fn the_decisions_list_names_every_section() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/decisions.md"))
            .unwrap();
    let listed: Vec<String> = markdown_links(&text)
        .into_iter()
        .filter_map(|l| l.strip_prefix('#').map(str::to_owned))
        .collect();
    let missing: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .filter(|h| {
            !listed
                .iter()
                .any(|l| heading_slugs(&format!("## {h}")) == [l.clone()])
        })
        .collect();
    assert!(
        missing.is_empty(),
        "sections missing from the list at the top: {missing:#?}"
    );
}

/// The targets of inline Markdown links, `[text](target)`.
fn markdown_links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].to_owned());
        }
    }
    out
}

/// The binary in `dir` with only `vars` set.
fn run_in(dir: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .current_dir(dir)
        .stdin(Stdio::null());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A `.env` in a parent directory (e.g. one planted in /tmp) is never read.
fn dot_env_is_not_read_from_a_parent_directory() {
    let parent = tempfile::tempdir().unwrap();
    write_mode(
        &parent.path().join(".env"),
        "DATABASE_URL=sqlite://./planted.db\n",
        0o600,
    );
    let child = parent.path().join("work");
    std::fs::create_dir(&child).unwrap();
    let out = run_in(&child, &["migrate"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("DATABASE_URL is not set"), "{stderr}");
    assert!(
        !child.join("planted.db").exists(),
        "the parent's .env was applied"
    );
    assert!(!stderr.contains(".env"), "{stderr}");
}

/// The working directory's `.env` is read, and stderr names it.
fn dot_env_in_the_working_directory_is_read_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join(".env");
    write_mode(&env, "DATABASE_URL=sqlite://./from-dot-env.db\n", 0o600);
    let out = run_in(dir.path(), &["migrate"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(dir.path().join("from-dot-env.db").exists());
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.contains("read settings from") && first.contains(&env.display().to_string()),
        "{stderr}"
    );

    // `--env-file` names another file; the working directory's `.env` is then ignored.
    let other = dir.path().join("other.env");
    write_mode(&other, "DATABASE_URL=sqlite://./from-env-file.db\n", 0o600);
    let out = run_in(dir.path(), &["migrate", "--env-file", "other.env"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(dir.path().join("from-env-file.db").exists());
    assert!(stderr.contains("other.env"), "{stderr}");
    // A variable that is set wins over the file.
    let out = run_in(
        dir.path(),
        &["--env-file=other.env", "migrate"],
        &[("DATABASE_URL", "sqlite://./from-variable.db")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("from-variable.db").exists());
    // A missing explicit file is an error, not silently nothing.
    let out = run_in(dir.path(), &["migrate", "--env-file", "missing.env"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

/// A `.env` someone else could have written is refused before anything is read from it.
fn dot_env_writable_by_others_or_owned_by_another_user_is_refused() {
    for mode in [0o666, 0o620, 0o602] {
        let dir = tempfile::tempdir().unwrap();
        write_mode(
            &dir.path().join(".env"),
            "DATABASE_URL=sqlite://./x.db\n",
            mode,
        );
        let out = run_in(dir.path(), &["migrate"], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{mode:o}: {stderr}");
        assert!(stderr.contains("writable by other users"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!dir.path().join("x.db").exists());
    }
    // Owned by another user (only root can set that up).
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join(".env");
    write_mode(&env, "DATABASE_URL=sqlite://./x.db\n", 0o644);
    if std::os::unix::fs::chown(&env, Some(65_534), None).is_ok() {
        let out = run_in(dir.path(), &["migrate"], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("owned by uid 65534"), "{stderr}");
        assert!(!dir.path().join("x.db").exists());
    }
}

/// Review finding: a variable set twice took the first value, while a shell's `. file`
/// takes the last: refused (exit 2), naming the variable and never a value.
fn an_env_file_that_sets_a_variable_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = "DATABASE_URL=sqlite://./first.db\nCOORDINATOR_INSECURE_HTTP=true\n\
                DATABASE_URL=sqlite://./Second-V4lue.db\n";
    write_mode(&dir.path().join("dup.env"), text, 0o600);
    write_mode(&dir.path().join(".env"), text, 0o600);
    for args in [&["migrate", "--env-file", "dup.env"][..], &["migrate"]] {
        let out = run_in(dir.path(), args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("DATABASE_URL is set more than once"),
            "{stderr}"
        );
        assert!(
            !stderr.contains("first.db") && !stderr.contains("V4lue"),
            "{stderr}"
        );
        assert!(!dir.path().join("first.db").exists());
    }
}

/// Review finding: an env file holding a secret that other users can read was used
/// without a word (only write access was checked). One warning line, no value.
fn an_env_file_with_a_secret_readable_by_others_gets_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let key = coordinator::crypto::seal::MasterKey::generate()
        .to_base64()
        .to_string();
    let sqlite = "DATABASE_URL=sqlite://./x.db\n";
    let cases: [(String, u32, bool); 7] = [
        (
            format!("COORDINATOR_MASTER_KEY={key}\n{sqlite}"),
            0o644,
            true,
        ),
        (
            format!("COORDINATOR_MASTER_KEY={key}\n{sqlite}"),
            0o640,
            true,
        ),
        (
            format!("COORDINATOR_MASTER_KEY={key}\n{sqlite}"),
            0o600,
            false,
        ),
        (
            format!("COORDINATOR_MASTER_KEY_PREVIOUS={key}\n{sqlite}"),
            0o604,
            true,
        ),
        (format!("COORDINATOR_API_KEY={key}\n{sqlite}"), 0o644, true),
        (
            "DATABASE_URL=postgres://svc:Pa55w0rdXyz@127.0.0.1:1/db\n".to_owned(),
            0o644,
            true,
        ),
        (
            "DATABASE_URL=postgres://svc@127.0.0.1:1/db\n".to_owned(),
            0o644,
            false,
        ),
    ];
    for (text, mode, warned) in cases {
        // Named by its variable in failures, never by its value.
        let var = text.split('=').next().unwrap_or_default().to_owned();
        write_mode(&dir.path().join("s.env"), &text, mode);
        // `--help` exits 0 once the file is loaded, whatever the database.
        let out = run_in(
            dir.path(),
            &["--env-file", "s.env", "migrate", "--help"],
            &[],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{var} {mode:o}: {stderr}");
        let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
        if warned {
            assert_eq!(warnings.len(), 1, "{var} {mode:o}: {stderr}");
            assert!(
                warnings[0].contains("s.env") && warnings[0].contains("chmod 600"),
                "{stderr}"
            );
        } else {
            assert!(warnings.is_empty(), "{var} {mode:o}: {stderr}");
        }
        assert!(
            !stderr.contains(&key) && !stderr.contains("Pa55w0rd"),
            "{stderr}"
        );
    }
}

/// The environment wins over an explicit `--env-file`; when their values differ that
/// is said once per variable, by name only.
fn an_env_file_value_the_environment_overrides_gets_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let text = "DATABASE_URL=sqlite://./from-file.db\nCOORDINATOR_DB_POOL_SIZE=4\n";
    write_mode(&dir.path().join("o.env"), text, 0o600);
    write_mode(&dir.path().join(".env"), text, 0o600);
    let overridden = |args: &[&str], vars: &[(&str, &str)]| -> Vec<String> {
        let out = run_in(dir.path(), args, vars);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        assert!(
            !stderr.contains("from-file") && !stderr.contains("from-var"),
            "{stderr}"
        );
        stderr
            .lines()
            .filter(|l| l.contains("warning"))
            .map(str::to_owned)
            .collect()
    };
    let vars = [
        ("DATABASE_URL", "sqlite://./from-var.db"),
        ("COORDINATOR_DB_POOL_SIZE", "4"),
    ];
    let warnings = overridden(&["--env-file", "o.env", "migrate"], &vars);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("DATABASE_URL") && warnings[0].contains("o.env"),
        "{warnings:?}"
    );
    assert!(dir.path().join("from-var.db").exists());
    // The same value: nothing to say. The implicit ./.env: as before, quietly.
    let same = [("DATABASE_URL", "sqlite://./from-file.db")];
    assert!(overridden(&["--env-file", "o.env", "migrate"], &same).is_empty());
    assert!(overridden(&["migrate"], &vars).is_empty());
}

/// Review finding: a missing argument's error lost its name (the line after "the
/// following required arguments were not provided:").
fn a_missing_argument_is_named() {
    for (args, named) in [
        (&["key", "issue"][..], "<CALLER>"),
        (&["secret", "revoke", "svc"], "<VERSION>"),
    ] {
        let (out, dir) = run(args, &[]);
        assert_config_error(&out, &dir, named, &args.join(" "));
    }
}

/// Review finding: `--bind localhost:…` was told "expected HOST:PORT", though only an
/// IP address is taken.
fn a_bind_address_that_is_a_name_is_told_ip_port() {
    let (out, dir) = run(
        &["serve", "--bind", "localhost:8080"],
        &[
            ("DATABASE_URL", SQLITE_URL),
            ("COORDINATOR_MASTER_KEY", MASTER_KEY),
        ],
    );
    assert_config_error(&out, &dir, "COORDINATOR_BIND", "--bind localhost:8080");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected IP:PORT"), "{stderr}");
}

/// Review finding: a PostgreSQL URL whose port is not a number failed only when
/// connecting (exit 1, "cannot connect"), not as a bad setting (exit 2).
fn a_database_port_that_is_not_a_number_exits_2() {
    for url in [
        "postgres://svc:Pa55w0rdXyz@127.0.0.1:54x2/db",
        "postgres://svc:Pa55w0rdXyz@h1:5432,[::1]:70000/db",
        "postgresql://svc:Pa55w0rdXyz@127.0.0.1/db?port=abc",
    ] {
        let (out, dir) = run(&["key", "list"], &[("DATABASE_URL", url)]);
        assert_config_error(&out, &dir, "DATABASE_URL", url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("port"), "{stderr}");
        assert!(!stderr.contains("Pa55w0rd"), "{stderr}");
    }
}

/// Secrets are never command-line flags (every local user can read those in `ps`): the
/// flags are refused with a pointer to the variable, without echoing the value.
fn secrets_are_not_accepted_as_flags() {
    // Commands that cannot start anything if the flag were accepted (no database file
    // for `secret rewrap`; no master key for `serve`), so a regression fails, never hangs.
    for (command, flag, var) in [
        ("secret rewrap", "--master-key", "COORDINATOR_MASTER_KEY"),
        (
            "secret rewrap",
            "--master-key-previous",
            "COORDINATOR_MASTER_KEY_PREVIOUS",
        ),
        ("serve", "--api-key", "COORDINATOR_API_KEY"),
    ] {
        let command: Vec<&str> = command.split(' ').collect();
        let joined = format!("{flag}={MASTER_KEY}");
        for tail in [vec![flag, MASTER_KEY], vec![joined.as_str()]] {
            let args: Vec<&str> = command.iter().copied().chain(tail).collect();
            let (out, dir) = run(&args, &[("DATABASE_URL", SQLITE_URL)]);
            assert_config_error(&out, &dir, var, flag);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("not accepted"), "{stderr}");
            assert!(!stderr.contains(MASTER_KEY), "echoed the secret: {stderr}");
        }
    }
    // The variables still work.
    let (out, dir) = run(
        &["serve"],
        &[
            ("DATABASE_URL", SQLITE_URL),
            ("COORDINATOR_MASTER_KEY", MASTER_KEY),
            ("COORDINATOR_MASTER_KEY_PREVIOUS", "AAAA"),
        ],
    );
    assert_config_error(
        &out,
        &dir,
        "COORDINATOR_MASTER_KEY_PREVIOUS",
        "bad previous key",
    );
}

/// `Debug` of the parsed command line never shows a database password.
fn debug_output_redacts_the_database_url() {
    let cli = Cli::try_parse_from([
        "coordinator",
        "migrate",
        "--database-url",
        "postgres://app:hunter2@db.internal/coordinator",
    ])
    .unwrap();
    let shown = format!("{cli:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("postgres://"), "{shown}");
}

fn tls_settings_that_cannot_work_name_their_variable() {
    let base = [
        ("DATABASE_URL", SQLITE_URL),
        ("COORDINATOR_MASTER_KEY", MASTER_KEY),
    ];
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("COORDINATOR_TLS_CERT", "/x.crt")], "COORDINATOR_TLS_KEY"),
        (&[("COORDINATOR_TLS_KEY", "/x.key")], "COORDINATOR_TLS_CERT"),
        (
            &[("COORDINATOR_TLS_CLIENT_CA", "/ca.crt")],
            "COORDINATOR_TLS_CLIENT_CA",
        ),
        (
            &[
                ("COORDINATOR_TLS_CERT", "/x.crt"),
                ("COORDINATOR_TLS_KEY", "/x.key"),
                ("COORDINATOR_INSECURE_HTTP", "true"),
            ],
            "COORDINATOR_INSECURE_HTTP",
        ),
        (
            &[("COORDINATOR_TLS_CLIENT_IDENTITY", "subject")],
            "COORDINATOR_TLS_CLIENT_IDENTITY",
        ),
        (
            &[("COORDINATOR_TLS_RELOAD_SECS", "0")],
            "COORDINATOR_TLS_RELOAD_SECS",
        ),
        (
            &[("DATABASE_URL", "postgres://app@db.example/c?sslmode=prefer")],
            "COORDINATOR_DB_ALLOW_TLS_DOWNGRADE",
        ),
    ];
    for (vars, var) in cases {
        let mut all: Vec<(&str, &str)> = base.to_vec();
        all.retain(|(k, _)| !vars.iter().any(|(v, _)| v == k));
        all.extend_from_slice(vars);
        let (out, dir) = run(&["serve"], &all);
        assert_config_error(&out, &dir, var, var);
    }
}

crate::plain_tests!(
    env_example_lists_every_variable_with_its_default,
    serve_without_a_database_url_names_it,
    serve_with_an_unknown_scheme_names_database_url,
    a_short_bootstrap_key_is_refused,
    a_value_that_is_not_a_number_exits_2,
    out_of_range_values_name_their_variable,
    a_missing_master_key_is_a_config_error,
    flags_win_over_the_environment,
    dev_mode_ignores_database_url_and_master_key_in_the_environment,
    operator_commands_without_a_database_name_their_dev_flag,
    docs_are_self_contained,
    the_decisions_list_names_every_section,
    dot_env_is_not_read_from_a_parent_directory,
    dot_env_in_the_working_directory_is_read_and_named,
    dot_env_writable_by_others_or_owned_by_another_user_is_refused,
    an_env_file_that_sets_a_variable_twice_is_refused,
    an_env_file_with_a_secret_readable_by_others_gets_a_warning,
    an_env_file_value_the_environment_overrides_gets_a_warning,
    a_missing_argument_is_named,
    a_bind_address_that_is_a_name_is_told_ip_port,
    a_database_port_that_is_not_a_number_exits_2,
    secrets_are_not_accepted_as_flags,
    debug_output_redacts_the_database_url,
    tls_settings_that_cannot_work_name_their_variable,
);
