//! Images as the virtual disks guests see: a raw file or block device, or a qcow2 image read
//! through its backing chain ([`vloop_qcow2::Chain`]), opened read-only.
//!
//! The layer between [`crate::input`] (files and devices as bytes) and the commands that read
//! a disk through its format: `convert`, `info` and `create --backing`. [`open`] returns a
//! [`Disk`], which is an input [`Source`], so [`crate::input::walk_data`] walks a qcow2
//! image's virtual disk as it walks a file: the unallocated and zero clusters are holes and
//! are never read, and so are the holes of the files under allocated clusters (a sparse raw
//! base, found with `SEEK_DATA`).
//!
//! # Probing
//! A file whose format is not named is probed ([`vloop_qcow2::probe`]). Probing is what the
//! CVE-2008-2004 class of attacks abuses: a guest that owns a raw image writes a qcow2 header
//! into it, naming any host file as its backing file, and whoever later reads the image as
//! qcow2 reads that host file. So the commands that read data out of an image
//! ([`Probing::Guarded`]) trust a qcow2 header found by probing only in a file whose name ends
//! in `.qcow2`; any other file that looks like qcow2 is refused with an error that asks for
//! the format to be named. The same rule holds for the backing files of a chain that names no
//! backing format. Inspecting ([`Probing::Content`]) trusts the content and says what it saw.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use vloop_qcow2::format::PROBE_BYTES;
pub use vloop_qcow2::Format;
use vloop_qcow2::{Backing, Chain, Extent, OpenOptions, ProbeError};

use crate::input::{
    file_data_region, open_source, read_full_at, FileSource, InputError, Source, CHUNK,
    KIND_BLOCK_DEVICE,
};

/// The name ending that makes a probed qcow2 header trusted.
pub const QCOW2_EXTENSION: &str = "qcow2";

/// Errors from opening an image as a virtual disk.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The file cannot be opened, or is not a file or block device.
    #[error(transparent)]
    Input(#[from] InputError),
    /// Reading the first sector to probe the format failed.
    #[error("cannot read {} to find its format", path.display())]
    ProbeRead {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Probing found a format that is neither raw nor qcow2.
    #[error("{}", path.display())]
    Foreign {
        /// The image.
        path: PathBuf,
        /// What it looks like.
        #[source]
        source: ProbeError,
    },
    /// Probing found a qcow2 header in a file whose name does not say qcow2.
    #[error(
        "{} looks like a qcow2 image but its name does not end in .qcow2; name its format \
         ({option} qcow2 to read it as qcow2, {option} raw to read its bytes as they are)",
        path.display()
    )]
    UnnamedQcow2 {
        /// The image.
        path: PathBuf,
        /// The command-line option that names the format.
        option: &'static str,
    },
    /// A qcow2 image on a block device.
    #[error("{}: qcow2 images on block devices are not supported (read it as raw, or copy it to a file first)", path.display())]
    Qcow2Device {
        /// The device.
        path: PathBuf,
    },
    /// The qcow2 image or a file of its backing chain is invalid or cannot be opened.
    #[error(transparent)]
    Chain(#[from] vloop_qcow2::Error),
}

/// Why a backing file that names no format and looks like qcow2 is refused (under
/// [`Probing::Guarded`]).
#[derive(Debug, Error)]
#[error(
    "it looks like a qcow2 image, but neither its name (not *.qcow2) nor the image naming it \
     (no backing format) says so; if it is one, record the format with \
     `qemu-img rebase -u -F qcow2 -b NAME IMAGE`"
)]
pub struct UnnamedBacking;

/// How much a probe is trusted when no format is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probing {
    /// Whatever the content looks like is the format (inspecting only).
    Content,
    /// A qcow2 header counts only in a file named `*.qcow2`, for the image and for backing
    /// files that the image names without a format; other files that look like qcow2 are
    /// refused. `option` is the command-line option that names the image's format, for the
    /// error message.
    Guarded {
        /// E.g. `--source-format`.
        option: &'static str,
    },
}

/// Serialises a [`Format`] as its name (`raw`, `qcow2`), for summaries.
pub fn serialize_format<S: serde::Serializer>(f: &Format, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(f.name())
}

/// Whether `path`'s name ends in `.qcow2` (any case).
pub fn has_qcow2_name(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(QCOW2_EXTENSION))
}

/// What probing the first sector of a file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probed {
    /// Raw or qcow2.
    Format(Format),
    /// Another image format (named), which vloop does not read.
    Foreign(&'static str),
}

