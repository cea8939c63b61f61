//! Read/write engines: io_uring (the default) and blocking preadv/pwritev (the fallback when
//! io_uring cannot be set up, e.g. on old kernels or under a seccomp policy that forbids it).
//!
//! Both take a batch of [`RwOp`]s whose iovecs point straight into guest memory and complete all
//! of them before returning, so the caller may release the memory guard afterwards.

use std::io;
use std::os::unix::io::RawFd;

use io_uring::{opcode, types, IoUring};
use smallvec::SmallVec;
use tracing::{debug, warn};

use crate::config::EngineKind;

/// Most iovecs one preadv/pwritev takes (IOV_MAX on Linux).
pub const IOV_MAX: usize = 1024;

/// The iovecs of one request, inline for the usual few buffers so a request allocates nothing.
pub type Iovecs = SmallVec<[libc::iovec; 4]>;

/// Errors setting up an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// io_uring_setup failed.
    #[error("io_uring is not available (io_uring_setup failed); run with --io-engine blocking")]
    Uring(#[source] io::Error),
}

/// One vectored read or write.
#[derive(Debug)]
pub struct RwOp {
    /// Write (true) or read.
    pub write: bool,
    /// fd to use.
    pub fd: RawFd,
    /// Buffered fd to retry on when an O_DIRECT request is refused with EINVAL.
    pub fallback_fd: RawFd,
    /// Byte offset in the image.
    pub offset: u64,
    /// Buffers; each points into mapped guest memory that stays mapped until the batch ends.
    pub iov: Iovecs,
    /// Sum of the iovec lengths.
    pub len: u64,
    /// Write with RWF_DSYNC (writethrough cache mode).
    pub dsync: bool,
    /// `fd` goes through the page cache (not O_DIRECT): worth trying without blocking first.
    pub buffered: bool,
    /// Outcome, filled in by the engine.
    pub result: Option<io::Result<()>>,
}

