//! I/O engines: io_uring (the default), blocking syscalls (the fallback when io_uring cannot
//! be set up, e.g. on old kernels or under a seccomp policy that forbids it), and a null engine
//! that does no I/O at all (to measure the vhost-user hop itself).
//!
//! An engine runs [`Op`]s: vectored reads and writes whose iovecs point straight into guest
//! memory, data syncs and fallocate calls. [`Engine::start`] says what happened to an op: it
//! completed at once ([`Started::Done`]), went to the kernel ([`Started::Queued`]), or partly
//! completed with the rest queued ([`Started::Partly`]); queued ops complete through
//! [`Engine::reap`] and [`finish`], tagged with the caller's id, so a worker keeps popping and
//! completing requests while others are in flight.

use std::io;
use std::os::unix::io::RawFd;

use smallvec::SmallVec;
use tracing::{debug, warn};

use super::uring::Uring;
use crate::config::EngineKind;

/// Most iovecs one preadv/pwritev takes (IOV_MAX on Linux).
pub const IOV_MAX: usize = 1024;

/// Largest io_uring submission queue an engine asks for (a queue never has more requests in
/// flight than its size, and the kernel caps rings at 32768 entries).
pub const MAX_RING_ENTRIES: u32 = 4096;

/// The iovecs of one request, inline for the usual few buffers so a request allocates nothing.
pub type Iovecs = SmallVec<[libc::iovec; 4]>;

/// The id [`Engine::reap`] reports for the completion of a [`Engine::watch`].
pub const WATCH_ID: usize = usize::MAX;

/// `FALLOC_FL_NO_HIDE_STALE`: with PUNCH_HOLE and KEEP_SIZE, a block device discards the range
/// (BLKDISCARD) instead of zeroing it.
pub const FALLOC_FL_NO_HIDE_STALE: libc::c_int = 0x04;

/// Errors setting up an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// io_uring_setup failed.
    #[error("io_uring is not available (io_uring_setup failed); run with --io-engine blocking")]
    Uring(#[source] io::Error),
}

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

/// What [`Engine::start`] did with an op.
#[derive(Debug)]
pub enum Started {
    /// It completed; the result is final.
    Done(io::Result<()>),
    /// It is in the kernel; its completion comes from [`Engine::reap`].
    Queued,
    /// `done` bytes completed at once; the rest is in the kernel (the op now describes it).
    Partly {
        /// Bytes transferred before the op was queued.
        done: u64,
    },
}

