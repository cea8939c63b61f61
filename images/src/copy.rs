//! `vloop-image copy`: a block device or an image file to an image file.
//!
//! This is `cp /dev/cdrom cdrom-image` done carefully:
//! - reads are large (1 MiB) and aligned to 1 MiB in the source;
//! - holes of a sparse source are found with `SEEK_DATA`/`SEEK_HOLE` and not read at all, and
//!   every all-zero 4 KiB block is left as a hole in the copy, so sparse stays sparse;
//! - the SHA-256 of the whole content (holes included, as zeros) is computed on the way;
//! - the copy is written to a temporary file beside the target and renamed into place only
//!   when it is complete (see [`crate::create::OutputFile`]): a failed copy leaves nothing
//!   that looks like an image; a read error names the byte offset and sector it failed at;
//! - `verify` drops both files from the page cache and reads them again, comparing hashes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::debug;

use crate::create::{CreateError, OutputFile};
use crate::size::Size;

static CANCELLED: AtomicBool = AtomicBool::new(false);

/// Asks every copy and hash running in this process to stop at the next chunk, discarding
/// its output ([`CopyError::Interrupted`]). Meant for a Ctrl-C handler: it cannot be undone.
pub fn cancel() {
    CANCELLED.store(true, Ordering::Relaxed);
}

/// Size of one read from the source.
pub const CHUNK: usize = 1 << 20;
/// Granularity of hole detection in the copy: an all-zero block of this size is not written.
pub const ZERO_BLOCK: usize = 4096;

/// Errors from copying or hashing an image.
#[derive(Debug, Error)]
pub enum CopyError {
    /// The source cannot be opened or examined.
    #[error("cannot open {path}")]
    Open {
        /// The source.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The source is neither a regular file nor a block device.
    #[error("{0} is not a file or a block device (copy reads image files and disks)")]
    NotCopyable(PathBuf),
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
    /// The copy was stopped by [`cancel`] (Ctrl-C).
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
    Output(#[from] CreateError),
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
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            verify: false,
            force: false,
            progress: ProgressBar::hidden(),
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

/// Something to copy from: positioned reads and, where known, where the data is.
pub trait Source {
    /// Reads at `offset`, like `pread`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// The data region containing or following `offset`: `Some((start, end))`, or `None`
    /// when only holes follow. The default says everything is data.
    fn data_region(&self, offset: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
        Ok((offset < len).then_some((offset, len)))
    }
}

/// A regular file or block device opened for copying.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    /// Regular files can report their holes; block devices cannot.
    seekable_holes: bool,
}

impl Source for FileSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn data_region(&self, offset: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
        if offset >= len {
            return Ok(None);
        }
        if !self.seekable_holes {
            return Ok(Some((offset, len)));
        }
        let fd = self.file.as_raw_fd();
        let seek = |off: u64, whence| -> io::Result<Option<u64>> {
            let off =
                i64::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            match nix::unistd::lseek(fd, off, whence) {
                Ok(v) => Ok(Some(v as u64)),
                Err(nix::errno::Errno::ENXIO) => Ok(None),
                // File systems without SEEK_DATA support: everything is data.
                Err(nix::errno::Errno::EINVAL) => Ok(Some(off as u64)),
                Err(e) => Err(e.into()),
            }
        };
        let Some(start) = seek(offset, nix::unistd::Whence::SeekData)? else {
            return Ok(None);
        };
        if start >= len {
            return Ok(None);
        }
        let end = seek(start, nix::unistd::Whence::SeekHole)?
            .unwrap_or(len)
            .clamp(start + 1, len);
        Ok(Some((start, end)))
    }
}

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);

