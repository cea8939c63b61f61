//! Blank raw images, and the safe way every command writes an output file.
//!
//! `vloop-image create FILE --size SIZE` makes a file of SIZE zero bytes: sparse by default
//! (`set_len`, no blocks allocated), fully allocated with `--preallocate`
//! (`posix_fallocate`). The size is rounded up to a whole number of 512-byte sectors, since
//! a block device cannot end in a partial sector; the summary says so when it happens.
//!
//! Output files are never half-written in place: the content goes to a hidden temporary file
//! beside the target (`.NAME.XXXXXX.partial`), which is renamed over the target only when it
//! is complete. Without `--force` the rename refuses to replace anything (`renameat2` with
//! `RENAME_NOREPLACE`), so two concurrent runs cannot overwrite each other either. With
//! `--force` an existing regular file is replaced, unless another process holds a lock on it
//! (QEMU and `vloop-blk` lock the images they serve).
//!
//! Every temporary output is also listed in a process-wide registry ([`Unfinished`]), so that
//! a Ctrl-C handler that ends the process at once can first remove them all
//! ([`remove_unfinished`]): destructors do not run on `exit`.

use std::fs::{self, File, Permissions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;
use thiserror::Error;
use tracing::debug;

use crate::size::Size;

/// Errors from creating an image or preparing an output file.
#[derive(Debug, Error)]
pub enum CreateError {
    /// The target exists and `--force` was not given.
    #[error("{0} already exists (use --force to replace it)")]
    Exists(PathBuf),
    /// The target exists but is not a regular file (a directory, a device...).
    #[error("{0} exists and is not a regular file: refusing to replace it (choose another path)")]
    NotAFile(PathBuf),
    /// Another process holds a lock on the target (QEMU or vloop-blk serving it).
    #[error(
        "{0} is in use: another process holds a lock on it (stop the VM or backend using it first)"
    )]
    InUse(PathBuf),
    /// A size of zero bytes was asked for.
    #[error("the size must be larger than 0 (e.g. --size 10M)")]
    ZeroSize,
    /// The size does not fit the platform's file offset type.
    #[error("{0} is too large for a file")]
    TooLarge(Size),
    /// The folder for the target does not exist.
    #[error("{0}: no such folder (create it first, or write the image somewhere else)")]
    NoDir(PathBuf),
    /// The folder for the target cannot be written.
    #[error("cannot create a file in {dir}")]
    Dir {
        /// The target's folder.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
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
    /// Moving the finished file into place failed.
    #[error("cannot move the finished file to {path}")]
    Persist {
        /// The target.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another I/O error on the target.
    #[error("{path}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Options for [`create`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateOptions {
    /// Size of the image; rounded up to a multiple of 512 bytes.
    pub size: Size,
    /// Allocate every block now instead of leaving the file sparse.
    pub preallocate: bool,
    /// Replace an existing file.
    pub force: bool,
}

/// What [`create`] made.
#[derive(Debug, Clone, Serialize)]
pub struct CreateSummary {
    /// The image's path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: Size,
    /// The size asked for, when it had to be rounded up to a whole sector.
    pub rounded_from: Option<Size>,
    /// Bytes allocated on disk (`st_blocks * 512`).
    pub allocated: u64,
}

/// Creates a blank raw image at `path`.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<CreateSummary, CreateError> {
    if opts.size.bytes() == 0 {
        return Err(CreateError::ZeroSize);
    }
    let size = opts.size.round_up_to_sector();
    let len = i64::try_from(size.bytes()).map_err(|_| CreateError::TooLarge(size))?;
    let out = OutputFile::new(path, opts.force)?;
    let alloc_err = |source| CreateError::Allocate {
        path: path.to_path_buf(),
        size,
        source,
    };
    if opts.preallocate {
        nix::fcntl::posix_fallocate(out.file().as_raw_fd(), 0, len)
            .map_err(|e| alloc_err(io::Error::from(e)))?;
    } else {
        out.file().set_len(size.bytes()).map_err(alloc_err)?;
    }
    out.file().sync_all().map_err(alloc_err)?;
    let file = out.commit()?;
    let allocated = allocated_bytes(&file.metadata().map_err(|source| CreateError::Io {
        path: path.to_path_buf(),
        source,
    })?);
    debug!(path = %path.display(), %size, allocated, "created");
    Ok(CreateSummary {
        path: path.to_path_buf(),
        size,
        rounded_from: (size != opts.size).then_some(opts.size),
        allocated,
    })
}

