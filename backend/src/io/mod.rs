//! The request executor: turns a batch of descriptor chains into I/O on the image and
//! completions for the used ring.
//!
//! [`Executor::process_queue`] is the data path of one worker thread: it pops every available
//! chain, parses each one ([`crate::request::parse`], pure), submits all reads and writes at
//! once on the thread's engine with iovecs that point straight into guest memory, waits for all
//! of them, runs flushes, discards and write-zeroes, writes the status bytes, adds everything
//! to the used ring and tells the caller whether the guest needs a notification (EVENT_IDX
//! honoured by `needs_notification`). [`Executor::execute`] does the same for any list of
//! chains without a queue, which is what tests and fuzzers call.

mod engine;
mod ratelimit;
#[cfg(test)]
mod tests;

use std::sync::Arc;

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
use crate::request::{parse, GuestRange, GuestRanges, Limits, RequestKind, ID_BYTES, SECTOR_SIZE};

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

/// Executes requests of one queue. Owned by that queue's worker thread.
#[derive(Debug)]
pub struct Executor {
    disk: Arc<Disk>,
    engine: Engine,
    queue: u16,
    limiter: RateLimiter,
    stats: Stats,
    features: u64,
    /// Per-batch buffers, emptied after each batch and kept for their capacity, so a batch
    /// allocates nothing once the first few have run.
    slots: Vec<Slot>,
    ops: OpBuf,
    op_slots: Vec<usize>,
    heads: Vec<u16>,
    done: Vec<Completion>,
}

/// Reusable storage for a batch's [`RwOp`]s.
#[derive(Debug, Default)]
struct OpBuf(Vec<RwOp>);

// SAFETY: the only thing that is not Send in an `RwOp` is the raw pointers of its iovecs, and
// the executor empties this buffer before every batch returns: the iovecs never outlive the
// batch and never reach another thread, only the allocation (capacity) does.
unsafe impl Send for OpBuf {}

#[derive(Debug)]
struct Slot {
    head: u16,
    status_addr: Option<GuestAddress>,
    status: u8,
    used: u32,
    kind: Option<RequestKind>,
    data: GuestRanges,
    data_len: u64,
    offset: u64,
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
            slots: Vec::new(),
            ops: OpBuf::default(),
            op_slots: Vec::new(),
            heads: Vec::new(),
            done: Vec::new(),
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

    /// Pop every available chain of `queue`, execute them as one batch and put them in the
    /// used ring. Returns whether the guest must be notified.
    pub fn process_queue(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
    ) -> Result<bool, virtio_queue::Error> {
        self.process_queue_tracked(queue, mem, None)
    }

