//! Database URLs: which backend a URL names, its TLS policy (`sslmode`), the libpq
//! connection string with the network bounds the URL does not set, and a `Debug` that
//! never prints a password.

use std::time::Duration;

use super::Backend;

/// A validated database URL. Unknown schemes are refused, so a typo never creates an
/// empty SQLite file somewhere.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    backend: Backend,
    /// For Postgres the whole URL; for SQLite the file path.
    target: String,
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A Postgres URL may carry a password: print only the backend.
        write!(f, "DatabaseUrl({:?})", self.backend)
    }
}

impl DatabaseUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            return Ok(DatabaseUrl {
                backend: Backend::Postgres,
                target: raw.to_owned(),
            });
        }
        let path = raw
            .strip_prefix("sqlite://")
            .or_else(|| raw.strip_prefix("sqlite:"));
        match path {
            Some(p) if !p.is_empty() && !p.contains(":memory:") => Ok(DatabaseUrl {
                backend: Backend::Sqlite,
                target: p.to_owned(),
            }),
            Some(_) => Err("sqlite URL needs a file path, e.g. sqlite://./coordinator.db".into()),
            None => Err("unknown scheme; expected postgres://, postgresql:// or sqlite://".into()),
        }
    }

    /// PostgreSQL TLS policy, applied to the URL the service connects with: an explicit
    /// `sslmode=prefer` or `allow` (TLS that silently falls back to plain text) is refused
    /// unless `allow_downgrade`; a URL without `sslmode` gets `sslmode=verify-full` when
    /// any host it names is not local (a Unix socket or a loopback address), so the
    /// server's certificate is checked against `sslrootcert` (libpq's default
    /// `~/.postgresql/root.crt`, or `sslrootcert=system`). SQLite URLs pass unchanged.
    pub fn with_tls_policy(mut self, allow_downgrade: bool) -> Result<Self, String> {
        if self.backend != Backend::Postgres {
            return Ok(self);
        }
        let pg = pg_url::Parts::of(&self.target);
        match pg.sslmode.as_deref() {
            Some("prefer" | "allow") if !allow_downgrade => Err(format!(
                "sslmode={} may connect without TLS; use sslmode=verify-full (or require, \
                 verify-ca, disable), or set COORDINATOR_DB_ALLOW_TLS_DOWNGRADE=true",
                pg.sslmode.as_deref().unwrap_or_default()
            )),
            Some("disable" | "allow" | "prefer" | "require" | "verify-ca" | "verify-full") => {
                Ok(self)
            }
            Some(other) => Err(format!(
                "unknown sslmode {other:?}; expected disable, require, verify-ca or verify-full"
            )),
            None if pg.all_hosts_local() => Ok(self),
            None => {
                let sep = if self.target.contains('?') { '&' } else { '?' };
                self.target.push(sep);
                self.target.push_str("sslmode=verify-full");
                Ok(self)
            }
        }
    }

    /// The connection string libpq gets: the URL with bounds on the network added,
    /// unless it names them itself. `connect_timeout` (the pool's wait, at least the
    /// 2 s libpq allows): a host that does not answer would otherwise hold a pool
    /// thread in `PQconnectdb` for good. TCP keepalives (idle 10 s, then 3 probes 5 s
    /// apart) and `tcp_user_timeout` (20 s for sent data to be acknowledged): an
    /// established connection whose peer vanished (a failed-over address, a host that
    /// froze) fails within about half a minute instead of after the kernel's ~15 min of
    /// retransmissions, is discarded by the pool, and its request answered 503. None of
    /// this touches a slow query: the server acknowledges what it is sent. Unix sockets
    /// ignore them.
    pub fn pg_conninfo(&self, connect_timeout: Duration) -> String {
        let secs = connect_timeout.as_secs().max(2);
        let given = |name: &str| {
            let query = self.target.split_once('?').map_or("", |(_, q)| q);
            query
                .split('&')
                .any(|pair| pair.split_once('=').map_or(pair, |(k, _)| k) == name)
        };
        let mut out = self.target.clone();
        for (name, value) in [
            ("connect_timeout", secs.to_string()),
            ("keepalives", "1".to_owned()),
            ("keepalives_idle", "10".to_owned()),
            ("keepalives_interval", "5".to_owned()),
            ("keepalives_count", "3".to_owned()),
            ("tcp_user_timeout", "20000".to_owned()),
        ] {
            if !given(name) {
                out.push(if out.contains('?') { '&' } else { '?' });
                out.push_str(name);
                out.push('=');
                out.push_str(&value);
            }
        }
        out
    }

    /// The `sslmode` the URL asks for, if any.
    pub fn sslmode(&self) -> Option<String> {
        (self.backend == Backend::Postgres)
            .then(|| pg_url::Parts::of(&self.target).sslmode)
            .flatten()
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The connection string handed to the driver (a file path for SQLite).
    pub fn target(&self) -> &str {
        &self.target
    }
}

