//! Images built from a folder on the host, the whole way: what `vloop-image ext2` and
//! `vloop-image iso` do, as library calls that print nothing.
//!
//! [`ext2()`] and [`iso()`] check the output path, read the folder ([`crate::tree::scan`], with
//! the build timestamp from [`BuildOptions::timestamp`], else `SOURCE_DATE_EPOCH`, else the
//! newest mtime in the folder), write the image through [`crate::output`] and hash it; each
//! returns a [`Built`] summary. A progress bar is drawn only when the caller passes a
//! visible one; temporary files are listed only in the [`Unfinished`] registry the caller
//! gives. Nothing is shared between calls, so two builds can run side by side in one process.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use thiserror::Error;

use crate::copy::{self, CopyError};
use crate::ext2::{self, Ext2Error, Ext2Options, Ext2Summary};
use crate::iso::{self, IsoError, IsoOptions, IsoSummary};
use crate::output::{check_target, Output, OutputError, Unfinished};
use crate::tree::{self, Tree, TreeError, TreeOptions};

/// Errors from building an image from a folder.
#[derive(Debug, Error)]
pub enum FolderError {
    /// The folder to build from is missing, or is not a folder.
    #[error(
        "--from {}: {} (give the folder whose files go into the image)",
        path.display(),
        if *exists { "not a folder" } else { "no such folder" }
    )]
    NoFolder {
        /// The path given.
        path: PathBuf,
        /// True when something that is not a folder is there.
        exists: bool,
    },
    /// The output path cannot be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The folder cannot be read.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// The ext2 builder failed.
    #[error(transparent)]
    Ext2(#[from] Ext2Error),
    /// The ISO 9660 builder failed.
    #[error(transparent)]
    Iso(#[from] IsoError),
    /// Hashing the finished image failed (the image itself is complete).
    #[error("hashing the image")]
    Hash(#[source] CopyError),
}

/// When [`ext2()`] and [`iso()`] hash the image they wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Hashing {
    /// Always (hashing reads every byte, holes included: about 1 s per GiB).
    #[default]
    Always,
    /// Only images of at most this many bytes.
    UpTo(u64),
    /// Never.
    Never,
}

impl Hashing {
    /// Whether an image of `size` bytes is hashed.
    pub fn covers(self, size: u64) -> bool {
        match self {
            Hashing::Always => true,
            Hashing::UpTo(max) => size <= max,
            Hashing::Never => false,
        }
    }
}

/// How [`ext2()`] and [`iso()`] read the folder and write the image.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Build timestamp in seconds since 1970; later mtimes are clamped to it. `None`:
    /// `SOURCE_DATE_EPOCH` if set, else the newest mtime in the folder.
    pub timestamp: Option<i64>,
    /// Keep the files' owners and groups (else everything is owned by root).
    pub keep_owners: bool,
    /// Replace an existing image file (unless another process holds a lock on it).
    pub force: bool,
    /// When to hash the image.
    pub sha256: Hashing,
    /// Shows the writing (ext2) and the hashing; hidden by default.
    pub progress: ProgressBar,
    /// Lists the temporary file while it is written (see [`Unfinished`]).
    pub unfinished: Option<Unfinished>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            timestamp: None,
            keep_owners: false,
            force: false,
            sha256: Hashing::default(),
            progress: ProgressBar::hidden(),
            unfinished: None,
        }
    }
}

/// What [`ext2()`] or [`iso()`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built<S> {
    /// The image file.
    pub path: PathBuf,
    /// What the builder reports.
    pub image: S,
    /// The build timestamp the image records.
    pub timestamp: i64,
    /// SHA-256 of the image, lower-case hex; `None` when [`BuildOptions::sha256`] left it
    /// out.
    pub sha256: Option<String>,
    /// Time from the call until the image was in place (hashing not included).
    pub build_time: Duration,
}

/// Builds an ext2 image of the folder `from` at `out`.
pub fn ext2(
    from: &Path,
    out: &Path,
    build: &BuildOptions,
    opts: &Ext2Options,
) -> Result<Built<Ext2Summary>, FolderError> {
    from_folder(from, out, build, |tree, output| {
        let bar = &build.progress;
        let image = ext2::write(tree, output, opts, &mut |done, total| {
            if bar.length() != Some(total) {
                bar.set_length(total);
                bar.set_message("writing ext2");
            }
            bar.set_position(done);
        });
        bar.finish_and_clear();
        let image = image?;
        Ok((image.size, image))
    })
}

