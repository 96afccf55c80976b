//! Child processes and scratch directories that never outlive the test that made them.
//!
//! Every child is killed when its handle drops (a test that panics unwinds through the
//! drop). A test run that is killed outright cannot unwind, so children are also started
//! under `setpriv --pdeathsig KILL`, which makes the kernel kill them when the thread that
//! spawned them dies; and scratch directories carry the owning pid in their name, so the
//! next run removes those whose owner is gone.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::process::{Child, Command};

/// Errors starting or watching a child process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The scratch directory could not be created.
    #[error("cannot create scratch directory {path}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The program could not be started at all.
    #[error("cannot start {name} ({program})")]
    Spawn {
        name: String,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The program exited while we were waiting for it to become ready.
    #[error("{name} exited with {status} before it was ready; last log lines:\n{log_tail}")]
    Exited {
        name: String,
        status: std::process::ExitStatus,
        log_tail: String,
    },
    /// The program did not become ready in time.
    #[error("{name} was not ready after {waited:?}; last log lines:\n{log_tail}")]
    NotReady {
        name: String,
        waited: std::time::Duration,
        log_tail: String,
    },
}

fn scratch_root() -> PathBuf {
    std::env::temp_dir().join("kvcsi-harness")
}

/// A directory removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `$TMPDIR/kvcsi-harness/<pid>-<n>-<label>`, after removing directories left by
    /// runs whose process no longer exists.
    pub fn new(label: &str) -> Result<Self, ProcessError> {
        Self::new_in(&scratch_root(), label)
    }

    /// Like [`ScratchDir::new`] under `<parent>/kvcsi-harness` (e.g. `/dev/shm` for etcd,
    /// whose fsyncs cost nothing on tmpfs).
    pub fn in_memory(label: &str) -> Result<Self, ProcessError> {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            Self::new_in(&shm.join("kvcsi-harness"), label)
        } else {
            Self::new(label)
        }
    }

    fn new_in(root: &Path, label: &str) -> Result<Self, ProcessError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        sweep_stale(root);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("{}-{n}-{label}", std::process::id()));
        fs::create_dir_all(&path).map_err(|source| ProcessError::Scratch {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn sweep_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A running child whose stdout and stderr go to a log file; killed on drop.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
}

impl ManagedProcess {
    /// Starts `program args` with output appended to `log_path`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log_path: &Path,
    ) -> Result<Self, ProcessError> {
        Self::spawn_with(name, program, args, log_path, |_| {})
    }

    /// Like [`ManagedProcess::spawn`], letting the caller adjust the command (env, stdout).
    pub fn spawn_with(
        name: &str,
        program: &Path,
        args: &[String],
        log_path: &Path,
        adjust: impl FnOnce(&mut Command),
    ) -> Result<Self, ProcessError> {
        let spawn_err = |source| ProcessError::Spawn {
            name: name.to_string(),
            program: program.to_path_buf(),
            source,
        };
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(spawn_err)?;
        let log_err = log.try_clone().map_err(spawn_err)?;
        let mut cmd = match pdeathsig_wrapper() {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.arg("--pdeathsig").arg("KILL").arg("--").arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true);
        adjust(&mut cmd);
        let child = cmd.spawn().map_err(spawn_err)?;
        Ok(Self {
            name: name.to_string(),
            child,
            log_path: log_path.to_path_buf(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The child, for callers that need its piped stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Fails with the log's tail when the child has already exited.
    pub fn check_running(&mut self) -> Result<(), ProcessError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ProcessError::Exited {
                name: self.name.clone(),
                status,
                log_tail: self.log_tail(40),
            }),
            _ => Ok(()),
        }
    }

    /// The last `lines` lines of the child's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    /// Sends SIGTERM and waits up to `grace` for exit, then kills.
    pub async fn stop(mut self, grace: std::time::Duration) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        // SIGKILL now; tokio reaps the zombie in the background.
        let _ = self.child.start_kill();
    }
}

/// The last `lines` lines of a text file, or a note that it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match File::open(path) {
        Ok(f) => {
            let all: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn pdeathsig_wrapper() -> Option<&'static Path> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
}

/// A loopback TCP port that was free a moment ago. Another process may take it before we
/// use it; callers that bind it themselves should prefer binding port 0.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
