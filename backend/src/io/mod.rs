//! The request executor: turns descriptor chains into I/O on the image and completions for
//! the used ring.
//!
//! [`Executor::process_queue`] is the data path of one worker thread, a pipeline: it pops every
//! available chain, parses it ([`crate::request::parse`], pure), starts its read or write on
//! the thread's engine with iovecs that point straight into guest memory (page-cache hits
//! complete at once; with several reads at hand, half of them go to a kernel thread that
//! copies on another CPU), runs flushes, discards and write-zeroes at once, and puts every
//! request in the used ring as soon as it completed, notifying the guest when it asks for it
//! (EVENT_IDX honoured by `needs_notification`), so the guest queues new requests while others
//! are still in flight. It keeps popping until the queue is empty and nothing is in flight.
//! [`Executor::execute`] does the same for any list of chains without a queue, which is what
//! tests, recovery and fuzzers call.

mod engine;
mod ratelimit;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub use self::engine::{Engine, EngineError, Iovecs, RwOp, IOV_MAX};
pub use self::ratelimit::RateLimiter;
use crate::config::EngineKind;
use crate::disk::Disk;
use crate::inflight::{Inflight, QueueInflight};
use crate::request::{parse, GuestRange, Limits, RequestKind, ID_BYTES};

/// Guest memory as the backend maps it (no dirty-page bitmap).
pub type GuestMem = GuestMemoryMmap<()>;

/// How many guest-caused warnings one queue may log per second.
pub const WARNINGS_PER_SECOND: u32 = 5;

const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

/// The outcome of one chain: what goes into the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index.
    pub head: u16,
    /// Bytes written into the chain's device-writable buffers (data + status).
    pub len: u32,
    /// The status byte written (or that would have been, if the chain had no status byte).
    pub status: u8,
}

/// Counters of one executor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests completed.
    pub requests: u64,
    /// Requests that did not complete with OK.
    pub errors: u64,
    /// Batches processed.
    pub batches: u64,
    /// Bytes read from the image.
    pub bytes_read: u64,
    /// Bytes written to the image.
    pub bytes_written: u64,
}

/// Fewest reads started together that are worth sharing with the engine's second CPU.
const SHARE_MIN: usize = 4;

/// Bounds and start of the part of a batch's page-cache reads given to the engine's helper,
/// in sixteenths; the part adapts to which of the two CPUs waits for the other.
const SHARE_MAX: usize = 15;
const SHARE_START: usize = 12;
const SHARE_PROBE: usize = 4;

/// Batches started without sharing before sharing is tried again.
const PROBE_EVERY: usize = 256;

/// Most waves (chains popped together) one `process_queue` call takes.
const WAVES_PER_CALL: usize = 1024;

/// Window over which a worker's busy time is measured.
const LOAD_WINDOW: Duration = Duration::from_millis(20);

/// Busy share of a window (in percent) from which a worker counts as saturated: below it, the
/// worker keeps up alone and a helper's polling thread would spin for a trickle.
const SATURATED_PERCENT: u32 = 75;

/// Requests are kept in chunks of this many, so the store grows without moving a request
/// whose iovecs the kernel holds.
const CHUNK: usize = 32;

/// Executes requests of one queue. Owned by that queue's worker thread.
#[derive(Debug)]
pub struct Executor {
    disk: Arc<Disk>,
    engine: Engine,
    queue: u16,
    limiter: RateLimiter,
    stats: Stats,
    features: u64,
    /// Requests started and not yet completed, by id.
    reqs: Reqs,
    /// Ids not in use.
    free: Vec<u32>,
    /// Most requests in flight at once (the queue size).
    capacity: usize,
    /// Completed requests not yet in the used ring, with their arrival position.
    ready: Vec<(u32, Completion)>,
    /// Reads and writes parsed since the engine was last given work.
    fresh: Vec<u32>,
    /// Sixteenths of the page-cache reads of a batch given to the engine's helper.
    share: usize,
    /// Batches started since sharing stopped.
    probe: usize,
    /// How busy this worker is, and how many workers of the device are.
    load: Load,
    /// Scratch buffers kept for their capacity, so the data path allocates nothing once the
    /// first few requests have run.
    heads: Vec<u16>,
    cqes: Vec<(usize, i32)>,
}

