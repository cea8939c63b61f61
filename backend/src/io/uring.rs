//! The io_uring engine of one worker thread: its ring, and a second ring with a kernel
//! submission thread (SQPOLL) that copies page-cache reads on another CPU while the worker
//! copies others and completes requests.
//!
//! Buffered reads under 256 KiB whose data is in the page cache and buffered writes up to
//! 4 MiB complete inline (no ring round trip, no io-wq worker); larger reads go to io-wq
//! workers, which copy them in parallel; everything else (O_DIRECT, cache misses,
//! larger and write-through writes, syncs, fallocate) goes to the ring. Where the file system
//! cannot say that a write would block (no RWF_NOWAIT, as on ext4), a write over 64 KiB that
//! slept there (dirty-page throttling, the journal, the inode lock) sends such writes back to
//! the ring for a while, so that the worker does not sleep with them.

use std::io;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use tracing::{debug, warn};

use super::blocking::run_blocking;
use super::op::{
    advance, Op, OpKind, Started, DOORBELL_CANCEL_ID, DOORBELL_ID, DOORBELL_POLLS, IOV_MAX,
    WATCH_ID,
};

/// Largest buffered write done inline. io_uring hands the buffered writes of one file to one
/// io-wq worker at a time, so the ring adds no parallelism to them, only a hand-off to that
/// worker and a wake-up of this one per write: copied by the worker itself, 1 MiB writes ran
/// 8-11% faster at QD8 and 32-58% at QD1, with a quarter less CPU per write. A larger write
/// goes to the ring, so that one op cannot hold the queue for long.
const INLINE_WRITE_MAX: u64 = 4 << 20;

/// Smallest buffered read handed to an io-wq worker (IOSQE_ASYNC) instead of being copied by
/// the queue's worker: io-wq copies several such reads at once on every CPU, as a thread pool
/// does, while one copied inline holds the worker for its whole length. Side by side on 2
/// CPUs, 1 MiB page-cache reads at QD8 ran at 15.8k IOPS against 10.5k copied inline in one
/// pair of runs and at 7.6k against 6.7k, both 1.01x qemu-storage-daemon, in another; the
/// hand-off costs the backend 20-25% more CPU per read. A read that is the queue's only work
/// ([`Uring::set_alone`]: queue depth 1) has nothing to overlap with and is still tried
/// inline, without the hand-off: 1 MiB reads at QD1 ran at 1.10-1.31x qemu-storage-daemon
/// with 0.98-1.00x its CPU per read, against 0.93-1.02x and 1.10-1.19x handed off.
const RING_READ_MIN: u64 = 256 << 10;

/// Whether `op` is a buffered read that goes to io-wq ([`RING_READ_MIN`]) when it is on the
/// ring; [`Uring::try_inline`] still tries it first when it is the queue's only work.
fn io_wq_read(op: &Op) -> bool {
    op.kind == OpKind::Read && op.buffered && op.len >= RING_READ_MIN
}

/// Largest buffered write always done inline, also while [`WriteBackoff`] sends the larger
/// ones to the ring: a copy of this size costs the queue little, and io-wq costs it more.
const INLINE_WRITE_SMALL: u64 = 64 * 1024;

/// A blocking inline write that slept (a voluntary context switch) and took longer than this
/// plus its copy at [`COPY_BYTES_PER_SEC`] waited in the file system rather than copied.
const SLOW_WRITE: Duration = Duration::from_millis(1);

/// Slowest page-cache copy rate assumed for [`SLOW_WRITE`].
const COPY_BYTES_PER_SEC: u64 = 1 << 30;

/// How long writes over [`INLINE_WRITE_SMALL`] go to the ring after one slept; doubled when
/// the first one after that period sleeps too, up to [`RING_WRITES_MAX`], and back to this
/// after one that did not.
const RING_WRITES_MIN: Duration = Duration::from_secs(1);
/// Longest such period.
const RING_WRITES_MAX: Duration = Duration::from_secs(64);

/// Longest wait for the helper ring while the worker ring has ops in flight too.
const HELPER_WAIT: std::time::Duration = std::time::Duration::from_micros(100);

/// How long the helper ring's kernel thread keeps polling for work after its last request
/// before it sleeps (io_uring counts this in milliseconds, rounded up to a scheduler tick).
const HELPER_IDLE_MS: u32 = 1;