/// A read/write engine owned by one worker thread.
pub enum Engine {
    /// io_uring with its rings.
    Uring(Box<Uring>),
    /// Blocking syscalls.
    Blocking,
    /// No I/O: every op succeeds at once.
    Null,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Engine {
    /// Create the engine `kind` asks for, with room for `entries` requests in flight.
    pub fn new(kind: EngineKind, entries: u32) -> Result<Engine, EngineError> {
        let entries = entries.clamp(8, MAX_RING_ENTRIES).next_power_of_two();
        match kind {
            EngineKind::Blocking => Ok(Engine::Blocking),
            EngineKind::Null => Ok(Engine::Null),
            EngineKind::IoUring => Uring::new(entries)
                .map(|u| Engine::Uring(Box::new(u)))
                .map_err(EngineError::Uring),
            EngineKind::Auto => match Uring::new(entries) {
                Ok(u) => Ok(Engine::Uring(Box::new(u))),
                Err(e) => {
                    warn!("io_uring is not available ({e}); using blocking preadv/pwritev");
                    Ok(Engine::Blocking)
                }
            },
        }
    }

    /// Engine name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Uring(_) => "io_uring",
            Engine::Blocking => "blocking",
            Engine::Null => "null",
        }
    }

    /// True for the engine that does no I/O.
    pub fn is_null(&self) -> bool {
        matches!(self, Engine::Null)
    }

    /// Whether [`Engine::start`] can give reads to a second CPU (the helper ring's kernel
    /// thread). The helper is created on the first call.
    pub fn can_share(&mut self) -> bool {
        match self {
            Engine::Uring(u) => u.helper_ready(),
            Engine::Blocking | Engine::Null => false,
        }
    }

    /// Start `op`, tagged `id`; with `share`, a [`Op::shareable`] read goes to the helper
    /// ring.
    ///
    /// # Safety
    /// Unless the op completed ([`Started::Done`]), until its completion is reaped the op must
    /// not move or be dropped, and the memory its iovecs point to must stay mapped: the kernel
    /// reads and writes them asynchronously.
    pub unsafe fn start(&mut self, id: usize, op: &mut Op, share: bool) -> Started {
        match self {
            Engine::Blocking => Started::Done(run_blocking(op, 0)),
            Engine::Null => Started::Done(Ok(())),
            // SAFETY: forwarded from this function's contract.
            Engine::Uring(u) => unsafe { u.start(id, op, share) },
        }
    }

    /// Make the next [`Engine::reap`] with `wait` also return (with [`WATCH_ID`]) when `fd`
    /// becomes readable; false when this engine cannot wait on other descriptors (the caller
    /// then waits on them itself).
    pub fn watch(&mut self, fd: RawFd) -> bool {
        match self {
            Engine::Uring(u) => u.watch(fd),
            Engine::Blocking | Engine::Null => false,
        }
    }

    /// Hand every started op to the kernel.
    pub fn submit(&mut self) {
        if let Engine::Uring(u) = self {
            u.submit();
        }
    }

    /// Ops started and not reaped yet.
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(u) => u.in_flight(),
            Engine::Blocking | Engine::Null => 0,
        }
    }

    /// Ops given to the helper ring and not reaped yet.
    pub fn helper_in_flight(&self) -> usize {
        match self {
            Engine::Uring(u) => u.helper_in_flight(),
            Engine::Blocking | Engine::Null => 0,
        }
    }

    /// Append the completions available now as (id, result of the ring entry) to `out`; the
    /// caller passes each to [`finish`] with its op. With `wait`, block until there is at
    /// least one (when anything is in flight).
    pub fn reap(&mut self, out: &mut Vec<(usize, i32)>, wait: bool) {
        if let Engine::Uring(u) = self {
            u.reap(out, wait);
        }
    }

    /// Wait for every op in flight and drop their completions (for unwinding: the ops'
    /// buffers are about to go away).
    pub fn drain(&mut self) {
        let mut cqes = Vec::new();
        while self.in_flight() > 0 {
            cqes.clear();
            self.reap(&mut cqes, true);
        }
    }
}

/// What a reaped ring entry means for its op.
#[derive(Debug)]
pub enum Reaped {
    /// The op is complete.
    Done(io::Result<()>),
    /// The op needs a second step in the ring (the sync after a fallocate): start it again.
    Again,
}

/// The outcome `res` of the ring entry of `op`: short or refused transfers are finished with
/// blocking syscalls; a successful fallocate that must be durable becomes a sync (the caller
/// starts it again).
pub fn finish(op: &mut Op, res: i32) -> Reaped {
    if res < 0 {
        let err = -res;
        return Reaped::Done(match op.kind {
            _ if op.is_rw() && err == libc::EINVAL && op.fallback_fd != op.fd => {
                rw_blocking(op, op.fallback_fd, 0)
            }
            // EBADF: a polling ring refused the file (it only takes registered ones on some
            // kernels); the fd itself is open.
            _ if matches!(err, libc::EINTR | libc::EAGAIN | libc::EBADF) => run_blocking(op, 0),
            OpKind::Fallocate { .. } => fallocate_refused(op, io::Error::from_raw_os_error(err)),
            _ => Err(io::Error::from_raw_os_error(err)),
        });
    }
    match op.kind {
        OpKind::Read | OpKind::Write { .. } if (res as u64) < op.len => {
            // Short transfer: finish the rest synchronously.
            Reaped::Done(run_blocking(op, res as u64))
        }
        OpKind::Fallocate { sync: true, .. } => {
            *op = Op::sync(op.fd);
            Reaped::Again
        }
        _ => Reaped::Done(Ok(())),
    }
}

/// Complete `op` with blocking syscalls, `done` bytes of a read or write being already
/// transferred.
pub fn run_blocking(op: &Op, done: u64) -> io::Result<()> {
    match op.kind {
        OpKind::Read | OpKind::Write { .. } => match rw_blocking(op, op.fd, done) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && op.fallback_fd != op.fd => {
                debug!("O_DIRECT refused a request ({e}); retrying buffered");
                rw_blocking(op, op.fallback_fd, done)
            }
            r => r,
        },
        OpKind::Sync => fdatasync(op.fd),
        OpKind::Fallocate { mode, sync, .. } => {
            match fallocate(op.fd, mode, op.offset, op.len) {
                Ok(()) => {}
                Err(e) => fallocate_refused(op, e)?,
            }
            if sync {
                fdatasync(op.fd)?;
            }
            Ok(())
        }
    }
}

