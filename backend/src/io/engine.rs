//! Read/write engines: io_uring (the default) and blocking preadv/pwritev (the fallback when
//! io_uring cannot be set up, e.g. on old kernels or under a seccomp policy that forbids it).
//!
//! An engine starts [`RwOp`]s whose iovecs point straight into guest memory and reports their
//! completions by the caller's id, so a worker keeps popping and completing requests while
//! others are in flight.

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

/// Largest buffered write done inline. A larger one goes to the ring (an io-wq worker copies
/// it): the worker keeps serving its other requests meanwhile instead of waiting for a long
/// copy, and the file system's write lock is handed from one write to the next without a gap.
const INLINE_WRITE_MAX: u64 = 64 * 1024;

/// Longest wait for the helper ring while the worker ring has ops in flight too.
const HELPER_WAIT: std::time::Duration = std::time::Duration::from_micros(100);

/// How long the helper ring's kernel thread keeps polling for work after its last request
/// before it sleeps (io_uring counts this in milliseconds, rounded up to a scheduler tick).
const HELPER_IDLE_MS: u32 = 1;

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
    /// Buffers; each points into mapped guest memory that stays mapped until the op completes.
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

impl RwOp {
    /// A buffered read that a page-cache copy on another CPU can serve.
    pub fn shareable(&self) -> bool {
        !self.write
            && self.buffered
            && self.result.is_none()
            && self.len > 0
            && self.iov.len() <= IOV_MAX
    }
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
        let entries = entries.clamp(8, 4096).next_power_of_two();
        match kind {
            EngineKind::Blocking => Ok(Engine::Blocking),
            EngineKind::Null => Ok(Engine::Null),
            EngineKind::IoUring => IoUring::new(entries)
                .map(|r| Engine::Uring(Box::new(Uring::new(r, entries))))
                .map_err(EngineError::Uring),
            EngineKind::Auto => match IoUring::new(entries) {
                Ok(r) => Ok(Engine::Uring(Box::new(Uring::new(r, entries)))),
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

    /// Whether [`Engine::start`] can give reads to a second CPU (the helper ring's kernel
    /// thread). The helper is created on the first call.
    pub fn can_share(&mut self) -> bool {
        match self {
            Engine::Uring(u) => u.helper().is_some(),
            Engine::Blocking | Engine::Null => false,
        }
    }

    /// Start `op`, tagged `id`; with `share`, a [`RwOp::shareable`] read goes to the helper
    /// ring. Returns true when the op completed already (its `result` is set); otherwise its
    /// completion comes from [`Engine::reap`] once [`Engine::submit`] handed it to the kernel.
    ///
    /// # Safety
    /// Until its completion is reaped, `op` must not move or be dropped, and the memory its
    /// iovecs point to must stay mapped: the kernel reads and writes them asynchronously.
    pub unsafe fn start(&mut self, id: usize, op: &mut RwOp, share: bool) -> bool {
        match self {
            Engine::Blocking => {
                op.result = Some(finish_blocking(op, 0));
                true
            }
            Engine::Null => {
                op.result = Some(Ok(()));
                true
            }
            // SAFETY: forwarded from this function's contract.
            Engine::Uring(u) => unsafe { u.start(id, op, share) },
        }
    }

    /// True for the engine that does no I/O.
    pub fn is_null(&self) -> bool {
        matches!(self, Engine::Null)
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
            Engine::Uring(u) => u.pending + u.helper_pending,
            Engine::Blocking | Engine::Null => 0,
        }
    }

    /// Ops given to the helper ring and not reaped yet.
    pub fn helper_in_flight(&self) -> usize {
        match self {
            Engine::Uring(u) => u.helper_pending,
            Engine::Blocking | Engine::Null => 0,
        }
    }

    /// Append the completions available now as (id, result of the ring entry) to `out`; the
    /// caller passes each to [`complete`] with its op. With `wait`, block until there is at
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
    /// A second ring with a kernel submission thread (SQPOLL), created when first asked for:
    /// page-cache copies are CPU work, and with more than one CPU that thread copies the reads
    /// given to it on another CPU while the worker copies others and completes requests.
    helper: Helper,
    /// RWF_NOWAIT reads are supported on this image.
    nowait_read: bool,
    /// RWF_NOWAIT writes are supported on this image.
    nowait_write: bool,
    /// Ring size.
    entries: u32,
    /// Entries pushed on `ring` and not reaped yet.
    pending: usize,
    /// Entries pushed on the helper ring and not reaped yet.
    helper_pending: usize,
}

/// The helper ring, once its creation was tried.
enum Helper {
    /// Not asked for yet.
    Untried,
    /// Polling ring.
    Ready(Box<IoUring>),
    /// One CPU only, or the kernel refused SQPOLL: every op stays on the worker's ring.
    Unavailable,
}

impl Uring {
    fn new(ring: IoUring, entries: u32) -> Uring {
        Uring {
            ring,
            helper: Helper::Untried,
            nowait_read: true,
            nowait_write: true,
            entries,
            pending: 0,
            helper_pending: 0,
        }
    }