/// One request from the time its chain is popped until it is completed.
#[derive(Debug)]
struct Req {
    head: u16,
    /// Arrival position within one [`Executor::execute`] call.
    pos: u32,
    status_addr: Option<GuestAddress>,
    status: u8,
    used: u32,
    kind: Option<RequestKind>,
    data_len: u64,
    offset: u64,
    /// The read or write, until it completes.
    op: Option<RwOp>,
    /// `op` was given to the engine.
    handed: bool,
}

/// Request store: boxed chunks that never move once allocated, because the kernel holds
/// pointers to the iovecs of requests in flight.
#[derive(Debug, Default)]
struct Reqs(Vec<Box<[Option<Req>; CHUNK]>>);

// SAFETY: the only thing that is not Send in a `Req` is the raw pointers of its iovecs, which
// point into guest memory mapped for the whole process; every request is completed before the
// worker's `process_queue`/`execute` call returns, so none is in flight when the executor
// moves to another thread.
unsafe impl Send for Reqs {}

impl Reqs {
    fn get_mut(&mut self, id: u32) -> Option<&mut Option<Req>> {
        let id = id as usize;
        self.0.get_mut(id / CHUNK).map(|c| &mut c[id % CHUNK])
    }

    fn op(&self, id: u32) -> Option<&RwOp> {
        let id = id as usize;
        self.0.get(id / CHUNK)?[id % CHUNK].as_ref()?.op.as_ref()
    }

    fn op_mut(&mut self, id: u32) -> Option<&mut RwOp> {
        self.get_mut(id)?.as_mut()?.op.as_mut()
    }

    fn len(&self) -> usize {
        self.0.len() * CHUNK
    }

    /// Add a chunk; returns the ids it holds.
    fn grow(&mut self) -> std::ops::Range<u32> {
        let start = self.len() as u32;
        self.0.push(Box::new(std::array::from_fn(|_| None)));
        start..start + CHUNK as u32
    }
}

/// Busy time of one worker, measured over [`LOAD_WINDOW`]s.
#[derive(Debug)]
struct Load {
    window: Instant,
    busy: Duration,
    /// Time blocked waiting for the engine in the current call.
    blocked: Duration,
    /// The last full window was busy for at least [`SATURATED_PERCENT`].
    saturated: bool,
    /// Saturated workers of the device, this one included while `saturated`.
    counter: Arc<AtomicUsize>,
    cpus: usize,
    /// Share regardless of the load.
    always: bool,
}

impl Load {
    fn new(counter: Arc<AtomicUsize>) -> Load {
        Load {
            window: Instant::now(),
            busy: Duration::ZERO,
            blocked: Duration::ZERO,
            saturated: false,
            counter,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            always: false,
        }
    }

