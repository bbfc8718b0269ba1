//! A real PostgreSQL server, started as a local process for one test.
//!
//! [`Postgres::start`] runs `initdb` into a fresh temp dir and starts
//! `postgres` there on a [`free_port`](crate::free_port) of 127.0.0.1
//! (trust authentication, user `postgres`, unix socket in the temp dir).
//! It returns `None` and prints "skipping: PostgreSQL not installed" when
//! the server binaries are missing, unless `AEREKOS_REQUIRE_POSTGRES=1`,
//! where it panics instead (CI sets it).
//!
//! Binaries: `pg_config --bindir` when that holds `initdb` and `postgres`,
//! else the newest `/usr/lib/postgresql/<version>/bin` (Debian installs
//! them there, off the `PATH`).
//!
//! # Root
//!
//! PostgreSQL refuses to run as root. As root the temp dir is chowned to
//! the `postgres` user and `initdb`, `postgres` and `pg_ctl` run through
//! `setpriv --reuid=postgres --regid=postgres --init-groups`, which execs
//! in place (unlike `runuser`, which forks and waits): the child this
//! handle holds *is* the postmaster.
//!
//! # Killing
//!
//! Every backend and auxiliary process calls `setsid()` when the postmaster
//! forks it (`InitPostmasterChild`), so a process-group kill would reach the
//! postmaster only; backends linger until they notice it is gone, and a
//! restart meanwhile fails on the shared memory they still hold.
//! [`Postgres::kill`] therefore SIGKILLs the postmaster, then every process
//! whose working directory is under the temp dir (all PostgreSQL processes
//! chdir to their data dir, [`kill_processes_under`]) until none is left.
//! The server is not put in a process group of its own: a Ctrl-C on
//! `cargo test` then reaches it too (a fast shutdown) instead of leaving it
//! running.
//!
//! # One server per test process
//!
//! [`Postgres::shared`] starts one server for the whole test binary (a
//! suite run a second time against PostgreSQL: each test its own database,
//! [`Postgres::database`]). A static is never dropped, so the server is
//! started from a thread that lives as long as the process, with
//! `setpriv --pdeathsig KILL`: the kernel kills the postmaster when that
//! thread ends, at process exit (its backends notice and exit). Its temp
//! dir is named after the process id, and the next shared start removes
//! those of processes that are gone.
//!
//! The server runs with `fsync=off`: a killed process loses nothing (the
//! kernel keeps its writes), only a machine crash would.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::reap::kill_processes_under;

/// How long the server may take to accept connections (crash recovery included).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(100);
/// The user the server runs as when the tests run as root.
const SERVER_USER: &str = "postgres";

/// A PostgreSQL server of its own for a test: its data dir, unix socket and
/// log (`postgres.log`) live in a temp dir removed on drop; dropping the
/// handle kills the server.
#[derive(Debug)]
pub struct Postgres {
    /// The directory holding `initdb`, `postgres`, `psql`, `pg_isready`, `pg_ctl`.
    bindir: PathBuf,
    /// Set when running as root: the server's user.
    run_as: Option<String>,
    /// Canonical path of `dir` (what `/proc/<pid>/cwd` reports).
    root: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    port: u16,
    /// The postmaster, while it runs.
    child: Option<Child>,
    /// The postmaster is started with `setpriv --pdeathsig KILL` (the
    /// shared server: see the module docs).
    die_with_parent: bool,
    /// Last: removed after the server is dead.
    dir: TempDir,
}

impl Postgres {
    /// Initialises a cluster in a fresh temp dir and starts a server on it;
    /// `None` (after "skipping: PostgreSQL not installed" on stderr) when the
    /// binaries are missing, a panic then instead with
    /// `AEREKOS_REQUIRE_POSTGRES=1`. Panics when initdb or the server fail.
    pub fn start() -> Option<Postgres> {
        Postgres::start_in("aerekos-pg-", false)
    }

