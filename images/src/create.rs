//! Blank images: `vloop-image create FILE --size SIZE [--format raw|qcow2]` (the format
//! defaults to qcow2 for a `*.qcow2` FILE or with a backing file, else raw).
//!
//! A raw image is SIZE zero bytes: sparse by default (`set_len`, no blocks allocated), fully
//! allocated with `preallocate` (`posix_fallocate`). A qcow2 image (version 3) is laid out by
//! [`vloop_qcow2::create()`]: header, refcounts and an empty L1 table, a few clusters in all.
//! It may have a backing file: its name is stored as given (a relative name is resolved
//! relative to the new image's folder, as QEMU resolves it), and it must open, with its own
//! chain, before anything is written. Its format is stored in the header: the one given, or
//! the one probed ([`crate::image`]'s guarded rule: a file that looks like qcow2 but is not
//! named `*.qcow2` must be named). Without a size, the image takes the backing file's virtual
//! size, as `qemu-img create -b` does.
//!
//! Sizes are rounded up to a whole number of 512-byte sectors, since a block device cannot
//! end in a partial sector; the summary says so when it happens. The file is written through
//! [`crate::output`], like every output.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;
use tracing::debug;

use crate::image::{self, has_qcow2_name, Format, ImageError, Probing};
use crate::input::allocated_bytes;
use crate::output::{Output, OutputError, OutputFile, Unfinished};
use crate::size::Size;

pub use vloop_qcow2::DEFAULT_CLUSTER_SIZE;

/// Errors from creating a blank image.
#[derive(Debug, Error)]
pub enum CreateError {
    /// A size of zero bytes was asked for.
    #[error("the size must be larger than 0 (e.g. --size 10M)")]
    ZeroSize,
    /// No size was given, and there is no backing file to take it from.
    #[error("give the image's size (e.g. --size 10M); only an image with a backing file takes its size from it")]
    NoSize,
    /// The size does not fit the platform's file offset type.
    #[error("{0} is too large for a file")]
    TooLarge(Size),
    /// A raw image was asked for with a qcow2-only option.
    #[error("{0} needs a qcow2 image (--format qcow2, or a FILE named *.qcow2): a raw image has no clusters and no backing file")]
    RawOption(&'static str),
    /// Preallocation was asked for a qcow2 image.
    #[error("--preallocate is for raw images only (a qcow2 image allocates clusters as they are written)")]
    Qcow2Preallocate,
    /// The backing file name is not UTF-8, which the qcow2 header needs.
    #[error("the backing file name {0:?} is not valid UTF-8")]
    BackingName(PathBuf),
    /// The backing file (resolved relative to the image's folder) cannot be opened as a disk.
    #[error(
        "backing file {}{}",
        name.display(),
        if name == resolved {
            String::new()
        } else {
            format!(" (relative to the image's folder: {})", resolved.display())
        }
    )]
    Backing {
        /// The name as given.
        name: PathBuf,
        /// Where it resolves to.
        resolved: PathBuf,
        /// Why it does not open.
        #[source]
        source: ImageError,
    },
    /// The backing chain contains the image about to be replaced.
    #[error(
        "{0} is in the backing chain of the new image: replacing it would make the chain loop"
    )]
    BackingLoop(PathBuf),
    /// The qcow2 layout cannot be written with these options, or writing it failed.
    #[error("cannot create the qcow2 image {path}")]
    Qcow2 {
        /// The target.
        path: PathBuf,
        /// Why.
        #[source]
        source: vloop_qcow2::CreateError,
    },
    /// Sizing or allocating the file failed (disk full, quota...).
    #[error("cannot make {path} {size} long")]
    Allocate {
        /// The target.
        path: PathBuf,
        /// The size asked for.
        size: Size,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Preparing or committing the output file failed.
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// The backing file of a new qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingOptions {
    /// The name stored in the image, as given: relative names are relative to the image's
    /// folder.
    pub name: PathBuf,
    /// Its format; `None` probes it (and stores what was found).
    pub format: Option<Format>,
}