    /// The helper ring, created on first use.
    fn helper(&mut self) -> Option<&mut IoUring> {
        if matches!(self.helper, Helper::Untried) {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            self.helper = if cpus < 2 {
                Helper::Unavailable
            } else {
                match IoUring::builder()
                    .setup_sqpoll(HELPER_IDLE_MS)
                    .build(self.entries)
                {
                    // Before Linux 5.11 an SQPOLL ring only takes registered files.
                    Ok(r) if r.params().is_feature_sqpoll_nonfixed() => Helper::Ready(Box::new(r)),
                    Ok(_) => {
                        debug!(
                            "io_uring SQPOLL needs registered files here; reads stay on one CPU"
                        );
                        Helper::Unavailable
                    }
                    Err(e) => {
                        debug!("no io_uring submission thread ({e}); reads stay on one CPU");
                        Helper::Unavailable
                    }
                }
            };
        }
        match &mut self.helper {
            Helper::Ready(r) => Some(r),
            _ => None,
        }
    }

    /// Start an op: shared reads go to the helper ring; buffered reads whose data is in the
    /// page cache complete inline with RWF_NOWAIT (no io_uring round trip, no io-wq worker);
    /// buffered writes up to [`INLINE_WRITE_MAX`] complete inline too (with RWF_NOWAIT where
    /// the file system supports it, else with a plain pwritev2: io_uring would hand them to an
    /// io-wq worker, which measured at about twice the CPU per 4 KiB write on ext4).
    /// Everything else (O_DIRECT, cache misses, larger writes, writethrough writes) goes to
    /// the ring.
    ///
    /// # Safety
    /// As [`Engine::start`].
    unsafe fn start(&mut self, id: usize, op: &mut RwOp, share: bool) -> bool {
        if share && op.shareable() {
            let entry = readv_entry(op, id);
            if let Some(helper) = self.helper() {
                // SAFETY: the caller keeps the op and its buffers in place until it is reaped.
                if unsafe { helper.submission().push(&entry) }.is_ok() {
                    self.helper_pending += 1;
                    return false;
                }
            }
        }
        self.try_inline(op);
        if op.result.is_some() {
            return true;
        }
        if op.iov.len() > IOV_MAX {
            // Too many pieces for one syscall: the blocking path splits them.
            op.result = Some(finish_blocking(op, 0));
            return true;
        }
        let entry = rw_entry(op, id);
        for _ in 0..2 {
            // SAFETY: the caller keeps the op and its buffers in place until it is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.pending += 1;
                return false;
            }
            // The submission queue is full: hand it to the kernel and try once more.
            self.submit();
        }
        op.result = Some(finish_blocking(op, 0));
        true
    }

