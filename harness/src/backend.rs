//! Starting the vhost-user-blk backend for one disk, as a separate process: `vloop-blk`
//! (the default) or `qemu-storage-daemon` (`--backend qsd`, the reference to compare with).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::ChildGuard;

/// Errors of starting a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend program could not be started.
    #[error("cannot start {0}: {1}")]
    Spawn(String, #[source] std::io::Error),
    /// The backend exited before its socket appeared.
    #[error("backend {0} exited ({1}) before listening; last log lines: {2}")]
    Exited(String, String, String),
    /// The socket did not appear in time.
    #[error("backend {0} did not create its socket {1} within {2:?}")]
    NoSocket(String, PathBuf, Duration),
    /// The log file could not be created.
    #[error("creating backend log {0}: {1}")]
    Log(PathBuf, #[source] std::io::Error),
}

/// Which backend program serves the disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `vloop-blk --socket-path S --blk-file F [--read-only] [--num-queues N]`.
    Vloop,
    /// `qemu-storage-daemon` with a vhost-user-blk export.
    Qsd,
}

/// A backend program.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Which command-line convention it follows.
    pub kind: BackendKind,
    /// The program.
    pub bin: PathBuf,
}

/// One disk to serve.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// The image file.
    pub image: PathBuf,
    /// Export read-only.
    pub readonly: bool,
    /// Number of virtqueues.
    pub queues: u32,
}

fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// The backend's arguments for one disk.
pub fn backend_args(kind: BackendKind, disk: &DiskSpec, sock: &Path) -> Vec<String> {
    let img = disk.image.to_string_lossy();
    let s = sock.to_string_lossy();
    match kind {
        BackendKind::Vloop => {
            let mut a = vec![
                "--socket-path".to_string(),
                s.into_owned(),
                "--blk-file".into(),
                img.into_owned(),
            ];
            if disk.readonly {
                a.push("--read-only".into());
            }
            if disk.queues > 1 {
                a.push("--num-queues".into());
                a.push(disk.queues.to_string());
            }
            a
        }
        BackendKind::Qsd => vec![
            "--blockdev".into(),
            format!(
                "driver=file,node-name=f,filename={},discard=unmap{}",
                qemu_escape(&img),
                if disk.readonly { ",read-only=on" } else { "" }
            ),
            "--export".into(),
            format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={},num-queues={}",
                qemu_escape(&s),
                if disk.readonly { "off" } else { "on" },
                disk.queues.max(1)
            ),
        ],
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = t.lines().collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

impl Backend {
    /// Starts the backend for `disk`, listening on `sock`, logging to `log`; returns when the
    /// socket exists.
    pub fn start(
        &self,
        disk: &DiskSpec,
        sock: &Path,
        log: &Path,
        limit: Duration,
    ) -> Result<ChildGuard, BackendError> {
        let name = self.bin.display().to_string();
        let f = File::create(log).map_err(|e| BackendError::Log(log.to_path_buf(), e))?;
        let f2 = f
            .try_clone()
            .map_err(|e| BackendError::Log(log.to_path_buf(), e))?;
        let _ = std::fs::remove_file(sock);
        let child = Command::new(&self.bin)
            .args(backend_args(self.kind, disk, sock))
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(|e| BackendError::Spawn(name.clone(), e))?;
        let mut g = ChildGuard::new(child, name.clone());
        let t = Instant::now();
        loop {
            if sock.exists() {
                return Ok(g);
            }
            if let Some(st) = g.try_wait() {
                return Err(BackendError::Exited(name, st.to_string(), tail(log, 5)));
            }
            if t.elapsed() > limit {
                return Err(BackendError::NoSocket(name, sock.to_path_buf(), limit));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_vloop_and_qsd_arguments() {
        let d = DiskSpec {
            image: "/tmp/a,b.img".into(),
            readonly: true,
            queues: 2,
        };
        let v = backend_args(BackendKind::Vloop, &d, Path::new("/s"));
        assert_eq!(
            v,
            [
                "--socket-path",
                "/s",
                "--blk-file",
                "/tmp/a,b.img",
                "--read-only",
                "--num-queues",
                "2"
            ]
        );
        let q = backend_args(BackendKind::Qsd, &d, Path::new("/s"));
        assert_eq!(
            q[1],
            "driver=file,node-name=f,filename=/tmp/a,,b.img,discard=unmap,read-only=on"
        );
        assert!(
            q[3].contains("writable=off") && q[3].contains("num-queues=2"),
            "{}",
            q[3]
        );
        let rw = DiskSpec {
            readonly: false,
            queues: 1,
            ..d
        };
        assert!(!backend_args(BackendKind::Vloop, &rw, Path::new("/s"))
            .contains(&"--read-only".to_string()));
        assert!(backend_args(BackendKind::Qsd, &rw, Path::new("/s"))[3].contains("writable=on"));
    }
}
