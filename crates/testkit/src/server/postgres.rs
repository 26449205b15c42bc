//! A throwaway PostgreSQL cluster: `postgres` run directly (not through
//! `pg_ctl`, so the postmaster is our child and its backends are in our
//! process group) on a copy of a data directory made once by `initdb`.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::ServerError;
use super::handle::{Flavor, server_type};
use super::pg_wire::Session;
use super::process::{self, Launch, RunAs};
use super::url::Parts;

/// The longest [`PostgresServer::simple_query`] waits.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Written into a template once `initdb` succeeded; bump the suffix when
/// the `initdb` options change so that old templates are not reused.
const TEMPLATE_MARKER: &str = ".writethrough-testkit-template-v1";

server_type! {
    /// A throwaway PostgreSQL cluster on a free loopback port.
    ///
    /// User `postgres` with trust authentication, database `postgres`,
    /// UTF-8, `max_connections` 200, and `fsync` and `full_page_writes` off:
    /// fast, and still safe against a killed process, since the kernel
    /// keeps what was written. `synchronous_commit` stays on, so every
    /// acknowledged commit survives [`kill`](Self::kill) and
    /// [`restart`](Self::restart) (the server runs crash recovery).
    ///
    /// When the test runs as root, PostgreSQL (which refuses to run as
    /// root) runs as the `postgres` user, or `nobody` when there is none.
    ///
    /// `initdb` runs once per machine and user: its result is kept in
    /// `writethrough-testkit-<uid>/` next to the servers' directories (see
    /// the [module docs](crate::server)) and copied for each server, which
    /// makes a start several times faster.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), writethrough_testkit::server::ServerError> {
    /// let pg = writethrough_testkit::server::PostgresServer::start().await?;
    /// let rows = pg.simple_query("SELECT 1 + 1").await?;
    /// assert_eq!(rows, vec![vec![Some("2".to_owned())]]);
    /// # Ok(())
    /// # }
    /// ```
    PostgresServer, Postgres, "a throwaway PostgreSQL cluster",
    "postgres://postgres@127.0.0.1:PORT/postgres", "WT_TEST_POSTGRES_URL"
}

