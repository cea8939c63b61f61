//! The backend that serves a harness disk, as a separate process: `vloop-blk` (the default),
//! `qemu-storage-daemon` (`--backend qsd`, the reference to compare with), or any program a
//! `--backend-cmd` template describes (the conformance suite's subject). The command lines
//! and the process handling are the shared ones of `vloop_frontend::backend`.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use vloop_frontend::backend::BackendError;
use vloop_frontend::backend::{
    sibling_binary, which, BackendProcess, BackendSpec, Export, ImageFormat, Program, Template,
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
    /// It does (vloop-blk serves a file named `*.qcow2` as qcow2 by its `--format auto` rule;
    /// qemu-storage-daemon is told so).
    Served {
        /// It locks the backing files as QEMU does for a read-only user that shares no write
        /// access (vloop-blk: read-only with the shared lock), so no writer can open them
        /// while it serves.
        locks_backing: bool,
    },
    /// Nobody knows before a guest looks: a `--backend-cmd` template is given the image's
    /// path and nothing that says its format.
    Unknown,
}

/// A backend program, ready to serve disks.
#[derive(Debug, Clone)]
pub struct Backend {
    program: Program,
    /// Open every image with O_DIRECT.
    direct: bool,
    /// Arguments after the export's own.
    extra_args: Vec<String>,
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
        Ok(Backend::program(program))
    }

    /// The program a `--backend-cmd` template describes.
    pub fn template(t: Template) -> Backend {
        Backend::program(Program::Template(t))
    }

    /// `program` as it is (for a program that drives the harness as a library, e.g. with
    /// qemu-storage-daemon's iothread).
    pub fn program(program: Program) -> Backend {
        Backend {
            program,
            direct: false,
            extra_args: Vec::new(),
        }
    }

    /// The same, opening the images with O_DIRECT when `direct` (vloop-blk `--direct`,
    /// qemu-storage-daemon `cache.direct=on`; a template has no such option).
    pub fn with_direct(self, direct: bool) -> Backend {
        Backend { direct, ..self }
    }

    /// The same, with `args` after the export's own arguments.
    pub fn with_args(self, args: Vec<String>) -> Backend {
        Backend {
            extra_args: args,
            ..self
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
            // The export opens a `driver=qcow2` node over an image named `*.qcow2` (see
            // [`Backend::spec`]); qemu-storage-daemon shares write access to the backing files.
            Program::Qsd { .. } => Qcow2Support::Served {
                locks_backing: false,
            },
            Program::Template(_) => Qcow2Support::Unknown,
        }
    }

    /// The spec that serves `disk` on `sock`. An image named `*.qcow2` is served as qcow2:
    /// vloop-blk decides so by itself (its `--format auto` rule), qemu-storage-daemon is told.
    pub fn spec(&self, disk: &DiskSpec, sock: &Path) -> BackendSpec {
        let named_qcow2 = disk
            .image
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("qcow2"));
        let format = match &self.program {
            Program::Qsd { .. } if named_qcow2 => ImageFormat::Qcow2 { cache_size: None },
            _ => ImageFormat::Auto,
        };
        let mut spec = BackendSpec::new(
            self.program.clone(),
            Export {
                queues: disk.queues.max(1),
                read_only: disk.readonly,
                direct: self.direct,
                format,
                ..Export::new(&disk.image, sock)
            },
        );
        spec.extra_args.clone_from(&self.extra_args);
        spec
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
        assert_eq!(
            q.qcow2(),
            Qcow2Support::Served {
                locks_backing: false
            }
        );
        let overlay = DiskSpec::rw("/vm1.qcow2".into());
        let a = q.spec(&overlay, Path::new("/s")).args().join(" ");
        assert!(a.contains("driver=qcow2"), "{a}");
        assert!(!q
            .spec(&disk, Path::new("/s"))
            .args()
            .join(" ")
            .contains("qcow2"));
        let q = Backend::program(Program::Qsd {
            bin: "/q".into(),
            iothread: true,
        })
        .with_direct(true)
        .spec(&disk, Path::new("/s"))
        .args();
        assert!(
            q[1] == "iothread,id=iothread0" && q[3].contains("cache.direct=on"),
            "{q:?}"
        );
        let v = v
            .with_direct(true)
            .with_args(vec!["--queue-size=512".into()])
            .spec(&disk, Path::new("/s"))
            .args();
        assert!(v.contains(&"--direct".to_string()), "{v:?}");
        assert_eq!(v.last().map(String::as_str), Some("--queue-size=512"));
        assert!(matches!(
            Backend::find(BackendKind::Qsd, Some(Path::new("/nonexistent"))),
            Err(ChooseError::NoSuchBin(_))
        ));
    }
}
