//! `docs/BENCHMARKS.md` is made of sections, one per mode, each between
//! `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`. A mode replaces only its own section,
//! so the scenarios can be run (and re-run) separately.

/// Replace (or append) section `name` of the report at `path` with `body`.
pub fn splice(path: &str, name: &str, body: &str) {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    // A report written before sections existed is all the main run's: keep it as that.
    let old = if old.contains("<!-- bench:") || old.trim().is_empty() {
        old
    } else {
        format!(
            "<!-- bench:main -->\n{}\n<!-- /bench:main -->\n",
            old.trim_end()
        )
    };
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let section = format!("{open}\n{}\n{close}\n", body.trim_end());
    let new = match (old.find(&open), old.find(&close)) {
        (Some(a), Some(b)) if b > a => {
            let end = b + close.len();
            let rest = old[end..].strip_prefix('\n').unwrap_or(&old[end..]);
            format!("{}{section}{rest}", &old[..a])
        }
        _ if old.is_empty() => section,
        _ => format!("{}\n{section}", old.trim_end()),
    };
    if let Some(dir) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(path, new).expect("write report");
    eprintln!("wrote section `{name}` of {path}");
}

/// The command line this run was started with, for the report.
pub fn command_line() -> String {
    let mut parts: Vec<String> = ["BENCH_DURATION_SECS", "BENCH_CONNECTIONS", "BENCH_BACKENDS"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
        .collect();
    parts.push("coordinator-bench".into());
    // The peer's directory is a local copy outside this repository: named, not shown.
    let mut after_peer = false;
    for a in std::env::args().skip(1) {
        parts.push(if after_peer {
            "$PEER_DIR".into()
        } else {
            a.clone()
        });
        after_peer = a == "--peer";
    }
    parts.join(" ")
}

/// The machine and date lines every section starts with (the machine line carries the
/// load average, since server and load generator share the cores).
pub fn machine_and_date(md: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(md, "- Machine: {}", crate::machine());
    let _ = writeln!(
        md,
        "- Date: {}\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
}
