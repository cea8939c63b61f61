//! The files under a chain: positioned reads and writes, sync, size, and the descriptor that
//! mapped extents name.
//!
//! Every byte this crate reads or writes goes through [`Storage`], implemented for
//! [`std::fs::File`]. Tests put a recording layer in between to replay what a power cut could
//! leave on disk (see `tests/crash.rs`); the daemon's own zero-copy I/O uses [`Storage::fd`].

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::fcntl::{fallocate, FallocateFlags};

/// A file of an image chain.
pub trait Storage: Send + Sync {
    /// Reads at `off` until `buf` is full or the file ends; returns the bytes read.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Reads at `off` into `bufs` in order until they are full or the file ends; returns the
    /// bytes read.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<usize> {
        let mut done = 0u64;
        for b in bufs.iter_mut() {
            let n = self.read_at(b, off + done)?;
            done += n as u64;
            if n < b.len() {
                break;
            }
        }
        Ok(done as usize)
    }
    /// Writes all of `buf` at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Writes all of `bufs`, in order, at `off`.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], off: u64) -> io::Result<()> {
        let mut at = off;
        for b in bufs {
            self.write_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// The file's length.
    fn file_size(&self) -> io::Result<u64>;
    /// Sets the file's length (new bytes read as zeroes).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `len` bytes at `off` read as zeroes; `unmap` may free their blocks.
    fn zero_range(&self, off: u64, len: u64, unmap: bool) -> io::Result<()> {
        let _ = unmap;
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = off;
        let end = off + len;
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
    /// Gives the blocks of `len` bytes at `off` back to the file system where it can (their
    /// content is then undefined): a hint, doing nothing where holes cannot be punched.
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        let _ = (off, len);
        Ok(())
    }
    /// The descriptor extents name; valid as long as the storage lives.
    fn fd(&self) -> RawFd;
    /// Device and inode, to detect a backing chain that loops.
    fn identity(&self) -> io::Result<(u64, u64)>;
}

/// Opens `path` as an image file (`write`: read-write; `flags`: more open flags, e.g.
/// O_DIRECT): a regular file or a block device, anything else refused with an error of kind
/// [`io::ErrorKind::InvalidInput`]. The open does not wait on a FIFO (it is made with
/// O_NONBLOCK, cleared once the file is known to be an image: io_uring would pass EAGAIN on).
pub fn open_image(path: &std::path::Path, write: bool, flags: i32) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags | libc::O_NONBLOCK)
        .open(path)?;
    let ft = file.metadata()?.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is not a regular file or a block device",
        ));
    }
    let fl = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
    let fl = nix::fcntl::OFlag::from_bits_truncate(fl) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl))?;
    Ok(file)
}

