//! Server processes and everything they fork: spawning, signalling, waiting
//! until all of it is gone, and the small helpers around them (binary
//! lookup, free ports, logs).

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::ServerError;

/// How long `kill` waits for the processes to disappear after `SIGKILL`.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The user a server runs as when the test runs as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl RunAs {
    /// The first of `names` that exists on this machine.
    pub(crate) fn first_existing(names: &[&str]) -> Option<Self> {
        names.iter().find_map(|name| {
            let user = nix::unistd::User::from_name(name).ok().flatten()?;
            Some(Self {
                name: (*name).to_owned(),
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            })
        })
    }

    pub(crate) fn chown(&self, path: &Path) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
    }
}

/// What to run, where, and where its output goes.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) cwd: PathBuf,
    /// stdout and stderr are appended here.
    pub(crate) log: PathBuf,
    pub(crate) run_as: Option<RunAs>,
}

impl Launch {
    pub(crate) fn new(program: &Path, cwd: &Path, log: PathBuf) -> Self {
        Self {
            program: program.to_owned(),
            args: Vec::new(),
            cwd: cwd.to_owned(),
            log,
            run_as: None,
        }
    }

    pub(crate) fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub(crate) fn run_as(mut self, user: Option<RunAs>) -> Self {
        self.run_as = user;
        self
    }

    fn command_line(&self) -> String {
        let mut line = self.program.display().to_string();
        for arg in &self.args {
            line.push(' ');
            let arg = arg.to_string_lossy();
            if arg.is_empty() || arg.contains(' ') {
                line.push_str(&format!("{arg:?}"));
            } else {
                line.push_str(&arg);
            }
        }
        line
    }
}

/// A running server and everything it forks.
///
/// The server leads its own process group, but that is not enough to reach
/// all of it: PostgreSQL puts every backend in a session of its own, so
/// signals also go to each descendant found in `/proc`.
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
    leader: Pid,
    exited: Option<ExitStatus>,
    /// Descendants signalled to end, still to be waited for.
    tracked: Vec<Pid>,
    /// Set once everything was seen gone: from then on the ids may be
    /// reused by unrelated processes, so nothing is signalled again.
    gone: bool,
}

impl Proc {
    /// Spawns `launch` as the leader of a new process group.
    ///
    /// The returned offset is where this run's output starts in the log,
    /// so callers can look at this run and not at earlier ones.
    pub(crate) fn spawn(launch: &Launch) -> Result<(Self, u64), ServerError> {
        become_subreaper();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&launch.log)
            .map_err(|e| {
                ServerError::new(format!("cannot open log {}: {e}", launch.log.display()))
            })?;
        // A visible boundary between runs in the log after restarts.
        let _ = writeln!(log, "--- writethrough-testkit: {}", launch.command_line());
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let stderr = log
            .try_clone()
            .map_err(|e| ServerError::new(format!("cannot duplicate the log handle: {e}")))?;

        let mut command = Command::new(&launch.program);
        command
            .args(&launch.args)
            .current_dir(&launch.cwd)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            // Its own group, so that a Ctrl-C in the terminal does not race
            // our own shutdown, and signals reach any helper it forks.
            .process_group(0);
        if let Some(user) = &launch.run_as {
            command.uid(user.uid).gid(user.gid);
        }
        let child = command.spawn().map_err(|e| {
            ServerError::new(format!("cannot start `{}`: {e}", launch.command_line()))
        })?;
        let leader = Pid::from_raw(child.id() as i32);
        Ok((
            Self {
                child,
                leader,
                exited: None,
                tracked: Vec::new(),
                gone: false,
            },
            offset,
        ))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once the leader has exited (reaps it).
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    fn check_running(&self) -> Result<(), ServerError> {
        if self.gone || self.exited.is_some() {
            return Err(ServerError::new("the server's main process has exited"));
        }
        Ok(())
    }

    /// Freezes the server and every process it forked with `SIGSTOP`.
    pub(crate) fn pause(&self) -> Result<(), ServerError> {
        self.check_running()?;
        nix::sys::signal::kill(self.leader, Signal::SIGSTOP).map_err(|e| {
            ServerError::new(format!("cannot send SIGSTOP to {}: {e}", self.leader))
        })?;
        self.freeze();
        Ok(())
    }

