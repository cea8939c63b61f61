//! The executor of one queue: descriptor chains in, I/O on the image, completions out.
//!
//! [`Executor::process_queue`] is the data path of one worker thread, a pipeline: it pops every
//! available chain, parses it ([`crate::request::parse`], pure), turns it into an [`Op`](super::op::Op) (a
//! read or write whose iovecs point straight into guest memory, a data sync, a fallocate) and
//! starts it on the thread's engine, and puts every request in the used ring as soon as it
//! completed, notifying the guest when it asks for it (EVENT_IDX honoured by
//! `needs_notification`), so the guest queues new requests while others are still in flight.
//! It keeps popping until the queue is empty and nothing is in flight. Part of the page-cache
//! reads of a saturated worker go to the engine's helper CPU ([`super::share`]).
//! [`Executor::execute`] does the same for any list of chains without a queue, which is what
//! tests, recovery and fuzzers call.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

mod plan;

use super::blocking::{self, Reaped};
use super::engine::{self, Engine, EngineError};
use super::op::{OpKind, Started, DOORBELL_ID, WATCH_ID};
use super::ratelimit::{Causes, RateLimiter};
use super::share::SharePolicy;
use super::slow::{SlowPath, Work};
use super::store::{Req, Stage, Store, Transfer};
use super::{Completion, GuestMem, Stats, Tracker, WARNINGS_PER_SECOND};
use crate::config::EngineKind;
use crate::disk::Disk;
use crate::request::{parse, Limits};

/// Most ops one request fans out to (extents of a qcow2 mapping); a request mapped to more
/// takes the slow path. Engine ids are `request id * MAX_OPS + op index`.
const MAX_OPS: usize = 16;

const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

/// Most waves (chains popped together) one `process_queue` call takes, so the caller gets to
/// release the vring now and then.
const WAVES_PER_CALL: usize = 1024;

/// Requests completed inline (page-cache hits) after which a wave stops popping and publishes
/// them, when [`SharePolicy::publish_early`] says so.
pub(super) const PUBLISH_EVERY: usize = 8;

/// Most bytes of writes one wave pops before it is published: buffered writes up to 4 MiB are
/// copied inline one after the other, and the driver hears of none of a wave's requests
/// before the wave ends.
const WAVE_WRITE_BYTES: u64 = 8 << 20;

/// Data bytes of requests in flight beyond which a queue takes no more until some complete:
/// what is in flight must finish before a stopping connection ends, or the next frontend is
/// served, so a driver that fills a large ring with the largest requests
/// ([`crate::request::REQUEST_DATA_MAX`]) cannot hold either up for long. Far above what
/// a full ring of 1 MiB requests at queue depth 32 moves at once.
const DATA_IN_FLIGHT_MAX: u64 = 128 << 20;

/// Whether `op`, queued on the engine, may take long whatever the disk's speed: a flush, a
/// fallocate, a write through, or a write through the page cache (which the file system may
/// throttle). Reads and O_DIRECT writes take the disk's time for one request.
fn lengthy(op: &super::op::Op) -> bool {
    match op.kind {
        OpKind::Read => false,
        OpKind::Write { dsync } => dsync || op.buffered,
        OpKind::Sync | OpKind::Fallocate { .. } => true,
    }
}

/// Executes requests of one queue. Owned by that queue's worker thread.
#[derive(Debug)]
pub struct Executor {
    disk: Arc<Disk>,
    engine: Engine,
    queue: u16,
    limiter: RateLimiter,
    stats: Stats,
    features: u64,
    /// The write cache mode of the connection (the driver's `wce`): true for writeback.
    writeback: Arc<AtomicBool>,
    /// Requests started and not yet completed.
    store: Store,
    /// Completed requests not yet in the used ring, with their arrival position.
    ready: Vec<(u32, Completion)>,
    /// Requests parsed since the engine was last given work.
    fresh: Vec<u32>,
    share: SharePolicy,
    /// The thread of this queue's slow requests.
    slow: SlowPath,
    /// Mapping scratch (qcow2 extents), kept for its capacity.
    extents: Vec<vloop_qcow2::Extent>,
    /// Slow-path completions scratch.
    slow_done: Vec<(u32, std::io::Result<()>)>,
    /// Scratch buffers kept for their capacity, so the data path allocates nothing once the
    /// first few requests have run.
    heads: Vec<u16>,
    cqes: Vec<(usize, i32)>,
    /// The queue's kick eventfd while a pass runs ([`Executor::set_doorbell`]).
    doorbell: Option<RawFd>,
    /// Ops in the engine that may take long whatever the disk ([`lengthy`]).
    long_ops: usize,
    /// Data bytes of the requests taken and not yet completed.
    data_in_flight: u64,
    /// Set when the connection ends (SIGTERM, the frontend gone): a pass takes no more
    /// requests and ends once those it took complete.
    stop: Option<Arc<AtomicBool>>,
}