/// io_uring state of one worker thread.
pub struct Uring {
    ring: IoUring,
    /// The helper ring, created when first asked for: page-cache copies are CPU work, and with
    /// more than one CPU its kernel thread copies the reads given to it on another CPU.
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
    /// A poll of a watched descriptor is on the ring (not counted in `pending`).
    watching: bool,
    /// The descriptor whose doorbell poll is on the ring, with the poll's id (not counted
    /// in `pending`).
    doorbell: Option<(libc::c_int, usize)>,
    /// Doorbell polls armed so far (wrapping): each poll has its own id, so a cancelled one
    /// that completes late is not taken for the current one.
    doorbell_arms: u16,
    /// Doorbell polls cancelled whose last completion is still to come.
    doorbell_stale: usize,
    /// The kernel refused a doorbell poll: not armed again.
    doorbell_broken: bool,
    /// The ops started next are the queue's only work ([`Uring::set_alone`]). It also holds
    /// for the restarts of a short read until the next launch: when it is set nothing else
    /// is in flight, so those restarts are of that same request.
    alone: bool,
    /// Whether blocking inline writes over [`INLINE_WRITE_SMALL`] are done inline now.
    backoff: WriteBackoff,
    /// Blocking inline writes that slept, and the time they slept, since
    /// [`Uring::take_slow_writes`].
    slow_writes: (u64, Duration),
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
    /// A ring of `entries` entries.
    pub fn new(entries: u32) -> io::Result<Uring> {
        Ok(Uring {
            ring: IoUring::new(entries)?,
            helper: Helper::Untried,
            nowait_read: true,
            nowait_write: true,
            entries,
            pending: 0,
            helper_pending: 0,
            watching: false,
            doorbell: None,
            doorbell_arms: 0,
            doorbell_stale: 0,
            doorbell_broken: false,
            alone: false,
            backoff: WriteBackoff::default(),
            slow_writes: (0, Duration::ZERO),
        })
    }

    /// Blocking inline writes that slept in the file system, and about how long they slept,
    /// since the last call: the worker blocked for them as it does for image I/O on the ring.
    pub fn take_slow_writes(&mut self) -> (u64, Duration) {
        std::mem::take(&mut self.slow_writes)
    }

    /// Entries in flight on both rings.
    pub fn in_flight(&self) -> usize {
        self.pending + self.helper_pending
    }

    /// Entries in flight on the helper ring.
    pub fn helper_in_flight(&self) -> usize {
        self.helper_pending
    }

    /// Whether the helper ring exists (creating it on the first call).
    pub fn helper_ready(&mut self) -> bool {
        self.helper().is_some()
    }

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

    /// Whether the op started next is all the queue has to do (the executor's one request
    /// of one op, with nothing in flight and nothing waiting to be published): a large
    /// page-cache read is then copied inline, as it has nothing to run beside
    /// ([`RING_READ_MIN`]).
    pub fn set_alone(&mut self, alone: bool) {
        self.alone = alone;
    }

    /// Start an op: shared reads go to the helper ring; page-cache hits and buffered writes
    /// up to [`INLINE_WRITE_MAX`] complete inline; everything else goes to the ring.
    ///
    /// # Safety
    /// As [`super::Engine::start`].
    pub unsafe fn start(&mut self, id: usize, op: &mut Op, share: bool) -> Started {
        if share && op.shareable() {
            let entry = entry(op, id);
            if let Some(helper) = self.helper() {
                // SAFETY: the caller keeps the op and its buffers in place until it is reaped.
                if unsafe { helper.submission().push(&entry) }.is_ok() {
                    self.helper_pending += 1;
                    return Started::Queued;
                }
            }
        }
        let done = match self.try_inline(op) {
            Inline::Done(r) => return Started::Done(r),
            Inline::Partly(n) => n,
            Inline::No => 0,
        };
        if op.iov.len() > IOV_MAX {
            // Too many pieces for one syscall: the blocking path splits them.
            return Started::Done(run_blocking(op, 0));
        }
        // SAFETY: the caller keeps the op and its buffers in place until it is reaped.
        if unsafe { self.push(&entry(op, id)) } {
            self.pending += 1;
            return if done > 0 {
                Started::Partly { done }
            } else {
                Started::Queued
            };
        }
        Started::Done(run_blocking(op, 0))
    }

