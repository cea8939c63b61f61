//! The virtio-blk device as vhost-user-backend sees it: features, config space, and one worker
//! thread per queue that runs that queue's [`Executor`].

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringMutex, VringState, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{Config, DiscardMode};
use crate::disk::Disk;
use crate::inflight::Inflight;
use crate::io::{EngineError, Executor, GuestMem, RateLimiter, Stats};
use crate::request::SECTOR_SHIFT;
use crate::LockUnpoisoned;

/// Size of the config space we define (up to and including `write_zeroes_may_unmap` and its
/// padding, virtio 1.2 `struct virtio_blk_config` without the secure-erase and zoned parts).
pub const CONFIG_LEN: usize = 60;
/// Offset of the `wce` (writeback) byte in the config space.
pub const CONFIG_WCE_OFFSET: usize = 32;
/// The vhost-user config window: GET_CONFIG ranges must end inside it.
pub const VHOST_USER_CONFIG_SIZE: u32 = 0x1000;

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

/// A vhost-user-blk device serving one [`Disk`] for one frontend connection.
pub struct BlkDevice {
    disk: Arc<Disk>,
    num_queues: u16,
    queue_size: u16,
    mem: GuestMemoryAtomic<GuestMem>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    workers: Vec<Mutex<Executor>>,
    exits: Vec<(EventConsumer, EventNotifier)>,
    limiter: Mutex<RateLimiter>,
    inflight: Arc<Inflight>,
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

/// The virtio and vhost-user feature bits offered for `disk`.
pub fn device_features(disk: &Disk) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_TOPOLOGY
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_CONFIG_WCE
        | 1 << VIRTIO_BLK_F_MQ
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if disk.limits().read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    f
}

/// The config space (`struct virtio_blk_config`, little endian) for `disk` with `num_queues`.
pub fn config_space(disk: &Disk, num_queues: u16) -> [u8; CONFIG_LEN] {
    let l = disk.limits();
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &l.capacity.to_le_bytes());
    put(8, &l.size_max.to_le_bytes());
    put(12, &l.seg_max.to_le_bytes());
    // 16..20: geometry, not offered.
    put(20, &l.logical_block_size.to_le_bytes());
    // 24 physical_block_exp = 0, 25 alignment_offset = 0.
    put(26, &1u16.to_le_bytes()); // min_io_size: one logical block.
                                  // 28..32 opt_io_size = 0.
    put(CONFIG_WCE_OFFSET, &[u8::from(disk.writeback())]);
    put(34, &num_queues.to_le_bytes());
    let align = (l.logical_block_size >> SECTOR_SHIFT).max(1);
    put(36, &l.max_discard_sectors.to_le_bytes());
    put(40, &l.max_discard_seg.to_le_bytes());
    put(44, &align.to_le_bytes());
    put(48, &l.max_write_zeroes_sectors.to_le_bytes());
    put(52, &l.max_write_zeroes_seg.to_le_bytes());
    put(56, &[u8::from(disk.discard_mode() == DiscardMode::Unmap)]);
    c
}

impl BlkDevice {
    /// A device for one connection: one executor (and I/O engine) per queue.
    pub fn new(
        disk: Arc<Disk>,
        config: &Config,
        mem: GuestMemoryAtomic<GuestMem>,
    ) -> Result<BlkDevice, DeviceError> {
        let mut workers = Vec::new();
        let mut exits = Vec::new();
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for q in 0..config.num_queues {
            let mut ex = Executor::new(disk.clone(), q, config.engine, config.queue_size)
                .map_err(|source| DeviceError::Engine { queue: q, source })?;
            ex.count_load_in(busy.clone());
            if q == 0 {
                debug!("I/O engine: {}", ex.engine().name());
            }
            workers.push(Mutex::new(ex));
            exits.push(
                new_event_consumer_and_notifier(EventFlag::NONBLOCK)
                    .map_err(DeviceError::EventFd)?,
            );
        }
        Ok(BlkDevice {
            disk,
            num_queues: config.num_queues,
            queue_size: config.queue_size,
            mem,
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            workers,
            exits,
            limiter: Mutex::new(RateLimiter::new(crate::io::WARNINGS_PER_SECOND)),
            inflight: Arc::new(Inflight::new(config.num_queues, config.queue_size)),
            leaked_exit_fds: Mutex::new(Vec::new()),
        })
    }

    /// The inflight tracking state of this connection (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
    pub fn inflight(&self) -> &Arc<Inflight> {
        &self.inflight
    }

