//! The virtio-blk device as vhost-user-backend sees it, for one frontend connection: features
//! and config space ([`crate::virtio_blk`]), and one worker thread per queue that runs that
//! queue's [`Executor`] whenever the queue is kicked.
//!
//! State that belongs to the connection lives here and starts afresh with each frontend: the
//! driver's write-cache setting, the negotiated features, the inflight region, which queues a
//! broken ring stopped. A queue whose ring is broken (an available index far ahead of the used
//! one, rings outside guest memory) stops, as the specification's DEVICE_NEEDS_RESET would have
//! it, with one log line, until the frontend stops the ring and sets it up again (a device
//! reset); the other queues and the daemon go on. A ring the frontend stopped (GET_VRING_BASE)
//! is not broken: it is left alone until it is started again. Guest memory is seen through
//! the device's own map, swapped in only after its ranges are guarded ([`crate::fault`]); a
//! fault in it ends the connection.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringState, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{Config, DiscardMode};
use crate::disk::Disk;
use crate::fault;
use crate::inflight::{resubmit, Inflight};
use crate::io::{EngineError, Executor, GuestMem, Pool, RateLimiter, Stats, Tracker};
use crate::poll::{PollBudget, Polled, Poller};
use crate::virtio_blk::{self, Offer};
use crate::LockUnpoisoned;

/// Times in a row the available ring may report new requests that a pass then does not find
/// before the queue counts as broken (a ring whose indices contradict each other).
const EMPTY_PASSES_MAX: u32 = 64;

/// Lines a second the devices of the process together log about their queues (one stopped,
/// requests resubmitted, notifications that failed): apart from the lines about requests, so
/// that a guest's bad requests on many queues cannot crowd them out.
static QUEUE_EVENT_LINES: Pool = Pool::new(20);

/// Errors creating a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A queue's I/O engine could not be created.
    #[error("cannot set up the I/O engine of queue {queue}")]
    Engine {
        /// Queue index.
        queue: u16,
        /// Why.
        #[source]
        source: EngineError,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
}

type Vring = VringMutex<GuestMemoryAtomic<GuestMem>>;

/// When clusters a qcow2 image freed (discard, write-zeroes) may be reused: only once no
/// request mapped before the free can still be in flight. A queue's requests are all mapped
/// and completed within one pass ([`Executor::process_queue_tracked`]), so each queue records
/// the chain's free mark when its pass starts; clusters freed before the oldest mark of the
/// passes running (or, with none running, all of them) can be reused.
struct Reclaim {
    chain: Arc<vloop_qcow2::Chain>,
    running: Vec<Mutex<Option<vloop_qcow2::FreeMark>>>,
}

impl std::fmt::Debug for Reclaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reclaim").finish_non_exhaustive()
    }
}

impl Reclaim {
    fn pass_starts(&self, queue: u16) {
        if let Some(m) = self.running.get(usize::from(queue)) {
            *m.lock_unpoisoned() = Some(self.chain.free_mark());
        }
    }

    /// Ends a pass of `queue`; reclaims what no pass running can still touch (a failed punch
    /// of the reclaimed clusters is returned).
    fn pass_ends(&self, queue: u16) -> Result<(), vloop_qcow2::Error> {
        if let Some(m) = self.running.get(usize::from(queue)) {
            *m.lock_unpoisoned() = None;
        }
        if self.chain.quarantined() == 0 {
            return Ok(());
        }
        let now = self.chain.free_mark();
        let oldest = self
            .running
            .iter()
            .filter_map(|m| *m.lock_unpoisoned())
            .min()
            .map_or(now, |m| m.min(now));
        self.chain.reclaim_freed(oldest)
    }
}

/// Whether the frontend stopped the ring (GET_VRING_BASE: a VM stop, a device reset, a
/// migration) or disabled it: not a broken ring, and not one to touch until it is started or
/// enabled again (which queues an event for it).
fn stopped_by_frontend(state: &VringState<GuestMemoryAtomic<GuestMem>>) -> bool {
    !state.get_queue().ready() || !state.is_enabled()
}