    fn set_counter(&mut self, counter: Arc<AtomicUsize>) {
        if self.saturated {
            self.counter.fetch_sub(1, Ordering::Relaxed);
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.counter = counter;
    }

    /// Count the time since `since`, less the time blocked waiting for the engine, as busy
    /// and close the window when it is full.
    fn account(&mut self, since: Instant) {
        let now = Instant::now();
        self.busy += now
            .saturating_duration_since(since)
            .saturating_sub(std::mem::take(&mut self.blocked));
        let span = now.saturating_duration_since(self.window);
        if span < LOAD_WINDOW {
            return;
        }
        let saturated = self.busy * 100 >= span * SATURATED_PERCENT;
        if saturated != self.saturated {
            if saturated {
                self.counter.fetch_add(1, Ordering::Relaxed);
            } else {
                self.counter.fetch_sub(1, Ordering::Relaxed);
            }
            self.saturated = saturated;
        }
        self.window = now;
        self.busy = Duration::ZERO;
    }

    /// Whether every saturated worker of the device can have two CPUs.
    fn may_share(&self) -> bool {
        self.always || self.saturated && 2 * self.counter.load(Ordering::Relaxed) <= self.cpus
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if self.saturated {
            self.counter.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Executor {
    /// An executor for queue `queue` with an engine of `kind`, sized for `queue_size`.
    pub fn new(
        disk: Arc<Disk>,
        queue: u16,
        kind: EngineKind,
        queue_size: u16,
    ) -> Result<Executor, EngineError> {
        Ok(Executor {
            features: crate::device::device_features(&disk),
            disk,
            engine: Engine::new(kind, u32::from(queue_size))?,
            queue,
            limiter: RateLimiter::new(WARNINGS_PER_SECOND),
            stats: Stats::default(),
            reqs: Reqs::default(),
            free: Vec::new(),
            capacity: usize::from(queue_size).clamp(1, 4096),
            ready: Vec::new(),
            fresh: Vec::new(),
            share: SHARE_START,
            probe: 0,
            load: Load::new(Arc::new(AtomicUsize::new(0))),
            heads: Vec::new(),
            cqes: Vec::new(),
        })
    }

    /// Tell the executor which virtio features the driver negotiated (all offered ones until
    /// this is called). `size_max` and `seg_max` bind only a driver that negotiated
    /// VIRTIO_BLK_F_SIZE_MAX / VIRTIO_BLK_F_SEG_MAX (UEFI's VirtioBlkDxe negotiates neither
    /// and puts a whole transfer in one descriptor), and a driver without VIRTIO_BLK_F_FLUSH
    /// cannot ask for durability, so its writes are written through.
    pub fn set_features(&mut self, features: u64) {
        self.features = features;
    }

    /// Share page-cache reads with the engine's helper whenever a batch has enough of them,
    /// saturated or not (tests and fuzzing use this to exercise the helper path).
    pub fn always_share(&mut self) {
        self.load.always = true;
    }

    /// Count this executor's worker in `busy`, the number of the device's workers that are
    /// saturated (a private counter by default). A saturated worker shares page-cache reads
    /// with its engine's helper thread only while every saturated worker can have a CPU for
    /// itself and one for its helper: otherwise a polling helper only takes CPU time from
    /// the workers.
    pub fn count_load_in(&mut self, busy: Arc<AtomicUsize>) {
        self.load.set_counter(busy);
    }

    /// The negotiated features in effect.
    pub fn features(&self) -> u64 {
        self.features
    }

    fn negotiated(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }

    /// Whether writes are made durable before they complete: the guest turned the write cache
    /// off, or it cannot flush.
    pub fn write_through(&self) -> bool {
        !self.disk.writeback() || !self.negotiated(VIRTIO_BLK_F_FLUSH)
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

    /// Serve `queue` until it is empty (or [`WAVES_PER_CALL`] waves were taken) and nothing is
    /// in flight, putting requests in the used ring as they complete. Returns whether the
    /// guest must be notified.
    pub fn process_queue(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
    ) -> Result<bool, virtio_queue::Error> {
        let mut notify = false;
        self.process_queue_tracked(queue, mem, None, &mut || notify = true)?;
        Ok(notify)
    }

    /// [`Executor::process_queue`] with inflight tracking ([`crate::inflight`]): each chain is
    /// recorded in `track` when taken and cleared once it is in the used ring. `notify` is
    /// called each time the guest asks to be told about completed requests; every request
    /// popped is completed when this returns, also when it returns an error.
    pub fn process_queue_tracked(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        track: Option<(&QueueInflight<'_>, &Inflight)>,
        notify: &mut dyn FnMut(),
    ) -> Result<(), virtio_queue::Error> {
        self.drained(|ex| ex.serve(queue, mem, track, notify))
    }

    /// Run `f`; if it panics, wait for the engine's ops in flight before unwinding further:
    /// the kernel may still write into guest memory that the caller unmaps afterwards.
    fn drained<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        done.unwrap_or_else(|panic| {
            self.engine.drain();
            std::panic::resume_unwind(panic)
        })
    }

    fn serve(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        track: Option<(&QueueInflight<'_>, &Inflight)>,
        notify: &mut dyn FnMut(),
    ) -> Result<(), virtio_queue::Error> {
        let mut broken = None;
        let started = Instant::now();
        let mut waves = 0;
        loop {
            let mut popped = 0;
            // After WAVES_PER_CALL waves, stop taking requests and return once the ones in
            // flight are done, so the caller gets to release the vring now and then.
            if broken.is_none() && self.room() > 0 && waves < WAVES_PER_CALL {
                match queue.iter(mem) {
                    Ok(chains) => {
                        // Taken for each wave, after the available index was read: the image
                        // size (SIGHUP) and the write cache mode (a config write) may have
                        // changed since the last one, before the guest queued these requests.
                        let limits = self.limits();
                        let dsync = self.write_through();
                        for chain in chains {
                            let head = chain.head_index();
                            if let Some((t, counter)) = track {
                                t.take(head, counter.next_counter());
                            }
                            self.start(mem, head, chain, 0, &limits, dsync);
                            popped += 1;
                            if self.room() == 0 {
                                break;
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
            }
            let in_flight = self.engine.in_flight();
            // Wait for the engine only when there is nothing else to do.
            let wait = popped == 0 && self.ready.is_empty() && in_flight > 0;
            if wait && self.engine.helper_in_flight() > 0 && self.share > 0 {
                // This thread is idle while the helper still copies: give it less.
                self.share -= 1;
            }
            self.collect(mem, wait);
            if self.ready.is_empty() {
                if popped == 0 && self.engine.in_flight() == 0 {
                    self.load.account(started);
                    return match broken {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                continue;
            }
            self.publish(queue, mem, track);
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
    fn publish(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        track: Option<(&QueueInflight<'_>, &Inflight)>,
    ) {
        let mut heads = std::mem::take(&mut self.heads);
        heads.clear();
        heads.extend(self.ready.iter().map(|(_, c)| c.head));
        if let Some((t, _)) = track {
            t.begin_batch(&heads);
        }
        let ready = std::mem::take(&mut self.ready);
        for (_, c) in &ready {
            // A head index past the ring (a broken or hostile driver) cannot be completed;
            // the rest still are.
            if let Err(e) = queue.add_used(mem, c.head, c.len) {
                self.guest_warn(c.head, format_args!("cannot complete the request: {e}"));
            }
        }
        if let Some((t, _)) = track {
            t.end_batch(&heads, queue.next_used());
        }
        self.ready = ready;
        self.ready.clear();
        self.heads = heads;
    }

    /// Execute a batch of chains (head index and descriptors) against `mem` and return their
    /// completions, in the same order. Status bytes and read data are written to `mem`.
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
        let dsync = self.write_through();
        let mut pos = 0u32;
        for (head, chain) in chains {
            while self.room() == 0 {
                self.launch(mem);
                self.collect(mem, true);
            }
            self.start(mem, head, chain, pos, &limits, dsync);
            pos = pos.wrapping_add(1);
        }
        self.launch(mem);
        while self.engine.in_flight() > 0 {
            self.collect(mem, true);
        }
        self.stats.batches += 1;
        let mut ready = std::mem::take(&mut self.ready);
        ready.sort_by_key(|(p, _)| *p);
        ready.into_iter().map(|(_, c)| c).collect()
    }

    /// How many more requests may start.
    fn room(&self) -> usize {
        self.capacity
            .saturating_sub(self.reqs.len() - self.free.len())
    }

    /// Parse one chain and start it: reads and writes wait in `fresh` for [`Self::launch`];
    /// everything else runs now and is ready at once.
    fn start<D>(
        &mut self,
        mem: &GuestMem,
        head: u16,
        chain: D,
        pos: u32,
        limits: &Limits,
        dsync: bool,
    ) where
        D: IntoIterator<Item = Descriptor>,
    {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let ids = self.reqs.grow();
                let first = ids.start;
                self.free.extend(ids.skip(1).rev());
                first
            }
        };
        let mut req = match parse(chain, mem, limits) {
            Ok(r) => {
                let mut req = Req {
                    head,
                    pos,
                    status_addr: Some(r.status),
                    status: STATUS_OK,
                    used: 1,
                    offset: r.offset(),
                    kind: None,
                    data_len: r.data_len,
                    op: None,
                    handed: false,
                };
                match r.kind {
                    RequestKind::Read { .. } | RequestKind::Write { .. } if r.data_len > 0 => {
                        let write = matches!(r.kind, RequestKind::Write { .. });
                        match self.rw_op(mem, &r.data, write, req.offset, r.data_len, dsync) {
                            Some(op) => req.op = Some(op),
                            None => {
                                req.status = STATUS_IOERR;
                                self.guest_warn(
                                    head,
                                    format_args!("request buffers are not in guest memory"),
                                );
                            }
                        }
                    }
                    RequestKind::GetId => req.used = self.write_id(mem, &r.data) + 1,
                    _ => {}
                }
                req.kind = Some(r.kind);
                req
            }
            Err(rej) => {
                self.guest_warn(head, format_args!("request rejected: {}", rej.error));
                Req {
                    head,
                    pos,
                    status_addr: rej.status,
                    status: rej.error.status(),
                    used: u32::from(rej.status.is_some()),
                    offset: 0,
                    kind: None,
                    data_len: 0,
                    op: None,
                    handed: false,
                }
            }
        };
        let has_op = req.op.is_some();
        if !has_op {
            self.run_other(&mut req);
        }
        if let Some(slot) = self.reqs.get_mut(id) {
            *slot = Some(req);
        }
        if has_op {
            self.fresh.push(id);
        } else {
            self.finish(mem, id);
        }
    }

    /// The read or write of `data` at `offset`; `None` when a buffer is not in guest memory.
    fn rw_op(
        &self,
        mem: &GuestMem,
        data: &[GuestRange],
        write: bool,
        offset: u64,
        len: u64,
        dsync: bool,
    ) -> Option<RwOp> {
        let iov = guest_iovecs(mem, data)?;
        let aligned = iov
            .iter()
            .all(|v| (v.iov_base as usize).is_multiple_of(512) && v.iov_len.is_multiple_of(512));
        let direct = self.disk.is_direct() && aligned;
        let fd = if direct {
            self.disk.fd()
        } else {
            self.disk.buffered_fd()
        };
        Some(RwOp {
            write,
            fd,
            fallback_fd: self.disk.buffered_fd(),
            offset,
            iov,
            len,
            dsync: write && dsync,
            buffered: !direct,
            result: None,
        })
    }

    /// Write the device serial into `data`; returns the bytes written.
    fn write_id(&self, mem: &GuestMem, data: &[GuestRange]) -> u32 {
        let serial = *self.disk.serial();
        let mut written = 0usize;
        for r in data {
            if written == ID_BYTES {
                break;
            }
            let n = (r.len as usize).min(ID_BYTES - written);
            if mem
                .write_slice(&serial[written..written + n], r.addr)
                .is_err()
            {
                break;
            }
            written += n;
        }
        written as u32
    }

    /// Run a request that has no read or write to start (flush, discard, write-zeroes, GET_ID,
    /// empty transfers, refused requests): they complete at once. A flush makes durable every
    /// write completed before it was popped, which is what the guest waited for before
    /// sending it.
    fn run_other(&mut self, req: &mut Req) {
        if req.status != STATUS_OK || self.engine.is_null() {
            return;
        }
        let result = match &req.kind {
            Some(RequestKind::Flush) => self.disk.flush(),
            Some(RequestKind::Discard(segs)) => self.disk.discard(segs),
            Some(RequestKind::WriteZeroes(segs)) => self.disk.write_zeroes(segs),
            _ => return,
        };
        if let Err(e) = result {
            req.status = STATUS_IOERR;
            warn!(queue = self.queue, "{:?} failed: {e}", req.kind);
        }
    }

    /// Give the engine every read and write parsed since the last call. When this worker is
    /// saturated and a CPU is free for the engine's helper, part of the page-cache reads (at
    /// least [`SHARE_MIN`] of them) go to the helper first, taken from the end of the batch,
    /// so its copies run while this thread copies the rest. The part adapts: one sixteenth
    /// more each time the helper had caught up, one less each time this thread had to wait
    /// for it, and after sharing stopped it is tried again every [`PROBE_EVERY`] batches.
    fn launch(&mut self, mem: &GuestMem) {
        if self.fresh.is_empty() {
            return;
        }
        let mut fresh = std::mem::take(&mut self.fresh);
        let shareable = fresh
            .iter()
            .filter(|&&id| self.reqs.op(id).is_some_and(RwOp::shareable))
            .count();
        let mut to_share = 0;
        if self.load.may_share() && shareable >= SHARE_MIN && self.engine.can_share() {
            if self.share == 0 {
                // Sharing stopped paying: try again now and then.
                self.probe += 1;
                if self.probe == PROBE_EVERY {
                    self.probe = 0;
                    self.share = SHARE_PROBE;
                }
            } else if self.engine.helper_in_flight() == 0 && self.share < SHARE_MAX {
                // The helper caught up with everything it was given: give it more.
                self.share += 1;
            }
            to_share = shareable * self.share / 16;
        }
        for pass in [true, false] {
            for i in 0..fresh.len() {
                // Shared reads are taken from the end of the batch.
                let id = if pass {
                    fresh[fresh.len() - 1 - i]
                } else {
                    fresh[i]
                };
                let Some(req) = self.reqs.get_mut(id).and_then(Option::as_mut) else {
                    continue;
                };
                if req.handed {
                    continue;
                }
                let Some(op) = req.op.as_mut() else { continue };
                if pass && (to_share == 0 || !op.shareable()) {
                    continue;
                }
                if pass {
                    to_share -= 1;
                }
                req.handed = true;
                // SAFETY: the op lives in a boxed chunk of `reqs`, which never moves, and stays
                // there until `collect` reaps its completion; every request is completed before
                // `process_queue`/`execute` returns, while the caller's `mem` keeps guest
                // memory mapped.
                if unsafe { self.engine.start(id as usize, op, pass) } {
                    self.finish(mem, id);
                }
            }
        }
        self.engine.submit();
        fresh.clear();
        self.fresh = fresh;
    }

    /// Finish the requests whose I/O completed; with `wait`, block until at least one did.
    fn collect(&mut self, mem: &GuestMem, wait: bool) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        if wait {
            let t = Instant::now();
            self.engine.reap(&mut cqes, true);
            self.load.blocked += t.elapsed();
        } else {
            self.engine.reap(&mut cqes, false);
        }
        for &(id, res) in &cqes {
            let Ok(id) = u32::try_from(id) else { continue };
            let Some(op) = self.reqs.op_mut(id) else {
                continue;
            };
            engine::complete(op, res);
            self.finish(mem, id);
        }
        self.cqes = cqes;
    }

    /// Turn request `id` into a completion: its I/O outcome, status byte, used length.
    fn finish(&mut self, mem: &GuestMem, id: u32) {
        let Some(mut req) = self.reqs.get_mut(id).and_then(Option::take) else {
            return;
        };
        self.free.push(id);
        if let Some(op) = req.op.take() {
            // The engine may have advanced `op` past a part it served inline, so the request's
            // own length is what was transferred.
            let len = req.data_len;
            match op.result {
                Some(Ok(())) => {
                    if op.write {
                        self.stats.bytes_written += len;
                    } else {
                        self.stats.bytes_read += len;
                        // The data length is below u32::MAX: the chain iterator caps it.
                        req.used = u32::try_from(len + 1).unwrap_or(u32::MAX);
                    }
                }
                Some(Err(e)) => {
                    req.status = STATUS_IOERR;
                    warn!(
                        queue = self.queue,
                        "{} of {} bytes at offset {} failed: {e}",
                        if op.write { "write" } else { "read" },
                        len,
                        req.offset
                    );
                }
                None => req.status = STATUS_IOERR,
            }
        }
        let mut used = req.used;
        match req.status_addr {
            Some(addr) if mem.write_obj(req.status, addr).is_ok() => {}
            _ => used = 0,
        }
        if req.status != STATUS_OK {
            used = used.min(1);
            self.stats.errors += 1;
        }
        self.stats.requests += 1;
        self.ready.push((
            req.pos,
            Completion {
                head: req.head,
                len: used,
                status: req.status,
            },
        ));
    }
}

/// iovecs covering `data`, split where guest memory regions end; `None` when any byte is not
/// in guest memory.
fn guest_iovecs(mem: &GuestMem, data: &[GuestRange]) -> Option<Iovecs> {
    let mut iov = Iovecs::with_capacity(data.len());
    for r in data {
        for slice in mem.get_slices(r.addr, r.len as usize) {
            let slice = slice.ok()?;
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(iov)
}

/// Check that a guest address range is valid (used by tests).
pub fn in_memory(mem: &GuestMem, addr: GuestAddress, len: u64) -> bool {
    addr.checked_add(len).is_some() && mem.check_range(addr, len as usize)
}
