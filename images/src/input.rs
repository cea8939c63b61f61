//! Reading what images are made from and what they are examined in: image files, block
//! devices and the builders' source files, read at positions with their holes skipped.
//!
//! The layer below `copy`, `info` and the ext2 writer, which all read the same way:
//! - [`open_source`] opens a regular file or a block device and says how long it is
//!   (`BLKGETSIZE64` for a device);
//! - [`Source::data_region`] finds the data of a sparse file with `SEEK_DATA`/`SEEK_HOLE`
//!   (a block device, or a file system that cannot tell, is all data);
//! - [`walk_data`] visits a source chunk by chunk: data is read in [`CHUNK`]s aligned to
//!   [`CHUNK`], holes are passed as zeros without being read, a failed read names the first
//!   512-byte sector that cannot be read;
//! - [`file_data_region`] is the same search on any open file (the files under a qcow2
//!   image's clusters);
//! - [`is_zero`] tells an all-zero block, which every writer leaves as a hole;
//! - [`drop_cache`] evicts a file from the page cache, so that a read-back reaches the disk;
//! - [`Cancel`] asks a running walk's caller to stop (a Ctrl-C handler's flag, one per
//!   operation, never shared by the whole process).

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::ProgressBar;
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use thiserror::Error;

use crate::size::SECTOR;

/// Size of one read from a source.
pub const CHUNK: usize = 1 << 20;

/// What [`open_source`] calls a regular file.
pub const KIND_FILE: &str = "file";
/// What [`open_source`] calls a block device.
pub const KIND_BLOCK_DEVICE: &str = "block device";

/// Errors from opening a source.
#[derive(Debug, Error)]
pub enum InputError {
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
}

/// How a caller of [`walk_data`] reports the walk's own failures, in its own error type.
pub trait ReadFailure {
    /// Reading `path` failed at byte `offset`.
    fn read(path: &Path, offset: u64, source: io::Error) -> Self;
    /// `path` ended at byte `offset`, before its size of `size` bytes.
    fn short(path: &Path, offset: u64, size: u64) -> Self;
}

/// A flag that asks one running operation to stop; clones share it.
///
/// The operation looks at it between chunks and gives up with its own "interrupted" error,
/// so that it can remove what it has written. Each operation gets its own flag: cancelling
/// one never stops another running in the same process.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A flag nobody has raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the flag; it stays raised.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// True once [`Cancel::cancel`] was called on this flag or a clone of it.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Something to read from: positioned reads and, where known, where the data is.
pub trait Source {
    /// Reads at `offset`, like `pread`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// The data region containing or following `offset`: `Some((start, end))`, or `None`
    /// when only holes follow. The default says everything is data.
    fn data_region(&self, offset: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
        Ok((offset < len).then_some((offset, len)))
    }
}

/// A regular file or block device opened for reading.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    /// Regular files can report their holes; block devices cannot.
    seekable_holes: bool,
}

impl FileSource {
    /// A regular file, whose holes are found with `SEEK_DATA`/`SEEK_HOLE`.
    pub fn regular(file: File) -> Self {
        Self {
            file,
            seekable_holes: true,
        }
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The open file, given up.
    pub fn into_file(self) -> File {
        self.file
    }
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
        file_data_region(self.file.as_raw_fd(), offset, len)
    }
}

/// The first data region of the open regular file `fd` in `offset..end`, found with
/// `SEEK_DATA`/`SEEK_HOLE`: `Some((start, stop))` with `offset <= start < stop <= end`, or
/// `None` when only holes lie there. A file system that cannot tell is all data. Only the
/// file offset of `fd` moves, which positioned reads and writes ignore.
pub fn file_data_region(fd: RawFd, offset: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
    if offset >= end {
        return Ok(None);
    }
    let seek = |off: u64, whence| -> io::Result<Option<u64>> {
        let off = i64::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        match lseek(fd, off, whence) {
            Ok(v) => Ok(u64::try_from(v).ok()),
            Err(Errno::ENXIO) => Ok(None),
            // File systems without SEEK_DATA support: everything is data.
            Err(Errno::EINVAL) => Ok(u64::try_from(off).ok()),
            Err(e) => Err(e.into()),
        }
    };
    let Some(start) = seek(offset, Whence::SeekData)? else {
        return Ok(None);
    };
    if start >= end {
        return Ok(None);
    }
    let stop = seek(start, Whence::SeekHole)?
        .unwrap_or(end)
        .clamp(start + 1, end);
    Ok(Some((start, stop)))
}

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);

/// Opens `path` for reading: a [`FileSource`], its size, and its kind ([`KIND_FILE`] or
/// [`KIND_BLOCK_DEVICE`]).
pub fn open_source(path: &Path) -> Result<(FileSource, u64, &'static str), InputError> {
    let open_err = |source| InputError::Open {
        path: path.to_path_buf(),
        source,
    };
    // Refuses a FIFO without waiting on it for a writer.
    let file = match vloop_qcow2::open_image(path, false, 0) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            return Err(InputError::NotCopyable(path.to_path_buf()))
        }
        Err(e) => return Err(open_err(e)),
    };
    let meta = file.metadata().map_err(open_err)?;
    let ft = meta.file_type();
    if ft.is_file() {
        Ok((FileSource::regular(file), meta.len(), KIND_FILE))
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
            KIND_BLOCK_DEVICE,
        ))
    } else {
        Err(InputError::NotCopyable(path.to_path_buf()))
    }
}

/// Bytes a file occupies on disk (`st_blocks * 512`).
pub fn allocated_bytes(meta: &fs::Metadata) -> u64 {
    meta.blocks().saturating_mul(512)
}