/// What one queue's thread owns: its executor and its polling state.
#[derive(Debug)]
struct Worker {
    ex: Executor,
    poll: Poller,
}

/// A guest memory map and the fault guards of its ranges, which live as long as the map
/// (declared after it: a range is unmapped before its guard goes). A range the next map
/// keeps (the same mapping) keeps its guard: each mapping takes one guard slot however many
/// maps hold it.
struct GuardedMem {
    mem: GuestMem,
    guards: Vec<((usize, usize), Arc<fault::Registration>)>,
}

/// Called when the connection must end (guest memory faulted).
pub type Hangup = Box<dyn Fn() + Send + Sync>;

/// A vhost-user-blk device serving one [`Disk`] for one frontend connection.
pub struct BlkDevice {
    disk: Arc<Disk>,
    num_queues: u16,
    queue_size: u16,
    /// Guest memory as the workers see it: swapped after its ranges are guarded, and guarded
    /// as long as a worker holds it.
    mem: Mutex<Arc<GuardedMem>>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// The driver's write cache mode (`wce`), shared by this connection's executors.
    writeback: Arc<AtomicBool>,
    workers: Vec<Mutex<Worker>>,
    /// Per queue: a broken ring stopped it.
    broken: Vec<AtomicBool>,
    exits: Vec<(EventConsumer, EventNotifier)>,
    limiter: Mutex<RateLimiter>,
    inflight: Arc<Inflight>,
    memory_owner: fault::Owner,
    memory_faulted: AtomicBool,
    /// qcow2 images: when freed clusters may be reused.
    reclaim: Option<Reclaim>,
    /// The connection is ending: workers take no more requests and return once those they
    /// took complete (the executors see it too).
    stopping: Arc<AtomicBool>,
    hangup: Mutex<Option<Hangup>>,
    /// Exit-event consumers handed to vhost-user-backend. Its `VringEpollHandler` (0.24)
    /// registers them with `into_raw_fd()` and never closes them, which would leak one
    /// descriptor per queue per connection; the device closes them when it is dropped, which
    /// is after every epoll handler that held it.
    leaked_exit_fds: Mutex<Vec<std::os::fd::RawFd>>,
}

impl Drop for BlkDevice {
    fn drop(&mut self) {
        let fds = std::mem::take(
            self.leaked_exit_fds
                .get_mut()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for fd in fds {
            // SAFETY: `fd` is a duplicate made by `exit_event` whose ownership vhost-user-backend
            // took with `into_raw_fd()` and dropped without closing; the epoll handlers that
            // used it are gone (each held this device), so nothing else owns it.
            unsafe { libc::close(fd) };
        }
    }
}

impl std::fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("disk", &self.disk.path())
            .field("num_queues", &self.num_queues)
            .finish()
    }
}

impl BlkDevice {
    /// A device for one connection: one executor (and I/O engine) per queue, reporting to
    /// `inflight`.
    pub fn new(
        disk: Arc<Disk>,
        config: &Config,
        inflight: Arc<Inflight>,
    ) -> Result<BlkDevice, DeviceError> {
        let mut workers = Vec::new();
        let mut exits = Vec::new();
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writeback = Arc::new(AtomicBool::new(true));
        let stopping = Arc::new(AtomicBool::new(false));
        let budget = PollBudget::for_this_machine();
        for q in 0..config.num_queues {
            let mut ex = Executor::new(disk.clone(), q, config.engine, config.queue_size)
                .map_err(|source| DeviceError::Engine { queue: q, source })?;
            ex.count_load_in(busy.clone());
            ex.share_write_cache(writeback.clone());
            ex.stop_on(stopping.clone());
            if q == 0 {
                debug!("I/O engine: {}", ex.engine().name());
            }
            workers.push(Mutex::new(Worker {
                ex,
                poll: Poller::new(config.poll_max, budget.clone()),
            }));
            exits.push(
                new_event_consumer_and_notifier(EventFlag::NONBLOCK)
                    .map_err(DeviceError::EventFd)?,
            );
        }
        let reclaim = match disk.layout() {
            crate::disk::Layout::Qcow2(q) => Some(Reclaim {
                chain: q.chain.clone(),
                running: (0..config.num_queues).map(|_| Mutex::new(None)).collect(),
            }),
            crate::disk::Layout::Raw { .. } => None,
        };
        Ok(BlkDevice {
            disk,
            num_queues: config.num_queues,
            queue_size: config.queue_size,
            mem: Mutex::new(Arc::new(GuardedMem {
                mem: GuestMem::new(),
                guards: Vec::new(),
            })),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            writeback,
            workers,
            broken: (0..config.num_queues)
                .map(|_| AtomicBool::new(false))
                .collect(),
            exits,
            limiter: Mutex::new(RateLimiter::in_pool(
                crate::io::WARNINGS_PER_SECOND,
                &QUEUE_EVENT_LINES,
            )),
            inflight,
            memory_owner: fault::Owner::default(),
            reclaim,
            memory_faulted: AtomicBool::new(false),
            stopping,
            hangup: Mutex::new(None),
            leaked_exit_fds: Mutex::new(Vec::new()),
        })
    }