    /// The test process's one server, started on first use (module docs);
    /// `None` as for [`Postgres::start`].
    pub fn shared() -> Option<&'static Postgres> {
        static SHARED: std::sync::OnceLock<Option<Postgres>> = std::sync::OnceLock::new();
        SHARED
            .get_or_init(|| {
                remove_stale_shared_dirs();
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::Builder::new()
                    .name("postgres-shared".into())
                    .spawn(move || {
                        let prefix = format!("{SHARED_PREFIX}{}-", std::process::id());
                        let _ = tx.send(Postgres::start_in(&prefix, true));
                        // The postmaster dies with this thread: keep it.
                        loop {
                            std::thread::park();
                        }
                    })
                    .expect("spawn the shared PostgreSQL's thread");
                rx.recv().expect("the shared PostgreSQL's thread panicked")
            })
            .as_ref()
    }

    /// Database `name`'s URL, creating it if it does not exist yet.
    pub fn database(&self, name: &str) -> String {
        let quoted = name.replace('\'', "''");
        let exists = self.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{quoted}'"),
        );
        if exists == "0" {
            return self.create_database(name);
        }
        format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            self.port,
            percent_encode(name)
        )
    }

    fn start_in(prefix: &str, die_with_parent: bool) -> Option<Postgres> {
        let Some(bindir) = bindir() else {
            return skip(
                "no initdb and postgres in `pg_config --bindir` or /usr/lib/postgresql/*/bin",
            );
        };
        let run_as = if effective_uid() == Some(0) {
            if which("setpriv").is_none() {
                return skip("running as root and setpriv (util-linux) is missing");
            }
            match (id_of("-u"), id_of("-g")) {
                (Some(uid), Some(gid)) => Some((uid, gid)),
                _ => return skip("running as root and there is no `postgres` user"),
            }
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create a temp dir for PostgreSQL");
        let root = dir
            .path()
            .canonicalize()
            .expect("canonicalize the temp dir");
        let sock = root.join("sock");
        fs::create_dir(&sock).expect("create the socket dir");
        if let Some((uid, gid)) = run_as {
            for p in [&root, &sock] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", p.display()));
            }
        }
        let mut pg = Postgres {
            bindir,
            run_as: run_as.map(|_| SERVER_USER.to_string()),
            data: root.join("data"),
            log: root.join("postgres.log"),
            sock,
            root,
            port: 0,
            child: None,
            die_with_parent,
            dir,
        };
        pg.initdb();
        // The port is free when drawn; another program may still take it
        // before the server binds it: draw again then.
        for attempt in 1..=3 {
            pg.port = crate::free_port();
            match pg.spawn_and_wait() {
                Ok(()) => return Some(pg),
                Err(log) if attempt < 3 && log.contains("could not bind") => {}
                Err(log) => panic!(
                    "PostgreSQL did not start on port {} ({}); log tail:\n{log}",
                    pg.port,
                    pg.dir.path().display()
                ),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The TCP port on 127.0.0.1 (the same across [`Postgres::start_again`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server's log (all its runs so far).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Creates database `name` and returns its URL. Panics on failure
    /// (an existing name included).
    pub fn create_database(&self, name: &str) -> String {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")),
        );
        format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            self.port,
            percent_encode(name)
        )
    }

    /// Turns TLS on: `cert_pem` (the server's certificate, then its chain)
    /// and `key_pem` become `server.crt` and `server.key` in the data dir
    /// (owned by the server's user, the key 0600), `ssl = on` is set with
    /// `ALTER SYSTEM` and the configuration reloaded. Clients may then ask
    /// for TLS; plain connections are still accepted (`pg_hba` `host`).
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) {
        use std::os::unix::fs::PermissionsExt;
        for (name, text, mode) in [
            ("server.crt", cert_pem, 0o644),
            ("server.key", key_pem, 0o600),
        ] {
            let path = self.data.join(name);
            fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
            if self.run_as.is_some() {
                let (uid, gid) = (id_of("-u"), id_of("-g"));
                std::os::unix::fs::chown(&path, uid, gid)
                    .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
            }
        }
        self.psql("postgres", "ALTER SYSTEM SET ssl = 'on'");
        self.psql("postgres", "SELECT pg_reload_conf()");
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.psql("postgres", "SHOW ssl") != "on" {
            assert!(
                Instant::now() < deadline,
                "ssl did not turn on; log tail:\n{}",
                self.log_tail()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Runs `sql` in database `db` with `psql -X -A -t` over TCP and returns
    /// its trimmed stdout (unaligned, tuples only: `SELECT 1` gives "1",
    /// columns are separated by `|`, rows by newlines). Panics with psql's
    /// stderr when it fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let out = Command::new(self.bindir.join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &port, "-U", "postgres", "-d", db, "-c", sql])
            .env_remove("PGOPTIONS")
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        if !out.status.success() {
            panic!(
                "psql -d {db} -c {sql:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// SIGKILLs the postmaster and every process it started (a crash: the
    /// next start runs crash recovery) and waits until they are gone.
    /// A no-op when the server is not running.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        self.reap();
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`: sessions are
    /// disconnected, a shutdown checkpoint is written). A no-op when the
    /// server is not running.
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let out = self
            .as_server_user(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-t", "30", "stop"])
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl stop");
        if !out.status.success() {
            let msg = output_text(&out);
            self.kill();
            panic!("pg_ctl stop failed ({}): {msg}", out.status);
        }
        self.reap();
    }

    /// Starts the server again on the same data dir and port, after
    /// [`Postgres::kill`] or [`Postgres::stop`], and waits until it accepts
    /// connections (after a kill: once crash recovery is done). Panics when
    /// it is running or does not come up.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again: the server is running");
        let Err(log) = self.spawn_and_wait() else {
            return;
        };
        // A stale lock file whose pid now belongs to another process: the
        // postmaster is dead (we reaped it), the file can go.
        if log.contains("postmaster.pid") && log.contains("already exists") {
            let _ = fs::remove_file(self.data.join("postmaster.pid"));
            if let Err(log) = self.spawn_and_wait() {
                panic!("PostgreSQL did not restart; log tail:\n{log}");
            }
            return;
        }
        panic!("PostgreSQL did not restart; log tail:\n{log}");
    }

    /// `bin` as the server's user: through `setpriv` (which execs in place)
    /// when running as root, else directly.
    fn as_server_user(&self, bin: &Path) -> Command {
        if self.run_as.is_none() && !self.die_with_parent {
            return Command::new(bin);
        }
        let mut c = Command::new("setpriv");
        if let Some(user) = &self.run_as {
            c.arg(format!("--reuid={user}"))
                .arg(format!("--regid={user}"))
                .arg("--init-groups");
        }
        if self.die_with_parent {
            c.args(["--pdeathsig", "KILL"]);
        }
        c.arg("--").arg(bin);
        c
    }

    fn initdb(&self) {
        let out = self
            .as_server_user(&self.bindir.join("initdb"))
            .arg("-D")
            .arg(&self.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb -D {} failed ({}):\n{}",
            self.data.display(),
            out.status,
            output_text(&out)
        );
    }

    /// Starts the postmaster and waits until it accepts connections; the
    /// log's tail when it exits or times out first (it is killed then).
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open postgres.log");
        let log2 = log.try_clone().expect("clone the log's handle");
        let port = self.port.to_string();
        let child = self
            .as_server_user(&self.bindir.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &port, "-k"])
            .arg(&self.sock)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ])
            .args(["-c", "shared_buffers=32MB", "-c", "fsync=off"])
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                self.reap();
                return Err(format!("postgres exited ({status})\n{}", self.log_tail()));
            }
            if self.ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "not ready after {READY_TIMEOUT:?}\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// `pg_isready` says the server accepts connections.
    fn ready(&self) -> bool {
        Command::new(self.bindir.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Kills whatever server process is left under the temp dir until none
    /// is, then reaps the postmaster.
    fn reap(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !kill_processes_under(&self.root).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of the log.
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The temp dir prefix of shared servers, followed by the owning pid.
const SHARED_PREFIX: &str = "aerekos-pg-shared-";

/// Removes the temp dirs of shared servers whose test process is gone.
fn remove_stale_shared_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(SHARED_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().filter(|p| !p.is_empty()) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// None after saying why on stderr, or a panic with `AEREKOS_REQUIRE_POSTGRES=1`.
fn skip(why: &str) -> Option<Postgres> {
    if std::env::var("AEREKOS_REQUIRE_POSTGRES").as_deref() == Ok("1") {
        panic!(
            "AEREKOS_REQUIRE_POSTGRES=1 but PostgreSQL cannot be started: {why} \
             (install it: sh tests/setup.sh)"
        );
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "skipping: PostgreSQL not installed ({why})");
    None
}

/// Where `initdb` and `postgres` are (module docs).
fn bindir() -> Option<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    let reported = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(d) = reported.filter(|d| has_server(d)) {
        return Some(d);
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name
                .split('.')
                .map(|n| n.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// This process's effective uid (`/proc/self/status`).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `id <flag> postgres`: the server user's uid (`-u`) or gid (`-g`).
fn id_of(flag: &str) -> Option<u32> {
    let out = Command::new("id")
        .args([flag, SERVER_USER])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// `name` found on the `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A database name as a URL path segment.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A command's stdout and stderr, for a panic message.
fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Processes (of any user) whose working directory is under `dir`.
    fn running_under(dir: &Path) -> usize {
        fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter(|e| fs::read_link(e.path().join("cwd")).is_ok_and(|p| p.starts_with(dir)))
            .count()
    }

    #[test]
    fn starts_and_answers_queries() {
        let t = Instant::now();
        let Some(pg) = Postgres::start() else {
            return;
        };
        eprintln!("started in {:?}", t.elapsed());
        assert_eq!(pg.psql("postgres", "SELECT 1"), "1");
        assert_eq!(
            pg.url(),
            format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port())
        );
        let url = pg.create_database("fleet-db");
        assert_eq!(
            url,
            format!("postgres://postgres@127.0.0.1:{}/fleet-db", pg.port())
        );
        assert_eq!(pg.psql("fleet-db", "SELECT current_database()"), "fleet-db");
        assert!(
            running_under(&pg.root) > 1,
            "postmaster and its children run"
        );
        let root = pg.root.clone();
        drop(pg);
        assert_eq!(running_under(&root), 0, "nothing left after drop");
        assert!(!root.exists(), "temp dir removed");
    }

    #[test]
    fn the_shared_server_is_one_and_its_databases_are_made_once() {
        let Some(a) = Postgres::shared() else {
            return;
        };
        let b = Postgres::shared().expect("started once, there twice");
        assert!(std::ptr::eq(a, b));
        assert!(a.die_with_parent);
        let url = a.database("shared_once");
        assert_eq!(a.database("shared_once"), url, "made once, then found");
        a.psql("shared_once", "CREATE TABLE IF NOT EXISTS t (v int)");
        assert!(a
            .root
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{SHARED_PREFIX}{}-", std::process::id()))));
    }

    #[test]
    fn committed_rows_survive_a_kill() {
        let Some(mut pg) = Postgres::start() else {
            return;
        };
        pg.psql("postgres", "CREATE TABLE t (id int PRIMARY KEY, v text)");
        pg.psql("postgres", "INSERT INTO t VALUES (1, 'kept')");
        // A busy backend (its own session: not in the postmaster's group).
        let mut busy = Command::new(pg.bindir.join("psql"))
            .args(["-X", "-h", "127.0.0.1", "-p", &pg.port().to_string()])
            .args(["-U", "postgres", "-c", "SELECT pg_sleep(60)"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn psql");
        let sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'";
        while pg.psql("postgres", sleeping) != "1" {
            std::thread::sleep(POLL);
        }
        let t = Instant::now();
        pg.kill();
        assert!(!busy.wait().expect("wait for psql").success());
        assert_eq!(
            running_under(&pg.root),
            0,
            "no server process survives kill()"
        );
        pg.start_again();
        eprintln!("kill + crash recovery in {:?}", t.elapsed());
        assert!(pg.log().contains("not properly shut down"), "{}", pg.log());
        assert_eq!(pg.psql("postgres", "SELECT v FROM t WHERE id = 1"), "kept");

        pg.psql("postgres", "INSERT INTO t VALUES (2, 'also')");
        let t = Instant::now();
        pg.stop();
        assert_eq!(
            running_under(&pg.root),
            0,
            "no server process survives stop()"
        );
        pg.start_again();
        eprintln!("stop + start in {:?}", t.elapsed());
        assert_eq!(pg.psql("postgres", "SELECT count(*) FROM t"), "2");
    }

    #[test]
    fn two_servers_at_once() {
        let start = || std::thread::spawn(Postgres::start);
        let (a, b) = (start(), start());
        let (Some(a), Some(b)) = (a.join().expect("thread a"), b.join().expect("thread b")) else {
            return;
        };
        assert_ne!(a.port(), b.port());
        a.psql("postgres", "CREATE TABLE only_in_a (x int)");
        assert_eq!(a.psql("postgres", "SELECT 1"), "1");
        assert_eq!(
            b.psql(
                "postgres",
                "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'"
            ),
            "0"
        );
    }

    #[test]
    fn database_urls_are_encoded() {
        assert_eq!(percent_encode("a b/c-d_e"), "a%20b%2Fc-d_e");
    }
}