/// Opens `path` for copying: its size, whether it is a block device, and a [`FileSource`].
pub fn open_source(path: &Path) -> Result<(FileSource, u64, &'static str), CopyError> {
    let open_err = |source| CopyError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    let ft = meta.file_type();
    if ft.is_file() {
        Ok((
            FileSource {
                file,
                seekable_holes: true,
            },
            meta.len(),
            "file",
        ))
    } else if ft.is_block_device() {
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`,
        // alive for the call; the fd is open for the duration of the call.
        unsafe { blk_get_size64(file.as_raw_fd(), &mut size) }
            .map_err(|e| open_err(io::Error::from(e)))?;
        Ok((
            FileSource {
                file,
                seekable_holes: false,
            },
            size,
            "block device",
        ))
    } else {
        Err(CopyError::NotCopyable(path.to_path_buf()))
    }
}

/// Copies `src` (file or block device) to the image file `dst`.
pub fn copy(src: &Path, dst: &Path, opts: &CopyOptions) -> Result<CopySummary, CopyError> {
    let start = Instant::now();
    let (source, len, source_kind) = open_source(src)?;
    let out = OutputFile::new(dst, opts.force)?;
    opts.progress.set_length(len);
    opts.progress.set_message("copying");
    let sha_bytes = copy_into(&source, src, len, out.file(), dst, &opts.progress)?;
    if source_kind == "file" {
        // A file that shrank while being copied reads as holes past its new end: catch it.
        let now = source.file.metadata().map(|m| m.len()).unwrap_or(len);
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
        opts.progress.reset();
        opts.progress.set_message("verifying copy");
        drop_cache(out.file());
        let dst_sha = hash_source(
            &FileSource {
                file: out.file().try_clone().map_err(write_err)?,
                seekable_holes: true,
            },
            out.temp_path(),
            len,
            &opts.progress,
        )?;
        opts.progress.reset();
        opts.progress.set_message("verifying source");
        drop_cache(&source.file);
        let src_sha = hash_source(&source, src, len, &opts.progress)?;
        if src_sha != sha256 {
            return Err(CopyError::SourceChanged {
                src: src.to_path_buf(),
                first: sha256,
                second: src_sha,
            });
        }
        if dst_sha != sha256 {
            return Err(CopyError::Mismatch {
                src: src.to_path_buf(),
                src_sha,
                dst_sha,
            });
        }
    }
    let file = out.commit()?;
    opts.progress.finish_and_clear();
    let allocated = file
        .metadata()
        .map(|m| crate::create::allocated_bytes(&m))
        .unwrap_or(0);
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
    let sha = hash_source(&source, path, len, progress)?;
    Ok((len, sha))
}

/// Asks the kernel to drop a file's cached pages, so that a read-back reaches the device.
fn drop_cache(file: &File) {
    let r = nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    if let Err(e) = r {
        debug!("posix_fadvise(DONTNEED): {e}");
    }
}

static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// Walks `src` region by region, calling `visit(offset, bytes, is_hole)` for every chunk:
/// data chunks are read (at most [`CHUNK`] bytes, aligned to [`CHUNK`]), holes are passed as
/// zeros without reading. `visit` returns `false` to stop early.
pub(crate) fn walk_data(
    src: &dyn Source,
    name: &Path,
    len: u64,
    progress: &ProgressBar,
    mut visit: impl FnMut(u64, &[u8], bool) -> Result<bool, CopyError>,
) -> Result<(), CopyError> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    let read_err = |offset, source| CopyError::Read {
        path: name.to_path_buf(),
        offset,
        source,
    };
    while off < len {
        if CANCELLED.load(Ordering::Relaxed) {
            return Err(CopyError::Interrupted);
        }
        let (start, end) = src
            .data_region(off, len)
            .map_err(|e| read_err(off, e))?
            .unwrap_or((len, len));
        while off < start {
            let n = (start - off).min(CHUNK as u64) as usize;
            if !visit(off, &ZEROS[..n], true)? {
                return Ok(());
            }
            off += n as u64;
            progress.inc(n as u64);
        }
        while off < end {
            let to_boundary = CHUNK as u64 - off % CHUNK as u64;
            let n = (end - off).min(to_boundary) as usize;
            if CANCELLED.load(Ordering::Relaxed) {
                return Err(CopyError::Interrupted);
            }
            let chunk = &mut buf[..n];
            let mut got = 0;
            while got < n {
                match src.read_at(&mut chunk[got..], off + got as u64) {
                    Ok(0) => {
                        return Err(CopyError::Short {
                            path: name.to_path_buf(),
                            offset: off + got as u64,
                            size: len,
                        })
                    }
                    Ok(k) => got += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let at = bad_sector(src, off + got as u64, off + n as u64);
                        return Err(read_err(at, e));
                    }
                }
            }
            if !visit(off, chunk, false)? {
                return Ok(());
            }
            off += n as u64;
            progress.inc(n as u64);
        }
    }
    Ok(())
}

/// The first 512-byte sector in `from..to` that cannot be read, found by reading the range
/// sector by sector after a large read failed; `from` if every sector reads.
fn bad_sector(src: &dyn Source, from: u64, to: u64) -> u64 {
    let mut sector = [0u8; crate::size::SECTOR as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(crate::size::SECTOR) as usize;
        match src.read_at(&mut sector[..n], at) {
            Ok(0) => break,
            Ok(k) => at += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return at,
        }
    }
    from
}

/// [`walk_data`] with every byte hashed (holes as zeros), `data` called for data chunks.
fn walk(
    src: &dyn Source,
    name: &Path,
    len: u64,
    progress: &ProgressBar,
    mut data: impl FnMut(u64, &[u8]) -> Result<(), CopyError>,
) -> Result<[u8; 32], CopyError> {
    let mut hasher = Sha256::new();
    walk_data(src, name, len, progress, |off, bytes, hole| {
        hasher.update(bytes);
        if !hole {
            data(off, bytes)?;
        }
        Ok(true)
    })?;
    Ok(hasher.finalize().into())
}

/// Hashes `src`'s first `len` bytes; lower-case hex.
pub fn hash_source(
    src: &dyn Source,
    name: &Path,
    len: u64,
    progress: &ProgressBar,
) -> Result<String, CopyError> {
    walk(src, name, len, progress, |_, _| Ok(())).map(hex::encode)
}

pub(crate) fn is_zero(block: &[u8]) -> bool {
    let (head, mid, tail) = {
        // SAFETY: every bit pattern is a valid u128, and `align_to` only yields the aligned,
        // in-bounds middle part of the slice as u128s.
        unsafe { block.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
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
) -> Result<([u8; 32], u64), CopyError> {
    let mut written = 0u64;
    let sha = walk(src, src_name, len, progress, |off, chunk| {
        // Write each run of non-zero blocks with one pwrite.
        let mut run: Option<usize> = None;
        let blocks = chunk.len().div_ceil(ZERO_BLOCK);
        for i in 0..=blocks {
            let nonzero = i < blocks && {
                let b = &chunk[i * ZERO_BLOCK..((i + 1) * ZERO_BLOCK).min(chunk.len())];
                !is_zero(b)
            };
            match (nonzero, run) {
                (true, None) => run = Some(i * ZERO_BLOCK),
                (false, Some(s)) => {
                    let e = (i * ZERO_BLOCK).min(chunk.len());
                    out.write_all_at(&chunk[s..e], off + s as u64)
                        .map_err(|source| CopyError::Write {
                            path: out_name.to_path_buf(),
                            offset: off + s as u64,
                            source,
                        })?;
                    written += (e - s) as u64;
                    run = None;
                }
                _ => {}
            }
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
    let secs = s.elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        format!(", {}/s", Size((s.bytes as f64 / secs) as u64).human())
    } else {
        String::new()
    };
    format!(
        "copied {} ({} bytes, {} in holes) in {secs:.2} s{rate}{}",
        Size(s.bytes).human(),
        s.bytes,
        Size(s.holes_bytes).human(),
        if s.verified {
            " (copy and read-back of both)"
        } else {
            ""
        },
    )
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

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
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        for i in [0, 1, 17, 2048, 4095] {
            let mut b = [0u8; 4096];
            b[i] = 1;
            assert!(!is_zero(&b), "{i}");
            assert!(!is_zero(&b[i..]), "{i}");
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn holes_and_data_hash_like_the_plain_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("src");
        let f = File::create(&p).unwrap();
        f.set_len(5 << 20).unwrap();
        f.write_all_at(b"middle", 2 << 20).unwrap();
        f.write_all_at(&[9u8; 5000], (5 << 20) - 5000).unwrap();
        drop(f);
        let bytes = std::fs::read(&p).unwrap();
        let want = hex::encode(Sha256::digest(&bytes));
        assert_eq!(sha256_file(&p).unwrap(), (5 << 20, want));
    }
}
