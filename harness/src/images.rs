//! The harness's image factory: blank, ext2, ISO 9660, copied images and qcow2 overlays made
//! by vloop's own writers (the `vloop_images` and `vloop_qcow2` libraries, called directly),
//! or, only when asked (`--image-tools system`, to compare), by standard tools (`truncate`,
//! `mke2fs -d`, `xorriso`, `cp`, `qemu-img create`). Every image says which tool made it.
//! This module is the harness's one door into `vloop_images` and `vloop_qcow2`; it also tells
//! which file system an image holds, and opens a qcow2 image with its backing chain for the
//! host's read-back.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

use vloop_images::{copy, create, ext2, iso, size::Size, tree};
use vloop_qcow2::{Chain, CreateOptions as Qcow2Options, Format};

use crate::file_error::{at, FileError};

/// Errors of making or probing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// vloop's blank-image writer failed.
    #[error("vloop-images create {path}")]
    Create {
        /// The image.
        path: PathBuf,
        /// Why (boxed: the writer's error is large).
        #[source]
        source: Box<create::CreateError>,
    },
    /// Reading the source folder failed.
    #[error("vloop-images: reading the folder {path}")]
    Tree {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: tree::TreeError,
    },
    /// vloop's ext2 writer failed.
    #[error("vloop-images ext2 {path}")]
    Ext2 {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: ext2::Ext2Error,
    },
    /// vloop's ISO 9660 writer failed.
    #[error("vloop-images iso {path}")]
    Iso {
        /// The image.
        path: PathBuf,
        /// Why (boxed: the writer's error is large).
        #[source]
        source: Box<iso::IsoError>,
    },
    /// vloop's image copier failed.
    #[error("vloop-images copy to {path}")]
    Copy {
        /// The copy.
        path: PathBuf,
        /// Why.
        #[source]
        source: copy::CopyError,
    },
    /// vloop's qcow2 writer failed.
    #[error("vloop-qcow2 create {path}")]
    Qcow2Create {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: vloop_qcow2::CreateError,
    },
    /// A qcow2 image or its backing chain could not be opened for reading.
    #[error("vloop-qcow2 open {path}")]
    Qcow2Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: vloop_qcow2::Error,
    },
    /// A system tool is not installed.
    #[error("{tool} is not installed (package {package}), and --image-tools system needs it")]
    ToolMissing {
        /// The program.
        tool: &'static str,
        /// The package that has it.
        package: &'static str,
    },
    /// A system tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        /// The command.
        tool: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The last line of its stderr.
        stderr: String,
    },
    /// A file could not be read, written or sized.
    #[error(transparent)]
    Io(#[from] FileError),
}

/// Which writers make the images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageTools {
    /// vloop's own writers (the `vloop_images` library).
    #[default]
    Vloop,
    /// Standard tools (truncate, mke2fs -d, xorriso, cp, qemu-img), for comparison.
    System,
}

impl ImageTools {
    /// How reports name the tool family.
    pub fn describe(self) -> &'static str {
        match self {
            ImageTools::Vloop => "vloop-images library",
            ImageTools::System => "system tools (truncate, mke2fs -d, xorriso, cp, qemu-img)",
        }
    }
}

/// Makes images with one tool family.
#[derive(Debug, Clone, Copy, Default)]
pub struct Images {
    /// The tool family.
    pub tools: ImageTools,
}

/// Cluster size of the qcow2 overlays the harness makes (QEMU's default).
pub const OVERLAY_CLUSTER: u64 = 64 * 1024;

/// Runs a system tool; `package` is named when it is missing.
fn system(cmd: &mut Command, tool: &'static str, package: &'static str) -> Result<(), ImageError> {
    let out = cmd.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::ToolMissing { tool, package },
        _ => ImageError::Io(at("running", Path::new(tool))(e)),
    })?;
    if !out.status.success() {
        return Err(ImageError::ToolFailed {
            tool: tool.to_string(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .to_string(),
        });
    }
    Ok(())
}

/// Reads a folder the way vloop's builders do (owners squashed to root, the build time from
/// `SOURCE_DATE_EPOCH` or the newest file).
fn scan(from: &Path) -> Result<tree::Tree, ImageError> {
    let tree_err = |source| ImageError::Tree {
        path: from.to_path_buf(),
        source,
    };
    let timestamp = tree::resolve_timestamp(None).map_err(tree_err)?;
    tree::scan(
        from,
        &tree::TreeOptions {
            keep_owners: false,
            timestamp,
        },
    )
    .map_err(tree_err)
}

