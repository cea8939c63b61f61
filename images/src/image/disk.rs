//! The [`Disk`]: an image opened read-only as the virtual disk a guest sees, raw or a qcow2
//! chain, with its files and their identities.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use vloop_qcow2::{Backing, Chain, Format, OpenOptions, ProbeError};

use super::error::ImageError;
use super::probe::{has_qcow2_name, open_backing, probe_file, Probed, Probing};
use crate::input::{open_source, FileSource, KIND_BLOCK_DEVICE};

/// One file of a disk, top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The file (a backing file: as resolved from the name the image above stores).
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Its virtual size in bytes.
    pub virtual_size: u64,
}

pub(super) enum Inner {
    Raw(FileSource),
    Qcow2(Chain),
}

/// An image opened read-only as the virtual disk a guest sees.
pub struct Disk {
    path: PathBuf,
    format: Format,
    probed: bool,
    pub(super) size: u64,
    kind: &'static str,
    pub(super) inner: Inner,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Opens `path` read-only as a virtual disk: in `format`, or probed under `probing` when it
/// is `None`. A qcow2 image is opened with the backing chain it names, every file read-only.
pub fn open(path: &Path, format: Option<Format>, probing: Probing) -> Result<Disk, ImageError> {
    let (source, len, kind) = open_source(path)?;
    let (format, probed) = match format {
        Some(f) => (f, false),
        None => match probe_file(source.file(), path)? {
            Probed::Format(Format::Qcow2) => {
                if let Probing::Guarded { option } = probing {
                    if !has_qcow2_name(path) {
                        return Err(ImageError::UnnamedQcow2 {
                            path: path.to_path_buf(),
                            option,
                        });
                    }
                }
                (Format::Qcow2, true)
            }
            Probed::Format(f) => (f, true),
            Probed::Foreign(name) => {
                return Err(ImageError::Foreign {
                    path: path.to_path_buf(),
                    source: ProbeError::Foreign(name),
                })
            }
        },
    };
    let inner = match format {
        Format::Raw => Inner::Raw(source),
        Format::Qcow2 => {
            if kind == KIND_BLOCK_DEVICE {
                return Err(ImageError::Qcow2Device {
                    path: path.to_path_buf(),
                });
            }
            Inner::Qcow2(open_chain(source, path, Backing::FromImage, probing)?)
        }
    };
    let size = match &inner {
        Inner::Raw(_) => len,
        Inner::Qcow2(c) => c.size(),
    };
    Ok(Disk {
        path: path.to_path_buf(),
        format,
        probed,
        size,
        kind,
        inner,
    })
}

/// Opens the qcow2 image `path` alone, without its backing file (unallocated clusters read
/// as zeroes): for looking at an image whose backing chain cannot be opened.
pub fn open_without_backing(path: &Path) -> Result<Disk, ImageError> {
    let (source, _, kind) = open_source(path)?;
    if kind == KIND_BLOCK_DEVICE {
        return Err(ImageError::Qcow2Device {
            path: path.to_path_buf(),
        });
    }
    let chain = open_chain(source, path, Backing::None, Probing::Content)?;
    Ok(Disk {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        probed: false,
        size: chain.size(),
        kind,
        inner: Inner::Qcow2(chain),
    })
}

fn open_chain(
    source: FileSource,
    path: &Path,
    backing: Backing,
    probing: Probing,
) -> Result<Chain, ImageError> {
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        read_only: true,
        backing,
        ..OpenOptions::default()
    };
    let mut opener = |p: &Path, f: Option<Format>| open_backing(p, f, probing);
    Ok(Chain::open(source.into_file(), path, &opts, &mut opener)?)
}

impl Disk {
    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Whether the format was probed (not named by the caller).
    pub fn probed(&self) -> bool {
        self.probed
    }

