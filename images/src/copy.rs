//! `vloop-image copy`: a block device or an image file to an image file.
//!
//! This is `cp /dev/cdrom cdrom-image` done carefully:
//! - reads are large (1 MiB) and aligned to 1 MiB in the source;
//! - holes of a sparse source are found with `SEEK_DATA`/`SEEK_HOLE` and not read at all, and
//!   every all-zero 4 KiB block is left as a hole in the copy, so sparse stays sparse;
//! - the SHA-256 of the whole content (holes included, as zeros) is computed on the way;
//! - the copy is written to a temporary file beside the target and renamed into place only
//!   when it is complete (see [`crate::output`]): a failed copy leaves nothing that looks
//!   like an image; a read error names the byte offset and sector it failed at;
//! - `verify` drops both files from the page cache and reads them again, comparing hashes;
//! - [`CopyOptions::cancel`] stops it at the next chunk (a Ctrl-C handler raises it), and
//!   the unfinished copy is removed.
//!
//! Hashing an image ([`sha256_file`]) is the same walk without the writes. The reading
//! itself (holes, chunks, bad sectors) is [`crate::input`]'s, the hashed walk and the
//! read-back [`crate::verify`]'s; the zero-block test of the writes ([`nonzero_runs`])
//! serves `convert` as well.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;
use thiserror::Error;
use tracing::debug;

use crate::input::{
    allocated_bytes, is_zero, open_source, Cancel, FileSource, InputError, ReadFailure, Source,
    KIND_FILE,
};
use crate::output::{Output, OutputError, OutputFile};
use crate::size::transfer;
use crate::verify::{hash, read_back, ReadBack, Verdict};
pub use crate::verify::{walk_hashed, WalkFailure};

/// Granularity of hole detection in the copy: an all-zero block of this size is not written.
pub const ZERO_BLOCK: usize = 4096;

/// Errors from copying or hashing an image.
#[derive(Debug, Error)]
pub enum CopyError {
    /// The source cannot be opened, or is not a file or block device.
    #[error(transparent)]
    Input(#[from] InputError),
    /// Reading the source failed at an offset.
    #[error("read error in {path} at byte {offset} (sector {}); the copy was discarded", offset / 512)]
    Read {
        /// The file read from.
        path: PathBuf,
        /// First byte of the failed read.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The source ended before its announced size (it shrank, or the medium is short).
    #[error(
        "{path} ended at byte {offset}, before its size of {size} bytes; the copy was discarded"
    )]
    Short {
        /// The file read from.
        path: PathBuf,
        /// Where it ended.
        offset: u64,
        /// The size it announced.
        size: u64,
    },
    /// Writing the copy failed at an offset.
    #[error("write error in {path} at byte {offset}; the copy was discarded")]
    Write {
        /// The target.
        path: PathBuf,
        /// First byte of the failed write.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The copy read back differs from the source.
    #[error(
        "verification failed: {src} has SHA-256 {src_sha} but the copy read back as {dst_sha}; \
         the copy was discarded"
    )]
    Mismatch {
        /// The source.
        src: PathBuf,
        /// The source's hash when read again.
        src_sha: String,
        /// The copy's hash when read back.
        dst_sha: String,
    },
    /// The copy was stopped by its [`CopyOptions::cancel`] flag (Ctrl-C).
    #[error("interrupted; the copy was discarded")]
    Interrupted,
    /// The source changed while it was copied.
    #[error(
        "{src} changed while it was copied (SHA-256 {first} then {second}); the copy was discarded"
    )]
    SourceChanged {
        /// The source.
        src: PathBuf,
        /// The hash while copying.
        first: String,
        /// The hash when read again.
        second: String,
    },
    /// Preparing or committing the output file failed.
    #[error(transparent)]
    Output(#[from] OutputError),
}

impl ReadFailure for CopyError {
    fn read(path: &Path, offset: u64, source: io::Error) -> Self {
        CopyError::Read {
            path: path.to_path_buf(),
            offset,
            source,
        }
    }

