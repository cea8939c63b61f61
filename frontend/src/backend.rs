//! vhost-user-blk backend processes: the command line that exports one image with each backend
//! program the project knows (vloop-blk, qemu-storage-daemon, or any program described by a
//! command template), and a running backend that is killed when dropped, so a failing test,
//! benchmark or guest run never leaves one behind.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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

/// A backend program and the command-line convention it follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// `vloop-blk` at this path: `--socket-path S --blk-file F [--read-only] [--num-queues N]
    /// [--direct]`.
    Vloop(PathBuf),
    /// `qemu-storage-daemon` at this path (`--blockdev driver=file,... --export
    /// type=vhost-user-blk,...`, `aio=io_uring`, discards passed down), serving from its main
    /// loop or, with `iothread`, from an iothread (how its users run it for speed).
    Qsd {
        /// The program (usually `qemu-storage-daemon` on PATH).
        bin: PathBuf,
        /// Serve the export from an iothread.
        iothread: bool,
    },
}

impl Program {
    /// qemu-storage-daemon from PATH, main loop.
    pub fn qsd() -> Program {
        Program::Qsd {
            bin: "qemu-storage-daemon".into(),
            iothread: false,
        }
    }

    /// Short name for tables and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Program::Vloop(_) => "vloop-blk",
            Program::Qsd {
                iothread: false, ..
            } => "qsd",
            Program::Qsd { iothread: true, .. } => "qsd-iothread",
        }
    }
}

/// One image exported over one vhost-user-blk socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Image file (or block device).
    pub image: PathBuf,
    /// Socket path to listen on (removed first if it exists).
    pub socket: PathBuf,
    /// Number of virtqueues.
    pub queues: u16,
    /// Export read-only.
    pub read_only: bool,
    /// Open the image with O_DIRECT (qemu-storage-daemon: `cache.direct=on`).
    pub direct: bool,
}

impl Export {
    /// A read-write, one-queue, buffered export of `image` on `socket`.
    pub fn new(image: impl Into<PathBuf>, socket: impl Into<PathBuf>) -> Export {
        Export {
            image: image.into(),
            socket: socket.into(),
            queues: 1,
            read_only: false,
            direct: false,
        }
    }
}

/// Everything needed to start one backend process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// The program.
    pub program: Program,
    /// What it exports.
    pub export: Export,
    /// Extra arguments appended to the command line.
    pub extra_args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

/// QEMU option values escape ',' by doubling it.
pub fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

impl BackendSpec {
    /// A spec with no extra arguments.
    pub fn new(program: Program, export: Export) -> BackendSpec {
        BackendSpec {
            program,
            export,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The program's arguments.
    pub fn args(&self) -> Vec<String> {
        let e = &self.export;
        let img = e.image.to_string_lossy();
        let sock = e.socket.to_string_lossy();
        let mut a = match &self.program {
            Program::Vloop(_) => {
                let mut a = vec![
                    "--socket-path".to_string(),
                    sock.into_owned(),
                    "--blk-file".into(),
                    img.into_owned(),
                ];
                if e.read_only {
                    a.push("--read-only".into());
                }
                if e.queues != 1 {
                    a.push("--num-queues".into());
                    a.push(e.queues.to_string());
                }
                if e.direct {
                    a.push("--direct".into());
                }
                a
            }
            Program::Qsd { iothread, .. } => {
                let mut a = Vec::new();
                if *iothread {
                    a.push("--object".to_string());
                    a.push("iothread,id=iothread0".to_string());
                }
                a.push("--blockdev".into());
                a.push(format!(
                    "driver=file,node-name=f,filename={},aio=io_uring,cache.direct={},discard=unmap{}",
                    qemu_escape(&img),
                    if e.direct { "on" } else { "off" },
                    if e.read_only { ",read-only=on" } else { "" }
                ));
                a.push("--export".into());
                a.push(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={},num-queues={}{}",
                    qemu_escape(&sock),
                    if e.read_only { "off" } else { "on" },
                    e.queues.max(1),
                    if *iothread { ",iothread=iothread0" } else { "" }
                ));
                a
            }
        };
        a.extend(self.extra_args.iter().cloned());
        a
    }

    /// The command line that starts this export (no redirections).
    pub fn command(&self) -> Command {
        let bin = match &self.program {
            Program::Vloop(bin) | Program::Qsd { bin, .. } => bin,
        };
        let mut c = Command::new(bin);
        c.args(self.args());
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
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

    fn export() -> Export {
        Export {
            image: "/tmp/a,b.img".into(),
            socket: "/tmp/s,.sock".into(),
            queues: 2,
            read_only: false,
            direct: true,
        }
    }

    #[test]
    fn qsd_command_escapes_commas_and_sets_modes() {
        let a = BackendSpec::new(Program::qsd(), export()).args();
        assert_eq!(a[0], "--blockdev");
        assert_eq!(
            a[1],
            "driver=file,node-name=f,filename=/tmp/a,,b.img,aio=io_uring,cache.direct=on,discard=unmap"
        );
        assert_eq!(
            a[3],
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/s,,.sock,writable=on,num-queues=2"
        );
        let ro = Export {
            read_only: true,
            direct: false,
            ..export()
        };
        let a = BackendSpec::new(Program::qsd(), ro).args();
        assert!(
            a[1].ends_with("cache.direct=off,discard=unmap,read-only=on"),
            "{}",
            a[1]
        );
        assert!(a[3].contains("writable=off"), "{}", a[3]);
    }

    #[test]
    fn qsd_iothread_serves_the_export_from_it() {
        let p = Program::Qsd {
            bin: "qemu-storage-daemon".into(),
            iothread: true,
        };
        let a = BackendSpec::new(p, export()).args();
        assert_eq!(a[..2], ["--object", "iothread,id=iothread0"]);
        assert!(a[5].ends_with(",iothread=iothread0"), "{}", a[5]);
    }

    #[test]
    fn vloop_command_uses_backend_conventions() {
        let mut s = BackendSpec::new(Program::Vloop("/bin/vloop-blk".into()), export());
        s.extra_args.push("-v".into());
        assert_eq!(
            s.args(),
            [
                "--socket-path",
                "/tmp/s,.sock",
                "--blk-file",
                "/tmp/a,b.img",
                "--num-queues",
                "2",
                "--direct",
                "-v"
            ]
        );
        s.export.queues = 1;
        s.export.direct = false;
        s.export.read_only = true;
        s.extra_args.clear();
        assert_eq!(
            s.args(),
            [
                "--socket-path",
                "/tmp/s,.sock",
                "--blk-file",
                "/tmp/a,b.img",
                "--read-only"
            ]
        );
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
