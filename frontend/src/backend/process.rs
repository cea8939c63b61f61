//! Running backends: a [`BackendProcess`] started from a [`BackendSpec`] that waits for its
//! socket, reports an early exit or a missing socket with the tail of its log, and is killed
//! when dropped; and finding backend programs ([`on_path`], [`which`], [`sibling_binary`]). The
//! top of [`backend`](super): it imports [`BackendSpec`] from [`spec`](super::spec) and the
//! child guard from [`crate::process`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::spec::BackendSpec;
use crate::process::ChildGuard;

/// Errors of starting a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The program could not be executed.
    #[error("cannot run {program}: is it installed (or built) at that path?")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The program exited before its socket appeared.
    #[error("{name} exited ({status}) before listening on {socket}; its last log lines:\n{log}")]
    Exited {
        /// Backend name.
        name: String,
        /// Exit status.
        status: ExitStatus,
        /// Socket path.
        socket: PathBuf,
        /// The tail of its log.
        log: String,
    },
    /// The socket did not appear in time.
    #[error("{name} did not create {socket} within {after:?}; its last log lines:\n{log}")]
    NoSocket {
        /// Backend name.
        name: String,
        /// Socket path.
        socket: PathBuf,
        /// Time waited.
        after: Duration,
        /// The tail of its log.
        log: String,
    },
    /// The log file could not be created.
    #[error("cannot create log file {path}")]
    Log {
        /// Log path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The last `lines` lines of the file at `path` (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Lines of log given in error messages.
const LOG_TAIL_LINES: usize = 20;

/// A running backend; killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct BackendProcess {
    child: ChildGuard,
    name: String,
    socket: PathBuf,
    log: PathBuf,
}

impl BackendProcess {
    /// Starts `spec` with stdout and stderr going to `log`, and waits up to `timeout` for its
    /// socket to appear.
    pub fn spawn(
        spec: &BackendSpec,
        log: &Path,
        timeout: Duration,
    ) -> Result<BackendProcess, BackendError> {
        Self::spawn_with(spec, log, timeout, |_| {})
    }

    /// As [`Self::spawn`], with `tweak` applied to the command first (a `pre_exec` hook that
    /// lowers a resource limit or changes user, a working directory, a umask).
    pub fn spawn_with(
        spec: &BackendSpec,
        log: &Path,
        timeout: Duration,
        tweak: impl FnOnce(&mut Command),
    ) -> Result<BackendProcess, BackendError> {
        let socket = spec.export.socket.clone();
        let _ = std::fs::remove_file(&socket);
        let log_err = |source| BackendError::Log {
            path: log.to_path_buf(),
            source,
        };
        let out = File::create(log).map_err(log_err)?;
        let err = out.try_clone().map_err(log_err)?;
        let mut cmd = spec.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        tweak(&mut cmd);
        let program = PathBuf::from(cmd.get_program());
        tracing::debug!(?cmd, "starting backend");
        let child = cmd
            .spawn()
            .map_err(|source| BackendError::Spawn { program, source })?;
        let name = spec.program.name().to_string();
        let mut p = BackendProcess {
            child: ChildGuard::new(child, name.clone()),
            name,
            socket,
            log: log.to_path_buf(),
        };
        let start = Instant::now();
        loop {
            if let Some(status) = p.child.try_wait() {
                return Err(BackendError::Exited {
                    name: p.name.clone(),
                    status,
                    socket: p.socket.clone(),
                    log: p.log_tail(LOG_TAIL_LINES),
                });
            }
            if p.socket.exists() {
                return Ok(p);
            }
            if start.elapsed() > timeout {
                return Err(BackendError::NoSocket {
                    name: p.name.clone(),
                    socket: p.socket.clone(),
                    after: timeout,
                    log: p.log_tail(LOG_TAIL_LINES),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Log file path.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Backend name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Its exit status, once it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Sends SIGTERM, waits up to `grace` for the exit, then kills it; returns its status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.child.stop(grace)
    }

    /// Waits up to `limit` for it to exit on its own.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.child.wait_timeout(limit)
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.child.kill()
    }
}

/// Whether `program` can be found on PATH.
pub fn on_path(program: &str) -> bool {
    which(program).is_some()
}

/// `program` as found on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A binary of this workspace built beside the running executable: in the same directory, or
/// one level up (test executables live in `<target>/<profile>/deps/`).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Export, Program, Template};

    #[test]
    fn a_template_backend_runs_and_reports_an_early_exit() {
        let dir = tempfile::tempdir().unwrap();
        let t =
            Template::parse("sh -c 'echo listening on \"$1\" >&2; exit 3' sh {socket}").unwrap();
        let s = BackendSpec::new(
            Program::Template(t),
            Export::new("/nonexistent", dir.path().join("s.sock")),
        );
        let e =
            BackendProcess::spawn(&s, &dir.path().join("log"), Duration::from_secs(5)).unwrap_err();
        match e {
            BackendError::Exited { log, status, .. } => {
                assert_eq!(status.code(), Some(3));
                assert!(log.contains("s.sock"), "{log}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_backend_that_exits_early_reports_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = BackendSpec::new(
            Program::Vloop("/bin/sh".into()),
            Export::new("/nonexistent", dir.path().join("s.sock")),
        );
        // `sh --socket-path ...` fails at once with a message on stderr.
        s.extra_args.clear();
        let e =
            BackendProcess::spawn(&s, &dir.path().join("log"), Duration::from_secs(5)).unwrap_err();
        match e {
            BackendError::Exited { log, .. } => assert!(!log.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    }
}