/// A fallocate failed with `e`: a mode the file system or device does not support becomes
/// what the op asks for; anything else stays an error.
fn fallocate_refused(op: &Op, e: io::Error) -> io::Result<()> {
    let OpKind::Fallocate {
        mode,
        sync,
        unsupported,
    } = op.kind
    else {
        return Err(e);
    };
    let refused = matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::ENODEV)
    );
    if !refused {
        return Err(e);
    }
    match unsupported {
        Unsupported::Ignore => {
            // A block device before fallocate support (Linux 4.9) still takes BLKDISCARD.
            if mode & FALLOC_FL_NO_HIDE_STALE != 0 {
                let range = [op.offset, op.len];
                // SAFETY: BLKDISCARD reads two u64 through the pointer, which points to a live
                // local; the fd is open. Failure is ignored: a discard is a hint.
                let _ = unsafe { blk_discard(op.fd, &range) };
            }
            Ok(())
        }
        Unsupported::WriteZeroes => {
            write_zero_buffers(op.fallback_fd, op.offset, op.len)?;
            if sync {
                fdatasync(op.fallback_fd)?;
            }
            Ok(())
        }
    }
}

nix::ioctl_write_ptr_bad!(blk_discard, nix::request_code_none!(0x12, 119), [u64; 2]);

