//! ISO 9660 images with Rock Ridge and Joliet, written from a [`Tree`].
//!
//! The layout and encoding are done by the `hadris-iso` crate, which reads no clock and
//! writes the same bytes for the same input. This module turns a [`Tree`] into its input,
//! pins every date to the tree (`tree.timestamp` for the volume, each node's mtime for its
//! records) and writes through [`crate::output`], like every output: a temporary file
//! renamed into place only when the image is complete.
//!
//! What the images hold:
//! - Primary volume descriptor, ISO 9660 level 2 names (up to 30 characters, `;1`,
//!   made unique per directory), L and M path tables, set terminator. Level 3 (several
//!   extents per file) only when a file is 4 GiB or larger.
//! - Rock Ridge (RRIP 1.12 over SUSP): `SP`, `ER` in the root `.` record, `PX` (mode,
//!   links, uid, gid, serial), `TF`, `NM` and `SL` with `CE` continuation areas.
//!   Directories deeper than ISO 9660's 8 levels move to `/.rr_moved` with `CL`/`PL`/`RE`
//!   entries, as `mkisofs -R -hide-rr-moved` does; Rock Ridge readers (Linux, xorriso)
//!   show them in place, and the empty `.rr_moved` stays visible (no reader hides it).
//! - Joliet supplementary volume descriptor with its own path tables: UCS-2 names cut to
//!   64 characters, made unique with a numbered suffix.
//! - Hard links: every name of a file points at the same extent.
//!
//! [`probe`] and [`read`] read images back without the writer's code.

pub mod read;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use hadris_fs::{Content, DateTime, Owner, Permissions, SetAttr};
use hadris_iso::{IsoId, IsoLevel, Preserve, Relocation};
use hadris_storage::host::FileDevice;
use thiserror::Error;
use tracing::{debug, info, warn};

pub use self::read::{probe, IsoInfo};
use crate::output::{Output, OutputError, OutputFile};
use crate::tree::{NodeKind, Tree};

/// Options for [`build`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoOptions {
    /// Volume identifier: d-characters (`A-Z`, `0-9`, `_`), 1 to 32 of them.
    pub volume_id: String,
    /// Add a Joliet supplementary volume descriptor (UCS-2 names for Windows).
    pub joliet: bool,
    /// Add Rock Ridge extensions (POSIX names, modes, symlinks, hard links).
    pub rock_ridge: bool,
}

impl Default for IsoOptions {
    fn default() -> Self {
        Self {
            volume_id: "CDROM".to_owned(),
            joliet: true,
            rock_ridge: true,
        }
    }
}

/// What [`build`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsoSummary {
    /// Image size in bytes.
    pub size: u64,
    /// Regular files (each node once; hard links count once).
    pub files: u64,
    /// Directories, the root included.
    pub directories: u64,
    /// Names or places the writer adjusted to the format's limits: directories nested
    /// deeper than 8 levels relocated, Joliet names cut to 64 characters or given a
    /// suffix to stay unique (Rock Ridge keeps every original name and place).
    pub adjusted: u64,
}

/// Errors from building an ISO 9660 image.
#[derive(Debug, Error)]
pub enum IsoError {
    /// The volume id is empty, longer than 32, or has characters outside `A-Z 0-9 _`.
    #[error("volume id {0:?} is not valid: use 1 to 32 of A-Z, 0-9 and _")]
    BadVolumeId(String),
    /// Reading a source file, or preparing, writing or committing the image, failed.
    #[error("{}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A source file changed size between reading the tree and writing the image.
    #[error(
        "{} changed while the image was built (expected {expected} bytes, found {found}); \
         build again when it is stable",
        path.display()
    )]
    FileChanged {
        /// The file.
        path: PathBuf,
        /// Size when the tree was read.
        expected: u64,
        /// Size now.
        found: u64,
    },
    /// The image would exceed what ISO 9660 can address.
    #[error("{what} is too large for ISO 9660 ({size} bytes)")]
    TooLarge {
        /// What is too large.
        what: String,
        /// Its size in bytes.
        size: u64,
    },
    /// A timestamp cannot be recorded (ISO 9660 dates run from 1900 to 2155).
    #[error(
        "timestamp {0} cannot be recorded in ISO 9660 (give --timestamp between 1900 and 2155)"
    )]
    BadTimestamp(i64),
    /// The image writer refused the tree or failed while writing it.
    #[error("cannot write the ISO image")]
    Write(#[source] hadris_fs::PathError),
}

/// Largest image: ISO 9660 counts 2048-byte blocks in 32 bits.
const MAX_IMAGE: u64 = (u32::MAX as u64) * 2048;

