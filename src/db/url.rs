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
    ///
    /// Where libpq connects is judged as libpq judges it (third security review,
    /// 2026-12-07): `hostaddr` (it, not `host`, is where libpq connects), percent-encoded
    /// parameter names and values, a `service`, and the `PGHOST`, `PGHOSTADDR` and
    /// `PGSERVICE` variables libpq falls back to. Before, `postgres://u@localhost/c?
    /// hostaddr=10.0.0.5`, `…?%68ost=db.example`, or `postgresql:///c` with
    /// `PGHOST=db.example` were taken for local and kept libpq's default `prefer`: a
    /// remote server over a connection anyone on the path could downgrade to plain text.
    pub fn with_tls_policy(self, allow_downgrade: bool) -> Result<Self, String> {
        self.with_tls_policy_in(allow_downgrade, |name| std::env::var(name).ok())
    }

    /// [`Self::with_tls_policy`] with libpq's environment read through `env`.
    fn with_tls_policy_in(
        mut self,
        allow_downgrade: bool,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        if self.backend != Backend::Postgres {
            return Ok(self);
        }
        let pg = pg_url::Parts::of(&self.target, env);
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
            .then(|| pg_url::Parts::of(&self.target, |_| None).sslmode)
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
        /// `hostaddr`: where libpq connects when given.
        pub hostaddrs: Vec<String>,
        /// A `service` names settings in a file this check does not read.
        pub service: bool,
        pub sslmode: Option<String>,
    }

    /// `%XX` decoded, as libpq decodes a URI's parameter names and values (left as it
    /// is when it is not valid UTF-8 once decoded).
    fn decode(raw: &str) -> String {
        let bytes = raw.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            let hex = |j: usize| {
                bytes
                    .get(j)
                    .and_then(|c| char::from(*c).to_digit(16))
                    .and_then(|d| u8::try_from(d).ok())
            };
            match (b, hex(i + 1), hex(i + 2)) {
                (b'%', Some(hi), Some(lo)) => {
                    out.push(hi * 16 + lo);
                    i += 3;
                }
                _ => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap_or_else(|_| raw.to_owned())
    }

    impl Parts {
        /// The parts of `url` as libpq reads them, with `env` for the variables it
        /// falls back to when the URL leaves a parameter out.
        pub fn of(url: &str, env: impl Fn(&str) -> Option<String>) -> Parts {
            let rest = url.split_once("://").map_or(url, |(_, r)| r);
            let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
            let authority = before_query.split('/').next().unwrap_or_default();
            let hostlist = authority.rsplit('@').next().unwrap_or_default();
            let mut hosts: Vec<String> = hostlist.split(',').map(strip_port).collect();
            let (mut hostaddrs, mut service) = (Vec::new(), false);
            let mut sslmode = None;
            // libpq decodes both the names and the values of a URI's parameters.
            let list = |v: &str| -> Vec<String> {
                v.split(',')
                    .map(str::to_owned)
                    .filter(|h| !h.is_empty())
                    .collect()
            };
            for pair in query.split('&') {
                let Some((k, v)) = pair.split_once('=') else {
                    continue;
                };
                let (k, v) = (decode(k), decode(v));
                match k.as_str() {
                    "sslmode" => sslmode = Some(v),
                    "host" => hosts = v.split(',').map(str::to_owned).collect(),
                    "hostaddr" => hostaddrs = list(&v),
                    "service" => service = !v.is_empty(),
                    _ => {}
                }
            }
            // What the URL leaves out, libpq takes from its environment.
            if hosts.iter().all(String::is_empty) {
                if let Some(h) = env("PGHOST").filter(|h| !h.is_empty()) {
                    hosts = h.split(',').map(str::to_owned).collect();
                }
            }
            if hostaddrs.is_empty() {
                hostaddrs = env("PGHOSTADDR").map(|v| list(&v)).unwrap_or_default();
            }
            service |= env("PGSERVICE").is_some_and(|v| !v.is_empty());
            Parts {
                hosts,
                hostaddrs,
                service,
                sslmode,
            }
        }

        /// Every address libpq connects to is local: a Unix socket directory, empty
        /// (libpq's default socket), `localhost` or a loopback address. With a
        /// `hostaddr` it connects there (`host` then only names the server), and a
        /// service file's settings are not known here: not local.
        pub fn all_hosts_local(&self) -> bool {
            if self.service {
                return false;
            }
            if !self.hostaddrs.is_empty() {
                return self.hostaddrs.iter().all(|a| {
                    a.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
                });
            }
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

    /// Third security review (2026-12-07): the policy judged "local" on the URL's
    /// `host` alone, where libpq connects to `hostaddr`, decodes percent-encoded
    /// parameter names, and reads a service file: remote servers were left on libpq's
    /// default `prefer` (TLS that falls back to plain text).
    #[test]
    fn the_tls_policy_sees_where_libpq_connects() {
        let policy = |url: &str| {
            DatabaseUrl::parse(url)
                .and_then(|u| u.with_tls_policy_in(false, |_| None))
                .map(|u| u.target().to_owned())
        };
        for remote in [
            "postgres://u@localhost/c?hostaddr=10.0.0.5",
            "postgres://u@127.0.0.1/c?hostaddr=127.0.0.1,10.0.0.5",
            "postgres://u@localhost/c?%68ost=db.example",
            "postgres://u@localhost/c?host=%64b.example",
            "postgres://u@localhost/c?service=prod",
        ] {
            assert!(
                policy(remote).is_ok_and(|t| t.ends_with("sslmode=verify-full")),
                "{remote}: {:?}",
                policy(remote)
            );
        }
        // A downgrade spelled with an encoded name is still one.
        assert!(policy("postgres://u@db.example/c?ssl%6Dode=prefer").is_err());
        assert!(policy("postgres://u@db.example/c?sslmode=%70refer").is_err());
        // Local stays local.
        for local in [
            "postgres://u@localhost/c?hostaddr=127.0.0.1",
            "postgres://u@db.example/c?hostaddr=::1&sslmode=disable",
        ] {
            assert_eq!(policy(local).as_deref(), Ok(local), "{local}");
        }
    }

    /// The same, for what libpq takes from its environment when the URL leaves it out.
    #[test]
    fn the_tls_policy_sees_libpqs_environment() {
        let policy = |url: &str, vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            DatabaseUrl::parse(url)
                .and_then(|u| {
                    u.with_tls_policy_in(false, |name| {
                        vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
                    })
                })
                .map(|u| u.target().to_owned())
        };
        let verified =
            |t: Result<String, String>| t.is_ok_and(|t| t.ends_with("sslmode=verify-full"));
        assert!(verified(policy(
            "postgresql:///c",
            &[("PGHOST", "db.example")]
        )));
        assert!(verified(policy(
            "postgres://u@localhost/c",
            &[("PGHOSTADDR", "10.0.0.5")]
        )));
        assert!(verified(policy(
            "postgres://u@localhost/c",
            &[("PGSERVICE", "prod")]
        )));
        // The URL's own host wins over PGHOST, and local variables stay local.
        assert_eq!(
            policy("postgres://u@localhost/c", &[("PGHOST", "db.example")]).as_deref(),
            Ok("postgres://u@localhost/c")
        );
        assert_eq!(
            policy("postgresql:///c", &[("PGHOST", "/var/run/postgresql")]).as_deref(),
            Ok("postgresql:///c")
        );
    }

    #[test]
    fn debug_never_prints_the_url() {
        let u = DatabaseUrl::parse("postgres://user:hunter2@h/db").expect("pg");
        assert!(!format!("{u:?}").contains("hunter2"));
    }
}
