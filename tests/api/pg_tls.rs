//! TLS to PostgreSQL against a throwaway cluster this test starts itself (`initdb` +
//! `pg_ctl` in a temporary directory, on a free port, `ssl=on` with a certificate from a
//! CA generated here, and only `hostssl` lines in pg_hba.conf). The shared server on
//! 5432 is never touched. As root, the cluster runs as the `postgres` user through
//! `runuser` (initdb refuses root). Without PostgreSQL binaries the test is skipped,
//! unless REQUIRE_POSTGRES=1, where that is a failure.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

const BIN: &str = env!("CARGO_BIN_EXE_coordinator");

fn pg_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Run a PostgreSQL tool, as `postgres` when we are root.
fn pg(tool: &Path, args: &[&str]) -> Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(tool);
        c
    } else {
        Command::new(tool)
    };
    cmd.args(args).output().unwrap()
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    (p.self_signed(&key).unwrap(), key)
}

/// A running throwaway cluster; stopped (and its directory removed) on drop.
struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    ca_file: PathBuf,
    wrong_ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(bin: PathBuf) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (ca, ca_key) = ca("pg test CA");
        let mut p =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().unwrap();
        let server = p.signed_by(&key, &ca, &ca_key).unwrap();
        let (wrong, _) = self::ca("someone else's CA");
        let ca_file = dir.path().join("ca.crt");
        let wrong_ca_file = dir.path().join("wrong-ca.crt");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(&wrong_ca_file, wrong.pem()).unwrap();
        let ssl = dir.path().join("ssl");
        std::fs::create_dir(&ssl).unwrap();
        std::fs::write(ssl.join("server.crt"), server.pem()).unwrap();
        std::fs::write(ssl.join("server.key"), key.serialize_pem()).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path, m: u32| {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
            };
            mode(dir.path(), 0o755);
            mode(&ssl.join("server.key"), 0o600);
            if is_root() {
                let out = Command::new("id")
                    .args(["-u", "postgres"])
                    .output()
                    .unwrap();
                let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
                for p in [&ssl, &ssl.join("server.crt"), &ssl.join("server.key")] {
                    std::os::unix::fs::chown(p, Some(uid), None).unwrap();
                }
                std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data_s = data.to_str().unwrap();
        let out = pg(
            &bin.join("initdb"),
            &["-D", data_s, "-U", "postgres", "-A", "trust", "--no-sync"],
        );
        assert!(out.status.success(), "initdb: {out:?}");
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\n",
            dir.path().display(),
            ssl.join("server.crt").display(),
            ssl.join("server.key").display()
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        // TLS only over TCP: a plain-text connection finds no pg_hba line.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let log = dir.path().join("pg.log");
        let out = pg(
            &bin.join("pg_ctl"),
            &["-D", data_s, "-l", log.to_str().unwrap(), "-w", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {out:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Cluster {
            bin,
            data,
            port,
            ca_file,
            wrong_ca_file,
            _dir: dir,
        }
    }

    fn url(&self, host: &str, params: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{params}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = pg(
            &self.bin.join("pg_ctl"),
            &["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}

/// `coordinator migrate` against this URL.
fn migrate(url: &str) -> Output {
    Command::new(BIN)
        .args(["migrate", "--database-url", url])
        .env_remove("DATABASE_URL")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .output()
        .unwrap()
}

/// `coordinator serve` against this URL: it must end at start with one line.
fn serve_fails(url: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["serve", "--bind", "127.0.0.1:0", "--database-url", url])
        .env_remove("DATABASE_URL")
        .env(
            "COORDINATOR_MASTER_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    stderr
}

fn postgres_over_verified_tls() {
    let bin = pg_bin_dir().expect("PostgreSQL binaries (checked before the run)");
    let cluster = Cluster::start(bin);
    let ca = cluster.ca_file.to_str().unwrap().to_owned();
    let wrong = cluster.wrong_ca_file.to_str().unwrap().to_owned();

    // verify-full with the right CA and host name connects.
    let out = migrate(&cluster.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ));
    assert!(out.status.success(), "{out:?}");
    // The server certificate names localhost and 127.0.0.1, not another host.
    let out = migrate(&cluster.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ));
    assert!(out.status.success(), "{out:?}");

    // Another CA: refused at start, one line saying why.
    let line = serve_fails(&cluster.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={wrong}"),
    ));
    assert!(line.contains("cannot connect to the database"), "{line}");
    assert!(line.contains("certificate verify failed"), "{line}");
    assert!(!line.contains("postgres@"), "the URL is not echoed: {line}");

    // Plain text against a hostssl-only server: refused, one line.
    let line = serve_fails(&cluster.url("localhost", "sslmode=disable"));
    assert!(line.contains("no encryption"), "{line}");

    // sslmode=prefer is refused before any connection unless explicitly allowed.
    let line = serve_fails(&cluster.url("localhost", "sslmode=prefer"));
    assert!(
        line.contains("COORDINATOR_DB_ALLOW_TLS_DOWNGRADE"),
        "{line}"
    );
    let out = Command::new(BIN)
        .args([
            "migrate",
            "--db-allow-tls-downgrade",
            "--database-url",
            &cluster.url("localhost", "sslmode=prefer"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

// Needs the PostgreSQL server binaries, not the shared server: ignored where they are
// missing, a failure under REQUIRE_POSTGRES=1.
inventory::submit! {
    crate::helpers::Test::new(module_path!(), "", "postgres_over_verified_tls", postgres_over_verified_tls)
        .when(postgres_binaries_available)
}

fn postgres_binaries_available() -> bool {
    let found = pg_bin_dir().is_some();
    assert!(
        found || std::env::var("REQUIRE_POSTGRES").as_deref() != Ok("1"),
        "REQUIRE_POSTGRES=1 but no /usr/lib/postgresql/*/bin/initdb"
    );
    found
}