/// A read/write engine owned by one worker thread.
pub enum Engine {
    /// io_uring with its rings.
    Uring(Box<Uring>),
    /// Blocking syscalls.
    Blocking,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Engine {
    /// Create the engine `kind` asks for, with room for `entries` requests in flight.
    pub fn new(kind: EngineKind, entries: u32) -> Result<Engine, EngineError> {
        let entries = entries.clamp(8, 4096).next_power_of_two();
        match kind {
            EngineKind::Blocking => Ok(Engine::Blocking),
            EngineKind::IoUring => IoUring::new(entries)
                .map(|r| Engine::Uring(Box::new(Uring::new(r))))
                .map_err(EngineError::Uring),
            EngineKind::Auto => match IoUring::new(entries) {
                Ok(r) => Ok(Engine::Uring(Box::new(Uring::new(r)))),
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
        }
    }

    /// Run every op to completion; each op's `result` is set.
    pub fn run(&mut self, ops: &mut [RwOp]) {
        match self {
            Engine::Blocking => {
                for op in ops.iter_mut() {
                    op.result = Some(finish_blocking(op, 0));
                }
            }
            Engine::Uring(u) => u.run(ops),
        }
    }
}

/// Complete `op` with blocking syscalls, `done` bytes being already transferred.
fn finish_blocking(op: &RwOp, done: u64) -> io::Result<()> {
    match rw_blocking(op, op.fd, done) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && op.fallback_fd != op.fd => {
            debug!("O_DIRECT refused a request ({e}); retrying buffered");
            rw_blocking(op, op.fallback_fd, done)
        }
        r => r,
    }
}

/// The iovecs of `iov` after skipping `skip` bytes.
fn advance(iov: &[libc::iovec], mut skip: u64) -> Iovecs {
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

fn rw_blocking(op: &RwOp, fd: RawFd, mut done: u64) -> io::Result<()> {
    while done < op.len {
        let iov = advance(&op.iov, done);
        let cnt = iov.len().min(IOV_MAX) as libc::c_int;
        let off = libc::off64_t::try_from(op.offset + done)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let flags = if op.dsync { libc::RWF_DSYNC } else { 0 };
        // SAFETY: every iovec points into guest memory that the caller keeps mapped for the
        // whole batch, with the length of the guest buffer it came from; the fd is open.
        let n = unsafe {
            if op.write {
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

/// io_uring state of one worker thread.
pub struct Uring {
    ring: IoUring,
    /// RWF_NOWAIT reads are supported on this image.
    nowait_read: bool,
    /// RWF_NOWAIT writes are supported on this image.
    nowait_write: bool,
    /// Completions of one wait (user data, result), kept to reuse its capacity.
    cqes: Vec<(usize, i32)>,
}

impl Uring {
    fn new(ring: IoUring) -> Uring {
        Uring {
            ring,
            nowait_read: true,
            nowait_write: true,
            cqes: Vec::new(),
        }
    }

    /// Run a batch: buffered reads whose data is in the page cache complete inline with
    /// RWF_NOWAIT (no io_uring round trip, no io-wq worker); buffered writes complete inline
    /// too (with RWF_NOWAIT where the file system supports it, else with a plain pwritev2:
    /// io_uring would hand them to an io-wq worker and the batch waits for them anyway, which
    /// measured at about twice the CPU per write on ext4). Everything else (O_DIRECT, cache
    /// misses, writethrough writes) goes to the ring, all at once.
    fn run(&mut self, ops: &mut [RwOp]) {
        for op in ops.iter_mut() {
            self.try_inline(op);
        }
        run_uring(&mut self.ring, ops, &mut self.cqes);
    }

    fn try_inline(&mut self, op: &mut RwOp) {
        if !op.buffered || op.iov.len() > IOV_MAX || op.len == 0 {
            return;
        }
        if op.write && op.dsync {
            return;
        }
        if op.write && !self.nowait_write {
            op.result = Some(finish_blocking(op, 0));
            return;
        }
        if !op.write && !self.nowait_read {
            return;
        }
        let Ok(off) = libc::off64_t::try_from(op.offset) else {
            return;
        };
        // SAFETY: every iovec points into guest memory that the caller keeps mapped for the
        // whole batch, with the length of the guest buffer it came from; the fd is open.
        let n = unsafe {
            if op.write {
                libc::pwritev2(
                    op.fd,
                    op.iov.as_ptr(),
                    op.iov.len() as libc::c_int,
                    off,
                    libc::RWF_NOWAIT,
                )
            } else {
                libc::preadv2(
                    op.fd,
                    op.iov.as_ptr(),
                    op.iov.len() as libc::c_int,
                    off,
                    libc::RWF_NOWAIT,
                )
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error().raw_os_error();
            if matches!(e, Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)) {
                // Not supported here: stop trying for this direction.
                if op.write {
                    self.nowait_write = false;
                    op.result = Some(finish_blocking(op, 0));
                } else {
                    self.nowait_read = false;
                }
            }
            return;
        }
        let n = n as u64;
        if n >= op.len {
            op.result = Some(Ok(()));
        } else if n > 0 {
            // Partly cached: the ring does the rest.
            op.iov = advance(&op.iov, n);
            op.offset += n;
            op.len -= n;
        }
    }
}

fn run_uring(ring: &mut IoUring, ops: &mut [RwOp], cqes: &mut Vec<(usize, i32)>) {
    let n = ops.len();
    let mut next = 0usize;
    let mut in_flight = 0usize;
    let mut completed = 0usize;
    while completed < n {
        // Queue as many as fit.
        {
            let mut sq = ring.submission();
            while next < n {
                if ops[next].result.is_some() {
                    // Completed inline.
                    next += 1;
                    completed += 1;
                    continue;
                }
                if ops[next].iov.len() > IOV_MAX {
                    // Too many pieces for one syscall: the blocking path splits them.
                    ops[next].result = Some(finish_blocking(&ops[next], 0));
                    next += 1;
                    completed += 1;
                    continue;
                }
                let op = &ops[next];
                let fd = types::Fd(op.fd);
                let cnt = op.iov.len() as u32;
                let entry = if op.write {
                    opcode::Writev::new(fd, op.iov.as_ptr(), cnt)
                        .offset(op.offset)
                        .rw_flags(if op.dsync { libc::RWF_DSYNC } else { 0 })
                        .build()
                } else {
                    opcode::Readv::new(fd, op.iov.as_ptr(), cnt)
                        .offset(op.offset)
                        .build()
                }
                .user_data(next as u64);
                // SAFETY: the iovec array and the guest buffers it points to live until this
                // function returns, and it returns only after every submitted entry completed.
                if unsafe { sq.push(&entry) }.is_err() {
                    break;
                }
                next += 1;
                in_flight += 1;
            }
        }
        if in_flight == 0 {
            continue;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) => {}
            Err(e) => {
                // Entries already in the kernel must still be reaped before returning; keep
                // trying, but do not spin.
                warn!("io_uring submit failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        cqes.clear();
        cqes.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for &(i, res) in cqes.iter() {
            let Some(op) = ops.get_mut(i) else { continue };
            in_flight -= 1;
            completed += 1;
            op.result = Some(if res < 0 {
                let e = io::Error::from_raw_os_error(-res);
                if -res == libc::EINVAL && op.fallback_fd != op.fd {
                    rw_blocking(op, op.fallback_fd, 0)
                } else if -res == libc::EINTR || -res == libc::EAGAIN {
                    finish_blocking(op, 0)
                } else {
                    Err(e)
                }
            } else if (res as u64) < op.len {
                // Short transfer: finish the rest synchronously.
                finish_blocking(op, res as u64)
            } else {
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;

    use super::*;

    fn roundtrip(kind: EngineKind, buffered: bool) {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let mut engine = Engine::new(kind, 16).unwrap();
        let mut a = vec![1u8; 1000];
        let mut b = vec![2u8; 3096];
        let mut ops = vec![RwOp {
            write: true,
            fd: f.as_raw_fd(),
            fallback_fd: f.as_raw_fd(),
            offset: 512,
            iov: smallvec::smallvec![
                libc::iovec {
                    iov_base: a.as_mut_ptr().cast(),
                    iov_len: a.len(),
                },
                libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                },
            ],
            len: 4096,
            dsync: false,
            buffered,
            result: None,
        }];
        engine.run(&mut ops);
        ops[0].result.take().unwrap().unwrap();
        let mut back = vec![0u8; 8192];
        let mut ops = vec![RwOp {
            write: false,
            fd: f.as_raw_fd(),
            fallback_fd: f.as_raw_fd(),
            offset: 0,
            iov: smallvec::smallvec![libc::iovec {
                iov_base: back.as_mut_ptr().cast(),
                iov_len: back.len(),
            }],
            len: 8192,
            dsync: false,
            buffered,
            result: None,
        }];
        engine.run(&mut ops);
        ops[0].result.take().unwrap().unwrap();
        assert!(back[..512].iter().all(|&x| x == 7));
        assert!(back[512..1512].iter().all(|&x| x == 1));
        assert!(back[1512..4608].iter().all(|&x| x == 2));
        assert!(back[4608..].iter().all(|&x| x == 7));
        // Reading past the end is an error, not a hang.
        let mut ops = vec![RwOp {
            write: false,
            fd: f.as_raw_fd(),
            fallback_fd: f.as_raw_fd(),
            offset: 8192 - 512,
            iov: smallvec::smallvec![libc::iovec {
                iov_base: back.as_mut_ptr().cast(),
                iov_len: 1024,
            }],
            len: 1024,
            dsync: false,
            buffered,
            result: None,
        }];
        engine.run(&mut ops);
        assert!(ops[0].result.take().unwrap().is_err());
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
            Err(e) => eprintln!("SKIPPED: io_uring unavailable here: {e}"),
        }
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