impl IsoError {
    /// The error for an output `path` that cannot be prepared or committed: an [`IsoError::Io`]
    /// naming the image, caused by what [`crate::output`] found.
    fn output(path: &Path, e: OutputError) -> Self {
        let kind = match &e {
            OutputError::Exists(_) => io::ErrorKind::AlreadyExists,
            OutputError::NoDir(_) => io::ErrorKind::NotFound,
            OutputError::InUse(_) => io::ErrorKind::ResourceBusy,
            OutputError::NotAFile(_) => io::ErrorKind::InvalidInput,
            OutputError::Dir { source, .. }
            | OutputError::Persist { source, .. }
            | OutputError::Io { source, .. } => source.kind(),
        };
        IsoError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(kind, e),
        }
    }
}

/// Writes `tree` as an ISO 9660 image to `out`, replacing a regular file there.
///
/// The bytes depend only on the tree (names, content, modes, owners, mtimes, hard links,
/// `tree.timestamp`) and `opts`.
pub fn build(tree: &Tree, out: &Path, opts: &IsoOptions) -> Result<IsoSummary, IsoError> {
    write(tree, &Output::replace(out), opts)
}

/// [`build`] to `out`, which says whether an existing file may be replaced and where the
/// temporary file is listed.
pub fn write(tree: &Tree, out: &Output<'_>, opts: &IsoOptions) -> Result<IsoSummary, IsoError> {
    validate_volume_id(&opts.volume_id)?;
    let time = date(tree.timestamp)?;
    let mut summary = IsoSummary {
        size: 0,
        files: 0,
        directories: 0,
        adjusted: 0,
    };
    let mut largest = 0u64;
    for node in &tree.nodes {
        match node.kind {
            NodeKind::File { size, .. } => {
                summary.files += 1;
                largest = largest.max(size);
            }
            NodeKind::Dir { .. } => summary.directories += 1,
            NodeKind::Symlink { .. } => {}
        }
    }
    if tree.file_bytes() > MAX_IMAGE {
        return Err(IsoError::TooLarge {
            what: "the tree's content".to_owned(),
            size: tree.file_bytes(),
        });
    }
    let input = to_input(tree, opts)?;
    let level = if largest > u64::from(u32::MAX) - 2047 {
        IsoLevel::L3
    } else {
        IsoLevel::L2
    };
    let mut iso = hadris_iso::IsoOptions::new()
        .with_id(IsoId::Volume, &opts.volume_id)
        .with_id(IsoId::Application, "VLOOP-IMAGE")
        .with_level(level)
        .with_time(time)
        .with_preserve(Preserve::all());
    if opts.rock_ridge {
        iso = iso
            .with_rock_ridge()
            .with_relocation(Relocation::DotRrMoved);
    }
    if opts.joliet {
        iso = iso.with_joliet();
    }
    let planned = hadris_iso::plan(&input, &iso).map_err(IsoError::Write)?;
    if planned.size() > MAX_IMAGE {
        return Err(IsoError::TooLarge {
            what: "the image".to_owned(),
            size: planned.size(),
        });
    }
    info!(
        out = %out.path.display(),
        size = planned.size(),
        files = summary.files,
        directories = summary.directories,
        "writing ISO 9660 image"
    );

    let tmp = OutputFile::create(out).map_err(|e| IsoError::output(out.path, e))?;
    let io_err = |source| IsoError::Io {
        path: tmp.temp_path().to_path_buf(),
        source,
    };
    let mut dev = FileDevice::new(tmp.file().try_clone().map_err(io_err)?).map_err(io_err)?;
    let total = planned.size();
    let report = with_progress(tmp.temp_path(), total, || {
        hadris_iso::sync::write(&mut dev, &input, &iso).map_err(IsoError::Write)
    })?;
    // Relocated directories and shortened Joliet names are expected; list them at debug.
    let changed = report.warnings().len();
    for warning in report.warnings() {
        debug!("{warning}");
    }
    if changed > 0 {
        info!(
            changed,
            "names or places adjusted to ISO 9660 limits (deep directories relocated, \
             Joliet names shortened); -v lists them"
        );
    }
    let file = dev.into_inner();
    // Trim anything past the image (none is expected) and make it durable before the rename.
    file.set_len(report.size()).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    tmp.commit().map_err(|e| IsoError::output(out.path, e))?;
    summary.size = report.size();
    summary.adjusted = changed as u64;
    Ok(summary)
}

/// Runs `work` while logging how much of the `total` bytes `path` holds, every 2 s
/// (the writer writes its blocks in ascending order, so the file's length is progress).
fn with_progress<T>(path: &Path, total: u64, work: impl FnOnce() -> T) -> T {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let interval = std::time::Duration::from_secs(2);
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(interval)
            {
                let written = fs::metadata(path).map_or(0, |m| m.len());
                info!(
                    written_mib = written >> 20,
                    total_mib = total >> 20,
                    percent = written.saturating_mul(100) / total.max(1),
                    "writing ISO image"
                );
            }
        });
        let out = work();
        drop(done);
        out
    })
}