impl Images {
    /// Which tool family is in use.
    pub fn tool(&self) -> &'static str {
        self.tools.describe()
    }

    /// A blank sparse image of `size` bytes; returns the tool that made it.
    pub fn create(&self, path: &Path, size: u64) -> Result<&'static str, ImageError> {
        match self.tools {
            ImageTools::Vloop => {
                let opts = create::CreateOptions {
                    size: Some(Size(size)),
                    ..Default::default()
                };
                create::create(path, &opts).map_err(|source| ImageError::Create {
                    path: path.to_path_buf(),
                    source: Box::new(source),
                })?;
                Ok("vloop-images create")
            }
            ImageTools::System => {
                let f = File::create(path).map_err(at("creating", path))?;
                f.set_len(size).map_err(at("sizing", path))?;
                Ok("truncate")
            }
        }
    }

    /// An ext2 image of `size` bytes holding the folder `from`.
    pub fn ext2(&self, path: &Path, from: &Path, size: u64) -> Result<&'static str, ImageError> {
        match self.tools {
            ImageTools::Vloop => {
                let opts = ext2::Ext2Options {
                    size: Some(size),
                    ..Default::default()
                };
                ext2::build(&scan(from)?, path, &opts).map_err(|source| ImageError::Ext2 {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok("vloop-images ext2")
            }
            ImageTools::System => {
                system(
                    Command::new("mke2fs")
                        .args(["-q", "-t", "ext2", "-F", "-E", "root_owner=0:0", "-d"])
                        .arg(from)
                        .arg(path)
                        .arg(format!("{}k", size / 1024)),
                    "mke2fs",
                    "e2fsprogs",
                )?;
                Ok("mke2fs -d")
            }
        }
    }

    /// An ISO 9660 image (Rock Ridge and Joliet) holding the folder `from`.
    pub fn iso(&self, path: &Path, from: &Path) -> Result<&'static str, ImageError> {
        match self.tools {
            ImageTools::Vloop => {
                iso::build(&scan(from)?, path, &iso::IsoOptions::default()).map_err(|source| {
                    ImageError::Iso {
                        path: path.to_path_buf(),
                        source: Box::new(source),
                    }
                })?;
                Ok("vloop-images iso")
            }
            ImageTools::System => {
                system(
                    Command::new("xorriso")
                        .args(["-as", "mkisofs", "-quiet", "-R", "-J", "-joliet-long"])
                        .args(["-V", "CDROM", "-o"])
                        .arg(path)
                        .arg(from),
                    "xorriso",
                    "xorriso",
                )?;
                Ok("xorriso")
            }
        }
    }

    /// A copy of an image (the CD-ROM path: `cp /dev/cdrom cdrom-image`).
    pub fn copy(&self, src: &Path, dst: &Path) -> Result<&'static str, ImageError> {
        match self.tools {
            ImageTools::Vloop => {
                copy::copy(src, dst, &copy::CopyOptions::default()).map_err(|source| {
                    ImageError::Copy {
                        path: dst.to_path_buf(),
                        source,
                    }
                })?;
                Ok("vloop-images copy")
            }
            ImageTools::System => {
                system(Command::new("cp").arg(src).arg(dst), "cp", "coreutils")?;
                Ok("cp")
            }
        }
    }

    /// An empty qcow2 overlay (version 3, [`OVERLAY_CLUSTER`] clusters) of `size` bytes over
    /// the raw image `backing`: the name is stored as given (a relative one is resolved from
    /// the overlay's folder, as QEMU does) with backing format raw, so nothing probes the base.
    /// Returns the tool that made it.
    pub fn overlay(
        &self,
        path: &Path,
        backing: &str,
        size: u64,
    ) -> Result<&'static str, ImageError> {
        match self.tools {
            ImageTools::Vloop => {
                let f = File::create_new(path).map_err(at("creating", path))?;
                let opts = Qcow2Options {
                    cluster_size: OVERLAY_CLUSTER,
                    backing: Some((backing.to_string(), Format::Raw)),
                    ..Qcow2Options::new(size)
                };
                vloop_qcow2::create(&f, &opts).map_err(|source| ImageError::Qcow2Create {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok("vloop-qcow2 create")
            }
            ImageTools::System => {
                system(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", backing])
                        .args(["-o", &format!("cluster_size={OVERLAY_CLUSTER}")])
                        .arg(path)
                        .arg(size.to_string()),
                    "qemu-img",
                    "qemu-utils",
                )?;
                Ok("qemu-img create")
            }
        }
    }
}