/// fdatasync, retried on EINTR.
pub fn fdatasync(fd: RawFd) -> io::Result<()> {
    loop {
        // SAFETY: fdatasync on an fd the caller keeps open.
        if unsafe { libc::fdatasync(fd) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let l = libc::off64_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate on an fd the caller keeps open, with plain integer arguments.
        if unsafe { libc::fallocate64(fd, mode, off, l) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Write zero-filled buffers over `len` bytes at `offset` (file systems without
/// FALLOC_FL_ZERO_RANGE).
fn write_zero_buffers(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    // SAFETY: the fd is open for this call; ManuallyDrop keeps the File from closing it.
    let f = std::mem::ManuallyDrop::new(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        f.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
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

fn rw_blocking(op: &Op, fd: RawFd, mut done: u64) -> io::Result<()> {
    let (write, dsync) = match op.kind {
        OpKind::Write { dsync } => (true, dsync),
        _ => (false, false),
    };
    while done < op.len {
        let iov = advance(&op.iov, done);
        let cnt = iov.len().min(IOV_MAX) as libc::c_int;
        let off = libc::off64_t::try_from(op.offset + done)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        // SAFETY: every iovec points into guest memory that the caller keeps mapped until the
        // op completes, with the length of the guest buffer it came from; the fd is open.
        let n = unsafe {
            if write {
                libc::pwritev2(fd, iov.as_ptr(), cnt, off, flags)
            } else {
                libc::preadv2(fd, iov.as_ptr(), cnt, off, 0)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image ended before the request did (was it truncated?)",
            ));
        }
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;

    use super::*;

    impl Engine {
        /// Run every op to completion and return their results.
        fn run(&mut self, ops: &mut [Op]) -> Vec<io::Result<()>> {
            let mut results: Vec<Option<io::Result<()>>> = ops.iter().map(|_| None).collect();
            let mut cqes = Vec::new();
            for (i, op) in ops.iter_mut().enumerate() {
                // SAFETY: every op started here is reaped below before this function returns,
                // and `ops` is borrowed for the whole call, so no op moves or is dropped.
                if let Started::Done(r) = unsafe { self.start(i, op, false) } {
                    results[i] = Some(r);
                }
            }
            self.submit();
            while self.in_flight() > 0 {
                cqes.clear();
                self.reap(&mut cqes, true);
                for &(i, res) in &cqes {
                    match finish(&mut ops[i], res) {
                        Reaped::Done(r) => results[i] = Some(r),
                        // SAFETY: as above.
                        Reaped::Again => match unsafe { self.start(i, &mut ops[i], false) } {
                            Started::Done(r) => results[i] = Some(r),
                            _ => self.submit(),
                        },
                    }
                }
            }
            results.into_iter().map(Option::unwrap).collect()
        }
    }

    fn rw(fd: RawFd, write: bool, offset: u64, iov: Iovecs, buffered: bool) -> Op {
        let len = iov.iter().map(|v| v.iov_len as u64).sum();
        Op {
            kind: if write {
                OpKind::Write { dsync: false }
            } else {
                OpKind::Read
            },
            fd,
            fallback_fd: fd,
            offset,
            len,
            iov,
            buffered,
        }
    }

    fn roundtrip(kind: EngineKind, buffered: bool) {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let fd = f.as_raw_fd();
        let mut engine = Engine::new(kind, 16).unwrap();
        let mut a = vec![1u8; 1000];
        let mut b = vec![2u8; 3096];
        let iov = smallvec::smallvec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        let r = engine.run(&mut [rw(fd, true, 512, iov, buffered)]);
        r.into_iter().next().unwrap().unwrap();
        let mut back = vec![0u8; 8192];
        let iov = smallvec::smallvec![libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: back.len(),
        }];
        let r = engine.run(&mut [rw(fd, false, 0, iov, buffered), Op::sync(fd)]);
        assert!(r.iter().all(Result::is_ok), "{r:?}");
        assert!(back[..512].iter().all(|&x| x == 7));
        assert!(back[512..1512].iter().all(|&x| x == 1));
        assert!(back[1512..4608].iter().all(|&x| x == 2));
        assert!(back[4608..].iter().all(|&x| x == 7));
        // Reading past the end is an error, not a hang.
        let iov = smallvec::smallvec![libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: 1024,
        }];
        let r = engine.run(&mut [rw(fd, false, 8192 - 512, iov, buffered)]);
        assert!(r[0].is_err());
        // Zero a range (and sync it), punch a hole: both read back as zeroes.
        let fall = |mode, offset, unsupported| Op {
            kind: OpKind::Fallocate {
                mode,
                sync: true,
                unsupported,
            },
            offset,
            len: 1024,
            ..Op::sync(fd)
        };
        let r = engine.run(&mut [
            fall(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                Unsupported::WriteZeroes,
            ),
            fall(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                4096,
                Unsupported::Ignore,
            ),
        ]);
        assert!(r.iter().all(Result::is_ok), "{r:?}");
        let mut all = vec![0u8; 8192];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut all, 0).unwrap();
        assert!(all[..1024].iter().all(|&x| x == 0));
        assert!(all[4096..5120].iter().all(|&x| x == 0));
        assert!(all[5120..].iter().all(|&x| x == 7));
    }

    #[test]
    fn blocking_roundtrip() {
        roundtrip(EngineKind::Blocking, true);
    }

    #[test]
    fn uring_roundtrip() {
        match Engine::new(EngineKind::IoUring, 16) {
            Ok(_) => {
                // Through the ring, and inline (page cache) first.
                roundtrip(EngineKind::IoUring, false);
                roundtrip(EngineKind::IoUring, true);
            }
            Err(e) => vloop_frontend::skip::skip(&format!("io_uring unavailable here: {e}")),
        }
    }

    #[test]
    fn zero_range_refused_falls_back_to_zero_buffers() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        let op = Op {
            kind: OpKind::Fallocate {
                mode: libc::FALLOC_FL_ZERO_RANGE,
                sync: false,
                unsupported: Unsupported::WriteZeroes,
            },
            offset: 512,
            len: 1024,
            ..Op::sync(f.as_raw_fd())
        };
        fallocate_refused(&op, io::Error::from_raw_os_error(libc::EOPNOTSUPP)).unwrap();
        let mut all = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut all, 0).unwrap();
        assert!(all[512..1536].iter().all(|&x| x == 0));
        assert!(all[..512].iter().chain(&all[1536..]).all(|&x| x == 7));
        // Other errors stay errors; a refused discard is a success.
        assert!(fallocate_refused(&op, io::Error::from_raw_os_error(libc::EIO)).is_err());
        let discard = Op {
            kind: OpKind::Fallocate {
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                sync: false,
                unsupported: Unsupported::Ignore,
            },
            ..op
        };
        assert!(fallocate_refused(&discard, io::Error::from_raw_os_error(libc::ENOTTY)).is_ok());
    }

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