/// Bytes a file occupies on disk.
pub fn allocated_bytes(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks().saturating_mul(512)
}

/// Temporary outputs of this process that are not finished yet.
static UNFINISHED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn unfinished() -> MutexGuard<'static, Vec<PathBuf>> {
    UNFINISHED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A temporary output listed in the process-wide registry until it is committed or
/// dropped, so that [`remove_unfinished`] can delete it when the process is interrupted.
///
/// Dropping it only takes the path off the list; deleting the file on the normal error
/// path stays the job of its owner.
#[derive(Debug)]
pub struct Unfinished {
    path: PathBuf,
}

impl Unfinished {
    /// Lists `path` (register it before creating the file, so that no moment is missed).
    pub fn register(path: &Path) -> Self {
        unfinished().push(path.to_path_buf());
        Self {
            path: path.to_path_buf(),
        }
    }

    /// Runs `finish` (the rename into place) with the registry locked, then takes the path
    /// off the list: an interruption either removes the temporary file before the rename or
    /// finds the output complete, never anything in between.
    pub fn commit<T>(self, finish: impl FnOnce() -> T) -> T {
        let mut list = unfinished();
        let result = finish();
        if let Some(i) = list.iter().position(|p| *p == self.path) {
            list.swap_remove(i);
        }
        drop(list);
        std::mem::forget(self);
        result
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let mut list = unfinished();
        if let Some(i) = list.iter().position(|p| *p == self.path) {
            list.swap_remove(i);
        }
    }
}

/// Deletes every unfinished temporary output of this process; returns how many it found.
///
/// Meant for a signal handler that ends the process right after: until the process
/// exits, nothing can be committed (the registry stays locked), so call it last.
pub fn remove_unfinished() -> usize {
    let mut list = unfinished();
    let n = list.len();
    for path in list.drain(..) {
        let _ = fs::remove_file(&path);
    }
    // Held until the process exits: a build that finishes meanwhile cannot rename its
    // output into place.
    std::mem::forget(list);
    n
}

/// An output file under construction: a temporary file beside the target, removed if it is
/// dropped before [`OutputFile::commit`].
#[derive(Debug)]
pub struct OutputFile {
    temp: tempfile::NamedTempFile,
    target: PathBuf,
    force: bool,
    listed: Unfinished,
}

impl OutputFile {
    /// Checks that `target` may be written (absent, or a regular file nobody has locked when
    /// `force` is set) and opens a temporary file beside it.
    pub fn new(target: &Path, force: bool) -> Result<Self, CreateError> {
        check_target(target, force)?;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !dir.is_dir() {
            return Err(CreateError::NoDir(dir));
        }
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".partial")
            .permissions(Permissions::from_mode(0o666))
            .tempfile_in(&dir)
            .map_err(|source| CreateError::Dir { dir, source })?;
        // Listed right after creation: the name is random, so it cannot be listed before.
        let listed = Unfinished::register(temp.path());
        debug!(temp = %temp.path().display(), "writing to a temporary file");
        Ok(OutputFile {
            temp,
            target: target.to_path_buf(),
            force,
            listed,
        })
    }

    /// The temporary file, open for reading and writing.
    pub fn file(&self) -> &File {
        self.temp.as_file()
    }

    /// Where the temporary file is.
    pub fn temp_path(&self) -> &Path {
        self.temp.path()
    }

    /// The target path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the finished file to the target and returns it, still open.
    pub fn commit(self) -> Result<File, CreateError> {
        let target = self.target;
        let temp = self.temp;
        let result = if self.force {
            // Checked again just before replacing: the lock may be new.
            check_target(&target, true)?;
            self.listed.commit(|| temp.persist(&target))
        } else {
            self.listed.commit(|| temp.persist_noclobber(&target))
        };
        result.map_err(|e| {
            if e.error.kind() == io::ErrorKind::AlreadyExists {
                CreateError::Exists(target.clone())
            } else {
                CreateError::Persist {
                    path: target.clone(),
                    source: e.error,
                }
            }
        })
    }
}