    /// Push `entry` on the worker ring; when the submission queue is full, hand it to the
    /// kernel and try once more. False when there is still no room.
    ///
    /// # Safety
    /// Whatever memory `entry` refers to stays valid until its completion is reaped.
    unsafe fn push(&mut self, entry: &io_uring::squeue::Entry) -> bool {
        for _ in 0..2 {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return true;
            }
            self.submit();
        }
        false
    }

    /// Arm a poll of `fd` on the ring, unless one is armed (see `Engine::watch`).
    pub fn watch(&mut self, fd: libc::c_int) -> bool {
        if self.watching {
            return true;
        }
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(WATCH_ID as u64);
        // SAFETY: a poll entry refers to no memory of ours.
        self.watching = unsafe { self.push(&entry) };
        self.watching
    }

    /// Arm a poll of the queue's doorbell (its kick eventfd) on the ring, unless one on `fd`
    /// is armed (see `Engine::watch_doorbell`). A poll on a descriptor the queue no longer
    /// uses is cancelled first, so a frontend replacing its kick fd leaves none behind. False
    /// when the poll cannot be armed (a kernel without multishot polls: never again).
    pub fn watch_doorbell(&mut self, fd: libc::c_int) -> bool {
        if let Some((armed, _)) = self.doorbell {
            if armed == fd {
                return true;
            }
            // Armed on a descriptor the queue no longer uses.
            if !self.cancel_doorbell() {
                return false;
            }
        }
        if self.doorbell_broken {
            return false;
        }
        self.doorbell_arms = self.doorbell_arms.wrapping_add(1);
        let id = DOORBELL_POLLS.start() + usize::from(self.doorbell_arms);
        // Multishot: one completion per kick (per wake-up of the eventfd), and the kick
        // stays in the eventfd for its reader.
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(id as u64);
        // SAFETY: a poll entry refers to no memory of ours.
        if !unsafe { self.push(&entry) } {
            return false;
        }
        self.doorbell = Some((fd, id));
        true
    }

    /// Cancel the doorbell poll, if one is armed, and hand the cancellation to the kernel at
    /// once: a poll does not outlive the pass that armed it (the descriptor it holds may be
    /// closed, and its number reused, before the next).
    pub fn unwatch_doorbell(&mut self) {
        if self.doorbell.is_some() && self.cancel_doorbell() {
            self.submit();
        }
    }

    /// Push the removal of the armed doorbell poll; false when the submission queue has no
    /// room even after a submit.
    fn cancel_doorbell(&mut self) -> bool {
        let Some((_, id)) = self.doorbell else {
            return true;
        };
        let cancel = opcode::PollRemove::new(id as u64)
            .build()
            .user_data(DOORBELL_CANCEL_ID as u64);
        // SAFETY: a poll removal refers to no memory of ours.
        if !unsafe { self.push(&cancel) } {
            return false;
        }
        self.doorbell = None;
        self.doorbell_stale += 1;
        true
    }

    /// Hand pushed entries to the kernel (the helper's thread only needs a wake-up call when
    /// it fell asleep).
    pub fn submit(&mut self) {
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

    /// Append the available completions to `out`; with `wait`, block for at least one.
    pub fn reap(&mut self, out: &mut Vec<(usize, i32)>, wait: bool) {
        let before = out.len();
        self.collect(out);
        if !wait || out.len() > before || (self.in_flight() == 0 && !self.watching) {
            return;
        }
        // Wait where the quick completions are: the helper's page-cache copies finish within
        // microseconds, the worker ring's ops may take a disk's time. While both have ops,
        // the wait on the helper is short, so a helper read that missed the cache does not
        // hold up the worker ring's completions. The worker ring's entries not yet handed to
        // the kernel go with the wait on it, or before the wait on the helper.
        if self.helper_pending > 0 && !self.ring.submission().is_empty() {
            if let Err(e) = self.ring.submit() {
                debug!("io_uring submit: {e}");
            }
        }
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
        for c in self.ring.completion() {
            let (mut id, res) = (c.user_data() as usize, c.result());
            match id {
                WATCH_ID => self.watching = false,
                DOORBELL_CANCEL_ID => continue,
                _ if DOORBELL_POLLS.contains(&id) => {
                    let more = io_uring::cqueue::more(c.flags());
                    if self.doorbell.is_none_or(|(_, armed)| armed != id) {
                        // A poll cancelled because its pass ended or its descriptor was
                        // replaced: rings it had left are not this pass's; its last
                        // completion (no more to come) settles it.
                        if !more {
                            self.doorbell_stale = self.doorbell_stale.saturating_sub(1);
                        }
                        continue;
                    }
                    if !more {
                        // Ended by the kernel (an error, or a full completion queue).
                        self.doorbell = None;
                        if res < 0 && res != -libc::ECANCELED {
                            debug!(
                                "io_uring doorbell poll: {}",
                                io::Error::from_raw_os_error(-res)
                            );
                            self.doorbell_broken = true;
                        }
                    }
                    // Reported only when it rang.
                    if res <= 0 {
                        continue;
                    }
                    id = DOORBELL_ID;
                }
                _ => self.pending -= 1,
            }
            out.push((id, res));
        }
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

    /// Try a buffered read or write without the ring: reads with RWF_NOWAIT (served only from
    /// the page cache), writes up to [`INLINE_WRITE_MAX`] with RWF_NOWAIT where the file
    /// system supports it, else with a plain pwritev2 ([`Uring::blocking_write`]; io_uring
    /// would hand them to an io-wq worker, which measured at about twice the CPU per 4 KiB
    /// write on ext4).
    fn try_inline(&mut self, op: &mut Op) -> Inline {
        let write = match op.kind {
            OpKind::Read => false,
            OpKind::Write { dsync: false } => true,
            _ => return Inline::No,
        };
        if !op.buffered || op.iov.len() > IOV_MAX || op.len == 0 {
            return Inline::No;
        }
        if write && op.len > INLINE_WRITE_MAX {
            return Inline::No;
        }
        if write && !self.nowait_write {
            return self.blocking_write(op);
        }
        // A large read goes straight to io-wq, unless it is all the queue has to do; the rest
        // of one only partly cached then goes there too.
        if !write && (!self.nowait_read || (io_wq_read(op) && !self.alone)) {
            return Inline::No;
        }
        let Ok(off) = libc::off64_t::try_from(op.offset) else {
            return Inline::No;
        };
        let call = if write { libc::pwritev2 } else { libc::preadv2 };
        // SAFETY: every iovec points into guest memory that the caller keeps mapped until the
        // op completes, with the length of the guest buffer it came from; the fd is open.
        let n = unsafe {
            call(
                op.fd,
                op.iov.as_ptr(),
                op.iov.len() as libc::c_int,
                off,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error().raw_os_error();
            if matches!(e, Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)) {
                // Not supported here: stop trying for this direction.
                if write {
                    self.nowait_write = false;
                    return self.blocking_write(op);
                }
                self.nowait_read = false;
            }
            return Inline::No;
        }
        let n = n as u64;
        if n >= op.len {
            Inline::Done(Ok(()))
        } else if n > 0 {
            // Partly cached: the ring does the rest.
            op.iov = advance(&op.iov, n);
            op.offset += n;
            op.len -= n;
            Inline::Partly(n)
        } else {
            Inline::No
        }
    }

    /// A buffered write with a plain pwritev2, which may sleep in the file system; one over
    /// [`INLINE_WRITE_SMALL`] goes to the ring instead while [`WriteBackoff`] says so.
    fn blocking_write(&mut self, op: &mut Op) -> Inline {
        let len = op.len;
        if len <= INLINE_WRITE_SMALL {
            return Inline::Done(run_blocking(op, 0));
        }
        let start = Instant::now();
        if !self.backoff.inline(start) {
            return Inline::No;
        }
        let switches = voluntary_switches();
        let result = run_blocking(op, 0);
        let now = Instant::now();
        let took = now.saturating_duration_since(start);
        // Unknown (getrusage failed): the time alone decides.
        let slept = switches.is_none() || voluntary_switches() != switches;
        if self.backoff.record(len, took, slept, now) {
            self.slow_writes.0 += 1;
            self.slow_writes.1 += took.saturating_sub(copy_time(len));
            debug!(
                "a {len}-byte buffered write slept {took:?} in the file system: writes over \
                 {INLINE_WRITE_SMALL} bytes go to the ring for {:?}",
                self.backoff.period
            );
        }
        Inline::Done(result)
    }
}

/// The calling thread's voluntary context switches so far (it slept), without the
/// involuntary ones (it was preempted).
fn voluntary_switches() -> Option<i64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole rusage to the pointer it is given, which points to
    // one; it is read only when the call succeeded.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: initialised by the successful call above.
    Some(unsafe { usage.assume_init() }.ru_nvcsw)
}