/// A driver message on one line (libpq's run over several: "connection to server … failed:
/// SSL error: certificate verify failed\n").
pub fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Just enough of a libpq connection URI to apply the TLS policy: the hosts (from the
/// authority, or a `host=` parameter, which wins as in libpq) and `sslmode`.
mod pg_url {
    pub struct Parts {
        pub hosts: Vec<String>,
        pub sslmode: Option<String>,
    }

    impl Parts {
        pub fn of(url: &str) -> Parts {
            let rest = url.split_once("://").map_or(url, |(_, r)| r);
            let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
            let authority = before_query.split('/').next().unwrap_or_default();
            let hostlist = authority.rsplit('@').next().unwrap_or_default();
            let mut hosts: Vec<String> = hostlist.split(',').map(strip_port).collect();
            let mut sslmode = None;
            for pair in query.split('&') {
                match pair.split_once('=') {
                    Some(("sslmode", v)) => sslmode = Some(v.to_owned()),
                    Some(("host", v)) => hosts = v.split(',').map(str::to_owned).collect(),
                    _ => {}
                }
            }
            Parts { hosts, sslmode }
        }

        /// Every host is a Unix socket directory, empty (libpq's default socket),
        /// `localhost` or a loopback address.
        pub fn all_hosts_local(&self) -> bool {
            self.hosts.iter().all(|h| {
                let h = h.trim_start_matches('[').trim_end_matches(']');
                h.is_empty()
                    || h.starts_with('/')
                    || h.to_ascii_lowercase().starts_with("%2f")
                    || h.eq_ignore_ascii_case("localhost")
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            })
        }
    }

    fn strip_port(host: &str) -> String {
        if let Some(end) = host.find(']') {
            return host.get(..=end).unwrap_or(host).to_owned();
        }
        host.split(':').next().unwrap_or(host).to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_scheme_picks_the_backend() {
        assert_eq!(
            DatabaseUrl::parse("postgres://u@h/db").map(|u| u.backend()),
            Ok(Backend::Postgres)
        );
        assert_eq!(
            DatabaseUrl::parse("postgresql://u@h/db").map(|u| u.backend()),
            Ok(Backend::Postgres)
        );
        let s = DatabaseUrl::parse("sqlite://./x.db").expect("sqlite");
        assert_eq!(s.backend(), Backend::Sqlite);
        assert_eq!(s.target(), "./x.db");
        assert!(DatabaseUrl::parse("mysql://h/db").is_err());
        assert!(DatabaseUrl::parse("./x.db").is_err());
        assert!(DatabaseUrl::parse("sqlite://").is_err());
        assert!(DatabaseUrl::parse("sqlite::memory:").is_err());
    }

    #[test]
    fn libpq_gets_network_bounds_the_url_does_not_set() {
        let info = |url: &str| {
            DatabaseUrl::parse(url)
                .map(|u| u.pg_conninfo(Duration::from_secs(5)))
                .unwrap_or_default()
        };
        assert_eq!(
            info("postgres://u@db/c"),
            "postgres://u@db/c?connect_timeout=5&keepalives=1&keepalives_idle=10&\
             keepalives_interval=5&keepalives_count=3&tcp_user_timeout=20000"
        );
        // What the URL sets stays; the rest is added after it.
        let own = info("postgres://u@db/c?sslmode=require&keepalives_idle=60&tcp_user_timeout=0");
        assert!(own.starts_with("postgres://u@db/c?sslmode=require&keepalives_idle=60&tcp_user_timeout=0&connect_timeout=5&keepalives=1&keepalives_interval=5"), "{own}");
        assert_eq!(own.matches("keepalives_idle").count(), 1, "{own}");
        assert_eq!(own.matches("tcp_user_timeout").count(), 1, "{own}");
        // libpq's smallest connect_timeout is 2 s.
        let quick = DatabaseUrl::parse("postgres://u@db/c")
            .map(|u| u.pg_conninfo(Duration::from_millis(500)))
            .unwrap_or_default();
        assert!(quick.contains("connect_timeout=2&"), "{quick}");
    }

    #[test]
    fn postgres_tls_policy() {
        let policy = |url: &str, allow: bool| {
            DatabaseUrl::parse(url)
                .and_then(|u| u.with_tls_policy(allow))
                .map(|u| u.target().to_owned())
        };
        // A remote host without sslmode gets verify-full; local ones are left alone.
        assert_eq!(
            policy("postgres://u:p@db.example:5432/c", false).as_deref(),
            Ok("postgres://u:p@db.example:5432/c?sslmode=verify-full")
        );
        assert_eq!(
            policy("postgres://u@10.0.0.5/c?connect_timeout=3", false).as_deref(),
            Ok("postgres://u@10.0.0.5/c?connect_timeout=3&sslmode=verify-full")
        );
        assert_eq!(
            policy("postgres://u@localhost,db.example/c", false).as_deref(),
            Ok("postgres://u@localhost,db.example/c?sslmode=verify-full")
        );
        for local in [
            "postgres://u@127.0.0.1:5432/c",
            "postgres://u@localhost/c",
            "postgres://u@[::1]:5432/c",
            "postgresql:///c",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/c",
            "postgres://u@/c?host=/var/run/postgresql",
        ] {
            assert_eq!(policy(local, false).as_deref(), Ok(local), "{local}");
        }
        // host= wins over the authority, as in libpq.
        assert!(policy("postgres://u@localhost/c?host=db.example", false)
            .is_ok_and(|t| t.ends_with("&sslmode=verify-full")));
        // Explicit modes are kept; prefer/allow only when allowed.
        for mode in ["disable", "require", "verify-ca", "verify-full"] {
            let url = format!("postgres://u@db.example/c?sslmode={mode}");
            assert_eq!(policy(&url, false), Ok(url.clone()));
        }
        for mode in ["prefer", "allow"] {
            let url = format!("postgres://u@db.example/c?sslmode={mode}");
            let err = policy(&url, false).expect_err("refused");
            assert!(err.contains("COORDINATOR_DB_ALLOW_TLS_DOWNGRADE"), "{err}");
            assert!(!err.contains('\n'));
            assert_eq!(policy(&url, true), Ok(url.clone()));
        }
        assert!(policy("postgres://u@h/c?sslmode=verify_full", false).is_err());
        assert_eq!(policy("sqlite://./x.db", false).as_deref(), Ok("./x.db"));
    }

    #[test]
    fn debug_never_prints_the_url() {
        let u = DatabaseUrl::parse("postgres://user:hunter2@h/db").expect("pg");
        assert!(!format!("{u:?}").contains("hunter2"));
    }
}