/// Checks that `target` is absent (in a folder that exists), or, with `force`, a regular
/// file nobody has locked.
pub fn check_target(target: &Path, force: bool) -> Result<(), CreateError> {
    match fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
                Err(CreateError::NoDir(dir.to_path_buf()))
            }
            _ => Ok(()),
        },
        Err(source) => Err(CreateError::Io {
            path: target.to_path_buf(),
            source,
        }),
        Ok(_) if !force => Err(CreateError::Exists(target.to_path_buf())),
        Ok(m) if !m.is_file() => Err(CreateError::NotAFile(target.to_path_buf())),
        Ok(_) => {
            if is_locked(target).map_err(|source| CreateError::Io {
                path: target.to_path_buf(),
                source,
            })? {
                Err(CreateError::InUse(target.to_path_buf()))
            } else {
                Ok(())
            }
        }
    }
}

/// True when another open file description holds a lock (OFD or POSIX record lock) on any
/// byte of `path`, as QEMU and `vloop-blk` do on the images they serve.
pub fn is_locked(path: &Path) -> io::Result<bool> {
    let file = File::open(path)?;
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl))
        .map_err(io::Error::from)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn sparse_by_default_and_rounded_to_sectors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let s = create(
            &p,
            &CreateOptions {
                size: Size(1000),
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
                size: Size(1 << 20),
                preallocate: true,
                force: false,
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
            size: Size(4096),
            ..Default::default()
        };
        let err = create(&p, &opts).unwrap_err();
        assert!(matches!(err, CreateError::Exists(_)), "{err}");
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

    #[test]
    fn unfinished_output_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let out = OutputFile::new(&p, false).unwrap();
        out.file().set_len(4096).unwrap();
        let temp = out.temp_path().to_path_buf();
        assert!(temp.exists());
        assert!(temp
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(".img."));
        drop(out);
        assert!(!temp.exists());
        assert!(!p.exists());
        // Another process created the target meanwhile: the commit refuses to replace it.
        let out = OutputFile::new(&p, false).unwrap();
        fs::write(&p, b"theirs").unwrap();
        let err = out.commit().unwrap_err();
        assert!(matches!(err, CreateError::Exists(_)), "{err}");
        assert_eq!(fs::read(&p).unwrap(), b"theirs");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_directories_zero_and_locked_files() {
        let d = tempfile::tempdir().unwrap();
        let err = create(
            d.path(),
            &CreateOptions {
                size: Size(4096),
                force: true,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, CreateError::NotAFile(_)), "{err}");
        let p = d.path().join("img");
        let err = create(&p, &CreateOptions::default()).unwrap_err();
        assert!(matches!(err, CreateError::ZeroSize), "{err}");

        fs::write(&p, b"served").unwrap();
        let holder = File::options().read(true).write(true).open(&p).unwrap();
        // SAFETY: all-zero bytes are a valid `flock`.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        nix::fcntl::fcntl(holder.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).unwrap();
        let err = create(
            &p,
            &CreateOptions {
                size: Size(4096),
                force: true,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, CreateError::InUse(_)), "{err}");
        drop(holder);
        assert!(!is_locked(&p).unwrap());
    }
}