    /// The virtual size in bytes (a raw image: its length).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// [`crate::input::KIND_FILE`] or [`KIND_BLOCK_DEVICE`].
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The qcow2 chain, for a qcow2 image.
    pub fn chain(&self) -> Option<&Chain> {
        match &self.inner {
            Inner::Raw(_) => None,
            Inner::Qcow2(c) => Some(c),
        }
    }

    /// The files of the disk, top first: one for a raw image, the backing chain for qcow2.
    pub fn layers(&self) -> Result<Vec<Layer>, ImageError> {
        match &self.inner {
            Inner::Raw(_) => Ok(vec![Layer {
                path: self.path.clone(),
                format: Format::Raw,
                virtual_size: self.size,
            }]),
            Inner::Qcow2(c) => Ok(c
                .info()?
                .chain
                .into_iter()
                .map(|l| Layer {
                    path: l.path,
                    format: l.format,
                    virtual_size: l.virtual_size,
                })
                .collect()),
        }
    }

    /// The descriptors of the disk's files, top first.
    pub fn fds(&self) -> Vec<RawFd> {
        match &self.inner {
            Inner::Raw(s) => vec![s.file().as_raw_fd()],
            Inner::Qcow2(c) => c.fds(),
        }
    }

    /// Device and inode of each of the disk's files, top first.
    pub fn identities(&self) -> io::Result<Vec<(u64, u64)>> {
        self.fds()
            .into_iter()
            .map(|fd| {
                nix::sys::stat::fstat(fd)
                    .map(|st| (st.st_dev, st.st_ino))
                    .map_err(io::Error::from)
            })
            .collect()
    }

    /// Whether the file at `path` is one of the disk's files.
    pub fn contains_file(&self, path: &Path) -> io::Result<bool> {
        let m = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        Ok(self.identities()?.contains(&(m.dev(), m.ino())))
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::image::testing::{create_new, qcow2_with, strip_backing_format, write_overlay};

    #[test]
    fn guarded_probing_trusts_qcow2_only_by_name() {
        let d = tempfile::tempdir().unwrap();
        let q = d.path().join("img.qcow2");
        qcow2_with(&q, 1 << 20, &[(0, b"x")]);
        let disguised = d.path().join("disk.img");
        fs::copy(&q, &disguised).unwrap();
        let guarded = Probing::Guarded {
            option: "--source-format",
        };
        let err = open(&disguised, None, guarded).unwrap_err();
        assert!(matches!(err, ImageError::UnnamedQcow2 { .. }), "{err}");
        assert!(err.to_string().contains("--source-format qcow2"), "{err}");
        assert_eq!(
            open(&disguised, None, Probing::Content).unwrap().format(),
            Format::Qcow2
        );
        let raw = open(&disguised, Some(Format::Raw), guarded).unwrap();
        assert_eq!((raw.format(), raw.probed()), (Format::Raw, false));
        assert_eq!(
            open(&disguised, Some(Format::Qcow2), guarded)
                .unwrap()
                .size(),
            1 << 20
        );

        // A raw base whose first sector holds a qcow2 header naming a host file, under an
        // overlay that names no backing format.
        let base = d.path().join("base.img");
        let host = d.path().join("secret");
        fs::write(&host, b"host data").unwrap();
        let mut evil = [0u8; 512];
        evil[..4].copy_from_slice(b"QFI\xfb");
        evil[7] = 3;
        fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        File::options()
            .write(true)
            .open(&base)
            .unwrap()
            .write_all_at(&evil, 0)
            .unwrap();
        let top = d.path().join("top.qcow2");
        write_overlay(&create_new(&top), 1 << 20, "base.img");
        // Named raw: read as raw.
        open(&top, None, guarded).unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .truncate(true)
            .open(&top)
            .unwrap();
        // No backing format: probed, and refused.
        write_overlay(&f, 1 << 20, "base.img");
        strip_backing_format(&top);
        let err = open(&top, None, guarded).unwrap_err();
        let text = format!("{:?}", anyhow::Error::from(err));
        assert!(text.contains("neither its name"), "{text}");
    }
}
