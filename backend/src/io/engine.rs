//! I/O engines: io_uring (the default), blocking syscalls (the fallback when io_uring cannot
//! be set up, e.g. on old kernels or under a seccomp policy that forbids it), and a null engine
//! that does no I/O at all (to measure the vhost-user hop itself).
//!
//! An engine runs [`Op`]s: vectored reads and writes whose iovecs point straight into guest
//! memory, data syncs and fallocate calls. [`Engine::start`] says what happened to an op: it
//! completed at once ([`Started::Done`]), went to the kernel ([`Started::Queued`]), or partly
//! completed with the rest queued ([`Started::Partly`]); queued ops complete through
//! [`Engine::reap`] and [`finish`](super::blocking::finish), tagged with the caller's id, so a
//! worker keeps popping and completing requests while others are in flight. The operations
//! themselves are described in [`super::op`].

use std::io;
use std::os::fd::RawFd;

use tracing::warn;

use super::blocking::run_blocking;
use super::op::{Op, Started};
use super::uring::Uring;
use crate::config::EngineKind;

/// Largest io_uring submission queue an engine asks for (a queue never has more requests in
/// flight than its size, and the kernel caps rings at 32768 entries).
pub const MAX_RING_ENTRIES: u32 = 4096;

/// Errors setting up an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// io_uring_setup failed.
    #[error("io_uring is not available (io_uring_setup failed); run with --io-engine blocking")]
    Uring(#[source] io::Error),
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

    /// Whether the op started next is all the queue has to do (see
    /// [`Uring::set_alone`]).
    pub fn set_alone(&mut self, alone: bool) {
        if let Engine::Uring(u) = self {
            u.set_alone(alone);
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

    /// Make the next [`Engine::reap`] with `wait` also return (with [`WATCH_ID`](super::op::WATCH_ID)) when `fd`
    /// becomes readable; false when this engine cannot wait on other descriptors (the caller
    /// then waits on them itself).
    pub fn watch(&mut self, fd: RawFd) -> bool {
        match self {
            Engine::Uring(u) => u.watch(fd),
            Engine::Blocking | Engine::Null => false,
        }
    }

    /// Make [`Engine::reap`] with `wait` also return (with
    /// [`DOORBELL_ID`](super::op::DOORBELL_ID)) whenever the queue's kick eventfd `fd` is
    /// written (a multishot poll, armed until [`Engine::unwatch_doorbell`] or a new `fd`; a
    /// kick already there rings once at once); false when this engine cannot.
    pub fn watch_doorbell(&mut self, fd: RawFd) -> bool {
        match self {
            Engine::Uring(u) => u.watch_doorbell(fd),
            Engine::Blocking | Engine::Null => false,
        }
    }

    /// Cancel the poll [`Engine::watch_doorbell`] armed, if any.
    pub fn unwatch_doorbell(&mut self) {
        if let Engine::Uring(u) = self {
            u.unwatch_doorbell();
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

    /// Inline writes that slept in the file system, and the time they took, since the last
    /// call.
    pub fn take_slow_writes(&mut self) -> (u64, std::time::Duration) {
        match self {
            Engine::Uring(u) => u.take_slow_writes(),
            Engine::Blocking | Engine::Null => (0, std::time::Duration::ZERO),
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
    /// caller passes each to [`finish`](super::blocking::finish) with its op. With `wait`, block until there is at
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;

    use super::*;
    use crate::io::blocking::{finish, Reaped};
    use crate::io::op::{Iovecs, OpKind, Unsupported};

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
}