/// What starting a chain led to.
enum Parsed {
    /// Ops to give the engine.
    Op(Req),
    /// Work for the slow path.
    Slow(Req, Work),
    /// Completed at once (refused, GET_ID, empty transfers, nothing to do).
    Done(Completion),
}

impl Executor {
    /// An executor for queue `queue` with an engine of `kind`, sized for `queue_size`.
    pub fn new(
        disk: Arc<Disk>,
        queue: u16,
        kind: EngineKind,
        queue_size: u16,
    ) -> Result<Executor, EngineError> {
        let capacity = usize::from(queue_size).min(engine::MAX_RING_ENTRIES as usize);
        Ok(Executor {
            features: crate::virtio_blk::features(&disk.limits()),
            disk,
            engine: Engine::new(kind, u32::from(queue_size))?,
            queue,
            limiter: RateLimiter::new(WARNINGS_PER_SECOND),
            stats: Stats::default(),
            writeback: Arc::new(AtomicBool::new(true)),
            store: Store::new(capacity),
            ready: Vec::new(),
            fresh: Vec::new(),
            share: SharePolicy::default(),
            slow: SlowPath::new(queue).map_err(EngineError::Uring)?,
            extents: Vec::new(),
            slow_done: Vec::new(),
            heads: Vec::new(),
            cqes: Vec::new(),
            doorbell: None,
            long_ops: 0,
            data_in_flight: 0,
            stop: None,
        })
    }

    /// End passes early once `stop` is set: a driver that keeps its ring full would otherwise
    /// hold a pass (and a SIGTERM) for up to [`WAVES_PER_CALL`] waves.
    pub fn stop_on(&mut self, stop: Arc<AtomicBool>) {
        self.stop = Some(stop);
    }

    /// Whether a pass may take more requests: not past its waves, and not stopping.
    fn takes_more(&self, waves: usize) -> bool {
        waves < WAVES_PER_CALL && self.data_in_flight < DATA_IN_FLIGHT_MAX && !self.stopping()
    }

