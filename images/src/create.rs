//! Blank raw images: `vloop-image create FILE --size SIZE`.
//!
//! The image is SIZE zero bytes: sparse by default (`set_len`, no blocks allocated), fully
//! allocated with `preallocate` (`posix_fallocate`). The size is rounded up to a whole number
//! of 512-byte sectors, since a block device cannot end in a partial sector; the summary
//! says so when it happens. The file is written through [`crate::output`], like every output.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;
use tracing::debug;

use crate::input::allocated_bytes;
use crate::output::{Output, OutputError, OutputFile, Unfinished};
use crate::size::Size;

/// Errors from creating a blank image.
#[derive(Debug, Error)]
pub enum CreateError {
    /// A size of zero bytes was asked for.
    #[error("the size must be larger than 0 (e.g. --size 10M)")]
    ZeroSize,
    /// The size does not fit the platform's file offset type.
    #[error("{0} is too large for a file")]
    TooLarge(Size),
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

/// Options for [`create`].
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Size of the image; rounded up to a multiple of 512 bytes.
    pub size: Size,
    /// Allocate every block now instead of leaving the file sparse.
    pub preallocate: bool,
    /// Replace an existing file.
    pub force: bool,
    /// Lists the temporary file while it is written (see [`Unfinished`]).
    pub unfinished: Option<Unfinished>,
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
    if opts.preallocate {
        nix::fcntl::posix_fallocate(out.file().as_raw_fd(), 0, len)
            .map_err(|e| alloc_err(io::Error::from(e)))?;
    } else {
        out.file().set_len(size.bytes()).map_err(alloc_err)?;
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
        size,
        rounded_from: (size != opts.size).then_some(opts.size),
        allocated,
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
            size: Size(4096),
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
                size: Size(4096),
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
}
