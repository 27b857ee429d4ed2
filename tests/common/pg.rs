//! A throwaway PostgreSQL cluster for the tests: `initdb` and `pg_ctl` from
//! the distribution's server package, run as a non-root user, in a
//! temporary directory, on a free loopback port; stopped and removed on
//! drop. Where the package is absent the helper says so loudly and the
//! test is skipped (`.ci/run` installs it).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A running cluster.
pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    user: Option<String>,
    pub port: u16,
}

/// Where the server binaries are: `COFFRE_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin`, else `PATH`.
fn pg_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("COFFRE_PG_BIN") {
        return Some(PathBuf::from(p));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// Runs `cmd` as `user` when the tests run as root (PostgreSQL refuses
/// root), else as ourselves.
fn as_user(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PgCluster {
    /// Starts a cluster, or `None` (with a loud message) where PostgreSQL's
    /// server package is not installed.
    pub fn start() -> Option<Self> {
        let Some(bin) = pg_bin() else {
            // Straight to the terminal: the test harness captures `eprintln!`.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"\n*** SKIPPED: no PostgreSQL server (initdb) found under /usr/lib/postgresql; \
                  install the `postgresql` package (.ci/run does) ***\n",
            );
            return None;
        };
        let root = nix::unistd::geteuid().is_root();
        let user = root.then(|| {
            if nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .is_some()
            {
                "postgres".to_string()
            } else {
                "nobody".to_string()
            }
        });
        let dir = tempfile::Builder::new()
            .prefix("coffre-pg")
            .tempdir()
            .unwrap();
        if let Some(u) = &user {
            let pw = nix::unistd::User::from_name(u).unwrap().unwrap();
            nix::unistd::chown(dir.path(), Some(pw.uid), Some(pw.gid)).unwrap();
        }
        let data = dir.path().join("data");
        let st = as_user(user.as_deref(), &bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        let port = free_port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=400",
            dir.path().display()
        );
        let st = as_user(user.as_deref(), &bin.join("pg_ctl"))
            .args(["-w", "-t", "30", "-D"])
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(dir.path().join("log"))
            .arg("start")
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&st.stderr),
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        );
        Some(Self {
            bin,
            dir,
            user,
            port,
        })
    }

    /// Stops the server (fast: connections are cut), keeping its data.
    pub fn stop(&self) {
        let st = as_user(self.user.as_deref(), &self.bin.join("pg_ctl"))
            .args(["-w", "-m", "fast", "-D"])
            .arg(self.data_dir())
            .arg("stop")
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    }

    /// Starts it again on the same port.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=400",
            self.port,
            self.dir.path().display()
        );
        let st = as_user(self.user.as_deref(), &self.bin.join("pg_ctl"))
            .args(["-w", "-t", "30", "-D"])
            .arg(self.data_dir())
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("log"))
            .arg("start")
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    }

    /// The cluster's data directory (its files, as a copy would hold them).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A URL for a client on this machine.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs one SQL statement with `psql`; its output (unaligned, no
    /// headers).
    pub fn sql(&self, database: &str, statement: &str) -> String {
        let psql = if self.bin.join("psql").exists() {
            self.bin.join("psql")
        } else {
            PathBuf::from("psql")
        };
        let out = Command::new(psql)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url(database))
            .args(["-c", statement])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// One cluster for the whole test binary (each server gets a database of
/// its own in it): started on first use, stopped by a watchdog process
/// when the test binary exits, since statics are never dropped.
pub fn shared() -> Option<&'static PgCluster> {
    static CLUSTER: std::sync::OnceLock<Option<PgCluster>> = std::sync::OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            let c = PgCluster::start()?;
            let stop = format!(
                "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {runuser}{ctl:?} -m immediate -D {data:?} stop >/dev/null 2>&1; rm -rf {dir:?}",
                pid = std::process::id(),
                runuser = c
                    .user
                    .as_deref()
                    .map(|u| format!("runuser -u {u} -- "))
                    .unwrap_or_default(),
                ctl = c.bin.join("pg_ctl"),
                data = c.dir.path().join("data"),
                dir = c.dir.path(),
            );
            // Outlives this process on purpose: it stops the cluster once
            // the test binary has exited.
            #[allow(clippy::zombie_processes)]
            Command::new("sh")
                .args(["-c", &stop])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start the cluster's watchdog");
            Some(c)
        })
        .as_ref()
}

impl PgCluster {
    /// A new, empty database; its URL.
    pub fn new_database(&self) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = as_user(self.user.as_deref(), &self.bin.join("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .output();
    }
}