    /// Whether the stop flag of [`Executor::stop_on`] is set.
    fn stopping(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// The queue's kick eventfd, open until the next call: while requests are in flight and
    /// the driver has completions to refill its ring from, a wait for them also ends when it
    /// kicks, so new requests start without waiting for the next completion. `None` (the
    /// default) waits for completions only.
    ///
    /// The doorbell is only polled, never read: its kicks stay for the reader who polls the
    /// eventfd between passes (vhost-user-backend's epoll loop, which fails the queue when a
    /// kick it was told of cannot be read). A pass polls it only while it runs.
    pub fn set_doorbell(&mut self, fd: Option<RawFd>) {
        self.doorbell = fd;
    }

    /// Tell the executor which virtio features the driver negotiated (all offered ones until
    /// this is called). `size_max` and `seg_max` bind only a driver that negotiated
    /// VIRTIO_BLK_F_SIZE_MAX / VIRTIO_BLK_F_SEG_MAX (UEFI's VirtioBlkDxe negotiates neither
    /// and puts a whole transfer in one descriptor), and a driver without VIRTIO_BLK_F_FLUSH
    /// cannot ask for durability, so its writes are written through.
    pub fn set_features(&mut self, features: u64) {
        self.features = features;
    }

    /// Read the write cache mode from `writeback` (shared by the queues of one connection, set
    /// by the driver's config writes) instead of this executor's own flag.
    pub fn share_write_cache(&mut self, writeback: Arc<AtomicBool>) {
        self.writeback = writeback;
    }

    /// Share page-cache reads with the engine's helper whenever a launch has enough of them,
    /// saturated or not (tests and fuzzing use this to exercise the helper path).
    pub fn always_share(&mut self) {
        self.share.always();
    }

    /// Count this executor's worker in `busy`, the number of the device's workers that are
    /// saturated (see [`super::share`]).
    pub fn count_load_in(&mut self, busy: Arc<AtomicUsize>) {
        self.share.set_counter(busy);
    }

    /// The negotiated features in effect.
    pub fn features(&self) -> u64 {
        self.features
    }

    fn negotiated(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }

    /// Whether writes, discards and write-zeroes are made durable before they complete: the
    /// driver turned the write cache off, or it cannot flush.
    pub fn write_through(&self) -> bool {
        !self.writeback.load(Ordering::Relaxed) || !self.negotiated(VIRTIO_BLK_F_FLUSH)
    }

    /// Ops in the engine and work on the slow path.
    fn in_flight(&self) -> usize {
        self.engine.in_flight() + self.slow.in_flight()
    }

    /// The request limits for this driver: the disk's, minus those it did not negotiate.
    pub fn limits(&self) -> Limits {
        let mut limits = *self.disk.limits();
        if !self.negotiated(VIRTIO_BLK_F_SIZE_MAX) {
            limits.size_max = u32::MAX;
        }
        if !self.negotiated(VIRTIO_BLK_F_SEG_MAX) {
            limits.seg_max = u32::MAX;
        }
        limits
    }

    /// The queue this executor serves.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// The engine in use.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The budget of log lines the guest can cause on this queue.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    fn guest_warn(&mut self, head: u16, what: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.limiter.allow() {
            if suppressed > 0 {
                warn!(
                    queue = self.queue,
                    "{suppressed} similar messages suppressed"
                );
            }
            warn!(queue = self.queue, head, "{what}");
        }
    }

    /// Serve `queue` until it is empty (or `WAVES_PER_CALL` waves were taken, or the stop flag
    /// of [`Executor::stop_on`] is set) and nothing is in flight, putting requests in the used
    /// ring as they complete. Returns whether the guest must be notified.
    pub fn process_queue(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
    ) -> Result<bool, virtio_queue::Error> {
        let mut notify = false;
        self.process_queue_tracked(queue, mem, None, &mut || notify = true)?;
        Ok(notify)
    }

    /// [`Executor::process_queue`] with a [`Tracker`] told of every chain taken and returned.
    /// `notify` is called each time the guest asks to be told about completed requests; every
    /// request popped is completed when this returns, also when it returns an error.
    pub fn process_queue_tracked(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        tracker: Option<&dyn Tracker>,
        notify: &mut dyn FnMut(),
    ) -> Result<(), virtio_queue::Error> {
        let result = self.drained(|ex| ex.serve(queue, mem, tracker, notify));
        // A poll does not outlive its pass (the kick fd may be replaced before the next).
        self.engine.unwatch_doorbell();
        result
    }

    /// Run `f`; if it panics, wait for the engine's ops and the slow path's work in flight
    /// before unwinding further: the kernel and the slow path's thread may still write into
    /// guest memory that the caller unmaps afterwards.
    fn drained<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        done.unwrap_or_else(|panic| {
            self.engine.unwatch_doorbell();
            self.engine.drain();
            self.long_ops = 0;
            self.data_in_flight = 0;
            let mut left = Vec::new();
            while self.slow.in_flight() > 0 {
                self.slow.collect(&mut left, true);
                left.clear();
            }
            std::panic::resume_unwind(panic)
        })
    }

    fn serve(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        tracker: Option<&dyn Tracker>,
        notify: &mut dyn FnMut(),
    ) -> Result<(), virtio_queue::Error> {
        let mut broken = None;
        let started = Instant::now();
        self.disk.refresh_atime(started);
        let mut waves = 0;
        // Completions were published since the last chains were popped: the driver may refill
        // the ring while this thread waits for the engine.
        let mut refill = false;
        // The ring was re-checked once since the last pop (bounds the re-checks of a ring
        // that announces requests it does not hold).
        let mut rechecked = false;
        loop {
            let mut popped = 0;
            if broken.is_none() && self.store.room() > 0 && self.takes_more(waves) {
                let (table, size) = (GuestAddress(queue.desc_table()), queue.size());
                match queue.iter(mem) {
                    Ok(chains) => {
                        // Taken for each wave, after the available index was read: the image
                        // size (SIGHUP) and the write cache mode (a config write) may have
                        // changed since the last one, before the guest queued these requests.
                        let limits = self.limits();
                        let write_through = self.write_through();
                        let mut wave_writes = 0u64;
                        for chain in chains {
                            let head = chain.head_index();
                            if let Some(t) = tracker {
                                t.taken(head);
                            }
                            let descs = super::guest::walk(mem, table, size, head);
                            let before = self.fresh.len();
                            self.start(mem, head, descs, 0, &limits, write_through);
                            popped += 1;
                            if self.store.room() == 0 || self.data_in_flight >= DATA_IN_FLIGHT_MAX {
                                break;
                            }
                            if let Some(r) =
                                self.fresh.get(before).and_then(|&id| self.store.get(id))
                            {
                                if r.transfer == Transfer::Write {
                                    wave_writes = wave_writes.saturating_add(r.data_len);
                                }
                            }
                            if wave_writes >= WAVE_WRITE_BYTES {
                                break;
                            }
                            // Without a helper to share the copies with, a long wave of
                            // page-cache reads would all complete inline before the first is
                            // published: the driver, asleep until then, leaves the ring empty
                            // while it wakes. Publish every PUBLISH_EVERY inline completions
                            // instead, so it refills the ring while the rest runs (when it has
                            // a CPU to do so: SharePolicy::publish_early). Ops that go to the
                            // ring only wait in its queue here, as before.
                            if self.fresh.len() >= PUBLISH_EVERY && self.share.publish_early() {
                                self.launch(mem);
                                if self.ready.len() >= PUBLISH_EVERY {
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => broken = Some(e),
                }
            }
            if popped > 0 {
                waves += 1;
                self.stats.batches += 1;
                self.launch(mem);
                (refill, rechecked) = (false, false);
            }
            // Wait for the engine only when there is nothing else to do; the wait hands the
            // ops just started to the kernel in the same system call. When completed requests
            // are to be published first, the ops start now.
            let wait = popped == 0 && self.ready.is_empty() && self.in_flight() > 0;
            // A driver given completions refills the ring while the engine works: with
            // notifications on, its kick ends the wait, so its requests do not sit in the ring
            // until the next completion (a disk's time for large or O_DIRECT requests). A
            // driver given none may still queue requests while a flush, a fallocate, a write
            // through or a throttled write runs, which can take the disk's time for many
            // requests (a read behind a guest's fsync), and so may the slow path's work: waits
            // for them watch the doorbell too. Notifications are turned on only once the poll
            // is queued (they stay off where it cannot be: the blocking engine); the kernel
            // starts it with the wait, and a kick written before that still rings, as nothing
            // reads the kick eventfd during a pass.
            let mut notified = false;
            let long_wait = self.long_ops > 0 || self.slow.in_flight() > 0;
            if wait
                && (refill || long_wait)
                && broken.is_none()
                && self.store.room() > 0
                && self.takes_more(waves)
                && self
                    .doorbell
                    .is_some_and(|fd| self.engine.watch_doorbell(fd))
            {
                match queue.enable_notification(mem) {
                    Ok(true) if !rechecked => {
                        // The poll stays armed for the rest of the pass.
                        rechecked = true;
                        if let Err(e) = queue.disable_notification(mem) {
                            broken = Some(e);
                        }
                        continue;
                    }
                    // Off again after the wait.
                    Ok(_) => notified = true,
                    Err(e) => broken = Some(e),
                }
            }
            if wait && self.engine.helper_in_flight() > 0 {
                self.share.worker_waits();
            }
            if !self.ready.is_empty() {
                self.engine.submit();
            }
            self.collect(mem, wait);
            if notified {
                if let Err(e) = queue.disable_notification(mem) {
                    broken.get_or_insert(e);
                }
            }
            if self.ready.is_empty() {
                if popped == 0 && self.in_flight() == 0 {
                    self.share.account(started);
                    return match broken {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                continue;
            }
            self.publish(queue, mem, tracker);
            refill = true;
            match queue.needs_notification(mem) {
                Ok(false) => {}
                Ok(true) => notify(),
                Err(e) => {
                    // Requests may still be in flight: finish them before reporting it, and
                    // notify, as the ring cannot say whether the guest wants it.
                    notify();
                    broken.get_or_insert(e);
                }
            }
        }
    }

    /// Put the completed requests in the used ring.
    fn publish(&mut self, queue: &mut Queue, mem: &GuestMem, tracker: Option<&dyn Tracker>) {
        let mut heads = std::mem::take(&mut self.heads);
        heads.clear();
        heads.extend(self.ready.iter().map(|(_, c)| c.head));
        if let Some(t) = tracker {
            t.completing(&heads);
        }
        let ready = std::mem::take(&mut self.ready);
        for (_, c) in &ready {
            // A head index past the ring (a broken or hostile driver) cannot be completed;
            // the rest still are. Not handed to the queue, which would log each one itself,
            // past this queue's limit.
            if c.head >= queue.size() {
                self.guest_warn(
                    c.head,
                    format_args!("head index past the ring of {}", queue.size()),
                );
                continue;
            }
            if let Err(e) = queue.add_used(mem, c.head, c.len) {
                self.guest_warn(c.head, format_args!("cannot complete the request: {e}"));
            }
        }
        if let Some(t) = tracker {
            t.completed(&heads, queue.next_used());
        }
        self.ready = ready;
        self.ready.clear();
        self.heads = heads;
    }

    /// Execute a batch of chains (head index and descriptors) against `mem` and return their
    /// completions, in the same order. Status bytes and read data are written to `mem`. As a
    /// pass does, it starts no chain while [`DATA_IN_FLIGHT_MAX`] are in flight, and none once
    /// the stop flag of [`Executor::stop_on`] is set: then the completions are those of the
    /// chains before the first one not started.
    pub fn execute<I, D>(&mut self, mem: &GuestMem, chains: I) -> Vec<Completion>
    where
        I: IntoIterator<Item = (u16, D)>,
        D: IntoIterator<Item = Descriptor>,
    {
        self.drained(|ex| ex.execute_all(mem, chains))
    }

    fn execute_all<I, D>(&mut self, mem: &GuestMem, chains: I) -> Vec<Completion>
    where
        I: IntoIterator<Item = (u16, D)>,
        D: IntoIterator<Item = Descriptor>,
    {
        let limits = self.limits();
        let write_through = self.write_through();
        let mut pos = 0u32;
        for (head, chain) in chains {
            while !self.stopping()
                && (self.store.room() == 0 || self.data_in_flight >= DATA_IN_FLIGHT_MAX)
            {
                self.launch(mem);
                if self.in_flight() == 0 && self.store.room() > 0 {
                    // Nothing to wait for.
                    break;
                }
                self.collect(mem, true);
            }
            if self.stopping() {
                break;
            }
            self.start(mem, head, chain, pos, &limits, write_through);
            pos = pos.wrapping_add(1);
        }
        self.launch(mem);
        while self.in_flight() > 0 {
            self.collect(mem, true);
        }
        self.stats.batches += 1;
        let mut ready = std::mem::take(&mut self.ready);
        ready.sort_by_key(|(p, _)| *p);
        ready.into_iter().map(|(_, c)| c).collect()
    }

    /// Parse one chain and start it: ops wait in `fresh` for [`Self::launch`]; everything else
    /// is ready at once.
    fn start<D>(
        &mut self,
        mem: &GuestMem,
        head: u16,
        chain: D,
        pos: u32,
        limits: &Limits,
        write_through: bool,
    ) where
        D: IntoIterator<Item = Descriptor>,
    {
        let parsed = match parse(chain, mem, limits) {
            Ok(r) => self.plan(mem, head, pos, r, write_through),
            Err(rej) => {
                self.guest_warn(head, format_args!("request rejected: {}", rej.error));
                let status = rej.error.status();
                Parsed::Done(self.complete(mem, head, rej.status, status, 1))
            }
        };
        match parsed {
            Parsed::Op(req) => {
                self.data_in_flight += req.data_len;
                let id = self.store.insert(req);
                self.fresh.push(id);
            }
            Parsed::Slow(req, work) => {
                self.data_in_flight += req.data_len;
                let id = self.store.insert(req);
                if let Err(e) = self.slow.submit(id, work) {
                    self.finish(mem, id, Err(e));
                }
            }
            Parsed::Done(c) => self.ready.push((pos, c)),
        }
    }

    /// Give the engine every op parsed since the last call; part of the page-cache reads go
    /// to the helper first (taken from the end of the launch), as the share policy says. The
    /// ring's entries reach the kernel with the next submit or wait.
    fn launch(&mut self, mem: &GuestMem) {
        if self.fresh.is_empty() {
            return;
        }
        let mut fresh = std::mem::take(&mut self.fresh);
        // One request and nothing else to wait for or to publish: a large read that is its
        // one op has nothing to overlap with and is copied here rather than handed to io-wq
        // (set per request below: a request of several ops runs them side by side).
        let alone = fresh.len() == 1 && self.in_flight() == 0 && self.ready.is_empty();
        let shareable = fresh
            .iter()
            .filter(|&&id| {
                self.store
                    .get(id)
                    .is_some_and(|r| single_shareable(&r.stage))
            })
            .count();
        let portion = self
            .share
            .portion(shareable, self.engine.helper_in_flight() == 0);
        let mut to_share = if portion > 0 && self.engine.can_share() {
            portion
        } else {
            0
        };
        for pass in [true, false] {
            for i in 0..fresh.len() {
                let id = if pass {
                    fresh[fresh.len() - 1 - i]
                } else {
                    fresh[i]
                };
                let Some(req) = self.store.get_mut(id) else {
                    continue;
                };
                if !matches!(req.stage, Stage::Parsed(_)) {
                    continue;
                }
                let share = pass && to_share > 0 && single_shareable(&req.stage);
                if pass && !share {
                    continue;
                }
                if share {
                    to_share -= 1;
                }
                let Some(ops) = req.stage.enter_engine() else {
                    continue;
                };
                self.engine.set_alone(alone && ops.len() == 1);
                let mut finished: smallvec::SmallVec<[std::io::Result<()>; 2]> =
                    smallvec::SmallVec::new();
                for (k, op) in ops.iter_mut().enumerate() {
                    let uid = id as usize * MAX_OPS + k;
                    // SAFETY: the ops live in a boxed chunk of the store, which never moves,
                    // and stay there (in their `InEngine` stage) until `collect` reaps their
                    // completions; every request is completed before `process_queue`/`execute`
                    // returns, while the caller's `mem` keeps guest memory mapped.
                    let started = unsafe { self.engine.start(uid, op, share) };
                    match started {
                        Started::Done(result) => finished.push(result),
                        Started::Queued | Started::Partly { .. } => {
                            self.long_ops += usize::from(lengthy(op));
                        }
                    }
                }
                let mut last = false;
                for result in finished {
                    last = req.stage.op_done(result);
                }
                if last {
                    let result = req.stage.take_result();
                    self.finish(mem, id, result);
                }
            }
        }
        fresh.clear();
        self.fresh = fresh;
        // Inline writes that slept did so as a wait on the ring would: not busy time, and no
        // poll after the pass.
        let (slept, took) = self.engine.take_slow_writes();
        if slept > 0 {
            self.stats.waits += slept;
            self.share.blocked(took);
        }
    }

    /// Finish the requests whose I/O completed; with `wait`, block until at least one did.
    fn collect(&mut self, mem: &GuestMem, wait: bool) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        let slow = self.slow.in_flight() > 0;
        // The engine wakes for the slow path too when it can; otherwise, with nothing of its
        // own in flight, the worker waits on the slow path itself.
        let watched = slow && self.engine.watch(self.slow.event_fd());
        // Waits on the helper alone are short (page-cache copies on another CPU): not counted.
        if wait && (slow || self.engine.in_flight() > self.engine.helper_in_flight()) {
            self.stats.waits += 1;
        }
        let t = Instant::now();
        if wait && slow && !watched && self.engine.in_flight() == 0 {
            let mut done = std::mem::take(&mut self.slow_done);
            self.slow.collect(&mut done, true);
            self.slow_done = done;
        } else {
            self.engine.reap(&mut cqes, wait);
        }
        if wait {
            self.share.blocked(t.elapsed());
        }
        let mut again = false;
        for &(uid, res) in &cqes {
            if uid == DOORBELL_ID {
                self.stats.doorbells += 1;
                continue;
            }
            if uid == WATCH_ID {
                continue;
            }
            let (Ok(id), k) = (u32::try_from(uid / MAX_OPS), uid % MAX_OPS) else {
                continue;
            };
            let Some(req) = self.store.get_mut(id) else {
                continue;
            };
            let Stage::InEngine { ops, .. } = &mut req.stage else {
                continue;
            };
            let Some(op) = ops.get_mut(k) else { continue };
            if lengthy(op) {
                debug_assert!(self.long_ops > 0, "a long op completed twice");
                self.long_ops = self.long_ops.saturating_sub(1);
            }
            let result = match blocking::finish(op, res) {
                Reaped::Done(result) => result,
                // SAFETY: as in `launch`: the op stays in the store until reaped.
                Reaped::Again => match unsafe { self.engine.start(uid, op, false) } {
                    Started::Done(result) => result,
                    Started::Queued | Started::Partly { .. } => {
                        self.long_ops += usize::from(lengthy(op));
                        again = true;
                        continue;
                    }
                },
            };
            if req.stage.op_done(result) {
                let result = req.stage.take_result();
                self.finish(mem, id, result);
            }
        }
        if again {
            self.engine.submit();
        }
        self.cqes = cqes;
        if self.slow.in_flight() > 0 || !self.slow_done.is_empty() {
            let mut done = std::mem::take(&mut self.slow_done);
            self.slow.collect(&mut done, false);
            if self.slow.panicked() {
                self.disk.fail();
            }
            for (id, result) in done.drain(..) {
                self.finish(mem, id, result);
            }
            self.slow_done = done;
        }
    }

    /// Request `id` completed with `result`: turn it into a completion.
    fn finish(&mut self, mem: &GuestMem, id: u32, result: std::io::Result<()>) {
        let Some(req) = self.store.remove(id) else {
            return;
        };
        self.data_in_flight = self.data_in_flight.saturating_sub(req.data_len);
        let kind = req.stage.ops().first().map(|op| op.kind);
        let (status, used) = match result {
            Ok(()) => {
                match req.transfer {
                    Transfer::Write => self.stats.bytes_written += req.data_len,
                    Transfer::Read => self.stats.bytes_read += req.data_len,
                    Transfer::None => {}
                }
                (
                    STATUS_OK,
                    used_len(req.transfer != Transfer::Read, req.data_len),
                )
            }
            Err(e) => {
                if kind == Some(OpKind::Sync) {
                    self.disk.poison_flush(&e);
                }
                let what = match req.transfer {
                    Transfer::Read => "read",
                    Transfer::Write => "write",
                    Transfer::None => kind.as_ref().map_or("request", op_name),
                };
                // Within the queue's budget: a failing disk, or a guest that keeps asking for
                // what fails, would fail every request.
                self.guest_warn(
                    req.head,
                    format_args!(
                        "{what} of {} bytes at offset {} failed: {}",
                        req.data_len,
                        req.offset,
                        Causes(&e)
                    ),
                );
                (STATUS_IOERR, 1)
            }
        };
        let c = self.complete(mem, req.head, Some(req.status), status, used);
        self.ready.push((req.pos, c));
    }

    /// Write the status byte and count the request; the completion for the used ring. A chain
    /// without a usable status byte is returned with nothing written.
    fn complete(
        &mut self,
        mem: &GuestMem,
        head: u16,
        status_addr: Option<GuestAddress>,
        status: u8,
        used: u32,
    ) -> Completion {
        let mut len = match status_addr {
            Some(addr) if super::guest::write_u8(mem, addr, status) => used,
            _ => 0,
        };
        if status != STATUS_OK {
            len = len.min(1);
            self.stats.errors += 1;
        }
        self.stats.requests += 1;
        Completion { head, len, status }
    }
}

/// Used length of a successful read or write of `len` bytes: the data plus the status byte
/// for a read (the data length is below u32::MAX: the chain iterator caps it), the status
/// byte for a write.
fn used_len(write: bool, len: u64) -> u32 {
    if write {
        1
    } else {
        u32::try_from(len + 1).unwrap_or(u32::MAX)
    }
}

/// Whether the request is one page-cache read the helper could serve.
fn single_shareable(stage: &Stage) -> bool {
    matches!(stage, Stage::Parsed(ops) if ops.len() == 1 && ops[0].shareable())
}

fn op_name(kind: &OpKind) -> &'static str {
    match kind {
        OpKind::Read => "read",
        OpKind::Write { .. } => "write",
        OpKind::Sync => "flush",
        OpKind::Fallocate { .. } => "discard/write-zeroes",
    }
}