/// Checks the volume id: 1 to 32 d-characters (ECMA-119 7.4.1).
fn validate_volume_id(id: &str) -> Result<(), IsoError> {
    let ok = !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(IsoError::BadVolumeId(id.to_owned()))
    }
}

/// `secs` as a date ISO 9660 can record.
fn date(secs: i64) -> Result<DateTime, IsoError> {
    // 1900-01-01 to 2155-12-31: the range of the 7-byte directory record date.
    const FIRST: i64 = -2_208_988_800;
    const LAST: i64 = 5_965_343_999;
    if !(FIRST..=LAST).contains(&secs) {
        return Err(IsoError::BadTimestamp(secs));
    }
    DateTime::from_unix_seconds(secs).map_err(|_| IsoError::BadTimestamp(secs))
}

/// The writer's input tree for `tree`.
fn to_input(tree: &Tree, opts: &IsoOptions) -> Result<hadris_fs::Tree, IsoError> {
    let attrs = |id: usize| -> Result<SetAttr, IsoError> {
        let node = &tree.nodes[id];
        // An mtime before 1900 cannot be recorded: use the earliest date that can.
        let mtime = date(node.mtime.max(-2_208_988_800))?;
        Ok(SetAttr::new()
            .with_modified(mtime)
            .with_accessed(mtime)
            .with_created(mtime)
            .with_permissions(Permissions::new(node.mode))
            .with_owner(Owner::new(node.uid, node.gid)))
    };
    let write_err = IsoError::Write;
    let mut input = hadris_fs::Tree::new();
    input
        .replace(
            "/",
            hadris_fs::Node::dir().with_attrs(attrs(crate::tree::ROOT)?),
        )
        .map_err(write_err)?;
    // First path of each multiply-linked file, for the later links.
    let mut first: Vec<Option<Vec<u8>>> = vec![None; tree.nodes.len()];
    for (rel, id) in tree.walk() {
        let mut path = Vec::with_capacity(rel.len() + 1);
        path.push(b'/');
        path.extend_from_slice(&rel);
        let node = &tree.nodes[id];
        let entry = match &node.kind {
            NodeKind::Dir { .. } => hadris_fs::Node::dir(),
            NodeKind::Symlink { target } => {
                if !opts.rock_ridge {
                    warn!(
                        path = %crate::tree::os_path(&rel).display(),
                        "skipping symlink: an image without Rock Ridge cannot hold it"
                    );
                    continue;
                }
                hadris_fs::Node::symlink(target)
            }
            NodeKind::File { source, size } => {
                if let Some(existing) = &first[id] {
                    input.link(existing, &path).map_err(write_err)?;
                    continue;
                }
                if node.nlink > 1 {
                    first[id] = Some(path.clone());
                }
                hadris_fs::Node::file(host_file(source, *size)?)
            }
        };
        input
            .insert(&path, entry.with_attrs(attrs(id)?))
            .map_err(write_err)?;
    }
    Ok(input)
}

/// `source` as content, checking it still has the length the tree recorded.
fn host_file(source: &Path, size: u64) -> Result<Content, IsoError> {
    let found = fs::symlink_metadata(source)
        .map_err(|e| IsoError::Io {
            path: source.to_path_buf(),
            source: e,
        })?
        .len();
    if found != size {
        return Err(IsoError::FileChanged {
            path: source.to_path_buf(),
            expected: size,
            found,
        });
    }
    hadris_fs::host::file(source).map_err(IsoError::Write)
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn output_errors_name_the_image_and_keep_their_cause() {
        let e = IsoError::output(
            Path::new("/x/a.iso"),
            OutputError::Dir {
                dir: PathBuf::from("/x"),
                source: io::Error::from(io::ErrorKind::PermissionDenied),
            },
        );
        let IsoError::Io { path, source } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(path, Path::new("/x/a.iso"));
        assert_eq!(source.kind(), io::ErrorKind::PermissionDenied);
        let mut chain = vec![e.to_string()];
        let mut next = e.source();
        while let Some(err) = next {
            chain.push(err.to_string());
            next = err.source();
        }
        assert_eq!(
            chain,
            [
                "/x/a.iso",
                "cannot create a file in /x",
                &io::Error::from(io::ErrorKind::PermissionDenied).to_string()
            ]
        );
        let e = IsoError::output(Path::new("a.iso"), OutputError::NoDir(PathBuf::from("no")));
        assert!(
            matches!(&e, IsoError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
    }
}