/// Probes the first sector of `file` (named `path` in errors).
pub fn probe_file(file: &File, path: &Path) -> Result<Probed, ImageError> {
    let mut first = [0u8; PROBE_BYTES];
    let n = read_full_at(
        &FileSource::regular(file.try_clone().map_err(|source| ImageError::ProbeRead {
            path: path.to_path_buf(),
            source,
        })?),
        &mut first,
        0,
    )
    .map_err(|(_, source)| ImageError::ProbeRead {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(match vloop_qcow2::probe(&first[..n]) {
        Ok(f) => Probed::Format(f),
        Err(ProbeError::Foreign(name)) => Probed::Foreign(name),
    })
}

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

enum Inner {
    Raw(FileSource),
    Qcow2(Chain),
}

/// An image opened read-only as the virtual disk a guest sees.
pub struct Disk {
    path: PathBuf,
    format: Format,
    probed: bool,
    size: u64,
    kind: &'static str,
    inner: Inner,
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

/// Opens backing files read-only, applying `probing`'s rule to those opened without a
/// format.
fn open_backing(path: &Path, format: Option<Format>, probing: Probing) -> io::Result<File> {
    let file = File::open(path)?;
    if format.is_none() && matches!(probing, Probing::Guarded { .. }) && !has_qcow2_name(path) {
        let probed = probe_file(&file, path).map_err(io::Error::other)?;
        if probed == Probed::Format(Format::Qcow2) {
            return Err(io::Error::other(UnnamedBacking));
        }
    }
    Ok(file)
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

/// Where the mapping of a qcow2 disk looks for data: the first window, grown fourfold while
/// only holes are found, up to the largest.
const FIRST_WINDOW: u64 = 4 * CHUNK as u64;
const LARGEST_WINDOW: u64 = 1 << 30;

/// The part of extent `e` (at virtual byte `at`) with data in it, first found: virtual
/// `(start, end)`, or `None` when the extent reads as zeroes without any data read.
fn extent_data(e: &Extent, at: u64) -> io::Result<Option<(u64, u64)>> {
    Ok(match *e {
        Extent::Zero { .. } => None,
        Extent::Slow { len } => Some((at, at + len)),
        Extent::Data { fd, host, len, .. } => {
            file_data_region(fd, host, host + len)?.map(|(s, t)| (at + (s - host), at + (t - host)))
        }
    })
}

/// The data region of a chain's virtual disk containing or following `offset`.
fn chain_data_region(chain: &Chain, offset: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    let mut ext = Vec::new();
    let mut at = offset;
    let mut window = FIRST_WINDOW;
    let mut region: Option<(u64, u64)> = None;
    while at < len {
        let n = (len - at).min(window);
        if chain.map_read(at, n, &mut ext).is_err() {
            // Something in the window cannot be mapped (a corrupt entry): call it data, so
            // that the reads find the failing place and report it precisely.
            return Ok(Some((at, at + n)));
        }
        let mut pos = at;
        for e in &ext {
            let end = pos + e.len();
            let data = extent_data(e, pos)?;
            match (region, data) {
                (None, None) => {}
                (None, Some((s, t))) => {
                    if t < end {
                        return Ok(Some((s, t)));
                    }
                    region = Some((s, t));
                }
                // A region continues only with data from the extent's first byte on.
                (Some((s, _)), Some((ds, t))) if ds == pos => {
                    if t < end {
                        return Ok(Some((s, t)));
                    }
                    region = Some((s, t));
                }
                (Some(r), _) => return Ok(Some(r)),
            }
            pos = end;
        }
        if region.is_some() {
            // Data up to the window's end: the walk asks again from there.
            return Ok(region);
        }
        at += n;
        window = (window * 4).min(LARGEST_WINDOW);
    }
    Ok(region)
}

impl Source for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match &self.inner {
            Inner::Raw(s) => s.read_at(buf, offset),
            Inner::Qcow2(c) => {
                let n = (self.size.saturating_sub(offset)).min(buf.len() as u64) as usize;
                if n == 0 {
                    return Ok(0);
                }
                c.read_at(&mut buf[..n], offset).map_err(io::Error::other)?;
                Ok(n)
            }
        }
    }

    fn data_region(&self, offset: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
        match &self.inner {
            Inner::Raw(s) => s.data_region(offset, len),
            Inner::Qcow2(c) => chain_data_region(c, offset, len.min(self.size)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::FileExt;

    use indicatif::ProgressBar;

    use super::*;
    use crate::input::walk_data;

    /// A qcow2 image at `path` of `size` bytes with 64 KiB clusters holding `data`, written
    /// through the chain.
    fn qcow2_with(path: &Path, size: u64, data: &[(u64, &[u8])]) {
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        vloop_qcow2::create(&f, &vloop_qcow2::CreateOptions::new(size)).unwrap();
        let opts = OpenOptions {
            format: Some(Format::Qcow2),
            backing: Backing::None,
            ..OpenOptions::default()
        };
        let c = Chain::open(f, path, &opts, &mut |_, _| unreachable!()).unwrap();
        for (off, bytes) in data {
            c.write_at(bytes, *off).unwrap();
        }
        c.close().unwrap();
    }

    #[derive(Debug)]
    struct Failed;
    impl crate::input::ReadFailure for Failed {
        fn read(_: &Path, _: u64, e: io::Error) -> Self {
            panic!("{e}")
        }
        fn short(_: &Path, o: u64, _: u64) -> Self {
            panic!("short at {o}")
        }
    }

    /// The data chunks a walk reads, and the bytes it yields.
    fn walk(d: &Disk) -> (Vec<(u64, u64)>, Vec<u8>) {
        let mut read = Vec::new();
        let mut all = Vec::new();
        walk_data::<Failed>(
            d,
            d.path(),
            d.size(),
            &ProgressBar::hidden(),
            |off, b, hole| {
                if !hole {
                    read.push((off, b.len() as u64));
                }
                all.extend_from_slice(b);
                Ok(true)
            },
        )
        .unwrap();
        (read, all)
    }

    #[test]
    fn qcow2_walk_reads_only_allocated_clusters() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img.qcow2");
        let size = 300u64 << 20;
        qcow2_with(
            &p,
            size,
            &[(5 << 20, b"five"), ((200 << 20) + 70_000, &[7u8; 100_000])],
        );
        let disk = open(&p, None, Probing::Guarded { option: "--f" }).unwrap();
        assert_eq!(
            (disk.format(), disk.probed(), disk.size()),
            (Format::Qcow2, true, size)
        );
        let (read, all) = walk(&disk);
        assert_eq!(all.len() as u64, size);
        assert_eq!(&all[5 << 20..(5 << 20) + 4], b"five");
        assert!(all[(200 << 20) + 70_000..(200 << 20) + 170_000]
            .iter()
            .all(|&b| b == 7));
        let n: u64 = read.iter().map(|r| r.1).sum();
        // One cluster, and the clusters holding the 100 000 bytes.
        assert!(n <= 4 * 65536, "{read:?}");
        assert!(
            read.iter().any(|r| r.0 <= 5 << 20 && r.0 + r.1 > 5 << 20),
            "{read:?}"
        );
    }

    #[test]
    fn sparse_raw_base_holes_are_not_read_through_an_overlay() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        crate::input::sparse_file(&base, 64 << 20, &[(40 << 20, b"base data")]);
        let top = d.path().join("top.qcow2");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&top)
            .unwrap();
        let mut o = vloop_qcow2::CreateOptions::new(64 << 20);
        o.backing = Some(("base.raw".into(), Format::Raw));
        vloop_qcow2::create(&f, &o).unwrap();
        drop(f);
        let disk = open(&top, None, Probing::Guarded { option: "--f" }).unwrap();
        assert_eq!(disk.layers().unwrap().len(), 2);
        let (read, all) = walk(&disk);
        assert_eq!(&all[40 << 20..(40 << 20) + 9], b"base data");
        let n: u64 = read.iter().map(|r| r.1).sum();
        assert!(n <= 1 << 20, "{read:?}");
        assert!(disk.contains_file(&base).unwrap());
        assert!(!disk.contains_file(&d.path().join("nothing")).unwrap());
    }

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
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&top)
            .unwrap();
        let mut o = vloop_qcow2::CreateOptions::new(1 << 20);
        o.backing = Some(("base.img".into(), Format::Raw));
        vloop_qcow2::create(&f, &o).unwrap();
        drop(f);
        // Named raw: read as raw.
        open(&top, None, guarded).unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .truncate(true)
            .open(&top)
            .unwrap();
        // No backing format: probed, and refused.
        let mut o = vloop_qcow2::CreateOptions::new(1 << 20);
        o.backing = Some(("base.img".into(), Format::Raw));
        vloop_qcow2::create(&f, &o).unwrap();
        strip_backing_format(&top);
        let err = open(&top, None, guarded).unwrap_err();
        let text = format!("{:?}", anyhow::Error::from(err));
        assert!(text.contains("neither its name"), "{text}");
    }

    /// Turns the backing format header extension of a fresh image made by
    /// `vloop_qcow2::create` (the first extension) into an unknown one, which readers skip:
    /// the image then names no backing format.
    fn strip_backing_format(path: &Path) {
        let f = File::options().read(true).write(true).open(path).unwrap();
        let mut h = [0u8; 108];
        f.read_exact_at(&mut h, 0).unwrap();
        let hl = u32::from_be_bytes(h[100..104].try_into().unwrap()) as u64;
        let mut ty = [0u8; 4];
        f.read_exact_at(&mut ty, hl).unwrap();
        assert_eq!(
            u32::from_be_bytes(ty),
            0xe279_2aca,
            "backing format extension first"
        );
        f.write_all_at(&0x7f00_0001u32.to_be_bytes(), hl).unwrap();
    }
}