/// How long a page-cache copy of `len` bytes takes at the slowest rate assumed.
fn copy_time(len: u64) -> Duration {
    Duration::from_nanos(len.saturating_mul(1_000_000_000) / COPY_BYTES_PER_SEC)
}

/// When blocking writes over [`INLINE_WRITE_SMALL`] are done inline: not for a while after one
/// slept in the file system (dirty-page throttling, the journal, another writer's lock), so
/// that the worker does not sleep with them while io-wq can.
#[derive(Debug, Default)]
struct WriteBackoff {
    /// Such writes go to the ring until then.
    until: Option<Instant>,
    /// The length of the current period (zero after a write that did not sleep).
    period: Duration,
}

impl WriteBackoff {
    /// Whether such a write is done inline at `now`.
    fn inline(&self, now: Instant) -> bool {
        self.until.is_none_or(|t| now >= t)
    }

    /// Such a write of `len` bytes took `took`, ending at `now`, with a voluntary context
    /// switch or not (`slept`); true when it slept in the file system rather than copied,
    /// which starts a period, twice as long as the last one when it followed that directly.
    fn record(&mut self, len: u64, took: Duration, slept: bool, now: Instant) -> bool {
        if !(slept && took > SLOW_WRITE + copy_time(len)) {
            self.period = Duration::ZERO;
            return false;
        }
        // A write that began before the period it is in started does not lengthen it.
        if self.inline(now.checked_sub(took).unwrap_or(now)) {
            self.period = (self.period * 2).clamp(RING_WRITES_MIN, RING_WRITES_MAX);
            self.until = Some(now + self.period);
        }
        true
    }
}