    fn short(path: &Path, offset: u64, size: u64) -> Self {
        CopyError::Short {
            path: path.to_path_buf(),
            offset,
            size,
        }
    }
}

/// Options for [`copy`].
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Read source and copy again after copying and compare their hashes.
    pub verify: bool,
    /// Replace an existing target file.
    pub force: bool,
    /// Advanced by the number of bytes processed; hidden by default.
    pub progress: ProgressBar,
    /// Stops the copy at the next chunk when raised ([`CopyError::Interrupted`]).
    pub cancel: Cancel,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            verify: false,
            force: false,
            progress: ProgressBar::hidden(),
            cancel: Cancel::new(),
        }
    }
}

/// What [`copy`] did.
#[derive(Debug, Clone, Serialize)]
pub struct CopySummary {
    /// The source.
    pub src: PathBuf,
    /// The copy.
    pub dst: PathBuf,
    /// `"file"` or `"block device"`.
    pub source_kind: &'static str,
    /// Bytes of content (the size of the copy).
    pub bytes: u64,
    /// Bytes actually written; the rest are holes.
    pub data_bytes: u64,
    /// Bytes left as holes in the copy (all-zero blocks).
    pub holes_bytes: u64,
    /// SHA-256 of the content, lower-case hex.
    pub sha256: String,
    /// True when both files were read back and their hashes matched.
    pub verified: bool,
    /// Wall time taken.
    #[serde(serialize_with = "ser_secs")]
    pub elapsed: Duration,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Copies `src` (file or block device) to the image file `dst`.
pub fn copy(src: &Path, dst: &Path, opts: &CopyOptions) -> Result<CopySummary, CopyError> {
    let start = Instant::now();
    let (source, len, source_kind) = open_source(src)?;
    let out = OutputFile::create(&Output {
        path: dst,
        force: opts.force,
        unfinished: None,
    })?;
    opts.progress.set_length(len);
    opts.progress.set_message("copying");
    let sha_bytes = copy_into(
        &source,
        src,
        len,
        out.file(),
        dst,
        &opts.progress,
        &opts.cancel,
    )?;
    if source_kind == KIND_FILE {
        // A file that shrank while being copied reads as holes past its new end: catch it.
        let now = source.file().metadata().map(|m| m.len()).unwrap_or(len);
        if now != len {
            return Err(CopyError::Short {
                path: src.to_path_buf(),
                offset: now.min(len),
                size: len,
            });
        }
    }
    let sha256 = hex::encode(sha_bytes.0);
    let write_err = |source| CopyError::Write {
        path: dst.to_path_buf(),
        offset: len,
        source,
    };
    out.file().sync_all().map_err(write_err)?;
    if opts.verify {
        let back = FileSource::regular(out.file().try_clone().map_err(write_err)?);
        let verdict = read_back::<CopyError>(
            &ReadBack {
                source: &back,
                name: out.temp_path(),
                fds: vec![out.file().as_raw_fd()],
                message: "verifying copy",
            },
            &ReadBack {
                source: &source,
                name: src,
                fds: vec![source.file().as_raw_fd()],
                message: "verifying source",
            },
            len,
            &sha256,
            &opts.progress,
            &opts.cancel,
        )?;
        match verdict {
            Verdict::Same => {}
            Verdict::SourceChanged { second } => {
                return Err(CopyError::SourceChanged {
                    src: src.to_path_buf(),
                    first: sha256,
                    second,
                })
            }
            Verdict::Mismatch { src_sha, dst_sha } => {
                return Err(CopyError::Mismatch {
                    src: src.to_path_buf(),
                    src_sha,
                    dst_sha,
                })
            }
        }
    }
    let file = out.commit()?;
    opts.progress.finish_and_clear();
    let allocated = file.metadata().map(|m| allocated_bytes(&m)).unwrap_or(0);
    debug!(allocated, "copy committed");
    Ok(CopySummary {
        src: src.to_path_buf(),
        dst: dst.to_path_buf(),
        source_kind,
        bytes: len,
        data_bytes: sha_bytes.1,
        holes_bytes: len - sha_bytes.1,
        sha256,
        verified: opts.verify,
        elapsed: start.elapsed(),
    })
}

/// SHA-256 of a file's or block device's content, lower-case hex, and its length.
pub fn sha256_file(path: &Path) -> Result<(u64, String), CopyError> {
    sha256_file_with_progress(path, &ProgressBar::hidden())
}

/// [`sha256_file`], advancing `progress` by the bytes hashed (holes included).
pub fn sha256_file_with_progress(
    path: &Path,
    progress: &ProgressBar,
) -> Result<(u64, String), CopyError> {
    let (source, len, _) = open_source(path)?;
    let sha = hash_source(&source, path, len, progress, &Cancel::new())?;
    Ok((len, sha))
}

impl WalkFailure for CopyError {
    fn interrupted() -> Self {
        CopyError::Interrupted
    }
}

/// Hashes `src`'s first `len` bytes; lower-case hex.
pub fn hash_source(
    src: &dyn Source,
    name: &Path,
    len: u64,
    progress: &ProgressBar,
    cancel: &Cancel,
) -> Result<String, CopyError> {
    hash(src, name, len, progress, cancel)
}

/// The runs of `chunk` that are not all zero, at the granularity of `block`-byte blocks
/// (the last block may be shorter): `(start, end)` byte ranges in order, each a maximal run
/// of blocks with a non-zero byte. What is left out is what writers leave as holes.
pub fn nonzero_runs(chunk: &[u8], block: usize) -> Vec<(usize, usize)> {
    let block = block.max(1);
    let mut runs = Vec::new();
    let mut run: Option<usize> = None;
    let blocks = chunk.len().div_ceil(block);
    for i in 0..=blocks {
        let nonzero = i < blocks && !is_zero(&chunk[i * block..((i + 1) * block).min(chunk.len())]);
        match (nonzero, run) {
            (true, None) => run = Some(i * block),
            (false, Some(s)) => {
                runs.push((s, (i * block).min(chunk.len())));
                run = None;
            }
            _ => {}
        }
    }
    runs
}

/// Copies `len` bytes of `src` into `out` (a fresh, empty file), leaving all-zero
/// [`ZERO_BLOCK`]s as holes. Returns the SHA-256 and the number of bytes written.
pub fn copy_into(
    src: &dyn Source,
    src_name: &Path,
    len: u64,
    out: &File,
    out_name: &Path,
    progress: &ProgressBar,
    cancel: &Cancel,
) -> Result<([u8; 32], u64), CopyError> {
    let mut written = 0u64;
    let sha = walk_hashed::<CopyError>(src, src_name, len, progress, cancel, |off, chunk| {
        // Each run of non-zero blocks with one pwrite.
        for (s, e) in nonzero_runs(chunk, ZERO_BLOCK) {
            out.write_all_at(&chunk[s..e], off + s as u64)
                .map_err(|source| CopyError::Write {
                    path: out_name.to_path_buf(),
                    offset: off + s as u64,
                    source,
                })?;
            written += (e - s) as u64;
        }
        Ok(())
    })?;
    out.set_len(len).map_err(|source| CopyError::Write {
        path: out_name.to_path_buf(),
        offset: len,
        source,
    })?;
    Ok((sha, written))
}

/// A short line for humans: `copied 10 MiB (10485760 bytes, 8 MiB in holes) in 0.10 s, 100 MiB/s`.
pub fn describe(s: &CopySummary) -> String {
    let line = transfer("copied", s.bytes, s.holes_bytes, s.elapsed);
    if s.verified {
        line + " (copy and read-back of both)"
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::input::sparse_file;

    /// Copies `len` bytes of `src` (named `name`) into a fresh file; the copy must fail.
    fn copy_error(src: &dyn Source, name: &str, len: u64) -> CopyError {
        let d = tempfile::tempdir().unwrap();
        let out = File::create(d.path().join("o")).unwrap();
        copy_into(
            src,
            Path::new(name),
            len,
            &out,
            Path::new("o"),
            &ProgressBar::hidden(),
            &Cancel::new(),
        )
        .unwrap_err()
    }

    /// A source of `len` bytes of a pattern that fails at `fail_at`.
    struct Failing {
        fail_at: u64,
        reads: Cell<u32>,
    }

    impl Source for Failing {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            self.reads.set(self.reads.get() + 1);
            if offset + buf.len() as u64 > self.fail_at {
                if offset >= self.fail_at {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                let n = (self.fail_at - offset) as usize;
                buf[..n].fill(7);
                return Ok(n);
            }
            buf.fill(7);
            Ok(buf.len())
        }
    }

    #[test]
    fn read_error_names_the_offset() {
        let src = Failing {
            fail_at: 3 * 1024 * 1024 + 4096,
            reads: Cell::new(0),
        };
        let err = copy_error(&src, "/dev/sr0", 8 << 20);
        assert!(
            matches!(err, CopyError::Read { offset, .. } if offset == 3 * 1024 * 1024 + 4096),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "read error in /dev/sr0 at byte 3149824 (sector 6152); the copy was discarded"
        );
        // Aligned 1 MiB reads: three full chunks, a short read, the failing one, then one
        // sector read that finds the failing sector.
        assert_eq!(src.reads.get(), 6);
    }

    /// A source that ends after `len` bytes.
    struct Truncated(u64);

    impl Source for Truncated {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let n = (self.0.saturating_sub(offset) as usize).min(buf.len());
            buf[..n].fill(1);
            Ok(n)
        }
    }

    /// A device with one bad sector: any read that covers it fails whole, as disks do.
    struct BadSector(u64);

    impl Source for BadSector {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            if (offset..offset + buf.len() as u64).contains(&self.0) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            buf.fill(1);
            Ok(buf.len())
        }
    }