fn off_t(off: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Runs `op` again while it fails with EINTR.
fn retry<T>(mut op: impl FnMut() -> nix::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

impl Storage for File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let at = off_t(off)?;
        let n = retry(|| nix::sys::uio::preadv(self.as_fd(), bufs, at))?;
        if n == total || n == 0 {
            return Ok(n);
        }
        // A short read: finish it buffer by buffer.
        let mut skip = n;
        let mut done = n;
        for b in bufs.iter_mut() {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            let r = Storage::read_at(self, &mut b[skip..], off + done as u64)?;
            done += r;
            if r < b.len() - skip {
                break;
            }
            skip = 0;
        }
        Ok(done)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, off)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], off: u64) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let at = off_t(off)?;
        let n = retry(|| nix::sys::uio::pwritev(self.as_fd(), bufs, at))?;
        if n == total {
            return Ok(());
        }
        // A short write: finish it buffer by buffer.
        let mut skip = n;
        let mut at = off + n as u64;
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            FileExt::write_all_at(self, &b[skip..], at)?;
            at += (b.len() - skip) as u64;
            skip = 0;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn file_size(&self) -> io::Result<u64> {
        let m = self.metadata()?;
        if m.file_type().is_block_device() {
            // A block device's st_size is 0: its size is where it ends. Every read and write
            // here is positioned, so the file offset this moves is not used.
            let mut f: &File = self;
            return f.seek(SeekFrom::End(0));
        }
        Ok(m.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn zero_range(&self, off: u64, len: u64, unmap: bool) -> io::Result<()> {
        let flags = if unmap {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        };
        match fallocate(self.as_raw_fd(), flags, off_t(off)?, off_t(len)?) {
            Ok(()) => Ok(()),
            // The file system cannot: write zeroes.
            Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS) => {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut at = off;
                while at < off + len {
                    let n = (off + len - at).min(zeros.len() as u64) as usize;
                    FileExt::write_all_at(self, &zeros[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(self.as_raw_fd(), flags, off_t(off)?, off_t(len)?) {
            Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS) => Ok(()),
            r => r.map_err(io::Error::from),
        }
    }

    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn identity(&self) -> io::Result<(u64, u64)> {
        let m = self.metadata()?;
        Ok((m.dev(), m.ino()))
    }
}

/// A writable image file whose first failed sync fails every later one. Linux reports a
/// writeback error once to each open file: the pages it could not write are clean again (or
/// gone) and the next fdatasync succeeds, so without this a flush after any failed sync (an
/// allocation's, a metadata write-back's) would tell the guest its data is on disk when it is
/// not. QEMU's file driver does the same once a flush failed.
pub(crate) struct StickySync {
    inner: Box<dyn Storage>,
    /// The errno of the first failed sync; 0 while none failed.
    failed: AtomicI32,
}

impl StickySync {
    pub(crate) fn new(inner: Box<dyn Storage>) -> StickySync {
        StickySync {
            inner,
            failed: AtomicI32::new(0),
        }
    }
}

impl Storage for StickySync {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.inner.read_at(buf, off)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<usize> {
        self.inner.read_vectored_at(bufs, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], off: u64) -> io::Result<()> {
        self.inner.write_vectored_at(bufs, off)
    }
    fn sync(&self) -> io::Result<()> {
        match self.failed.load(Ordering::Relaxed) {
            0 => self.inner.sync().inspect_err(|e| {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                let _ =
                    self.failed
                        .compare_exchange(0, errno, Ordering::Relaxed, Ordering::Relaxed);
            }),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }
    fn file_size(&self) -> io::Result<u64> {
        self.inner.file_size()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn zero_range(&self, off: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.inner.zero_range(off, len, unmap)
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.punch(off, len)
    }
    fn fd(&self) -> RawFd {
        self.inner.fd()
    }
    fn identity(&self) -> io::Result<(u64, u64)> {
        self.inner.identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// A file whose first sync fails, as fdatasync does once after a writeback error.
    struct FailsOnce {
        file: File,
        syncs: Arc<AtomicUsize>,
    }

    impl Storage for FailsOnce {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            Storage::read_at(&self.file, buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            Storage::write_at(&self.file, buf, off)
        }
        fn sync(&self) -> io::Result<()> {
            match self.syncs.fetch_add(1, Ordering::Relaxed) {
                0 => Err(io::Error::from_raw_os_error(libc::EIO)),
                _ => Ok(()),
            }
        }
        fn file_size(&self) -> io::Result<u64> {
            self.file.file_size()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }
        fn fd(&self) -> RawFd {
            self.file.as_raw_fd()
        }
        fn identity(&self) -> io::Result<(u64, u64)> {
            self.file.identity()
        }
    }

    #[test]
    fn images_open_without_waiting_on_a_fifo_and_blocking_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // A plain open would wait here for a writer.
        let e = open_image(&fifo, false, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            open_image(dir.path(), false, 0).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let img = dir.path().join("img");
        File::create(&img).unwrap();
        let f = open_image(&img, true, 0).unwrap();
        let fl = nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_eq!(fl & libc::O_NONBLOCK, 0);
        assert_eq!(fl & libc::O_ACCMODE, libc::O_RDWR);
    }

    #[test]
    fn a_failed_sync_fails_every_later_one() {
        let syncs = Arc::new(AtomicUsize::new(0));
        let st = StickySync::new(Box::new(FailsOnce {
            file: tempfile::tempfile().unwrap(),
            syncs: syncs.clone(),
        }));
        assert_eq!(st.sync().unwrap_err().raw_os_error(), Some(libc::EIO));
        for _ in 0..3 {
            assert_eq!(st.sync().unwrap_err().raw_os_error(), Some(libc::EIO));
        }
        // The later ones did not even ask the file (whose next sync would succeed).
        assert_eq!(syncs.load(Ordering::Relaxed), 1);
    }
}