/// Reads into all of `buf` from `offset`, retrying interrupted and short reads; returns the
/// bytes read, fewer than `buf.len()` only where the source ends. A failure carries the
/// offset it happened at.
pub fn read_full_at(
    src: &dyn Source,
    buf: &mut [u8],
    offset: u64,
) -> Result<usize, (u64, io::Error)> {
    let mut got = 0;
    while got < buf.len() {
        let at = offset + got as u64;
        match src.read_at(&mut buf[got..], at) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((at, e)),
        }
    }
    Ok(got)
}

static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// Walks the first `len` bytes of `src` (named `name` in errors) region by region, calling
/// `visit(offset, bytes, is_hole)` for every chunk in order: data chunks are read (at most
/// [`CHUNK`] bytes, aligned to [`CHUNK`]), holes are passed as zeros without reading.
/// `progress` advances by every chunk's length; `visit` returns `false` to stop early.
pub fn walk_data<E: ReadFailure>(
    src: &dyn Source,
    name: &Path,
    len: u64,
    progress: &ProgressBar,
    mut visit: impl FnMut(u64, &[u8], bool) -> Result<bool, E>,
) -> Result<(), E> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < len {
        let (start, end) = src
            .data_region(off, len)
            .map_err(|e| E::read(name, off, e))?
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
            let chunk = &mut buf[..n];
            match read_full_at(src, chunk, off) {
                Ok(got) if got < n => return Err(E::short(name, off + got as u64, len)),
                Ok(_) => {}
                Err((at, e)) => return Err(E::read(name, bad_sector(src, at, off + n as u64), e)),
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
    let mut sector = [0u8; SECTOR as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(SECTOR) as usize;
        match src.read_at(&mut sector[..n], at) {
            Ok(0) => break,
            Ok(k) => at += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return at,
        }
    }
    from
}

/// Asks the kernel to drop the cached pages of the open file `fd`, so that reading it again
/// reaches the device (a verifying read-back). Failure only costs that guarantee.
pub fn drop_cache(fd: RawFd) {
    let r = nix::fcntl::posix_fadvise(
        fd,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    if let Err(e) = r {
        tracing::debug!("posix_fadvise(DONTNEED): {e}");
    }
}

/// True when every byte of `block` is zero.
pub fn is_zero(block: &[u8]) -> bool {
    let (head, mid, tail) = {
        // SAFETY: every bit pattern is a valid u128, and `align_to` only yields the aligned,
        // in-bounds middle part of the slice as u128s.
        unsafe { block.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Creates `path` as a sparse file of `len` bytes holding each `(offset, bytes)` of `data`.
#[cfg(test)]
pub(crate) fn sparse_file(path: &Path, len: u64, data: &[(u64, &[u8])]) {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
    for (offset, bytes) in data {
        f.write_all_at(bytes, *offset).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(!is_zero(&[0, 0, 3]));
    }

    #[test]
    fn cancel_is_per_flag() {
        let a = Cancel::new();
        let b = Cancel::new();
        let a2 = a.clone();
        a2.cancel();
        assert!(a.is_cancelled());
        assert!(!b.is_cancelled(), "another operation's flag stays down");
    }

    /// A walk's failure as the tests look at it: where it happened.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Read(u64),
        Short(u64),
    }

    impl ReadFailure for Seen {
        fn read(_: &Path, offset: u64, _: io::Error) -> Self {
            Seen::Read(offset)
        }
        fn short(_: &Path, offset: u64, _: u64) -> Self {
            Seen::Short(offset)
        }
    }

    #[test]
    fn walk_skips_holes_and_covers_every_byte() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sparse");
        sparse_file(&p, 5 << 20, &[((2 << 20) + 10, b"x")]);
        let (src, len, kind) = open_source(&p).unwrap();
        assert_eq!((len, kind), (5 << 20, KIND_FILE));
        let mut chunks = Vec::new();
        walk_data::<Seen>(&src, &p, len, &ProgressBar::hidden(), |off, b, hole| {
            chunks.push((off, b.len() as u64, hole));
            Ok(true)
        })
        .unwrap();
        let mut next = 0;
        for &(off, n, _) in &chunks {
            assert_eq!(off, next, "{chunks:?}");
            next += n;
        }
        assert_eq!(next, len);
        assert!(chunks.iter().any(|&(_, _, hole)| hole), "{chunks:?}");
        let read: u64 = chunks.iter().filter(|c| !c.2).map(|c| c.1).sum();
        assert!(read < len, "holes were read: {chunks:?}");
    }

    /// Bytes in memory, with no hole information.
    struct Bytes(Vec<u8>);

    impl Source for Bytes {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let start = (offset as usize).min(self.0.len());
            let n = buf.len().min(self.0.len() - start);
            buf[..n].copy_from_slice(&self.0[start..start + n]);
            Ok(n)
        }
    }

    #[test]
    fn short_source_names_where_it_ended() {
        let name = Path::new("dev");
        let err = walk_data::<Seen>(
            &Bytes(vec![1; 1000]),
            name,
            3000,
            &ProgressBar::hidden(),
            |_, _, _| Ok(true),
        )
        .unwrap_err();
        assert_eq!(err, Seen::Short(1000));
        let mut buf = [0u8; 10];
        assert_eq!(
            read_full_at(&Bytes(vec![2; 995]), &mut buf, 990).ok(),
            Some(5)
        );
        let d = tempfile::tempdir().unwrap();
        let err = open_source(d.path()).unwrap_err();
        assert!(matches!(err, InputError::NotCopyable(_)), "{err}");
    }
}
