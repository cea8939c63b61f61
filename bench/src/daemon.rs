//! Starting and stopping the backends under test: vloop-blk and qemu-storage-daemon, each
//! exporting one image over a vhost-user-blk unix socket. A [`Daemon`] kills its process
//! when dropped, so a failing test or benchmark never leaves one behind.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors of starting a backend.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
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
    #[error("{name} exited with {status} before listening on {socket}; its log:\n{log}")]
    Exited {
        /// Backend name.
        name: &'static str,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Socket path.
        socket: PathBuf,
        /// The tail of its stderr.
        log: String,
    },
    /// The socket did not appear in time.
    #[error("{name} did not create {socket} within {after:?}; its log:\n{log}")]
    NoSocket {
        /// Backend name.
        name: &'static str,
        /// Socket path.
        socket: PathBuf,
        /// Time waited.
        after: Duration,
        /// The tail of its stderr.
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

/// Which backend to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// vloop-blk, from this binary path.
    Vloop(PathBuf),
    /// qemu-storage-daemon from PATH (aio=io_uring).
    Qsd,
}

impl Backend {
    /// Short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Vloop(_) => "vloop",
            Self::Qsd => "qsd",
        }
    }
}

/// One export to start.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// The backend program.
    pub backend: Backend,
    /// Image file.
    pub image: PathBuf,
    /// Socket path to listen on (removed first if it exists).
    pub socket: PathBuf,
    /// Number of queues.
    pub queues: u16,
    /// Open the image with O_DIRECT.
    pub direct: bool,
    /// Export read-only.
    pub read_only: bool,
    /// Extra arguments appended to the command line.
    pub extra_args: Vec<String>,
}

impl DaemonSpec {
    /// The command line that starts this export.
    pub fn command(&self) -> Command {
        match &self.backend {
            Backend::Vloop(bin) => {
                let mut c = Command::new(bin);
                c.arg("--socket-path")
                    .arg(&self.socket)
                    .arg("--blk-file")
                    .arg(&self.image)
                    .arg("--num-queues")
                    .arg(self.queues.to_string());
                if self.direct {
                    c.arg("--direct");
                }
                if self.read_only {
                    c.arg("--read-only");
                }
                c.args(&self.extra_args);
                c
            }
            Backend::Qsd => {
                // QEMU option values escape ',' by doubling it.
                let esc = |p: &Path| p.display().to_string().replace(',', ",,");
                let mut c = Command::new("qemu-storage-daemon");
                c.arg("--blockdev").arg(format!(
                    "driver=file,node-name=f,filename={},aio=io_uring,cache.direct={}",
                    esc(&self.image),
                    if self.direct { "on" } else { "off" }
                ));
                c.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={},num-queues={}",
                    esc(&self.socket),
                    if self.read_only { "off" } else { "on" },
                    self.queues
                ));
                c.args(&self.extra_args);
                c
            }
        }
    }
}

/// A running backend; killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    name: &'static str,
    socket: PathBuf,
    log: PathBuf,
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Daemon {
    /// Starts `spec` and waits up to `timeout` for its socket; stderr goes to `<socket>.log`.
    pub fn spawn(spec: &DaemonSpec, timeout: Duration) -> Result<Self, DaemonError> {
        let _ = std::fs::remove_file(&spec.socket);
        let log = spec.socket.with_extension("log");
        let err_file = File::create(&log).map_err(|source| DaemonError::Log {
            path: log.clone(),
            source,
        })?;
        let mut cmd = spec.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err_file));
        let program = PathBuf::from(cmd.get_program());
        tracing::debug!(?cmd, "starting backend");
        let child = cmd
            .spawn()
            .map_err(|source| DaemonError::Spawn { program, source })?;
        let mut d = Self {
            child,
            name: spec.backend.name(),
            socket: spec.socket.clone(),
            log,
        };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(DaemonError::Exited {
                    name: d.name,
                    status,
                    socket: d.socket.clone(),
                    log: tail(&d.log),
                });
            }
            if d.socket.exists() {
                return Ok(d);
            }
            if start.elapsed() > timeout {
                return Err(DaemonError::NoSocket {
                    name: d.name,
                    socket: d.socket.clone(),
                    after: timeout,
                    log: tail(&d.log),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
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

    /// Backend name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The last lines of its stderr.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process and waits for it.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `program` can be found on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(backend: Backend) -> DaemonSpec {
        DaemonSpec {
            backend,
            image: "/tmp/a,b.img".into(),
            socket: "/tmp/s.sock".into(),
            queues: 2,
            direct: true,
            read_only: false,
            extra_args: vec![],
        }
    }

    #[test]
    fn qsd_command_escapes_commas_and_sets_modes() {
        let c = spec(Backend::Qsd).command();
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[0], "--blockdev");
        assert!(args[1].contains("filename=/tmp/a,,b.img"), "{}", args[1]);
        assert!(args[1].contains("aio=io_uring,cache.direct=on"));
        assert!(args[3].contains("num-queues=2"));
        assert!(args[3].contains("writable=on"));
    }

    #[test]
    fn vloop_command_uses_backend_conventions() {
        let c = spec(Backend::Vloop("/bin/vloop-blk".into())).command();
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--socket-path",
                "/tmp/s.sock",
                "--blk-file",
                "/tmp/a,b.img",
                "--num-queues",
                "2",
                "--direct"
            ]
        );
    }
}