    /// [`Executor::process_queue`] with inflight tracking ([`crate::inflight`]): each chain is
    /// recorded in `track` when taken and cleared once it is in the used ring.
    pub fn process_queue_tracked(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        track: Option<(&QueueInflight<'_>, &Inflight)>,
    ) -> Result<bool, virtio_queue::Error> {
        // Every chain is popped (and recorded in `track`) while the batch is parsed, before any
        // I/O starts.
        let chains = queue.iter(mem)?.map(|c| {
            let head = c.head_index();
            if let Some((t, counter)) = track {
                t.take(head, counter.next_counter());
            }
            (head, c)
        });
        if !self.run_batch(mem, chains) {
            return Ok(false);
        }
        let done = std::mem::take(&mut self.done);
        let mut heads = std::mem::take(&mut self.heads);
        heads.clear();
        heads.extend(done.iter().map(|c| c.head));
        if let Some((t, _)) = track {
            t.begin_batch(&heads);
        }
        for c in &done {
            // A head index past the ring (a broken or hostile driver) cannot be completed;
            // the rest of the batch still is.
            if let Err(e) = queue.add_used(mem, c.head, c.len) {
                self.guest_warn(c.head, format_args!("cannot complete the request: {e}"));
            }
        }
        if let Some((t, _)) = track {
            t.end_batch(&heads, queue.next_used());
        }
        self.done = done;
        self.heads = heads;
        queue.needs_notification(mem)
    }

    /// Execute a batch of chains (head index and descriptors) against `mem` and return their
    /// completions, in the same order. Status bytes and read data are written to `mem`.
    pub fn execute<I, D>(&mut self, mem: &GuestMem, chains: I) -> Vec<Completion>
    where
        I: IntoIterator<Item = (u16, D)>,
        D: IntoIterator<Item = Descriptor>,
    {
        if !self.run_batch(mem, chains) {
            self.stats.batches += 1;
        }
        self.done.clone()
    }

    /// Execute a batch into `self.done`. Returns false (and counts no batch) when `chains` is
    /// empty.
    fn run_batch<I, D>(&mut self, mem: &GuestMem, chains: I) -> bool
    where
        I: IntoIterator<Item = (u16, D)>,
        D: IntoIterator<Item = Descriptor>,
    {
        let limits = self.limits();
        let mut slots = std::mem::take(&mut self.slots);
        slots.clear();
        self.done.clear();
        for (head, chain) in chains {
            match parse(chain, mem, &limits) {
                Ok(req) => slots.push(Slot {
                    head,
                    status_addr: Some(req.status),
                    status: STATUS_OK,
                    used: 1,
                    offset: req.offset(),
                    kind: Some(req.kind),
                    data: req.data,
                    data_len: req.data_len,
                }),
                Err(rej) => {
                    self.guest_warn(head, format_args!("request rejected: {}", rej.error));
                    slots.push(Slot {
                        head,
                        status_addr: rej.status,
                        status: rej.error.status(),
                        used: u32::from(rej.status.is_some()),
                        offset: 0,
                        kind: None,
                        data: GuestRanges::new(),
                        data_len: 0,
                    });
                }
            }
        }

        // Reads and writes: all at once on the engine.
        if slots.is_empty() {
            self.slots = slots;
            return false;
        }
        let mut ops = std::mem::take(&mut self.ops.0);
        let mut op_slots = std::mem::take(&mut self.op_slots);
        ops.clear();
        op_slots.clear();
        let dsync = self.write_through();
        for (i, slot) in slots.iter_mut().enumerate() {
            let (write, sector) = match slot.kind {
                Some(RequestKind::Read { sector }) => (false, sector),
                Some(RequestKind::Write { sector }) => (true, sector),
                _ => continue,
            };
            if slot.data_len == 0 {
                continue;
            }
            let Some(iov) = guest_iovecs(mem, &slot.data) else {
                slot.status = STATUS_IOERR;
                let head = slot.head;
                self.guest_warn(
                    head,
                    format_args!("request buffers are not in guest memory"),
                );
                continue;
            };
            let offset = sector * SECTOR_SIZE;
            let aligned = iov.iter().all(|v| {
                (v.iov_base as usize).is_multiple_of(512) && v.iov_len.is_multiple_of(512)
            });
            let direct = self.disk.is_direct() && aligned;
            let fd = if direct {
                self.disk.fd()
            } else {
                self.disk.buffered_fd()
            };
            ops.push(RwOp {
                write,
                fd,
                fallback_fd: self.disk.buffered_fd(),
                offset,
                iov,
                len: slot.data_len,
                dsync: write && dsync,
                buffered: !direct,
                result: None,
            });
            op_slots.push(i);
        }
        if !ops.is_empty() {
            self.engine.run(&mut ops);
        }
        for (op, &i) in ops.iter_mut().zip(&op_slots) {
            // The engine may have advanced `op` past a part it served inline, so the request's
            // own length is what was transferred.
            let len = slots[i].data_len;
            match op.result.take() {
                Some(Ok(())) => {
                    if op.write {
                        self.stats.bytes_written += len;
                    } else {
                        self.stats.bytes_read += len;
                        // The data length is below u32::MAX: the chain iterator caps it.
                        slots[i].used = u32::try_from(len + 1).unwrap_or(u32::MAX);
                    }
                }
                Some(Err(e)) => {
                    slots[i].status = STATUS_IOERR;
                    warn!(
                        queue = self.queue,
                        "{} of {} bytes at offset {} failed: {e}",
                        if op.write { "write" } else { "read" },
                        len,
                        slots[i].offset
                    );
                }
                None => slots[i].status = STATUS_IOERR,
            }
        }
        // The iovecs point into guest memory: none survives the batch.
        ops.clear();
        self.ops.0 = ops;
        self.op_slots = op_slots;

        // Everything else, in order, after the batch's reads and writes completed.
        for slot in slots.iter_mut() {
            let result = match &slot.kind {
                Some(RequestKind::Flush) => self.disk.flush(),
                Some(RequestKind::Discard(segs)) => self.disk.discard(segs),
                Some(RequestKind::WriteZeroes(segs)) => self.disk.write_zeroes(segs),
                Some(RequestKind::GetId) => {
                    let serial = *self.disk.serial();
                    let mut written = 0usize;
                    for r in &slot.data {
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
                    slot.used = written as u32 + 1;
                    Ok(())
                }
                _ => continue,
            };
            if let Err(e) = result {
                slot.status = STATUS_IOERR;
                warn!(queue = self.queue, "{:?} failed: {e}", slot.kind);
            }
        }

        self.stats.batches += 1;
        let mut done = std::mem::take(&mut self.done);
        done.extend(slots.drain(..).map(|slot| {
            let mut used = slot.used;
            if let Some(addr) = slot.status_addr {
                if mem.write_obj(slot.status, addr).is_err() {
                    used = 0;
                }
            } else {
                used = 0;
            }
            if slot.status != STATUS_OK {
                used = used.min(1);
                self.stats.errors += 1;
            }
            self.stats.requests += 1;
            Completion {
                head: slot.head,
                len: used,
                status: slot.status,
            }
        }));
        self.done = done;
        self.slots = slots;
        true
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