/// Builds an ISO 9660 image of the folder `from` at `out`.
pub fn iso(
    from: &Path,
    out: &Path,
    build: &BuildOptions,
    opts: &IsoOptions,
) -> Result<Built<IsoSummary>, FolderError> {
    from_folder(from, out, build, |tree, output| {
        let image = iso::write(tree, output, opts)?;
        Ok((image.size, image))
    })
}

/// Reads the folder, lets `write` put the image in place (it returns the image's size and
/// summary), then hashes the image if asked.
fn from_folder<S>(
    from: &Path,
    out: &Path,
    build: &BuildOptions,
    write: impl FnOnce(&Tree, &Output<'_>) -> Result<(u64, S), FolderError>,
) -> Result<Built<S>, FolderError> {
    let start = Instant::now();
    let tree = read(from, out, build)?;
    let output = Output {
        path: out,
        force: build.force,
        unfinished: build.unfinished.as_ref(),
    };
    let (size, image) = write(&tree, &output)?;
    let build_time = start.elapsed();
    let sha256 = if build.sha256.covers(size) {
        let bar = &build.progress;
        bar.reset();
        bar.set_length(size);
        bar.set_message("hashing");
        let hashed = copy::sha256_file_with_progress(out, bar);
        bar.finish_and_clear();
        Some(hashed.map_err(FolderError::Hash)?.1)
    } else {
        None
    };
    Ok(Built {
        path: out.to_path_buf(),
        image,
        timestamp: tree.timestamp,
        sha256,
        build_time,
    })
}

/// Checks the output path, then reads the folder.
fn read(from: &Path, out: &Path, build: &BuildOptions) -> Result<Tree, FolderError> {
    check_target(out, build.force)?;
    if !from.is_dir() {
        return Err(FolderError::NoFolder {
            path: from.to_path_buf(),
            exists: from.exists(),
        });
    }
    let timestamp = tree::resolve_timestamp(build.timestamp)?;
    Ok(tree::scan(
        from,
        &TreeOptions {
            keep_owners: build.keep_owners,
            timestamp,
        },
    )?)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn builds_side_by_side_share_nothing() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/f"), vec![7u8; 100_000]).unwrap();
        let build = BuildOptions {
            timestamp: Some(1_700_000_000),
            ..BuildOptions::default()
        };
        let (a, b) = std::thread::scope(|s| {
            let one = s.spawn(|| ext2(&src, &d.path().join("a.img"), &build, &Default::default()));
            let two = s.spawn(|| iso(&src, &d.path().join("b.iso"), &build, &Default::default()));
            (one.join().unwrap().unwrap(), two.join().unwrap().unwrap())
        });
        for (path, sha) in [(&a.path, &a.sha256), (&b.path, &b.sha256)] {
            let (_, want) = copy::sha256_file(path).unwrap();
            assert_eq!(sha.as_deref(), Some(want.as_str()), "{}", path.display());
        }
        assert_eq!((a.timestamp, b.timestamp), (1_700_000_000, 1_700_000_000));
        assert!(a.image.free_blocks > 0 && b.image.files == 1);

        // An existing image is kept unless `force` is set; nothing is hashed when asked not to.
        let err = ext2(&src, &a.path, &build, &Default::default()).unwrap_err();
        assert!(
            matches!(err, FolderError::Output(OutputError::Exists(_))),
            "{err}"
        );
        let again = ext2(
            &src,
            &a.path,
            &BuildOptions {
                force: true,
                sha256: Hashing::Never,
                ..build.clone()
            },
            &Default::default(),
        )
        .unwrap();
        assert_eq!(again.sha256, None);
        assert_eq!(copy::sha256_file(&a.path).unwrap().1, a.sha256.unwrap());
        let hidden: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "temporary files left: {hidden:?}");
    }

    #[test]
    fn results_cross_threads() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<FolderError>();
        send_sync::<Built<Ext2Summary>>();
        send_sync::<Built<IsoSummary>>();
        send_sync::<crate::create::CreateError>();
        send_sync::<CopyError>();
        send_sync::<BuildOptions>();
    }

    #[test]
    fn a_missing_folder_says_so() {
        let d = tempfile::tempdir().unwrap();
        let err = iso(
            &d.path().join("nope"),
            &d.path().join("x.iso"),
            &BuildOptions::default(),
            &Default::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, FolderError::NoFolder { exists: false, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .ends_with("nope: no such folder (give the folder whose files go into the image)"),
            "{err}"
        );
        assert!(Hashing::UpTo(10).covers(10) && !Hashing::UpTo(10).covers(11));
    }
}