/// Options for [`create`].
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Size of the image (rounded up to a multiple of 512 bytes); `None` takes the backing
    /// file's virtual size.
    pub size: Option<Size>,
    /// Raw or qcow2; `None`: qcow2 with a backing file or for a path named `*.qcow2`, else
    /// raw.
    pub format: Option<Format>,
    /// qcow2: the backing file.
    pub backing: Option<BackingOptions>,
    /// qcow2: cluster size (a power of two from 512 B to 2 MiB; default 64 KiB).
    pub cluster_size: Option<Size>,
    /// Raw: allocate every block now instead of leaving the file sparse.
    pub preallocate: bool,
    /// Replace an existing file.
    pub force: bool,
    /// Lists the temporary file while it is written (see [`Unfinished`]).
    pub unfinished: Option<Unfinished>,
}

/// The backing file of an image [`create`] made.
#[derive(Debug, Clone, Serialize)]
pub struct BackingSummary {
    /// The name stored in the image.
    pub name: PathBuf,
    /// Where it resolves to.
    pub path: PathBuf,
    /// The format stored in the image.
    #[serde(serialize_with = "image::serialize_format")]
    pub format: Format,
    /// True when the format was probed, not given.
    pub format_probed: bool,
    /// Its virtual size in bytes.
    pub size: u64,
}

/// What [`create`] made.
#[derive(Debug, Clone, Serialize)]
pub struct CreateSummary {
    /// The image's path.
    pub path: PathBuf,
    /// Its format.
    #[serde(serialize_with = "image::serialize_format")]
    pub format: Format,
    /// Its (virtual) size in bytes.
    pub size: Size,
    /// The size asked for (or the backing file's), when it had to be rounded up to a whole
    /// sector.
    pub rounded_from: Option<Size>,
    /// True when the size was taken from the backing file.
    pub size_from_backing: bool,
    /// qcow2: the cluster size.
    pub cluster_size: Option<u64>,
    /// qcow2: the backing file.
    pub backing: Option<BackingSummary>,
    /// Bytes allocated on disk (`st_blocks * 512`).
    pub allocated: u64,
}

/// Creates a blank image at `path`.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<CreateSummary, CreateError> {
    let format = opts
        .format
        .unwrap_or(if opts.backing.is_some() || has_qcow2_name(path) {
            Format::Qcow2
        } else {
            Format::Raw
        });
    if format == Format::Raw {
        if opts.backing.is_some() {
            return Err(CreateError::RawOption("--backing"));
        }
        if opts.cluster_size.is_some() {
            return Err(CreateError::RawOption("--cluster-size"));
        }
    } else if opts.preallocate {
        return Err(CreateError::Qcow2Preallocate);
    }
    let backing = match &opts.backing {
        Some(b) => Some(open_backing(path, b, opts.force)?),
        None => None,
    };
    let (asked, size_from_backing) = match (opts.size, &backing) {
        (Some(s), _) => (s, false),
        (None, Some(b)) => (Size(b.size), true),
        (None, None) => return Err(CreateError::NoSize),
    };
    if asked.bytes() == 0 {
        return Err(CreateError::ZeroSize);
    }
    let size = asked.round_up_to_sector();
    let len = i64::try_from(size.bytes()).map_err(|_| CreateError::TooLarge(size))?;
    let out = OutputFile::create(&Output {
        path,
        force: opts.force,
        unfinished: opts.unfinished.as_ref(),
    })?;
    let alloc_err = |source| CreateError::Allocate {
        path: path.to_path_buf(),
        size,
        source,
    };
    let mut cluster_size = None;
    match format {
        Format::Raw if opts.preallocate => {
            nix::fcntl::posix_fallocate(out.file().as_raw_fd(), 0, len)
                .map_err(|e| alloc_err(io::Error::from(e)))?;
        }
        Format::Raw => out.file().set_len(size.bytes()).map_err(alloc_err)?,
        Format::Qcow2 => {
            let cs = opts.cluster_size.map_or(DEFAULT_CLUSTER_SIZE, Size::bytes);
            let mut q = vloop_qcow2::CreateOptions::new(size.bytes());
            q.cluster_size = cs;
            q.backing = match &backing {
                Some(b) => Some((
                    b.name
                        .to_str()
                        .ok_or_else(|| CreateError::BackingName(b.name.clone()))?
                        .to_owned(),
                    b.format,
                )),
                None => None,
            };
            vloop_qcow2::create(out.file(), &q).map_err(|source| CreateError::Qcow2 {
                path: path.to_path_buf(),
                source,
            })?;
            cluster_size = Some(cs);
        }
    }
    out.file().sync_all().map_err(alloc_err)?;
    let file = out.commit()?;
    let allocated = allocated_bytes(&file.metadata().map_err(|source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    })?);
    debug!(path = %path.display(), %size, allocated, "created");
    Ok(CreateSummary {
        path: path.to_path_buf(),
        format,
        size,
        rounded_from: (size != asked).then_some(asked),
        size_from_backing,
        cluster_size,
        backing,
        allocated,
    })
}

