//! The backend that serves a harness disk, as a separate process: `vloop-blk` (the default),
//! `qemu-storage-daemon` (`--backend qsd`, the reference to compare with), or any program a
//! `--backend-cmd` template describes (the conformance suite's subject). The command lines
//! and the process handling are the shared ones of `vloop_frontend::backend`.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use vloop_frontend::backend::BackendError;
use vloop_frontend::backend::{
    sibling_binary, which, BackendProcess, BackendSpec, Export, Program, Template,
};

/// Errors of choosing a backend program.
#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    /// `--backend-bin` names no file.
    #[error("--backend-bin {0} does not exist")]
    NoSuchBin(PathBuf),
    /// vloop-blk is neither built beside the harness nor on PATH.
    #[error("vloop-blk not found beside vloop-harness nor on PATH; build it with `cargo build --release` or pass --backend-bin")]
    NoVloop,
    /// qemu-storage-daemon is not installed.
    #[error("qemu-storage-daemon not found; install the package qemu-system-x86")]
    NoQsd,
}

/// Which known backend program serves the disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `vloop-blk --socket-path S --blk-file F [--read-only] [--num-queues N]`.
    Vloop,
    /// `qemu-storage-daemon` with a vhost-user-blk export.
    Qsd,
}

/// Whether a backend, as the harness starts it, serves a qcow2 image (the image its backing
/// chain makes, not the file's own bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Qcow2Support {
    /// It does (vloop-blk serves a file named `*.qcow2` as qcow2: its `--format auto` rule).
    Served {
        /// It locks the backing files as QEMU does for a read-only user that shares no write
        /// access (vloop-blk: read-only with the shared lock), so no writer can open them
        /// while it serves.
        locks_backing: bool,
    },
    /// It does not, for this reason.
    NotServed(String),
    /// Nobody knows before a guest looks: a `--backend-cmd` template is given the image's
    /// path and nothing that says its format.
    Unknown,
}

/// A backend program, ready to serve disks.
#[derive(Debug, Clone)]
pub struct Backend {
    program: Program,
}

/// One disk to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image file.
    pub image: PathBuf,
    /// Export read-only.
    pub readonly: bool,
    /// Number of virtqueues.
    pub queues: u16,
}

impl DiskSpec {
    /// A read-write, one-queue disk.
    pub fn rw(image: PathBuf) -> DiskSpec {
        DiskSpec {
            image,
            readonly: false,
            queues: 1,
        }
    }

    /// A read-only, one-queue disk.
    pub fn ro(image: PathBuf) -> DiskSpec {
        DiskSpec {
            readonly: true,
            ..DiskSpec::rw(image)
        }
    }
}

impl Backend {
    /// The program of `kind`: `bin` when given, else vloop-blk beside the harness (or on
    /// PATH), or qemu-storage-daemon on PATH.
    pub fn find(kind: BackendKind, bin: Option<&Path>) -> Result<Backend, ChooseError> {
        let bin = match (bin, kind) {
            (Some(b), _) if !b.is_file() => return Err(ChooseError::NoSuchBin(b.to_path_buf())),
            (Some(b), _) => b.to_path_buf(),
            (None, BackendKind::Vloop) => sibling_binary("vloop-blk")
                .or_else(|| which("vloop-blk"))
                .ok_or(ChooseError::NoVloop)?,
            (None, BackendKind::Qsd) => which("qemu-storage-daemon").ok_or(ChooseError::NoQsd)?,
        };
        let program = match kind {
            BackendKind::Vloop => Program::Vloop(bin),
            BackendKind::Qsd => Program::Qsd {
                bin,
                iothread: false,
            },
        };
        Ok(Backend { program })
    }

    /// The program a `--backend-cmd` template describes.
    pub fn template(t: Template) -> Backend {
        Backend {
            program: Program::Template(t),
        }
    }

    /// How reports name it: the program's short name and its path or template.
    pub fn describe(&self) -> String {
        match &self.program {
            Program::Vloop(bin) | Program::Qsd { bin, .. } => {
                format!("{} {}", self.program.name(), bin.display())
            }
            Program::Template(t) => format!("--backend-cmd {}", t.text()),
        }
    }

    /// Whether it serves qcow2 images.
    pub fn qcow2(&self) -> Qcow2Support {
        match &self.program {
            Program::Vloop(_) => Qcow2Support::Served {
                locks_backing: true,
            },
            Program::Qsd { .. } => Qcow2Support::NotServed(
                "qemu-storage-daemon as the harness starts it exports the image through a \
                 driver=file node, which serves the qcow2 file's own bytes; serving the image \
                 needs a driver=qcow2 node over it: pass that command as --backend-cmd, e.g. \
                 'qemu-storage-daemon --blockdev driver=file,node-name=f,filename={image} \
                 --blockdev driver=qcow2,node-name=q,file=f --export \
                 type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={socket},writable={writable}'"
                    .into(),
            ),
            Program::Template(_) => Qcow2Support::Unknown,
        }
    }

    /// The spec that serves `disk` on `sock`.
    pub fn spec(&self, disk: &DiskSpec, sock: &Path) -> BackendSpec {
        BackendSpec::new(
            self.program.clone(),
            Export {
                queues: disk.queues.max(1),
                read_only: disk.readonly,
                ..Export::new(&disk.image, sock)
            },
        )
    }

    /// Starts the backend for `disk`, listening on `sock`, logging to `log`; returns when the
    /// socket exists.
    pub fn start(
        &self,
        disk: &DiskSpec,
        sock: &Path,
        log: &Path,
        limit: Duration,
    ) -> Result<BackendProcess, BackendError> {
        BackendProcess::spawn(&self.spec(disk, sock), log, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_follow_each_programs_conventions() {
        let disk = DiskSpec {
            queues: 2,
            ..DiskSpec::ro("/i.img".into())
        };
        let v = Backend::find(BackendKind::Vloop, Some(Path::new("/bin/sh"))).unwrap();
        let a = v.spec(&disk, Path::new("/s")).args();
        assert!(a.contains(&"--read-only".to_string()) && a.contains(&"2".to_string()));
        let t = Backend::template(
            Template::parse("my-blk --sock {socket} --img {image} --rw={writable}").unwrap(),
        );
        assert_eq!(
            t.spec(&disk, Path::new("/s")).args(),
            ["--sock", "/s", "--img", "/i.img", "--rw=off"]
        );
        assert!(t.describe().starts_with("--backend-cmd my-blk"));
        assert_eq!(
            v.qcow2(),
            Qcow2Support::Served {
                locks_backing: true
            }
        );
        assert_eq!(t.qcow2(), Qcow2Support::Unknown);
        let q = Backend::find(BackendKind::Qsd, Some(Path::new("/bin/sh"))).unwrap();
        assert!(matches!(q.qcow2(), Qcow2Support::NotServed(why) if why.contains("driver=qcow2")));
        assert!(matches!(
            Backend::find(BackendKind::Qsd, Some(Path::new("/nonexistent"))),
            Err(ChooseError::NoSuchBin(_))
        ));
    }
}