    #[test]
    fn read_error_names_the_bad_sector() {
        let bad = (5 << 20) + 7 * 512 + 100;
        let err = copy_error(&BadSector(bad), "/dev/sr0", 8 << 20);
        let sector_start = bad - bad % 512;
        assert!(
            matches!(err, CopyError::Read { offset, .. } if offset == sector_start),
            "{err:?}"
        );
        assert!(err
            .to_string()
            .contains(&format!("sector {}", sector_start / 512)));
    }

    #[test]
    fn short_source_is_an_error() {
        let err = copy_error(&Truncated(1000), "src", 2000);
        assert!(
            matches!(err, CopyError::Short { offset: 1000, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn nonzero_runs_skip_zero_blocks() {
        let mut b = vec![0u8; 10 * 4096 + 100];
        b[5] = 1;
        b[4096 + 4095] = 2;
        b[5 * 4096] = 3;
        b[10 * 4096 + 99] = 4;
        assert_eq!(
            nonzero_runs(&b, 4096),
            vec![
                (0, 2 * 4096),
                (5 * 4096, 6 * 4096),
                (10 * 4096, 10 * 4096 + 100)
            ]
        );
        assert_eq!(nonzero_runs(&[0u8; 8192], 4096), vec![]);
        assert_eq!(nonzero_runs(&[], 4096), vec![]);
        assert_eq!(nonzero_runs(&[7u8; 3], 4096), vec![(0, 3)]);
    }

    #[test]
    fn holes_and_data_hash_like_the_plain_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("src");
        sparse_file(
            &p,
            5 << 20,
            &[(2 << 20, b"middle"), ((5 << 20) - 5000, &[9u8; 5000])],
        );
        let bytes = std::fs::read(&p).unwrap();
        let want = hex::encode(Sha256::digest(&bytes));
        assert_eq!(sha256_file(&p).unwrap(), (5 << 20, want));
    }
}
