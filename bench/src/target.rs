//! What the comparisons set side by side: the targets (vloop-blk, qemu-storage-daemon from
//! its main loop and from an iothread, io_uring straight on the image, vloop-blk on the raw
//! image in qcow2 mode), the cache mode every target serves in, and for a backend target the
//! program that runs it and its command line. Both the host comparison and the guest
//! comparison name their sides with these.

use std::path::{Path, PathBuf};

use vloop_frontend::backend::{BackendSpec, Program};

/// One side of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// vloop-blk.
    Vloop,
    /// qemu-storage-daemon serving the export from its main loop.
    Qsd,
    /// qemu-storage-daemon serving the export from an iothread.
    QsdIothread,
    /// io_uring straight on the image file, in this process.
    Raw,
    /// vloop-blk on the raw image, while [`Target::Vloop`] serves its qcow2 copy (qcow2 mode).
    VloopRaw,
}

impl Target {
    /// Every target, in table order.
    pub const ALL: [Target; 5] = [
        Self::Vloop,
        Self::Qsd,
        Self::QsdIothread,
        Self::Raw,
        Self::VloopRaw,
    ];

    /// Name in tables, JSON and charts.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vloop => "vloop",
            Self::Qsd => "qsd",
            Self::QsdIothread => "qsd-iothread",
            Self::Raw => "raw",
            Self::VloopRaw => "vloop-raw",
        }
    }

    /// Whether it is a backend process (not the raw engine).
    pub fn is_backend(self) -> bool {
        self != Self::Raw
    }

    /// Whether it is vloop-blk (on either image).
    pub fn is_vloop(self) -> bool {
        matches!(self, Self::Vloop | Self::VloopRaw)
    }

    /// Whether it is one of the qemu-storage-daemon configurations.
    pub fn is_qsd(self) -> bool {
        matches!(self, Self::Qsd | Self::QsdIothread)
    }

    /// The backend program of this target: vloop-blk at `vloop_bin`, or qemu-storage-daemon at
    /// `qsd_bin` from its main loop or from an iothread (None for the raw target, which has no
    /// backend process).
    pub fn program(self, vloop_bin: &Path, qsd_bin: &Path) -> Option<Program> {
        match self {
            Self::Vloop | Self::VloopRaw => Some(Program::Vloop(vloop_bin.to_path_buf())),
            Self::Qsd | Self::QsdIothread => Some(Program::Qsd {
                bin: qsd_bin.to_path_buf(),
                iothread: self == Self::QsdIothread,
            }),
            Self::Raw => None,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the backends serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The image through the page cache.
    PageCache,
    /// The image with O_DIRECT (qemu-storage-daemon: `cache.direct=on`).
    Direct,
    /// No image I/O: vloop-blk's null engine, qemu-storage-daemon's `null-co` driver.
    Null,
}

impl Mode {
    /// The mode the options ask for: null, else O_DIRECT, else the page cache.
    pub fn of(null: bool, direct: bool) -> Self {
        if null {
            Self::Null
        } else if direct {
            Self::Direct
        } else {
            Self::PageCache
        }
    }

    /// Name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::PageCache => "page cache",
            Self::Direct => "O_DIRECT",
            Self::Null => "null (no image I/O)",
        }
    }
}

/// Errors of finding the backend programs.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// qemu-storage-daemon is neither a file at the path given nor on PATH.
    #[error("{0} is not on PATH: install qemu-system-x86 (Debian), pass --qsd-bin or --no-qsd")]
    NoQsd(PathBuf),
}

/// Checks that qemu-storage-daemon can be run as `bin`: a path to a file, or a name on PATH.
pub fn require_qsd(bin: &Path) -> Result<(), TargetError> {
    let found = bin.components().count() > 1 && bin.is_file()
        || vloop_frontend::backend::on_path(&bin.to_string_lossy());
    if found {
        Ok(())
    } else {
        Err(TargetError::NoQsd(bin.to_path_buf()))
    }
}

/// The vloop-blk binary: `given`, or the one beside the running program (or on PATH when that
/// cannot be told); a warning goes to stderr when it does not exist.
pub fn vloop_bin(given: Option<PathBuf>) -> PathBuf {
    let bin = given.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("vloop-blk")))
            .unwrap_or_else(|| PathBuf::from("vloop-blk"))
    });
    if !bin.is_file() {
        eprintln!(
            "warning: {} does not exist (build it with `cargo build --release -p vloop-blk` or pass --vloop-bin); vloop columns will fail",
            bin.display()
        );
    }
    bin
}

/// The command line `spec` starts: the program, then its arguments.
pub fn command_line(spec: &BackendSpec) -> Vec<String> {
    std::iter::once(spec.command().get_program().to_string_lossy().into())
        .chain(spec.args())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_target_has_its_program() {
        let (v, q) = (Path::new("/b/vloop-blk"), Path::new("qsd-bin"));
        assert_eq!(
            Target::VloopRaw.program(v, q),
            Some(Program::Vloop(v.into()))
        );
        assert_eq!(
            Target::QsdIothread.program(v, q),
            Some(Program::Qsd {
                bin: q.into(),
                iothread: true
            })
        );
        assert_eq!(Target::Raw.program(v, q), None);
        assert!(Target::ALL
            .iter()
            .all(|t| t.is_backend() == t.program(v, q).is_some()));
        assert_eq!(Mode::of(true, false), Mode::Null);
        assert_eq!(Mode::of(false, true), Mode::Direct);
        assert_eq!(Mode::of(false, false), Mode::PageCache);
    }

    #[test]
    fn a_missing_qsd_is_named_with_the_way_out() {
        let e = require_qsd(Path::new("/nonexistent/qemu-storage-daemon")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/nonexistent/qemu-storage-daemon is not on PATH: install qemu-system-x86 (Debian), pass --qsd-bin or --no-qsd"
        );
        assert!(require_qsd(Path::new("/bin/sh")).is_ok());
        let spec = BackendSpec::new(
            Program::Vloop("/b/vloop-blk".into()),
            vloop_frontend::backend::Export::new("/i.img", "/s.sock"),
        );
        let line = command_line(&spec);
        assert_eq!(line[0], "/b/vloop-blk");
        assert_eq!(line[1..], spec.args()[..]);
    }
}