impl PostgresServer {
    /// Runs `sql` (one or more statements, no parameters) with the simple
    /// query protocol and returns the rows of its results, each value in
    /// PostgreSQL's text form (`None` for NULL).
    ///
    /// A helper for tests that need to set up or inspect data without a
    /// driver. It only speaks trust authentication, as used by the servers
    /// the testkit starts.
    ///
    /// # Errors
    ///
    /// When the server cannot be reached, refuses the session, rejects a
    /// statement (the message includes the SQLSTATE), or does not answer
    /// within 30 s.
    pub async fn simple_query(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ServerError> {
        let url = self.url();
        let parts = Parts::parse(&url);
        let user = parts.user.unwrap_or("postgres");
        let database = parts.database().unwrap_or("postgres");
        let addr = self.addr();
        let run = async {
            let mut session = Session::connect(addr, user, database).await?;
            let rows = session.simple_query(sql).await;
            session.close().await;
            rows
        };
        match tokio::time::timeout(QUERY_TIMEOUT, run).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(ServerError::new(format!(
                "query {sql:?} on {url} failed: {e}"
            ))),
            Err(_) => Err(ServerError::new(format!(
                "query {sql:?} on {url}: no answer within {} s",
                QUERY_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// The PostgreSQL server binaries of one installation.
#[derive(Debug, Clone)]
struct Binaries {
    initdb: PathBuf,
    postgres: PathBuf,
}

impl Binaries {
    /// `initdb` and `postgres` from the same directory: on `PATH`, or in
    /// Debian's `/usr/lib/postgresql/<major>/bin` (newest first), which is
    /// not on `PATH`.
    fn find() -> Result<Self, ServerError> {
        let mut dirs = Vec::new();
        if let Some(initdb) = process::find_on_path("initdb") {
            // Follow a symlink to the real installation, whose directory
            // also holds `postgres`.
            if let Some(dir) = fs::canonicalize(&initdb)
                .ok()
                .and_then(|real| real.parent().map(Path::to_owned))
            {
                dirs.push(dir);
            }
            if let Some(dir) = initdb.parent() {
                dirs.push(dir.to_owned());
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let major = entry.file_name().to_str()?.parse().ok()?;
                Some((major, entry.path().join("bin")))
            })
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.0));
        dirs.extend(versions.into_iter().map(|(_, dir)| dir));

        for dir in dirs {
            let (initdb, postgres) = (dir.join("initdb"), dir.join("postgres"));
            if process::is_executable(&initdb) && process::is_executable(&postgres) {
                return Ok(Self { initdb, postgres });
            }
        }
        match (
            process::find_on_path("initdb"),
            process::find_on_path("postgres"),
        ) {
            (Some(initdb), Some(postgres)) => Ok(Self { initdb, postgres }),
            _ => Err(process::missing_binary(
                "PostgreSQL (initdb and postgres)",
                "on PATH or in /usr/lib/postgresql/*/bin",
                "postgresql",
            )),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Postgres {
    binaries: Binaries,
    run_as: Option<RunAs>,
}

impl Postgres {
    fn data_dir(dir: &Path) -> PathBuf {
        dir.join("data")
    }
}

impl Flavor for Postgres {
    const BINARY: &'static str = "postgres";
    const ENV_VAR: &'static str = "WT_TEST_POSTGRES_URL";
    const DEFAULT_PORT: u16 = 5432;
    // SIGINT is the "fast" shutdown: SIGTERM ("smart") would wait for every
    // client to disconnect.
    const STOP_SIGNAL: Signal = Signal::SIGINT;

    fn url(port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }

    async fn prepare() -> Result<(Self, tempfile::TempDir), ServerError> {
        let binaries = Binaries::find()?;
        let run_as = if super::is_root() {
            Some(
                RunAs::first_existing(&["postgres", "nobody"]).ok_or_else(|| {
                    ServerError::new(
                        "PostgreSQL refuses to run as root, and neither a `postgres` nor a \
                     `nobody` user exists to run it as (`apt-get install -y postgresql` \
                     creates `postgres`)",
                    )
                })?,
            )
        } else {
            None
        };
        let template = template(&binaries, run_as.as_ref()).await?;
        let dir = process::temp_dir("wt-postgres-")?;
        let target = dir.path().to_owned();
        let user = run_as.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let started = Instant::now();
            if let Some(user) = &user {
                // The socket directory (-k) is the server directory itself.
                user.chown(&target)?;
            }
            copy_tree(
                &Postgres::data_dir(&template),
                &Postgres::data_dir(&target),
                user.as_ref(),
            )?;
            tracing::debug!(elapsed = ?started.elapsed(), "copied the PostgreSQL template");
            Ok(())
        })
        .await
        .map_err(|e| ServerError::new(format!("copying the PostgreSQL template panicked: {e}")))?
        .map_err(|e| {
            ServerError::new(format!(
                "cannot copy the PostgreSQL template into {}: {e}",
                dir.path().display()
            ))
        })?;
        Ok((Self { binaries, run_as }, dir))
    }

    fn launch(&self, port: u16, dir: &Path) -> Launch {
        let mut launch = Launch::new(&self.binaries.postgres, dir, Self::log_file(dir))
            .run_as(self.run_as.clone())
            .arg("-D")
            .arg(Self::data_dir(dir))
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(dir);
        for setting in [
            "listen_addresses=127.0.0.1",
            // Without fsync, a commit still write()s its WAL to the kernel
            // before it is acknowledged, so it survives a killed server (not
            // a machine crash, which tests do not do). synchronous_commit
            // stays on for that reason: off, a commit acknowledged just
            // before a kill is lost, and the tests that check "the DB never
            // loses an acknowledged write" would fail for the wrong reason.
            "fsync=off",
            "full_page_writes=off",
            "max_connections=200",
            // Dynamic shared memory in files under the data directory, so a
            // killed server leaves none in /dev/shm.
            "dynamic_shared_memory_type=mmap",
            // Log to stderr, which goes to our log file.
            "logging_collector=off",
        ] {
            launch = launch.arg("-c").arg(setting);
        }
        launch
    }

    fn log_file(dir: &Path) -> PathBuf {
        dir.join("postgres.log")
    }

    fn after_kill(&self, dir: &Path) {
        // A killed postmaster leaves its System V shared memory segment
        // behind (a restart would reuse and free it). Line 7 of its lock
        // file has the segment's key and id. Left alone, these pile up to
        // the kernel's limit (kernel.shmmni) over many test runs.
        let Ok(lock) = fs::read_to_string(Self::data_dir(dir).join("postmaster.pid")) else {
            return; // a clean shutdown removes the file, and the segment
        };
        let Some(shmid) = lock
            .lines()
            .nth(6)
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|id| id.parse::<i64>().ok())
        else {
            return;
        };
        match Command::new("ipcrm")
            .arg("-m")
            .arg(shmid.to_string())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => tracing::debug!(
                shmid,
                "ipcrm failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => tracing::debug!(shmid, "cannot run ipcrm: {e}"),
        }
    }

    async fn probe(&self, addr: SocketAddr, pid: u32, dir: &Path) -> Result<(), String> {
        // The postmaster writes its pid file before it binds the port, and
        // exits if the bind fails: our pid in it (not a stale one from before
        // a kill) plus a session on the port means the port is ours.
        let lock_file = Self::data_dir(dir).join("postmaster.pid");
        let owner = fs::read_to_string(&lock_file).ok();
        let owner = owner
            .as_deref()
            .and_then(|text| text.lines().next())
            .and_then(|line| line.trim().parse::<u32>().ok());
        if owner != Some(pid) {
            return Err(format!(
                "postmaster.pid names process {owner:?}, not ours ({pid}) yet"
            ));
        }
        let session = Session::connect(addr, "postgres", "postgres")
            .await
            .map_err(|e| e.to_string())?;
        session.close().await;
        Ok(())
    }
}

/// The template data directory, made by `initdb` once per machine, user and
/// PostgreSQL installation, and kept between test runs.
async fn template(binaries: &Binaries, run_as: Option<&RunAs>) -> Result<PathBuf, ServerError> {
    static TEMPLATE: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    TEMPLATE
        .get_or_try_init(|| {
            let binaries = binaries.clone();
            let run_as = run_as.cloned();
            async move {
                tokio::task::spawn_blocking(move || make_template(&binaries, run_as.as_ref()))
                    .await
                    .map_err(|e| ServerError::new(format!("initdb panicked: {e}")))?
            }
        })
        .await
        .cloned()
}

fn make_template(binaries: &Binaries, run_as: Option<&RunAs>) -> Result<PathBuf, ServerError> {
    let version = Command::new(&binaries.postgres)
        .arg("--version")
        .output()
        .map_err(|e| {
            ServerError::new(format!(
                "cannot run `{} --version`: {e}",
                binaries.postgres.display()
            ))
        })?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let uid = run_as.map_or_else(|| nix::unistd::geteuid().as_raw(), |u| u.uid);
    let key: String = format!(
        "pg-{version}-{}-uid{uid}",
        binaries
            .postgres
            .parent()
            .unwrap_or(Path::new(""))
            .display()
    )
    .chars()
    .map(|c| {
        if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
            c
        } else {
            '_'
        }
    })
    .collect();

    let root = process::scratch_root().join(format!(
        "writethrough-testkit-{}",
        nix::unistd::geteuid().as_raw()
    ));
    let io_error = |what: &str, path: &Path, e: io::Error| {
        ServerError::new(format!("cannot {what} {}: {e}", path.display()))
    };
    fs::create_dir_all(&root).map_err(|e| io_error("create", &root, e))?;
    let done = root.join(&key);
    if done.join(TEMPLATE_MARKER).exists() {
        return Ok(done);
    }

    // initdb into a private directory, then rename it into place: another
    // test process may be doing the same, and rename is atomic.
    let staging = root.join(format!(
        "{key}.tmp-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    fs::create_dir(&staging).map_err(|e| io_error("create", &staging, e))?;
    let result = run_initdb(binaries, run_as, &staging);
    let result = result.and_then(|()| {
        fs::write(staging.join(TEMPLATE_MARKER), &version)
            .map_err(|e| io_error("write to", &staging, e))
    });
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    if fs::rename(&staging, &done).is_ok() {
        return Ok(done);
    }
    if done.join(TEMPLATE_MARKER).exists() {
        // Another process won the race.
        let _ = fs::remove_dir_all(&staging);
        return Ok(done);
    }
    // A leftover without the marker: replace it.
    let _ = fs::remove_dir_all(&done);
    fs::rename(&staging, &done).map_err(|e| io_error("rename a template to", &done, e))?;
    Ok(done)
}

fn run_initdb(binaries: &Binaries, run_as: Option<&RunAs>, dir: &Path) -> Result<(), ServerError> {
    use std::os::unix::process::CommandExt as _;

    if let Some(user) = run_as {
        user.chown(dir).map_err(|e| {
            ServerError::new(format!(
                "cannot give {} to user {}: {e}",
                dir.display(),
                user.name
            ))
        })?;
    }
    let started = Instant::now();
    let mut command = Command::new(&binaries.initdb);
    command
        .arg("-D")
        .arg(Postgres::data_dir(dir))
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .current_dir(dir)
        .env("LC_ALL", "C");
    if let Some(user) = run_as {
        command.uid(user.uid).gid(user.gid);
    }
    let output = command
        .output()
        .map_err(|e| ServerError::new(format!("cannot run {}: {e}", binaries.initdb.display())))?;
    if !output.status.success() {
        return Err(ServerError::new(format!(
            "`{} -D {}` failed ({}){}:\n{}{}",
            binaries.initdb.display(),
            Postgres::data_dir(dir).display(),
            output.status,
            run_as
                .map(|u| format!(" running as user {}", u.name))
                .unwrap_or_default(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    tracing::debug!(elapsed = ?started.elapsed(), "initdb made the PostgreSQL template");
    Ok(())
}

/// Copies a directory tree, keeping permissions (PostgreSQL insists on a
/// private data directory) and giving everything to `owner`.
fn copy_tree(from: &Path, to: &Path, owner: Option<&RunAs>) -> io::Result<()> {
    fs::create_dir(to)?;
    fs::set_permissions(to, fs::metadata(from)?.permissions())?;
    if let Some(owner) = owner {
        owner.chown(to)?;
    }
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&source, &target, owner)?;
            continue;
        }
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&source)?, &target)?;
        } else {
            fs::copy(&source, &target)?;
        }
        if let Some(owner) = owner {
            owner.chown(&target)?;
        }
    }
    Ok(())
}