    /// Hand pushed entries to the kernel (the helper's thread only needs a wake-up call when
    /// it fell asleep).
    fn submit(&mut self) {
        if !self.ring.submission().is_empty() {
            if let Err(e) = self.ring.submit() {
                // Left in the queue: the next wait submits them again.
                debug!("io_uring submit: {e}");
            }
        }
        if let Helper::Ready(helper) = &mut self.helper {
            if !helper.submission().is_empty() {
                if let Err(e) = helper.submit() {
                    // Its thread still takes what is in the queue.
                    debug!("io_uring helper wake-up: {e}");
                }
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<(usize, i32)>, wait: bool) {
        let before = out.len();
        self.collect(out);
        if !wait || out.len() > before || self.pending + self.helper_pending == 0 {
            return;
        }
        // Wait where the quick completions are: the helper's page-cache copies finish within
        // microseconds, the worker ring's ops may take a disk's time. While both have ops,
        // the wait on the helper is short, so a helper read that missed the cache does not
        // hold up the worker ring's completions.
        let waited = match &mut self.helper {
            Helper::Ready(helper) if self.helper_pending > 0 && self.pending > 0 => {
                let ts = types::Timespec::from(HELPER_WAIT);
                helper
                    .submitter()
                    .submit_with_args(1, &types::SubmitArgs::new().timespec(&ts))
            }
            Helper::Ready(helper) if self.helper_pending > 0 => helper.submit_and_wait(1),
            _ => self.ring.submit_and_wait(1),
        };
        match waited {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::ETIME)
                ) => {}
            Err(e) => {
                // Entries already in the kernel must still be reaped; do not spin.
                warn!("io_uring wait failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        self.collect(out);
    }

    fn collect(&mut self, out: &mut Vec<(usize, i32)>) {
        let before = out.len();
        out.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        self.pending -= out.len() - before;
        if let Helper::Ready(helper) = &mut self.helper {
            let mid = out.len();
            out.extend(
                helper
                    .completion()
                    .map(|c| (c.user_data() as usize, c.result())),
            );
            self.helper_pending -= out.len() - mid;
        }
    }

    fn try_inline(&mut self, op: &mut RwOp) {
        if !op.buffered || op.iov.len() > IOV_MAX || op.len == 0 {
            return;
        }
        if op.write && op.dsync {
            return;
        }
        if op.write && op.len > INLINE_WRITE_MAX {
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

/// The ring entry for `op`, tagged `id`.
fn rw_entry(op: &RwOp, id: usize) -> io_uring::squeue::Entry {
    if op.write {
        opcode::Writev::new(types::Fd(op.fd), op.iov.as_ptr(), op.iov.len() as u32)
            .offset(op.offset)
            .rw_flags(if op.dsync { libc::RWF_DSYNC } else { 0 })
            .build()
            .user_data(id as u64)
    } else {
        readv_entry(op, id)
    }
}

fn readv_entry(op: &RwOp, id: usize) -> io_uring::squeue::Entry {
    opcode::Readv::new(types::Fd(op.fd), op.iov.as_ptr(), op.iov.len() as u32)
        .offset(op.offset)
        .build()
        .user_data(id as u64)
}

/// Record the outcome `res` of a ring entry for `op`, finishing short or refused transfers
/// with blocking syscalls.
pub fn complete(op: &mut RwOp, res: i32) {
    op.result = Some(if res < 0 {
        let e = io::Error::from_raw_os_error(-res);
        if -res == libc::EINVAL && op.fallback_fd != op.fd {
            rw_blocking(op, op.fallback_fd, 0)
        } else if -res == libc::EINTR || -res == libc::EAGAIN || -res == libc::EBADF {
            // EBADF: a polling ring refused the file (it only takes registered ones on some
            // kernels); the fd itself is open.
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;

    use super::*;

    impl Engine {
        /// Run every op to completion; each op's `result` is set.
        fn run(&mut self, ops: &mut [RwOp]) {
            let mut cqes = Vec::new();
            for (i, op) in ops.iter_mut().enumerate() {
                // SAFETY: every op started here is reaped below before this function returns, and
                // `ops` is borrowed for the whole call, so no op moves or is dropped meanwhile.
                unsafe { self.start(i, op, false) };
            }
            self.submit();
            while self.in_flight() > 0 {
                cqes.clear();
                self.reap(&mut cqes, true);
                for &(i, res) in &cqes {
                    if let Some(op) = ops.get_mut(i) {
                        complete(op, res);
                    }
                }
            }
        }
    }

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