    /// The connection is ending: every worker takes no more requests, ends its current pass
    /// once those it took complete, and starts no other.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Wait, for at most `limit`, until no worker is in a pass (after [`BlkDevice::stop`],
    /// none starts another): every request the workers took is then complete and in the used
    /// ring, and the guest was notified. Whether they all finished in time.
    pub fn wait_idle(&self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        for w in &self.workers {
            loop {
                match w.try_lock() {
                    Ok(_) | Err(std::sync::TryLockError::Poisoned(_)) => break,
                    Err(std::sync::TryLockError::WouldBlock) => {
                        if std::time::Instant::now() >= deadline {
                            return false;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        }
        true
    }

    /// What to call when the connection must end because guest memory faulted.
    pub fn set_hangup(&self, hangup: Hangup) {
        *self.hangup.lock_unpoisoned() = Some(hangup);
    }

    /// The inflight tracking state of this connection.
    pub fn inflight(&self) -> &Arc<Inflight> {
        &self.inflight
    }

    /// The features each queue's executor works with (see [`Executor::set_features`]).
    pub fn queue_features(&self) -> Vec<u64> {
        self.workers
            .iter()
            .map(|w| w.lock_unpoisoned().ex.features())
            .collect()
    }

    /// The disk served.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// The driver's write cache mode: true for writeback.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Whether a broken ring stopped queue `queue`.
    pub fn is_stopped(&self, queue: u16) -> bool {
        self.broken
            .get(usize::from(queue))
            .is_some_and(|b| b.load(Ordering::Relaxed))
    }

    /// Counters summed over all queues.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for w in &self.workers {
            s += w.lock_unpoisoned().ex.stats();
        }
        s
    }

    fn warn_limited(&self, msg: std::fmt::Arguments<'_>) {
        self.log_limited(tracing::Level::WARN, msg);
    }

    /// A line the frontend or the guest causes, within the device's log budget.
    fn log_limited(&self, level: tracing::Level, msg: std::fmt::Arguments<'_>) {
        let mut l = self.limiter.lock_unpoisoned();
        if let Some(suppressed) = l.allow() {
            if suppressed > 0 {
                warn!("{suppressed} similar messages suppressed");
            }
            if level == tracing::Level::INFO {
                tracing::info!("{msg}");
            } else {
                warn!("{msg}");
            }
        }
    }

    /// A ring stopped or reset by the frontend: queue `queue` is no longer broken, unless guest
    /// memory faulted and the connection is ending.
    fn unbreak(&self, queue: usize) {
        if let Some(b) = self.broken.get(queue) {
            b.store(false, Ordering::Relaxed);
            // Checked after: a fault that ends the connection meanwhile keeps it stopped. A
            // fault outside the workers (the library reads a ring's indices when it stops or
            // sets one up) ends the connection here.
            if self.memory_faulted.load(Ordering::Relaxed) {
                b.store(true, Ordering::Relaxed);
            } else if self.memory_owner.faulted() {
                self.memory_fault();
            }
        }
    }

    /// Stop `queue` for good: its ring cannot be trusted.
    fn stop_queue(&self, queue: u16, why: std::fmt::Arguments<'_>) {
        if let Some(b) = self.broken.get(usize::from(queue)) {
            if !b.swap(true, Ordering::Relaxed) {
                self.warn_limited(format_args!(
                    "queue {queue} stopped (the driver must reset the device): {why}"
                ));
            }
        }
    }

    /// A ring error on `queue`: when guest memory faulted under it (a truncated memory file
    /// reads as zeroes), the connection ends; otherwise the queue stops.
    fn ring_error(&self, queue: u16, why: std::fmt::Arguments<'_>) {
        if self.memory_owner.faulted() {
            self.memory_fault();
        } else {
            self.stop_queue(queue, why);
        }
    }

    /// Guest memory faulted: end the connection (once).
    fn memory_fault(&self) {
        if self.memory_faulted.swap(true, Ordering::Relaxed) {
            return;
        }
        warn!(
            "guest memory faulted under the mapping (the frontend truncated its memory file, \
             or its hugetlbfs pool has no page for it): closing the connection"
        );
        for q in 0..self.num_queues {
            if let Some(b) = self.broken.get(usize::from(q)) {
                b.store(true, Ordering::Relaxed);
            }
        }
        self.hang_up();
    }

    /// End the connection (the relay's sockets are shut down).
    fn hang_up(&self) {
        if let Some(h) = self.hangup.lock_unpoisoned().as_ref() {
            h();
        }
    }

    /// Drain one vring: passes until the queue is empty and nothing arrived while
    /// notifications were off, with polls of the available ring between passes
    /// ([`crate::poll`]). A ring error stops the queue.
    fn drain(&self, vring: &Vring, w: &mut Worker) {
        let queue = w.ex.queue();
        if self.is_stopped(queue) || self.stopping.load(Ordering::Relaxed) {
            return;
        }
        w.poll.woke();
        let mut empty_passes = 0;
        loop {
            // Taken for each pass: a frontend that replaces its memory table while this queue
            // stays busy has the new one used from the next pass on.
            let guarded = self.mem.lock_unpoisoned().clone();
            let mem = &guarded.mem;
            let mut state = vring.get_mut();
            if stopped_by_frontend(&state) {
                return;
            }
            if let Err(e) = state.get_queue_mut().disable_notification(mem) {
                self.ring_error(queue, format_args!("cannot disable notifications: {e}"));
                return;
            }
            let (before, waits) = (w.ex.stats().requests, w.ex.stats().waits);
            if let Err(e) = self.process(&mut state, &mut w.ex, mem) {
                self.ring_error(queue, format_args!("{e}"));
                return;
            }
            if self.memory_owner.faulted() {
                self.memory_fault();
                return;
            }
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            empty_passes = if w.ex.stats().requests == before {
                empty_passes + 1
            } else {
                0
            };
            // Watch the available ring with notifications still off and the vring unlocked,
            // so the library's handler is not held up. Only after a pass that completed
            // without waiting for the image: a frontend that slept through a disk's time
            // comes back late (a halted vCPU wakes slowly), so polling for its next request
            // burns the CPU without saving time (measured at O_DIRECT QD1: fewer IOPS, more
            // CPU per request than sleeping), and says nothing of the gaps between quick ones.
            let waited = w.ex.stats().waits != waits;
            let next = state.get_queue().next_avail();
            let avail_idx = GuestAddress(state.get_queue().avail_ring()).checked_add(2);
            drop(state);
            if let Some(at) = avail_idx.filter(|_| !waited) {
                let arrived = || {
                    mem.read_obj::<u16>(at)
                        .is_ok_and(|i| u16::from_le(i) != next)
                };
                if w.poll.poll(arrived) == Polled::Found {
                    continue;
                }
            }
            // The table as it is now: the ring may have been stopped and set up again on a new
            // one while this thread polled.
            let guarded = self.mem.lock_unpoisoned().clone();
            let mem = &guarded.mem;
            let mut state = vring.get_mut();
            if stopped_by_frontend(&state) {
                return;
            }
            match state.get_queue_mut().enable_notification(mem) {
                Ok(true) if empty_passes >= EMPTY_PASSES_MAX => {
                    self.ring_error(
                        queue,
                        format_args!("the available ring announces requests it does not hold"),
                    );
                    return;
                }
                Ok(true) => continue,
                Ok(false) => {
                    if waited {
                        w.poll.not_polling();
                    } else {
                        w.poll.sleeping();
                    }
                    return;
                }
                Err(e) => {
                    self.ring_error(queue, format_args!("cannot enable notifications: {e}"));
                    return;
                }
            }
        }
    }

    fn process(
        &self,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        worker: &mut Executor,
        mem: &GuestMem,
    ) -> Result<(), virtio_queue::Error> {
        let tracker = self.inflight.tracker(worker.queue());
        // The call eventfd stays open while this thread holds the vring's lock (`state`); the
        // relay made it non-blocking.
        let call = state.get_call().as_ref().map(|c| c.as_raw_fd());
        let signal = |warn: &dyn Fn(std::fmt::Arguments<'_>)| {
            tracing::trace!("signal used queue");
            if let Some(fd) = call {
                // SAFETY: `fd` is the vring's call eventfd, kept open by the vring state that
                // is locked for this whole call.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                match nix::unistd::write(fd, &1u64.to_ne_bytes()) {
                    // A counter at its maximum is signalled already.
                    Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
                    Err(e) => warn(format_args!("cannot notify the guest: {e}")),
                }
            }
        };
        let warn = |m: std::fmt::Arguments<'_>| self.warn_limited(m);
        let queue = worker.queue();
        // Before the resubmission too: its writes may land in clusters that another queue's
        // discard frees meanwhile, which may not be reused while they are in flight.
        if let Some(r) = &self.reclaim {
            r.pass_starts(queue);
        }
        if let Some(t) = &tracker {
            if self.inflight.take_recovery(worker.queue()) {
                if let Some(q) = t.state() {
                    match resubmit(state.get_queue_mut(), mem, worker, &q) {
                        Ok(0) => {}
                        // Within the log budget: a frontend can set an inflight region again
                        // and again.
                        Ok(n) => self.log_limited(
                            tracing::Level::INFO,
                            format_args!(
                                "resubmitted {n} request(s) left in flight by the previous backend"
                            ),
                        ),
                        Err(e) => {
                            self.warn_limited(format_args!("resubmitting in-flight requests: {e}"))
                        }
                    }
                }
                // Whatever the previous backend completed, and what was resubmitted now,
                // reaches the guest.
                signal(&warn);
            }
        }
        let tracker = tracker.as_ref().map(|t| t as &dyn Tracker);
        // The kick eventfd stays open, as the call eventfd, while `state` is locked; the relay
        // made it non-blocking.
        worker.set_doorbell(state.get_kick().as_ref().map(|k| k.as_raw_fd()));
        let result = worker
            .process_queue_tracked(state.get_queue_mut(), mem, tracker, &mut || signal(&warn));
        worker.set_doorbell(None);
        if let Some(r) = &self.reclaim {
            if let Err(e) = r.pass_ends(queue) {
                self.warn_limited(format_args!(
                    "giving freed clusters back to the file system: {}",
                    crate::io::Causes(&e)
                ));
            }
        }
        result
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        virtio_blk::features(&self.disk.limits())
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
        for w in &self.workers {
            w.lock_unpoisoned().ex.set_features(features);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let offer = Offer {
            num_queues: self.num_queues,
            writeback: self.writeback(),
            may_unmap: self.disk.discard_mode() == DiscardMode::Unmap,
        };
        let space = virtio_blk::config_space(&self.disk.limits(), &offer);
        virtio_blk::read_config(&space, offset, size).unwrap_or_default()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce = virtio_blk::written_wce(offset, buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // Only `wce` is writable, and only when CONFIG_WCE was negotiated.
        let wce_acked =
            self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if let (Some(on), true) = (wce, wce_acked) {
            debug!(
                "guest set the write cache to {}",
                if on { "writeback" } else { "writethrough" }
            );
            self.writeback.store(on, Ordering::Relaxed);
            if !on {
                // Everything written so far becomes durable now.
                self.disk.flush()?;
            }
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        let snapshot: GuestMem = (*mem.memory()).clone();
        let ranges: Vec<(usize, usize)> = snapshot
            .iter()
            .map(|r| (r.as_ptr() as usize, r.len() as usize))
            .collect();
        // Guarded first, seen by the workers second. Memory that cannot be guarded is not
        // used: the workers keep the memory they had, and the connection ends.
        let current = self.mem.lock_unpoisoned().clone();
        let mut guards = Vec::with_capacity(ranges.len());
        for range in ranges {
            let kept = current.guards.iter().find(|(r, _)| *r == range);
            let guard = match kept {
                Some((_, g)) => g.clone(),
                None => match self.memory_owner.register([range]) {
                    Ok(g) => Arc::new(g),
                    Err(e) => {
                        self.warn_limited(format_args!("{e}: closing the connection"));
                        self.hang_up();
                        return Err(io::Error::other(e));
                    }
                },
            };
            guards.push((range, guard));
        }
        drop(current);
        *self.mem.lock_unpoisoned() = Arc::new(GuardedMem {
            mem: snapshot,
            guards,
        });
        Ok(())
    }

    /// GET_VRING_BASE: the ring is marked not ready and no pass runs on it now (a pass holds
    /// the vring's lock, and every request it took is complete when it ends). A ring that
    /// was broken starts afresh when the frontend sets it up again (a device reset, or a VM
    /// stop and cont: a ring still broken then stops again), unless guest memory faulted and
    /// the connection is ending.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Ok(q) = usize::try_from(queue_index) {
            self.unbreak(q);
        }
        Ok(())
    }

    /// RESET_DEVICE: the library disables every ring; each starts afresh when it is set up
    /// again.
    fn reset_device(&self) {
        for q in 0..self.broken.len() {
            self.unbreak(q);
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exits.get(thread_index)?;
        let (c, n) = (c.try_clone().ok()?, n.try_clone().ok()?);
        self.leaked_exit_fds
            .lock_unpoisoned()
            .push(std::os::fd::AsRawFd::as_raw_fd(&c));
        Some((c, n))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let (Some(vring), Some(worker)) = (
            vrings.get(usize::from(device_event)),
            self.workers.get(thread_id),
        ) else {
            self.warn_limited(format_args!(
                "unexpected event {device_event} on thread {thread_id}"
            ));
            return Ok(());
        };
        tracing::trace!(queue = thread_id, "kick");
        let mut worker = worker.lock_unpoisoned();
        self.drain(vring, &mut worker);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::RawFd;

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO};
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::virtio_blk::CONFIG_LEN;

    const MIB: u64 = 1 << 20;

    fn device(size: u64, tweak: impl FnOnce(&mut Config)) -> (tempfile::TempDir, BlkDevice) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let mut cfg = Config::new(&path);
        tweak(&mut cfg);
        let disk = Arc::new(Disk::open(&cfg).unwrap());
        let inflight = Arc::new(Inflight::new(cfg.num_queues, cfg.queue_size));
        let dev = BlkDevice::new(disk, &cfg, inflight).unwrap();
        (dir, dev)
    }

    #[test]
    fn get_config_honours_offset_and_size() {
        let (_d, dev) = device(8 * MIB, |c| c.num_queues = 4);
        let all = dev.get_config(0, CONFIG_LEN as u32);
        assert_eq!(all.len(), CONFIG_LEN);
        assert_eq!(
            u64::from_le_bytes(all[0..8].try_into().unwrap()),
            8 * MIB / 512
        );
        assert_eq!(u32::from_le_bytes(all[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(all[34..36].try_into().unwrap()), 4);
        assert_eq!(all[32], 1, "writeback by default");
        assert_eq!(
            u32::from_le_bytes(all[40..44].try_into().unwrap()),
            1,
            "one segment"
        );
        assert_eq!(all[56], 1, "write zeroes may unmap");
        for (off, len) in [(1u32, 7u32), (3, 1), (34, 2), (59, 1), (13, 40)] {
            let part = dev.get_config(off, len);
            assert_eq!(
                part,
                all[off as usize..(off + len) as usize],
                "offset {off} size {len}"
            );
        }
        // Past our fields: zeroes; past the vhost-user window or overflowing: empty.
        let tail = dev.get_config(50, 20);
        assert_eq!(&tail[..10], &all[50..60]);
        assert!(tail[10..].iter().all(|&b| b == 0));
        assert_eq!(dev.get_config(200, 8), vec![0u8; 8]);
        assert!(dev.get_config(0xfff, 2).is_empty());
        assert!(dev.get_config(u32::MAX, 2).is_empty());
        assert!(dev.get_config(2, u32::MAX).is_empty());
        assert_eq!(dev.get_config(7, 0), Vec::<u8>::new());
    }

    #[test]
    fn features_and_a_write_cache_of_the_connection() {
        let (_d, dev) = device(MIB, |_| {});
        let f = dev.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(dev.queues_per_thread(), vec![1]);
        // wce is ignored until CONFIG_WCE is negotiated, then switches to writethrough.
        dev.set_config(32, &[0]).unwrap();
        assert!(dev.writeback());
        dev.acked_features(1 << VIRTIO_BLK_F_CONFIG_WCE);
        dev.set_config(32, &[0]).unwrap();
        assert!(!dev.writeback());
        assert_eq!(dev.get_config(32, 1), vec![0]);
        assert!(dev
            .workers
            .iter()
            .all(|w| w.lock_unpoisoned().ex.write_through()));
        dev.set_config(30, &[0, 0, 1]).unwrap();
        assert!(dev.writeback());
        assert!(dev.set_config(0xfff, &[0, 0]).is_err());
        // The next connection's device starts with the default again, on the same disk.
        dev.set_config(32, &[0]).unwrap();
        let cfg = Config::new(dev.disk().path());
        let next = BlkDevice::new(
            dev.disk().clone(),
            &cfg,
            Arc::new(Inflight::new(1, cfg.queue_size)),
        )
        .unwrap();
        assert!(next.writeback());
        assert_eq!(next.get_config(32, 1), vec![1]);

        let (_d, ro) = device(MIB, |c| c.read_only = true);
        let f = ro.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        let (_d, dev16) = device(MIB, |c| c.num_queues = 16);
        assert_eq!(dev16.num_queues(), 16);
        assert_eq!(dev16.queues_per_thread().len(), 16);
    }

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only asks about the descriptor number.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    /// vhost-user-backend 0.24 takes the exit-event consumers with `into_raw_fd()` and never
    /// closes them; the device closes them itself when it is dropped. This test fails when an
    /// upgrade of the library stops leaking them, so that the device's workaround (which
    /// would then close descriptors it no longer owns) is removed with the upgrade.
    #[test]
    fn the_library_still_leaks_exit_events_and_the_device_closes_them() {
        let (_d, dev) = device(MIB, |c| c.num_queues = 2);
        let dev = Arc::new(dev);
        let mem = GuestMemoryAtomic::new(GuestMem::new());
        let daemon =
            vhost_user_backend::VhostUserDaemon::new("t".into(), dev.clone(), mem).unwrap();
        let fds = dev.leaked_exit_fds.lock_unpoisoned().clone();
        assert_eq!(fds.len(), 2, "one exit event registered per worker thread");
        drop(daemon);
        assert!(
            fds.iter().all(|&fd| is_open(fd)),
            "vhost-user-backend now closes its exit-event descriptors: remove the device's \
             leaked_exit_fds workaround"
        );
        // Their closing, at the device's drop, is checked by the daemon tests that count a
        // process's descriptors across connections (numbers are reused across threads here).
        assert_eq!(Arc::strong_count(&dev), 1);
    }

    /// A queue of 16 at guest address 0 of `mem` whose ring entries all offer the chain at
    /// descriptor 0: a flush with its header at 0x10000 and its status byte after it.
    fn flush_ring(mem: &GuestMem) -> (MockSplitQueue<'_, GuestMem>, Vring) {
        use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
        use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
        mem.write_slice(&header, GuestAddress(0x10000)).unwrap();
        let vq = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let chain = [
            RawDescriptor::from(Descriptor::new(0x10000, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(Descriptor::new(0x10010, 1, VRING_DESC_F_WRITE as u16, 0)),
        ];
        vq.add_desc_chains(&chain, 0).unwrap();
        for slot in 1..16 {
            vq.avail().ring().ref_at(slot).unwrap().store(0);
        }
        let vring = Vring::new(GuestMemoryAtomic::new(mem.clone()), 16).unwrap();
        vring.set_queue_size(16);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring.set_enabled(true);
        vring.set_queue_ready(true);
        (vq, vring)
    }

    #[test]
    fn a_memory_change_guards_only_the_mappings_it_adds() {
        use vm_memory::{GuestRegionMmap, MmapRegion};
        let (_d, dev) = device(MIB, |_| {});
        let ranges: Vec<_> = (0..100u64).map(|i| (GuestAddress(i << 16), 4096)).collect();
        let base = GuestMem::from_ranges(&ranges).unwrap();
        dev.update_memory(GuestMemoryAtomic::new(base.clone()))
            .unwrap();
        assert_eq!(dev.memory_owner.held(), 100);
        // Workers hold the maps they took for a pass: each region added and removed while
        // they do costs one slot, not a whole map's.
        let mut held = Vec::new();
        for i in 0..30u64 {
            let extra = GuestRegionMmap::new(MmapRegion::new(4096).unwrap(), GuestAddress(1 << 30))
                .unwrap();
            let with = base.insert_region(Arc::new(extra)).unwrap();
            dev.update_memory(GuestMemoryAtomic::new(with)).unwrap();
            held.push(dev.mem.lock_unpoisoned().clone());
            dev.update_memory(GuestMemoryAtomic::new(base.clone()))
                .unwrap();
            assert_eq!(dev.memory_owner.held(), 100 + i as usize + 1);
        }
        drop(held);
        assert_eq!(dev.memory_owner.held(), 100);
    }

    #[test]
    fn a_ring_the_frontend_stopped_is_left_alone_and_a_reset_restarts_a_broken_one() {
        let (_d, dev) = device(MIB, |_| {});
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        dev.update_memory(GuestMemoryAtomic::new(mem.clone()))
            .unwrap();
        let (vq, vring) = flush_ring(&mem);
        let kick = |dev: &BlkDevice| {
            dev.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
                .unwrap()
        };
        let status = || mem.read_obj::<u8>(GuestAddress(0x10010)).unwrap();
        // GET_VRING_BASE marked the ring not ready (a VM stop, a device reset) while a kick
        // was on its way: the ring is not touched, and it is not broken.
        vring.set_queue_ready(false);
        kick(&dev);
        assert!(!dev.is_stopped(0), "a stopped ring counted as broken");
        assert_eq!(vq.used().idx().load(), 0, "a stopped ring was served");
        // Started again where it stopped: served.
        vring.set_queue_ready(true);
        kick(&dev);
        assert_eq!((vq.used().idx().load(), status()), (1, 0));
        // A broken ring (an available index far ahead of the used one) stops the queue ...
        vq.avail().idx().store(u16::to_le(1000));
        kick(&dev);
        assert!(dev.is_stopped(0));
        // ... until the frontend stops the ring and sets it up again (a device reset).
        vring.set_queue_ready(false);
        dev.stop_vring(0).unwrap();
        assert!(!dev.is_stopped(0), "a reset left the queue stopped");
        mem.write_obj(0xffu8, GuestAddress(0x10010)).unwrap();
        vq.avail().idx().store(u16::to_le(2));
        vring.set_queue_next_avail(1);
        vring.set_queue_next_used(1);
        vring.set_queue_ready(true);
        kick(&dev);
        assert_eq!((vq.used().idx().load(), status()), (2, 0));
        // RESET_DEVICE too.
        vq.avail().idx().store(u16::to_le(1000));
        kick(&dev);
        assert!(dev.is_stopped(0));
        dev.reset_device();
        assert!(!dev.is_stopped(0), "RESET_DEVICE left the queue stopped");
    }
}
