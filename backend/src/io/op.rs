//! The operations an engine runs: vectored reads and writes whose iovecs point straight into
//! guest memory, data syncs and fallocate calls, and what starting one did.

use std::io;
use std::os::unix::io::RawFd;

use smallvec::SmallVec;

/// Most iovecs one preadv/pwritev takes (IOV_MAX on Linux).
pub const IOV_MAX: usize = 1024;

/// The iovecs of one request, inline for the usual few buffers so a request allocates nothing.
pub type Iovecs = SmallVec<[libc::iovec; 4]>;

/// The id [`Engine::reap`](super::engine::Engine::reap) reports for the completion of a [`Engine::watch`](super::engine::Engine::watch).
pub const WATCH_ID: usize = usize::MAX;

/// The id [`Engine::reap`](super::engine::Engine::reap) reports when the queue's doorbell
/// armed with [`Engine::watch_doorbell`](super::engine::Engine::watch_doorbell) rang.
pub const DOORBELL_ID: usize = usize::MAX - 1;

/// The id of the cancellation of a doorbell poll (its completion is ignored).
pub const DOORBELL_CANCEL_ID: usize = usize::MAX - 2;

/// The ids of doorbell polls on the ring, one per poll armed (wrapping).
pub const DOORBELL_POLLS: std::ops::RangeInclusive<usize> =
    usize::MAX - 3 - u16::MAX as usize..=usize::MAX - 3;

/// `FALLOC_FL_NO_HIDE_STALE`: with PUNCH_HOLE and KEEP_SIZE, a block device discards the range
/// (BLKDISCARD) instead of zeroing it.
pub const FALLOC_FL_NO_HIDE_STALE: libc::c_int = 0x04;

/// What an op does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Vectored read into the iovecs.
    Read,
    /// Vectored write from the iovecs; `dsync`: durable before it completes (RWF_DSYNC).
    Write {
        /// Write through (RWF_DSYNC).
        dsync: bool,
    },
    /// fdatasync of the image.
    Sync,
    /// `fallocate(fd, mode, offset, len)`; with `sync`, an fdatasync after it succeeded.
    Fallocate {
        /// fallocate mode bits.
        mode: libc::c_int,
        /// Make it durable before it completes.
        sync: bool,
        /// What to do where the file system refuses the mode.
        unsupported: Unsupported,
    },
}

/// What a fallocate that the file system or device does not support turns into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsupported {
    /// Success: the op was a hint (DISCARD).
    Ignore,
    /// Write zero-filled buffers over the range (WRITE_ZEROES).
    WriteZeroes,
}

/// One I/O operation on the image.
#[derive(Debug)]
pub struct Op {
    /// What it does.
    pub kind: OpKind,
    /// fd to use.
    pub fd: RawFd,
    /// Buffered fd to retry on when an O_DIRECT request is refused with EINVAL, and for the
    /// zero-buffer fallback of write-zeroes.
    pub fallback_fd: RawFd,
    /// Byte offset in the image.
    pub offset: u64,
    /// Bytes: the sum of the iovec lengths for reads and writes, the range for fallocate.
    pub len: u64,
    /// Buffers of a read or write; each points into mapped guest memory that stays mapped
    /// until the op completes. Empty for the other kinds.
    pub iov: Iovecs,
    /// `fd` goes through the page cache (not O_DIRECT): worth trying without blocking first.
    pub buffered: bool,
}

impl Op {
    /// A sync (fdatasync) of `fd`.
    pub fn sync(fd: RawFd) -> Op {
        Op {
            kind: OpKind::Sync,
            fd,
            fallback_fd: fd,
            offset: 0,
            len: 0,
            iov: Iovecs::new(),
            buffered: false,
        }
    }

    /// True for a read or write.
    pub fn is_rw(&self) -> bool {
        matches!(self.kind, OpKind::Read | OpKind::Write { .. })
    }

    /// True for a write.
    pub fn is_write(&self) -> bool {
        matches!(self.kind, OpKind::Write { .. })
    }

    /// A buffered read that a page-cache copy on another CPU can serve.
    pub fn shareable(&self) -> bool {
        self.kind == OpKind::Read && self.buffered && self.len > 0 && self.iov.len() <= IOV_MAX
    }
}

/// What [`Engine::start`](super::engine::Engine::start) did with an op.
#[derive(Debug)]
pub enum Started {
    /// It completed; the result is final.
    Done(io::Result<()>),
    /// It is in the kernel; its completion comes from [`Engine::reap`](super::engine::Engine::reap).
    Queued,
    /// `done` bytes completed at once; the rest is in the kernel (the op now describes it).
    Partly {
        /// Bytes transferred before the op was queued.
        done: u64,
    },
}

/// The iovecs of `iov` after skipping `skip` bytes.
pub fn advance(iov: &[libc::iovec], mut skip: u64) -> Iovecs {
    let mut out = Iovecs::with_capacity(iov.len());
    for v in iov {
        let len = v.iov_len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        out.push(libc::iovec {
            // skip < len, so the pointer stays inside the buffer.
            iov_base: v.iov_base.cast::<u8>().wrapping_add(skip as usize).cast(),
            iov_len: (len - skip) as usize,
        });
        skip = 0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_skips_whole_and_partial_buffers() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 10];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 10,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 10,
            },
        ];
        let r = advance(&iov, 13);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].iov_len, 7);
        assert_eq!(r[0].iov_base as usize, b.as_ptr() as usize + 3);
        assert!(advance(&iov, 20).is_empty());
    }
}