    /// The features each queue's executor works with (see [`Executor::set_features`]).
    pub fn queue_features(&self) -> Vec<u64> {
        self.workers
            .iter()
            .map(|w| w.lock_unpoisoned().features())
            .collect()
    }

    /// The disk served.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// Counters summed over all queues.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for w in &self.workers {
            let w = w.lock_unpoisoned().stats();
            s.requests += w.requests;
            s.errors += w.errors;
            s.batches += w.batches;
            s.bytes_read += w.bytes_read;
            s.bytes_written += w.bytes_written;
        }
        s
    }

    fn warn_limited(&self, msg: std::fmt::Arguments<'_>) {
        let mut l = self.limiter.lock_unpoisoned();
        if l.allow().is_some() {
            warn!("{msg}");
        }
    }

    /// Drain one vring: batches until the queue is empty (with EVENT_IDX, until no new request
    /// arrived while notifications were off).
    fn drain(&self, vring: &Vring, worker: &mut Executor) -> io::Result<()> {
        let mem = self.mem.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            let mut state = vring.get_mut();
            if event_idx {
                if let Err(e) = state.disable_notification() {
                    self.warn_limited(format_args!("cannot disable notifications: {e}"));
                    return Ok(());
                }
            }
            self.process(&mut state, worker, &mem)?;
            if !event_idx {
                return Ok(());
            }
            match state.enable_notification() {
                Ok(true) => continue,
                Ok(false) => return Ok(()),
                Err(e) => {
                    self.warn_limited(format_args!("cannot enable notifications: {e}"));
                    return Ok(());
                }
            }
        }
    }

    fn process(
        &self,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        worker: &mut Executor,
        mem: &GuestMem,
    ) -> io::Result<()> {
        let region = self.inflight.region();
        let track = region.as_ref().and_then(|r| r.queue(worker.queue()));
        let mut resubmitted = 0;
        if let Some(t) = &track {
            if self.inflight.take_recovery(worker.queue()) {
                match crate::inflight::resubmit(state.get_queue_mut(), mem, worker, t) {
                    Ok(n) => resubmitted = n,
                    Err(e) => {
                        self.warn_limited(format_args!("resubmitting in-flight requests: {e}"))
                    }
                }
            }
        }
        let tracked = track.as_ref().map(|t| (t, &*self.inflight));
        // The call eventfd stays open while this thread holds the vring's lock (`state`).
        let call = state.get_call().as_ref().map(|c| c.as_raw_fd());
        let mut signalled = false;
        let mut signal = || {
            signalled = true;
            tracing::trace!("signal used queue");
            if let Some(fd) = call {
                // SAFETY: `fd` is the vring's call eventfd, kept open by the vring state that
                // is locked for this whole call.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                if let Err(e) = nix::unistd::write(fd, &1u64.to_ne_bytes()) {
                    self.warn_limited(format_args!("cannot notify the guest: {e}"));
                }
            }
        };
        let result = worker.process_queue_tracked(state.get_queue_mut(), mem, tracked, &mut signal);
        if let Err(e) = result {
            // A broken ring is the guest's problem; keep the thread alive.
            self.warn_limited(format_args!("virtqueue error: {e}"));
        }
        if resubmitted > 0 && !signalled {
            state.signal_used_queue()?;
        }
        Ok(())
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
        device_features(&self.disk)
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
        for w in &self.workers {
            w.lock_unpoisoned().set_features(features);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let Some(end) = offset.checked_add(size) else {
            return Vec::new();
        };
        if end > VHOST_USER_CONFIG_SIZE {
            return Vec::new();
        }
        let cfg = config_space(&self.disk, self.num_queues);
        // Bytes past the fields we define read as zero, like reserved config fields.
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < CONFIG_LEN {
            let n = (CONFIG_LEN - start).min(out.len());
            out[..n].copy_from_slice(&cfg[start..start + n]);
        }
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let start = offset as usize;
        let end = start
            .checked_add(buf.len())
            .filter(|e| *e <= VHOST_USER_CONFIG_SIZE as usize)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // Only `wce` is writable, and only when CONFIG_WCE was negotiated.
        let wce_acked =
            self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if (start..end).contains(&CONFIG_WCE_OFFSET) && wce_acked {
            let on = buf[CONFIG_WCE_OFFSET - start] != 0;
            debug!(
                "guest set the write cache to {}",
                if on { "writeback" } else { "writethrough" }
            );
            self.disk.set_writeback(on);
            if !on {
                // Everything written so far becomes durable now.
                self.disk.flush()?;
            }
        }
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // The daemon shares `self.mem` with the handler, which has already swapped the map.
        Ok(())
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
        self.drain(vring, &mut worker)
    }
}