/// The qcow2 image `path` with its backing chain, opened read-only (backing files as the
/// image names them, in the format it records) for reading on the host.
pub fn open_qcow2(path: &Path) -> Result<Chain, ImageError> {
    let top = File::open(path).map_err(at("opening", path))?;
    let opts = vloop_qcow2::OpenOptions {
        format: Some(Format::Qcow2),
        read_only: true,
        ..Default::default()
    };
    Chain::open(top, path, &opts, &mut |p, _| File::open(p)).map_err(|source| {
        ImageError::Qcow2Open {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// A size as users type it (`64M`, `1G`, `20480s`, `4096`: qemu-img's grammar, as
/// `vloop-image` reads it).
pub fn parse_size(text: &str) -> Result<u64, vloop_images::size::SizeError> {
    vloop_images::size::parse(text).map(Size::bytes)
}

/// A file system an image holds, as far as the guest can mount it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// ext2, ext3 or ext4 (the guest's ext4 driver mounts all three).
    Ext,
    /// ISO 9660.
    Iso9660,
}

impl FsKind {
    /// The `mount -t` name in the guest.
    pub fn fstype(self) -> &'static str {
        match self {
            FsKind::Ext => "ext4",
            FsKind::Iso9660 => "iso9660",
        }
    }
}

/// Offset of the ext2/3/4 superblock's magic number.
const EXT_MAGIC_AT: u64 = 1024 + 56;
/// The ext2/3/4 magic number.
const EXT_MAGIC: u16 = 0xEF53;

/// Which file system `image` holds, if one the guest mounts.
pub fn probe_fs(image: &Path) -> Result<Option<FsKind>, ImageError> {
    let mut f = File::open(image).map_err(at("opening", image))?;
    if iso::probe(&mut f).map_err(at("reading", image))?.is_some() {
        return Ok(Some(FsKind::Iso9660));
    }
    let mut magic = [0u8; 2];
    let read = f
        .seek(SeekFrom::Start(EXT_MAGIC_AT))
        .and_then(|_| f.read_exact(&mut magic));
    match read {
        Ok(()) if u16::from_le_bytes(magic) == EXT_MAGIC => Ok(Some(FsKind::Ext)),
        Ok(()) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(ImageError::Io(at("reading", image)(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vloop_writers_make_each_kind_and_probe_tells_them_apart() {
        let t = tempfile::tempdir().unwrap();
        let tree = t.path().join("tree");
        std::fs::create_dir_all(tree.join("d")).unwrap();
        std::fs::write(tree.join("d/f.txt"), b"hello").unwrap();
        let im = Images::default();
        let blank = t.path().join("blank.img");
        assert_eq!(im.create(&blank, 1 << 20).unwrap(), "vloop-images create");
        assert_eq!(std::fs::metadata(&blank).unwrap().len(), 1 << 20);
        assert_eq!(probe_fs(&blank).unwrap(), None);
        let e = t.path().join("e.img");
        assert_eq!(im.ext2(&e, &tree, 4 << 20).unwrap(), "vloop-images ext2");
        assert_eq!(probe_fs(&e).unwrap(), Some(FsKind::Ext));
        let i = t.path().join("i.iso");
        assert_eq!(im.iso(&i, &tree).unwrap(), "vloop-images iso");
        assert_eq!(probe_fs(&i).unwrap(), Some(FsKind::Iso9660));
        let c = t.path().join("copy.iso");
        assert_eq!(im.copy(&i, &c).unwrap(), "vloop-images copy");
        assert_eq!(std::fs::read(&i).unwrap(), std::fs::read(&c).unwrap());
        // No silent clobbering: vloop's writers refuse an existing target.
        assert!(matches!(
            im.create(&blank, 1 << 20),
            Err(ImageError::Create { .. })
        ));
        let tiny = t.path().join("tiny");
        std::fs::write(&tiny, b"x").unwrap();
        assert_eq!(probe_fs(&tiny).unwrap(), None);
    }

    #[test]
    fn overlays_read_through_to_their_base_and_keep_their_own_writes() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base.img");
        let data: Vec<u8> = (0..3 << 16).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&base, &data).unwrap();
        let ov = t.path().join("o.qcow2");
        let im = Images::default();
        assert_eq!(
            im.overlay(&ov, "base.img", data.len() as u64).unwrap(),
            "vloop-qcow2 create"
        );
        assert!(matches!(
            im.overlay(&ov, "base.img", data.len() as u64),
            Err(ImageError::Io(_))
        ));
        let c = open_qcow2(&ov).unwrap();
        assert_eq!(c.size(), data.len() as u64);
        assert_eq!(c.layers(), 2);
        let mut got = vec![0u8; data.len()];
        c.read_at(&mut got, 0).unwrap();
        assert_eq!(got, data);
        let info = c.info().unwrap();
        assert_eq!(info.allocated_clusters, Some(0));
        assert_eq!(info.cluster_size, Some(OVERLAY_CLUSTER));
        drop(c);
        // A write through a writable chain lands in the overlay; the base keeps its bytes.
        let w = Chain::open(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&ov)
                .unwrap(),
            &ov,
            &vloop_qcow2::OpenOptions::default(),
            &mut |p, _| File::open(p),
        )
        .unwrap();
        w.write_at(b"overlay", 70_000).unwrap();
        w.close().unwrap();
        drop(w);
        let c = open_qcow2(&ov).unwrap();
        c.read_at(&mut got, 0).unwrap();
        assert_eq!(&got[70_000..70_007], b"overlay");
        assert_eq!(&got[..70_000], &data[..70_000]);
        assert_eq!(&got[70_007..], &data[70_007..]);
        assert_eq!(std::fs::read(&base).unwrap(), data);
        assert!(matches!(
            open_qcow2(&base),
            Err(ImageError::Qcow2Open { .. })
        ));
    }

    #[test]
    fn a_missing_system_tool_names_its_package() {
        let e = system(
            &mut Command::new("/nonexistent/mke2fs"),
            "mke2fs",
            "e2fsprogs",
        )
        .unwrap_err();
        assert!(e.to_string().contains("package e2fsprogs"), "{e}");
    }
}