/// What an inline attempt did.
enum Inline {
    /// Completed (or failed for good).
    Done(io::Result<()>),
    /// This many bytes done; the op now describes the rest.
    Partly(u64),
    /// Nothing done: use the ring.
    No,
}

/// The ring entry for `op`, tagged `id`.
fn entry(op: &Op, id: usize) -> io_uring::squeue::Entry {
    let fd = types::Fd(op.fd);
    let e = match op.kind {
        OpKind::Read => opcode::Readv::new(fd, op.iov.as_ptr(), op.iov.len() as u32)
            .offset(op.offset)
            .build(),
        OpKind::Write { dsync } => opcode::Writev::new(fd, op.iov.as_ptr(), op.iov.len() as u32)
            .offset(op.offset)
            .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
            .build(),
        OpKind::Sync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        OpKind::Fallocate { mode, .. } => opcode::Fallocate::new(fd, op.len)
            .offset(op.offset)
            .mode(mode)
            .build(),
    };
    let e = if io_wq_read(op) {
        // Straight to io-wq: a nonblocking attempt at submission would copy it here.
        e.flags(io_uring::squeue::Flags::ASYNC)
    } else {
        e
    };
    e.user_data(id as u64)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    fn eventfd() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    /// Reap until `rung` doorbell rings were reported and no cancelled poll is outstanding
    /// (1 s at most); any other entry fails.
    fn settle(u: &mut Uring, rung: usize) {
        let until = Instant::now() + Duration::from_secs(1);
        let mut seen = 0;
        while seen < rung || u.doorbell_stale > 0 {
            assert!(
                Instant::now() < until,
                "{seen} of {rung} rings, {} cancellations outstanding",
                u.doorbell_stale
            );
            // Also flushes completions that overflowed the completion queue.
            u.ring.submit().unwrap();
            let mut out = Vec::new();
            u.reap(&mut out, false);
            for (id, res) in out {
                assert_eq!(id, DOORBELL_ID, "only doorbell polls are on the ring");
                assert!(res > 0, "a ring reports POLLIN, not {res}");
                seen += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(seen, rung, "cancelled polls are not reported as rings");
    }

    #[test]
    fn a_doorbell_poll_rings_once_per_kick_until_it_is_cancelled() {
        let mut u = Uring::new(8).unwrap();
        let a = eventfd();
        assert!(u.watch_doorbell(a.as_raw_fd()));
        assert!(u.watch_doorbell(a.as_raw_fd()), "armed once");
        a.write(1).unwrap();
        settle(&mut u, 1);
        a.write(1).unwrap();
        settle(&mut u, 1);
        assert!(u.doorbell.is_some(), "still armed");
        settle(&mut u, 0);
        assert_eq!(a.read().unwrap(), 2, "the kicks stay for their reader");

        // The queue's kick fd is replaced while a poll of the old one is armed: the old poll
        // is cancelled silently, the new one rings.
        let b = eventfd();
        assert!(u.watch_doorbell(b.as_raw_fd()));
        assert_eq!(u.doorbell_stale, 1);
        a.write(1).unwrap();
        b.write(1).unwrap();
        settle(&mut u, 1);
        assert_eq!(u.in_flight(), 0);

        // Unwatched at the end of a pass: gone, and a later kick is not reported.
        u.unwatch_doorbell();
        assert_eq!(u.doorbell, None);
        settle(&mut u, 0);
        b.write(1).unwrap();
        settle(&mut u, 0);
        assert_eq!(b.read().unwrap(), 2);
    }

    #[test]
    fn replacing_the_doorbell_again_and_again_leaves_no_polls_behind() {
        // A hostile frontend may replace a running queue's kick fd without end: each
        // replacement cancels the previous poll, so the ring never holds more than one.
        let mut u = Uring::new(8).unwrap();
        let fds: Vec<EventFd> = (0..500).map(|_| eventfd()).collect();
        for fd in &fds {
            assert!(u.watch_doorbell(fd.as_raw_fd()));
        }
        settle(&mut u, 0);
        assert_eq!(u.doorbell.map(|d| d.0), Some(fds[499].as_raw_fd()));
        assert_eq!(u.in_flight(), 0);
        u.unwatch_doorbell();
        settle(&mut u, 0);
    }

    #[test]
    fn a_write_that_slept_sends_larger_writes_to_the_ring_for_a_growing_while() {
        let mut b = WriteBackoff::default();
        let t0 = Instant::now();
        let big = 1 << 20;
        let ms = Duration::from_millis;
        assert!(b.inline(t0));
        // 1 MiB copies in under 1 ms at the slowest rate assumed: 1.5 ms is still a copy.
        assert!(!b.record(big, Duration::from_micros(1500), true, t0));
        assert!(!b.record(big, ms(30), false, t0), "preempted, not asleep");
        assert!(b.inline(t0));
        assert!(b.record(big, ms(3), true, t0), "3 ms asleep");
        assert!(!b.inline(t0 + RING_WRITES_MIN - ms(1)));
        assert!(b.inline(t0 + RING_WRITES_MIN));
        // The first write after the period sleeps too: a period twice as long.
        let t1 = t0 + RING_WRITES_MIN + ms(5);
        assert!(b.record(big, ms(5), true, t1));
        assert!(!b.inline(t1 + RING_WRITES_MIN));
        assert!(b.inline(t1 + 2 * RING_WRITES_MIN));
        // One that began before that period started neither lengthens nor doubles it.
        assert!(b.record(big, ms(6), true, t1 + ms(1)));
        assert_eq!(b.period, 2 * RING_WRITES_MIN);
        assert!(b.inline(t1 + 2 * RING_WRITES_MIN));
        let mut t = t1;
        for _ in 0..20 {
            t += b.period + ms(10);
            assert!(b.record(big, ms(10), true, t));
        }
        assert_eq!(b.period, RING_WRITES_MAX, "the period has a ceiling");
        // One that did not sleep ends the doubling.
        t += b.period + ms(1);
        assert!(!b.record(big, Duration::from_micros(100), true, t));
        t += ms(20);
        assert!(b.record(big, ms(10), true, t));
        assert_eq!(b.period, RING_WRITES_MIN);
    }

    #[test]
    fn during_a_back_off_larger_buffered_writes_go_to_the_ring_and_small_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 2 << 20]).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut u = Uring::new(8).unwrap();
        // As on ext4: no RWF_NOWAIT buffered writes, and a write over 64 KiB slept just now.
        u.nowait_write = false;
        u.backoff.until = Some(Instant::now() + Duration::from_secs(60));
        let buf = vec![0x7eu8; 1 << 20];
        let write = |len: usize, offset: u64| Op {
            kind: OpKind::Write { dsync: false },
            fd: f.as_raw_fd(),
            fallback_fd: f.as_raw_fd(),
            offset,
            len: len as u64,
            iov: smallvec::smallvec![libc::iovec {
                iov_base: buf.as_ptr() as *mut libc::c_void,
                iov_len: len,
            }],
            buffered: true,
        };
        let (mut small, mut big) = (write(64 << 10, 0), write(1 << 20, 1 << 20));
        // SAFETY: both ops and `buf` outlive the reap below.
        let (s, b) = unsafe { (u.start(0, &mut small, false), u.start(1, &mut big, false)) };
        assert!(matches!(s, Started::Done(Ok(()))), "64 KiB: inline");
        assert!(matches!(b, Started::Queued), "1 MiB: on the ring");
        let mut out = Vec::new();
        while out.is_empty() {
            u.reap(&mut out, true);
        }
        assert_eq!(out, vec![(1, 1 << 20)]);
        let data = std::fs::read(&path).unwrap();
        assert!(
            data[..64 << 10].iter().all(|&b| b == 0x7e),
            "the small write"
        );
        assert!(
            data[1 << 20..].iter().all(|&b| b == 0x7e),
            "the large write"
        );
        // After the period the worker copies it itself again.
        u.backoff.until = Some(Instant::now());
        let mut again = write(1 << 20, 1 << 20);
        // SAFETY: as above; an inline write is done when start returns.
        let a = unsafe { u.start(2, &mut again, false) };
        assert!(
            matches!(a, Started::Done(Ok(()))),
            "1 MiB after the period: inline"
        );
        assert_eq!(u.in_flight(), 0);
    }

    #[test]
    fn large_page_cache_reads_go_to_io_wq_unless_alone_and_small_ones_are_copied_inline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let data: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let mut u = Uring::new(8).unwrap();
        let mut small_buf = vec![0u8; 4096];
        let mut big_buf = vec![0u8; 1 << 20];
        let read = |buf: &mut Vec<u8>, offset: u64| Op {
            kind: OpKind::Read,
            fd: f.as_raw_fd(),
            fallback_fd: f.as_raw_fd(),
            offset,
            len: buf.len() as u64,
            iov: smallvec::smallvec![libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            }],
            buffered: true,
        };
        let (mut small, mut big) = (read(&mut small_buf, 8192), read(&mut big_buf, 1 << 20));
        // SAFETY: both ops and their buffers outlive the reap below.
        let (s, b) = unsafe { (u.start(0, &mut small, false), u.start(1, &mut big, false)) };
        if u.nowait_read {
            assert!(
                matches!(s, Started::Done(Ok(()))),
                "4 KiB in the cache: inline"
            );
        }
        assert!(matches!(b, Started::Queued), "1 MiB: on the ring");
        u.submit();
        let mut out = Vec::new();
        while !out.iter().any(|&(id, _)| id == 1) {
            u.reap(&mut out, true);
        }
        assert!(out.contains(&(1, 1 << 20)), "{out:?}");
        assert_eq!(big_buf[..], data[1 << 20..], "the large read");
        if u.nowait_read {
            assert_eq!(small_buf[..], data[8192..8192 + 4096], "the small read");
            // The queue's only work: copied inline, no hand-off.
            u.set_alone(true);
            big_buf.fill(0);
            let mut big = read(&mut big_buf, 1 << 20);
            // SAFETY: the op and its buffer outlive the call, which completes it.
            let b = unsafe { u.start(2, &mut big, false) };
            assert!(matches!(b, Started::Done(Ok(()))), "alone: inline");
            assert_eq!(big_buf[..], data[1 << 20..], "the lone large read");
        }
    }
}