/// Opens the backing file `b` of a new image at `path` as QEMU will find it, and checks that
/// replacing `path` (with `force`) would not make the chain loop.
fn open_backing(
    path: &Path,
    b: &BackingOptions,
    force: bool,
) -> Result<BackingSummary, CreateError> {
    if b.name.to_str().is_none() {
        return Err(CreateError::BackingName(b.name.clone()));
    }
    let resolved = vloop_qcow2::resolve_backing(path, &b.name);
    let backing_err = |source| CreateError::Backing {
        name: b.name.clone(),
        resolved: resolved.clone(),
        source,
    };
    let disk = image::open(
        &resolved,
        b.format,
        Probing::Guarded {
            option: "--backing-format",
        },
    )
    .map_err(backing_err)?;
    if force
        && disk.contains_file(path).map_err(|source| OutputError::Io {
            path: path.to_path_buf(),
            source,
        })?
    {
        return Err(CreateError::BackingLoop(path.to_path_buf()));
    }
    Ok(BackingSummary {
        name: b.name.clone(),
        path: resolved,
        format: disk.format(),
        format_probed: disk.probed(),
        size: disk.size(),
    })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::output::{hold_lock, is_locked};

    #[test]
    fn sparse_by_default_and_rounded_to_sectors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let s = create(
            &p,
            &CreateOptions {
                size: Some(Size(1000)),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.size, Size(1024));
        assert_eq!(s.rounded_from, Some(Size(1000)));
        let m = fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 1024);
        assert_eq!(m.blocks(), 0);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1, "no temp left");
    }

    #[test]
    fn preallocate_allocates() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let s = create(
            &p,
            &CreateOptions {
                size: Some(Size(1 << 20)),
                preallocate: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(s.allocated >= 1 << 20, "{s:?}");
        assert!(fs::read(&p).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        fs::write(&p, b"keep me").unwrap();
        let opts = CreateOptions {
            size: Some(Size(4096)),
            ..Default::default()
        };
        let err = create(&p, &opts).unwrap_err();
        assert!(
            matches!(err, CreateError::Output(OutputError::Exists(_))),
            "{err}"
        );
        assert_eq!(fs::read(&p).unwrap(), b"keep me");
        create(
            &p,
            &CreateOptions {
                force: true,
                ..opts
            },
        )
        .unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 4096);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1, "no temp left");
    }

    /// Creates a 4 KiB image at `path`, replacing what is there.
    fn create_forced(path: &Path) -> Result<CreateSummary, CreateError> {
        create(
            path,
            &CreateOptions {
                size: Some(Size(4096)),
                force: true,
                ..Default::default()
            },
        )
    }

    #[test]
    fn refuses_directories_zero_and_locked_files() {
        let d = tempfile::tempdir().unwrap();
        let err = create_forced(d.path()).unwrap_err();
        assert!(
            matches!(err, CreateError::Output(OutputError::NotAFile(_))),
            "{err}"
        );
        let p = d.path().join("img");
        let err = create(&p, &CreateOptions::default()).unwrap_err();
        assert!(matches!(err, CreateError::NoSize), "{err}");
        let err = create(
            &p,
            &CreateOptions {
                size: Some(Size(0)),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, CreateError::ZeroSize), "{err}");

        fs::write(&p, b"served").unwrap();
        let holder = hold_lock(&p);
        let err = create_forced(&p).unwrap_err();
        assert!(
            matches!(err, CreateError::Output(OutputError::InUse(_))),
            "{err}"
        );
        drop(holder);
        assert!(!is_locked(&p).unwrap());
    }

    fn qcow2(size: Option<u64>, backing: Option<(&str, Option<Format>)>) -> CreateOptions {
        CreateOptions {
            size: size.map(Size),
            format: Some(Format::Qcow2),
            backing: backing.map(|(n, f)| BackingOptions {
                name: n.into(),
                format: f,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn qcow2_with_a_relative_backing_file_takes_its_size() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("vms")).unwrap();
        let base = d.path().join("vms/base.raw");
        fs::File::create(&base).unwrap().set_len(3 << 20).unwrap();
        let top = d.path().join("vms/top.qcow2");
        let s = create(&top, &qcow2(None, Some(("base.raw", None)))).unwrap();
        assert_eq!(
            (s.format, s.size, s.size_from_backing),
            (Format::Qcow2, Size(3 << 20), true)
        );
        assert_eq!(s.cluster_size, Some(DEFAULT_CLUSTER_SIZE));
        let b = s.backing.unwrap();
        assert_eq!(
            (b.format, b.format_probed, b.size),
            (Format::Raw, true, 3 << 20)
        );
        assert_eq!(b.path, base);
        let disk = image::open(&top, None, Probing::Content).unwrap();
        assert_eq!(disk.layers().unwrap().len(), 2);
        assert_eq!(disk.size(), 3 << 20);
        // An overlay of the overlay, 2 MiB clusters, its own size.
        let mut o = qcow2(Some(5 << 20), Some(("top.qcow2", None)));
        o.cluster_size = Some(Size(2 << 20));
        let s = create(&d.path().join("vms/top2.qcow2"), &o).unwrap();
        assert_eq!((s.size, s.cluster_size), (Size(5 << 20), Some(2 << 20)));
        assert_eq!(s.backing.unwrap().format, Format::Qcow2);
        // A name that does not resolve relative to the image's folder is refused, and nothing
        // is written.
        fs::write(d.path().join("here.raw"), [0u8; 4096]).unwrap();
        let err = create(
            &top.with_file_name("x.qcow2"),
            &qcow2(None, Some(("here.raw", None))),
        )
        .unwrap_err();
        assert!(matches!(err, CreateError::Backing { .. }), "{err}");
        assert!(err.to_string().contains("vms/here.raw"), "{err}");
        assert_eq!(fs::read_dir(d.path().join("vms")).unwrap().count(), 3);
    }

    #[test]
    fn qcow2_refusals() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.qcow2");
        create(&base, &qcow2(Some(1 << 20), None)).unwrap();
        let top = d.path().join("top.qcow2");
        create(&top, &qcow2(None, Some(("base.qcow2", None)))).unwrap();
        // Replacing the base by an overlay of its own overlay would loop.
        let mut o = qcow2(None, Some(("top.qcow2", None)));
        o.force = true;
        let err = create(&base, &o).unwrap_err();
        assert!(matches!(err, CreateError::BackingLoop(_)), "{err}");
        // A qcow2 base not named *.qcow2 needs its format named.
        fs::copy(&base, d.path().join("base.img")).unwrap();
        let err = create(
            &d.path().join("o.qcow2"),
            &qcow2(None, Some(("base.img", None))),
        )
        .unwrap_err();
        let line = format!("{:#}", anyhow::Error::from(err));
        assert!(line.contains("--backing-format qcow2"), "{line}");
        create(
            &d.path().join("o.qcow2"),
            &qcow2(None, Some(("base.img", Some(Format::Qcow2)))),
        )
        .unwrap();
        let raw_with = |o: CreateOptions| {
            create(
                &d.path().join("r.img"),
                &CreateOptions {
                    format: Some(Format::Raw),
                    ..o
                },
            )
            .unwrap_err()
        };
        let err = raw_with(qcow2(Some(4096), Some(("base.qcow2", None))));
        assert!(matches!(err, CreateError::RawOption("--backing")), "{err}");
        let mut o = qcow2(Some(4096), None);
        o.cluster_size = Some(Size(4096));
        assert!(matches!(
            raw_with(o),
            CreateError::RawOption("--cluster-size")
        ));
        let mut o = qcow2(Some(4096), None);
        o.preallocate = true;
        let err = create(&d.path().join("p.qcow2"), &o).unwrap_err();
        assert!(matches!(err, CreateError::Qcow2Preallocate), "{err}");
        let mut o = qcow2(Some(4096), None);
        o.cluster_size = Some(Size(1000));
        let err = create(&d.path().join("c.qcow2"), &o).unwrap_err();
        assert!(matches!(err, CreateError::Qcow2 { .. }), "{err}");
        assert!(!d.path().join("c.qcow2").exists());
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            4,
            "no temporary left"
        );
    }
}
