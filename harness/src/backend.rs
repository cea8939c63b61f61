//! Starting the vhost-user-blk backend for one disk, as a separate process: `vloop-blk`
//! (the default) or `qemu-storage-daemon` (`--backend qsd`, the reference to compare with).
//! The command lines and the process handling are the shared ones of `vloop_frontend::backend`.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use vloop_frontend::backend::BackendError;
use vloop_frontend::backend::{BackendProcess, BackendSpec, Export, Program};

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

impl Backend {
    /// The spec that serves `disk` on `sock`.
    pub fn spec(&self, disk: &DiskSpec, sock: &Path) -> BackendSpec {
        let program = match self.kind {
            BackendKind::Vloop => Program::Vloop(self.bin.clone()),
            BackendKind::Qsd => Program::Qsd {
                bin: self.bin.clone(),
                iothread: false,
            },
        };
        BackendSpec::new(
            program,
            Export {
                queues: u16::try_from(disk.queues.max(1)).unwrap_or(u16::MAX),
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