    /// Continues what [`pause`](Self::pause) froze.
    pub(crate) fn resume(&self) -> Result<(), ServerError> {
        self.check_running()?;
        self.continue_all(&descendants(self.leader));
        Ok(())
    }

    fn continue_all(&self, descendants: &[Pid]) {
        for pid in descendants {
            let _ = nix::sys::signal::kill(*pid, Signal::SIGCONT);
        }
        if self.exited.is_none() {
            let _ = killpg(self.leader, Signal::SIGCONT);
            let _ = nix::sys::signal::kill(self.leader, Signal::SIGCONT);
        }
    }

    /// Stops the leader first, so it forks no more, then its descendants
    /// until no new one shows up. Returns the descendants.
    fn freeze(&self) -> Vec<Pid> {
        let _ = nix::sys::signal::kill(self.leader, Signal::SIGSTOP);
        let _ = killpg(self.leader, Signal::SIGSTOP);
        wait_until_stopped(self.leader);
        let mut frozen: Vec<Pid> = Vec::new();
        for _ in 0..10 {
            let new: Vec<Pid> = descendants(self.leader)
                .into_iter()
                .filter(|pid| !frozen.contains(pid))
                .collect();
            if new.is_empty() {
                break;
            }
            for pid in &new {
                let _ = nix::sys::signal::kill(*pid, Signal::SIGSTOP);
            }
            for pid in &new {
                wait_until_stopped(*pid);
            }
            frozen.extend(new);
        }
        frozen
    }

    /// `SIGKILL` to the leader, its group and every descendant.
    fn kill_all(&mut self) {
        if self.exited.is_none() {
            // Frozen first: a process that is being killed must not fork.
            let tree = self.freeze();
            self.tracked.extend(tree);
            let _ = killpg(self.leader, Signal::SIGKILL);
            let _ = nix::sys::signal::kill(self.leader, Signal::SIGKILL);
        }
        for pid in &self.tracked {
            let _ = nix::sys::signal::kill(*pid, Signal::SIGKILL);
        }
    }

    /// Kills everything, then waits until all of it is gone.
    pub(crate) async fn kill(&mut self) -> Result<(), ServerError> {
        if self.gone {
            return Ok(());
        }
        self.kill_all();
        let deadline = Instant::now() + KILL_TIMEOUT;
        let mut pause = Duration::from_millis(1);
        loop {
            if self.is_gone() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ServerError::new(format!(
                    "processes of server {} still alive {} s after SIGKILL: {:?}",
                    self.leader,
                    KILL_TIMEOUT.as_secs(),
                    self.tracked
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the leader (continuing everything, in case it was
    /// paused) and waits up to `grace` for all of it to exit. Returns
    /// whether it did; when it did not, the server is left running.
    pub(crate) async fn shut_down(
        &mut self,
        signal: Signal,
        grace: Duration,
    ) -> Result<bool, ServerError> {
        if self.is_gone() {
            return Ok(true);
        }
        if self.exited.is_none() {
            let tree = descendants(self.leader);
            nix::sys::signal::kill(self.leader, signal).map_err(|e| {
                ServerError::new(format!("cannot send {signal} to {}: {e}", self.leader))
            })?;
            // A stopped process does not act on a signal until continued.
            self.continue_all(&tree);
            self.tracked.extend(tree);
        }
        let deadline = Instant::now() + grace;
        let mut pause = Duration::from_millis(1);
        loop {
            if self.is_gone() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Whether the leader, its group and the tracked descendants are gone,
    /// reaping what is ours to reap.
    fn is_gone(&mut self) -> bool {
        // The leader is reaped through its `Child` first: waiting on the
        // group would otherwise steal its exit status.
        if !self.gone && self.exit_status().is_some() {
            self.tracked.retain(|pid| still_alive(*pid));
            if self.tracked.is_empty() && reap_group(self.leader) == Group::Gone {
                self.gone = true;
            }
        }
        self.gone
    }
}

impl Drop for Proc {
    // Blocking, but short: SIGKILLed processes exit at once.
    fn drop(&mut self) {
        if self.is_gone() {
            return;
        }
        self.kill_all();
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.is_gone() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Alive,
    Gone,
}

/// Reaps whatever members of the group are our children and tells whether
/// any live process is left in it. Only call this once the leader itself has
/// been reaped through its `Child`.
fn reap_group(pgid: Pid) -> Group {
    loop {
        match waitpid(Pid::from_raw(-pgid.as_raw()), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return Group::Alive,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    match killpg(pgid, None) {
        Err(Errno::ESRCH) => Group::Gone,
        // Members that are not our children: gone once only zombies remain
        // (their parent may never reap them, e.g. a container's PID 1).
        _ if !stats()
            .iter()
            .any(|s| s.pgrp == pgid.as_raw() && !s.is_dead()) =>
        {
            Group::Gone
        }
        _ => Group::Alive,
    }
}

/// Whether a descendant is still running; reaps it if it is our child
/// (once its parent died it is, see [`become_subreaper`]).
fn still_alive(pid: Pid) -> bool {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => true,
        Ok(_) => false,
        // Not our child: alive while it has a live entry in /proc.
        Err(Errno::ECHILD) => stat(pid).is_some_and(|s| !s.is_dead()),
        Err(_) => false,
    }
}

/// Waits (briefly) until `pid` has actually stopped: `kill` only queues
/// the signal.
fn wait_until_stopped(pid: Pid) {
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        match stat(pid) {
            Some(s) if s.state == b'T' || s.state == b't' || s.is_dead() => return,
            None => return,
            Some(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

/// The fields of `/proc/PID/stat` used here.
#[derive(Debug, Clone, Copy)]
struct Stat {
    pid: i32,
    state: u8,
    ppid: i32,
    pgrp: i32,
}

impl Stat {
    fn parse(text: &str) -> Option<Self> {
        // "pid (comm) state ppid pgrp ...": comm may contain anything, so
        // the fields are read from its closing parenthesis.
        let (pid, rest) = text.split_once(' ')?;
        let rest = &rest[rest.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace();
        Some(Self {
            pid: pid.parse().ok()?,
            state: *fields.next()?.as_bytes().first()?,
            ppid: fields.next()?.parse().ok()?,
            pgrp: fields.next()?.parse().ok()?,
        })
    }

    fn is_dead(&self) -> bool {
        self.state == b'Z' || self.state == b'X'
    }
}

fn stat(pid: Pid) -> Option<Stat> {
    Stat::parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every process on the machine (empty where there is no `/proc`).
fn stats() -> Vec<Stat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| Stat::parse(&fs::read_to_string(e.path().join("stat")).ok()?))
        .collect()
}

/// The descendants of `root`, parents before children. Zombies included:
/// one whose parent is killed before reaping it becomes ours to reap.
fn descendants(root: Pid) -> Vec<Pid> {
    let all = stats();
    let mut found = vec![root.as_raw()];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(all.iter().filter(|s| s.ppid == parent).map(|s| s.pid));
        i += 1;
    }
    found.into_iter().skip(1).map(Pid::from_raw).collect()
}

/// Makes this process the "child subreaper" of its descendants (Linux), so
/// that when a server's leader is killed, the processes it forked are
/// re-parented to us and we can reap them, instead of leaving zombies under
/// a PID 1 that may never reap them. Orphans are only adopted this way when
/// their own parent dies, so nothing else in the test process changes.
fn become_subreaper() {
    #[cfg(target_os = "linux")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
                tracing::debug!("cannot become a child subreaper: {e}");
            }
        });
    }
}

/// The install hint for a missing binary.
pub(crate) fn missing_binary(what: &str, where_: &str, package: &str) -> ServerError {
    ServerError::new(format!(
        "{what} not found {where_}: install it with `apt-get install -y {package}` \
         (scripts/test.sh does this when run as root)"
    ))
}

/// The first executable called `name` in `PATH`.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A loopback port that was free a moment ago. Another process may take it
/// before the server binds it: callers retry with a new port when the
/// server reports the address in use.
pub(crate) fn free_port() -> Result<u16, ServerError> {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| ServerError::new(format!("cannot find a free loopback port: {e}")))
}

/// Where server directories go: `WT_TEST_TMPDIR` when set, else
/// `/dev/shm` when it is a writable directory, else the system temporary
/// directory.
///
/// Memory beats disk here: on a loaded machine, copying PostgreSQL's
/// template (about 1000 files) took 500-1000 ms to disk and 50-80 ms to
/// tmpfs, and the servers' own writes get cheaper too. Nothing needs to
/// outlive the test, and a killed server loses nothing either way.
pub(crate) fn scratch_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("WT_TEST_TMPDIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    static SHM_WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let shm = Path::new("/dev/shm");
    if *SHM_WORKS.get_or_init(|| tempfile::tempdir_in(shm).is_ok()) {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// A fresh temporary directory for one server, under [`scratch_root`].
pub(crate) fn temp_dir(prefix: &str) -> Result<tempfile::TempDir, ServerError> {
    let root = scratch_root();
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&root)
        .map_err(|e| {
            ServerError::new(format!(
                "cannot create a temporary directory in {}: {e}",
                root.display()
            ))
        })
}

/// The log file, or what could be read of it.
pub(crate) fn read_log(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The log written from byte `offset` on.
pub(crate) fn read_log_from(path: &Path, offset: u64) -> String {
    let log = read_log(path);
    let offset = usize::try_from(offset).unwrap_or(usize::MAX);
    log.get(offset..).map(str::to_owned).unwrap_or(log)
}

/// The last lines of a log, framed for an error message.
pub(crate) fn log_tail(path: &Path, log: &str) -> String {
    const LINES: usize = 40;
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(LINES);
    let mut out = format!(
        "\n--- last {} lines of {} ---\n",
        lines.len() - start,
        path.display()
    );
    for line in &lines[start..] {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("--- end of log ---");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_the_install_command() {
        let err = missing_binary("memcached", "on PATH", "memcached");
        assert_eq!(
            err.message(),
            "memcached not found on PATH: install it with `apt-get install -y memcached` \
             (scripts/test.sh does this when run as root)"
        );
    }

    #[test]
    fn finds_sh_on_path_and_not_a_made_up_name() {
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("writethrough-no-such-binary").is_none());
    }

    #[test]
    fn parses_proc_stat_even_with_odd_command_names() {
        let stat = Stat::parse("4242 (a) b (c) S 1 4242 4242 0 -1 4194560").unwrap();
        assert_eq!(
            (stat.pid, stat.state, stat.ppid, stat.pgrp),
            (4242, b'S', 1, 4242)
        );
        assert!(!stat.is_dead());
        assert!(Stat::parse("4242 (x) Z 1 7").unwrap().is_dead());
        assert!(Stat::parse("garbage").is_none());
    }

    /// Like PostgreSQL's backends: children in sessions of their own, out
    /// of reach of the leader's process group.
    #[tokio::test]
    async fn pause_and_kill_reach_descendants_in_sessions_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let launch = Launch::new(Path::new("/bin/sh"), dir.path(), dir.path().join("log"))
            .arg("-c")
            .arg("setsid sleep 60 & setsid sleep 60 & wait");
        let (mut proc, _) = Proc::spawn(&launch).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let children = loop {
            let found: Vec<Pid> = descendants(proc.leader)
                .into_iter()
                .filter(|pid| stat(*pid).is_some_and(|s| s.pgrp == pid.as_raw()))
                .collect();
            if found.len() == 2 {
                break found;
            }
            assert!(Instant::now() < deadline, "no children: {found:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };

        proc.pause().unwrap();
        for pid in &children {
            assert_eq!(stat(*pid).map(|s| s.state), Some(b'T'), "{pid} not stopped");
        }
        proc.resume().unwrap();
        for pid in &children {
            assert_ne!(
                stat(*pid).map(|s| s.state),
                Some(b'T'),
                "{pid} still stopped"
            );
        }

        proc.kill().await.unwrap();
        for pid in &children {
            // Gone, and reaped: not even a zombie is left.
            assert!(stat(*pid).is_none(), "{pid} left behind: {:?}", stat(*pid));
        }
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let log: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let tail = log_tail(Path::new("x.log"), &log);
        assert!(tail.contains("line 99\n"));
        assert!(tail.contains("line 60\n"));
        assert!(!tail.contains("line 59\n"));
    }
}
