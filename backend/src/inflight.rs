//! Inflight I/O tracking for split virtqueues (vhost-user `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`).
//!
//! The backend keeps, in a shared memory region the frontend holds on to across backend
//! restarts, which descriptor chains it has taken from the available ring and not yet returned
//! in the used ring. A backend that starts on such a region (SET_INFLIGHT_FD after a reconnect)
//! resubmits those chains, in the order it first took them, so a request in flight when the
//! previous backend died is neither lost nor duplicated.
//!
//! Layout per queue, as docs/interop/vhost-user.rst "Inflight I/O tracking" defines it:
//!
//! ```text
//! struct QueueRegionSplit {          // one per queue, 64-byte aligned
//!     u64 features;                  // unused, 0
//!     u16 version;                   // 1
//!     u16 desc_num;                  // queue size
//!     u16 last_batch_head;           // head of the list of the last used batch
//!     u16 used_idx;                  // used ring idx after the last completed batch
//!     struct DescStateSplit {        // one per descriptor, indexed by head
//!         u8 inflight; u8 padding[5]; u16 next; u64 counter;
//!     } desc[desc_num];
//! }
//! ```
//!
//! Tracking (see the spec): when a chain with head `i` is taken, `desc[i].counter` gets the next
//! value of a counter that only grows and `desc[i].inflight = 1`. When a batch is returned, its
//! heads are linked through `next` starting at `last_batch_head`, the used ring's idx is
//! published, then every entry of the batch gets `inflight = 0` and `used_idx` the new idx. On
//! start, a `used_idx` different from the used ring's idx means the backend died between those
//! two steps: the last batch is cleared first; what is left marked inflight is resubmitted.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use vm_memory::mmap::MmapRegion;
use vm_memory::volatile_memory::VolatileSlice;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

use crate::LockUnpoisoned;

/// Region format version written in every queue header.
pub const VERSION: u16 = 1;
/// Bytes of one `DescStateSplit`.
pub const DESC_STATE_SIZE: u64 = 16;
/// Bytes of a queue header before the descriptor states.
pub const QUEUE_HEADER_SIZE: u64 = 16;
/// Alignment of each queue's region.
pub const QUEUE_ALIGN: u64 = 64;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_NEXT: usize = 6;
const DESC_OFF_COUNTER: usize = 8;

/// Errors creating or opening an inflight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend described a region that does not fit the queues it announced.
    #[error("inflight region of {size} bytes cannot hold {queues} queues of {queue_size}")]
    BadSize {
        /// Announced mapping size.
        size: u64,
        /// Announced queue count.
        queues: u16,
        /// Announced queue size.
        queue_size: u16,
    },
    /// The queue size is zero or larger than the split ring maximum.
    #[error("queue size {0} is not valid for a split virtqueue")]
    BadQueueSize(u16),
    /// The region holds another format.
    #[error("inflight region of queue {queue} has version {version} and {desc_num} descriptors, expected version 1 and {queue_size}")]
    BadHeader {
        /// Queue index.
        queue: u16,
        /// Version found.
        version: u16,
        /// Descriptor count found.
        desc_num: u16,
        /// Queue size expected.
        queue_size: u16,
    },
    /// The memfd could not be created or sized.
    #[error("cannot create the inflight memfd")]
    Memfd(#[source] io::Error),
    /// The region could not be mapped.
    #[error("cannot map the inflight region: {0}")]
    Map(String),
}

/// Bytes of one queue's region for `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (QUEUE_HEADER_SIZE + DESC_STATE_SIZE * u64::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// A mapped inflight region for every queue of a device.
#[derive(Debug)]
pub struct InflightRegion {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A new, zeroed region (GET_INFLIGHT_FD) and the memfd that backs it, to hand to the
    /// frontend.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(InflightRegion, File), InflightError> {
        if queue_size == 0 || queue_size > 32768 || num_queues == 0 {
            return Err(InflightError::BadQueueSize(queue_size));
        }
        let size = queue_region_size(queue_size) * u64::from(num_queues);
        // SAFETY: memfd_create with a NUL-terminated name and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vloop-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(InflightError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size).map_err(InflightError::Memfd)?;
        let region = Self::map(&file, size, 0, num_queues, queue_size)?;
        for q in 0..num_queues {
            let s = region.slice(q);
            // A fresh memfd reads as zeroes: only the header needs values.
            let _ = s.write_obj(VERSION, OFF_VERSION);
            let _ = s.write_obj(queue_size, OFF_DESC_NUM);
        }
        Ok((region, file))
    }

    /// The region the frontend kept from a previous backend (SET_INFLIGHT_FD).
    pub fn open(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        if queue_size == 0 || queue_size > 32768 || num_queues == 0 {
            return Err(InflightError::BadQueueSize(queue_size));
        }
        let need = queue_region_size(queue_size) * u64::from(num_queues);
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let fits = mmap_size >= need
            && mmap_offset
                .checked_add(mmap_size)
                .is_some_and(|end| end <= file_len);
        if !fits {
            return Err(InflightError::BadSize {
                size: mmap_size,
                queues: num_queues,
                queue_size,
            });
        }
        let region = Self::map(file, need, mmap_offset, num_queues, queue_size)?;
        for q in 0..num_queues {
            let s = region.slice(q);
            let version: u16 = s.read_obj(OFF_VERSION).unwrap_or(0);
            let desc_num: u16 = s.read_obj(OFF_DESC_NUM).unwrap_or(0);
            if version == 0 && desc_num == 0 {
                // Never used (a frontend may zero the region itself): initialise it.
                let _ = s.write_obj(VERSION, OFF_VERSION);
                let _ = s.write_obj(queue_size, OFF_DESC_NUM);
            } else if version != VERSION || desc_num != queue_size {
                return Err(InflightError::BadHeader {
                    queue: q,
                    version,
                    desc_num,
                    queue_size,
                });
            }
        }
        Ok(region)
    }

    fn map(
        file: &File,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        let dup = file.try_clone().map_err(InflightError::Memfd)?;
        let len = usize::try_from(size).map_err(|e| InflightError::Map(e.to_string()))?;
        let map = MmapRegion::from_file(FileOffset::new(dup, offset), len)
            .map_err(|e| InflightError::Map(e.to_string()))?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
        })
    }

    /// Number of queues in the region.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn slice(&self, queue: u16) -> VolatileSlice<'_, ()> {
        let size = queue_region_size(self.queue_size) as usize;
        let all = self.map.as_volatile_slice();
        // The mapping holds num_queues regions of `size` bytes; callers pass queue < num_queues.
        all.subslice(usize::from(queue) * size, size).unwrap_or(all)
    }

    /// The tracking state of queue `queue`, if the region has it.
    pub fn queue(&self, queue: u16) -> Option<QueueInflight<'_>> {
        (queue < self.num_queues).then(|| QueueInflight {
            s: self.slice(queue),
            size: self.queue_size,
        })
    }
}

/// One queue's part of an [`InflightRegion`].
#[derive(Debug)]
pub struct QueueInflight<'a> {
    s: VolatileSlice<'a, ()>,
    size: u16,
}

fn desc_off(head: u16) -> usize {
    (QUEUE_HEADER_SIZE + DESC_STATE_SIZE * u64::from(head)) as usize
}

impl QueueInflight<'_> {
    // Reads and writes below are inside the queue's slice (heads are checked against the queue
    // size), so they cannot fail; a failure would leave the entry as it was.

    /// The used ring idx recorded after the last completed batch.
    pub fn used_idx(&self) -> u16 {
        self.s.read_obj(OFF_USED_IDX).unwrap_or(0)
    }

    fn inflight(&self, head: u16) -> bool {
        self.s
            .read_obj::<u8>(desc_off(head) + DESC_OFF_INFLIGHT)
            .unwrap_or(0)
            != 0
    }

    fn set_inflight(&self, head: u16, on: bool) {
        let _ = self
            .s
            .write_obj(u8::from(on), desc_off(head) + DESC_OFF_INFLIGHT);
    }

    fn counter(&self, head: u16) -> u64 {
        self.s
            .read_obj(desc_off(head) + DESC_OFF_COUNTER)
            .unwrap_or(0)
    }

    /// The largest counter of any entry: a restarted backend continues after it.
    pub fn max_counter(&self) -> u64 {
        (0..self.size).map(|h| self.counter(h)).max().unwrap_or(0)
    }

    /// Record that the chain with head `head` was taken from the available ring, as the
    /// `counter`-th request.
    pub fn take(&self, head: u16, counter: u64) {
        if head >= self.size {
            return;
        }
        let _ = self.s.write_obj(counter, desc_off(head) + DESC_OFF_COUNTER);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.set_inflight(head, true);
    }

    /// Before the used ring is updated with `heads`, in that order: link them from
    /// `last_batch_head` in the same order (each head's `next` is the one added after it), so
    /// [`QueueInflight::recover`] can clear exactly the first n that reached the used ring.
    pub fn begin_batch(&self, heads: &[u16]) {
        let mut next: u16 = self.s.read_obj(OFF_LAST_BATCH_HEAD).unwrap_or(0);
        for &h in heads.iter().rev().filter(|&&h| h < self.size) {
            let _ = self.s.write_obj(next, desc_off(h) + DESC_OFF_NEXT);
            next = h;
        }
        let _ = self.s.write_obj(next, OFF_LAST_BATCH_HEAD);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    }

    /// After the used ring's idx became `used_idx`: the batch is no longer in flight.
    pub fn end_batch(&self, heads: &[u16], used_idx: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        for &h in heads.iter().filter(|&&h| h < self.size) {
            self.set_inflight(h, false);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        let _ = self.s.write_obj(used_idx, OFF_USED_IDX);
    }

    /// On start with a region from a previous backend, given the used ring's current idx:
    /// repair the last batch if the previous backend died while returning it, and return the
    /// heads still in flight in the order they were taken.
    pub fn recover(&self, ring_used_idx: u16) -> Vec<u16> {
        let recorded = self.used_idx();
        if recorded != ring_used_idx {
            // The batch reached the used ring but was not cleared here.
            let n = ring_used_idx.wrapping_sub(recorded);
            let mut h: u16 = self.s.read_obj(OFF_LAST_BATCH_HEAD).unwrap_or(0);
            for _ in 0..n.min(self.size) {
                if h >= self.size {
                    break;
                }
                self.set_inflight(h, false);
                h = self
                    .s
                    .read_obj(desc_off(h) + DESC_OFF_NEXT)
                    .unwrap_or(u16::MAX);
            }
            let _ = self.s.write_obj(ring_used_idx, OFF_USED_IDX);
        }
        let mut heads: Vec<u16> = (0..self.size).filter(|&h| self.inflight(h)).collect();
        heads.sort_by_key(|&h| self.counter(h));
        heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_layout() {
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(3), 64);
        assert_eq!(queue_region_size(4), 128);
        assert_eq!(queue_region_size(256), 16 + 16 * 256 + 48);
    }

    #[test]
    fn a_restarted_backend_sees_what_was_in_flight_in_order() {
        let (r, file) = InflightRegion::create(2, 8).unwrap();
        let q = r.queue(1).unwrap();
        for (n, h) in [5u16, 2, 7, 0].iter().enumerate() {
            q.take(*h, 10 + n as u64);
        }
        // 5 and 2 complete: used idx 0 -> 2.
        q.begin_batch(&[5, 2]);
        q.end_batch(&[5, 2], 2);
        assert!(r.queue(0).unwrap().recover(0).is_empty());
        drop(r);
        // Reopened from the file, as after a restart.
        let size = file.metadata().unwrap().len();
        let r = InflightRegion::open(&file, size, 0, 2, 8).unwrap();
        let q = r.queue(1).unwrap();
        assert_eq!(q.used_idx(), 2);
        assert_eq!(q.recover(2), vec![7, 0]);
        assert_eq!(q.max_counter(), 13);
    }

    #[test]
    fn a_batch_half_returned_is_repaired() {
        let (r, _file) = InflightRegion::create(1, 4).unwrap();
        let q = r.queue(0).unwrap();
        q.take(1, 1);
        q.take(3, 2);
        q.take(0, 3);
        q.begin_batch(&[1, 3]);
        // Died after the used ring reached 2, before end_batch.
        assert_eq!(q.recover(2), vec![0]);
        assert_eq!(q.used_idx(), 2);
        // Died after the first of the two reached the used ring: the second and the request
        // taken later are still in flight.
        let (r, _file) = InflightRegion::create(1, 4).unwrap();
        let q = r.queue(0).unwrap();
        q.take(1, 1);
        q.take(3, 2);
        q.take(0, 3);
        q.begin_batch(&[1, 3]);
        assert_eq!(q.recover(1), vec![3, 0]);
        // A later batch after a completed one: only its own first head is cleared.
        let (r, _file) = InflightRegion::create(1, 4).unwrap();
        let q = r.queue(0).unwrap();
        q.take(2, 1);
        q.begin_batch(&[2]);
        q.end_batch(&[2], 1);
        q.take(0, 2);
        q.take(1, 3);
        q.begin_batch(&[0, 1]);
        assert_eq!(q.recover(2), vec![1]);
        // Died before the used ring was updated: the whole batch is still in flight.
        let (r, _file) = InflightRegion::create(1, 4).unwrap();
        let q = r.queue(0).unwrap();
        q.take(2, 7);
        q.take(1, 8);
        q.begin_batch(&[2, 1]);
        assert_eq!(q.recover(0), vec![2, 1]);
    }

    #[test]
    fn hostile_regions_are_refused() {
        let (_, file) = InflightRegion::create(1, 8).unwrap();
        let size = file.metadata().unwrap().len();
        assert!(InflightRegion::open(&file, size, 0, 2, 8).is_err());
        assert!(InflightRegion::open(&file, size, 4096, 1, 8).is_err());
        assert!(InflightRegion::open(&file, u64::MAX, 1, 1, 8).is_err());
        assert!(InflightRegion::open(&file, size, 0, 1, 0).is_err());
        assert!(InflightRegion::open(&file, size, 0, 1, 4).is_err());
        assert!(InflightRegion::create(1, 0).is_err());
        // Out-of-range heads are ignored.
        let (r, _f) = InflightRegion::create(1, 4).unwrap();
        let q = r.queue(0).unwrap();
        q.take(9, 1);
        q.begin_batch(&[9]);
        q.end_batch(&[9], 1);
        assert!(q.recover(1).is_empty());
        assert!(r.queue(1).is_none());
    }
}

// ---- The connection: INFLIGHT_SHMFD in front of vhost-user-backend ----
//
// vhost-user-backend 0.24 answers GET_INFLIGHT_FD and SET_INFLIGHT_FD with an error and offers
// no hook for them, so the daemon puts a small relay between the frontend and the library:
// every message passes through unchanged except GET_PROTOCOL_FEATURES (its reply gains
// INFLIGHT_SHMFD), SET_PROTOCOL_FEATURES (INFLIGHT_SHMFD is recorded and stripped) and the two
// inflight requests, which the relay answers itself. After SET_INFLIGHT_FD with a region from a
// previous backend, SET_VRING_KICK is followed by one kick, so the queue's worker resubmits what
// was in flight even if the guest never kicks again. SET_BACKEND_REQ_FD is answered here too:
// the relay keeps the backend request channel ([`BackendChannel`]) to announce config changes,
// which vhost-user-backend's `Backend` cannot send.

const HDR_LEN: usize = 12;
const MAX_BODY: usize = 1 << 16;
const MAX_FDS: usize = 32;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_KICK: u32 = 12;
const SET_BACKEND_REQ_FD: u32 = 21;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
/// `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`.
pub const PROTOCOL_F_INFLIGHT_SHMFD: u64 = 1 << 12;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
const VRING_NOFD: u64 = 1 << 8;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend request channel.
pub const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
/// How long the frontend has to acknowledge a backend request.
const BACKEND_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The backend request channel (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`) of one connection, once
/// the frontend has sent it with SET_BACKEND_REQ_FD.
#[derive(Debug, Default)]
pub struct BackendChannel {
    /// The socket, and whether REPLY_ACK was negotiated when it arrived.
    sock: std::sync::Mutex<Option<(std::os::unix::net::UnixStream, bool)>>,
}

impl BackendChannel {
    fn set(&self, sock: std::os::unix::net::UnixStream, reply_ack: bool) {
        *self.sock.lock_unpoisoned() = Some((sock, reply_ack));
    }

    /// True once the frontend has set up the channel.
    pub fn is_set(&self) -> bool {
        self.sock.lock_unpoisoned().is_some()
    }

    /// Tell the frontend the config space changed (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG); with
    /// REPLY_ACK, wait (bounded) for its acknowledgement. Returns false when there is no
    /// channel.
    pub fn config_changed(&self) -> io::Result<bool> {
        use std::io::Read;
        let guard = self.sock.lock_unpoisoned();
        let Some((sock, reply_ack)) = guard.as_ref() else {
            return Ok(false);
        };
        let flags = FLAG_VERSION | if *reply_ack { FLAG_NEED_REPLY } else { 0 };
        let mut hdr = [0u8; HDR_LEN];
        hdr[0..4].copy_from_slice(&BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());
        hdr[4..8].copy_from_slice(&flags.to_le_bytes());
        send(
            sock,
            &Msg {
                hdr,
                body: Vec::new(),
                fds: Vec::new(),
            },
        )?;
        if *reply_ack {
            sock.set_read_timeout(Some(BACKEND_REPLY_TIMEOUT))?;
            let mut r = [0u8; HDR_LEN + 8];
            let mut s = sock;
            s.read_exact(&mut r)?;
            let code = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
            let rflags = u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
            let value =
                u64::from_le_bytes([r[12], r[13], r[14], r[15], r[16], r[17], r[18], r[19]]);
            if code != BACKEND_CONFIG_CHANGE_MSG || rflags & FLAG_REPLY == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected reply {code} (flags {rflags:#x}) to CONFIG_CHANGE_MSG"),
                ));
            }
            if value != 0 {
                return Err(io::Error::other(format!(
                    "the frontend failed CONFIG_CHANGE_MSG ({value})"
                )));
            }
        }
        Ok(true)
    }
}

/// The inflight region of one connection, shared by the relay and the queue workers.
#[derive(Debug)]
pub struct Inflight {
    region: std::sync::Mutex<Option<std::sync::Arc<InflightRegion>>>,
    /// Per queue: the region came from a previous backend and is not recovered yet.
    recover: Vec<std::sync::atomic::AtomicBool>,
    counter: std::sync::atomic::AtomicU64,
    /// Largest queue size the device accepts.
    max_queue_size: u16,
    /// The backend request channel the relay received.
    channel: BackendChannel,
}

impl Inflight {
    /// No region yet, for a device with `num_queues` queues of at most `max_queue_size`.
    pub fn new(num_queues: u16, max_queue_size: u16) -> Inflight {
        Inflight {
            max_queue_size,
            region: std::sync::Mutex::new(None),
            recover: (0..num_queues)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            counter: std::sync::atomic::AtomicU64::new(0),
            channel: BackendChannel::default(),
        }
    }

    /// The backend request channel of this connection.
    pub fn backend_channel(&self) -> &BackendChannel {
        &self.channel
    }

    /// The current region, if the frontend set one up.
    pub fn region(&self) -> Option<std::sync::Arc<InflightRegion>> {
        self.region.lock_unpoisoned().clone()
    }

    fn install(&self, region: InflightRegion, recover: bool) {
        let max = (0..region.num_queues())
            .filter_map(|q| region.queue(q).map(|s| s.max_counter()))
            .max()
            .unwrap_or(0);
        self.counter
            .fetch_max(max, std::sync::atomic::Ordering::Relaxed);
        for (q, flag) in self.recover.iter().enumerate() {
            flag.store(
                recover && q < usize::from(region.num_queues()),
                std::sync::atomic::Ordering::Release,
            );
        }
        *self.region.lock_unpoisoned() = Some(std::sync::Arc::new(region));
    }

    /// The next request counter value.
    pub fn next_counter(&self) -> u64 {
        self.counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// True once for each queue whose region must be recovered before it serves requests.
    pub fn take_recovery(&self, queue: u16) -> bool {
        self.recover
            .get(usize::from(queue))
            .is_some_and(|f| f.swap(false, std::sync::atomic::Ordering::AcqRel))
    }

    fn needs_recovery(&self, queue: u16) -> bool {
        self.recover
            .get(usize::from(queue))
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Acquire))
    }
}

struct Msg {
    hdr: [u8; HDR_LEN],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn code(&self) -> u32 {
        u32::from_le_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.hdr[4], self.hdr[5], self.hdr[6], self.hdr[7]])
    }

    fn u64_at(&self, off: usize) -> Option<u64> {
        let b = self.body.get(off..off + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn u16_at(&self, off: usize) -> Option<u16> {
        let b = self.body.get(off..off + 2)?;
        Some(u16::from_le_bytes(b.try_into().ok()?))
    }

    fn set_body(&mut self, body: Vec<u8>) {
        self.hdr[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        self.body = body;
    }
}

/// Read one message (header with its descriptors, then the body); `None` at end of stream.
fn recv(sock: &std::os::unix::net::UnixStream) -> io::Result<Option<Msg>> {
    use std::io::Read;
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut hdr = [0u8; HDR_LEN];
    let mut fds = Vec::new();
    let got = {
        let mut iov = [io::IoSliceMut::new(&mut hdr)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
        let msg = loop {
            match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r.map_err(io::Error::from)?,
            }
        };
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS just gave this process a new descriptor nobody owns.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        msg.bytes
    };
    if got == 0 {
        return Ok(None);
    }
    let mut s = sock;
    if got < HDR_LEN {
        s.read_exact(&mut hdr[got..])?;
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    let mut body = vec![0u8; size];
    s.read_exact(&mut body)?;
    Ok(Some(Msg { hdr, body, fds }))
}

fn send(sock: &std::os::unix::net::UnixStream, msg: &Msg) -> io::Result<()> {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let mut buf = Vec::with_capacity(HDR_LEN + msg.body.len());
    buf.extend_from_slice(&msg.hdr);
    buf.extend_from_slice(&msg.body);
    let raw: Vec<std::os::fd::RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let mut sent = 0;
    while sent < buf.len() {
        let iov = [io::IoSlice::new(&buf[sent..])];
        let c: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
            &cmsg
        } else {
            &[]
        };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, c, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn reply(code: u32, body: Vec<u8>, fds: Vec<OwnedFd>) -> Msg {
    let mut hdr = [0u8; HDR_LEN];
    hdr[0..4].copy_from_slice(&code.to_le_bytes());
    hdr[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    let mut m = Msg {
        hdr,
        body: Vec::new(),
        fds,
    };
    m.set_body(body);
    m
}

/// What the relay remembers of the negotiation.
struct Relay {
    outer: std::os::unix::net::UnixStream,
    inner: std::os::unix::net::UnixStream,
    /// Writes to the frontend come from both directions' threads.
    out_lock: std::sync::Mutex<()>,
    inflight: std::sync::Arc<Inflight>,
    reply_ack: std::sync::atomic::AtomicBool,
}

impl Relay {
    fn to_frontend(&self, m: &Msg) -> io::Result<()> {
        let _g = self.out_lock.lock_unpoisoned();
        send(&self.outer, m)
    }

    fn ack(&self, req: &Msg, ok: bool) -> io::Result<()> {
        if req.flags() & FLAG_NEED_REPLY != 0
            && self.reply_ack.load(std::sync::atomic::Ordering::Relaxed)
        {
            let v: u64 = if ok { 0 } else { 1 };
            self.to_frontend(&reply(req.code(), v.to_le_bytes().to_vec(), Vec::new()))?;
        }
        Ok(())
    }

    /// Frontend to library; the inflight requests are answered here.
    fn forward(&self) -> io::Result<()> {
        while let Some(mut m) = recv(&self.outer)? {
            match m.code() {
                GET_INFLIGHT_FD => {
                    let (nq, qs) = (m.u16_at(16).unwrap_or(0), m.u16_at(18).unwrap_or(0));
                    // No bigger than the device: the frontend does not size our memory.
                    let created = if usize::from(nq) > self.inflight.recover.len()
                        || qs > self.inflight.max_queue_size
                    {
                        Err(InflightError::BadSize {
                            size: 0,
                            queues: nq,
                            queue_size: qs,
                        })
                    } else {
                        InflightRegion::create(nq, qs)
                    };
                    match created {
                        Ok((region, file)) => {
                            let size = queue_region_size(qs) * u64::from(nq);
                            self.inflight.install(region, false);
                            let mut b = Vec::with_capacity(24);
                            b.extend_from_slice(&size.to_le_bytes());
                            b.extend_from_slice(&0u64.to_le_bytes());
                            b.extend_from_slice(&nq.to_le_bytes());
                            b.extend_from_slice(&qs.to_le_bytes());
                            b.extend_from_slice(&[0u8; 4]);
                            self.to_frontend(&reply(GET_INFLIGHT_FD, b, vec![file.into()]))?;
                        }
                        Err(e) => {
                            tracing::warn!("GET_INFLIGHT_FD refused: {e}");
                            return Ok(());
                        }
                    }
                }
                SET_INFLIGHT_FD => {
                    let parsed = (
                        m.u64_at(0),
                        m.u64_at(8),
                        m.u16_at(16),
                        m.u16_at(18),
                        m.fds.pop(),
                    );
                    let r = match parsed {
                        (Some(_), Some(_), Some(nq), Some(qs), Some(_))
                            if usize::from(nq) > self.inflight.recover.len()
                                || qs > self.inflight.max_queue_size =>
                        {
                            Err(format!("{nq} queues of {qs} exceed the device"))
                        }
                        (Some(size), Some(off), Some(nq), Some(qs), Some(fd)) => {
                            InflightRegion::open(&File::from(fd), size, off, nq, qs)
                                .map_err(|e| e.to_string())
                        }
                        _ => Err("SET_INFLIGHT_FD without a region".to_string()),
                    };
                    match r {
                        Ok(region) => {
                            tracing::debug!("inflight region installed");
                            self.inflight.install(region, true);
                            self.ack(&m, true)?;
                        }
                        Err(e) => {
                            tracing::warn!("SET_INFLIGHT_FD refused: {e}");
                            self.ack(&m, false)?;
                            return Ok(());
                        }
                    }
                }
                SET_BACKEND_REQ_FD => match m.fds.pop() {
                    Some(fd) => {
                        tracing::debug!("backend request channel set up");
                        self.inflight.channel.set(
                            fd.into(),
                            self.reply_ack.load(std::sync::atomic::Ordering::Relaxed),
                        );
                        self.ack(&m, true)?;
                    }
                    None => {
                        tracing::warn!("SET_BACKEND_REQ_FD without a descriptor");
                        self.ack(&m, false)?;
                    }
                },
                SET_PROTOCOL_FEATURES => {
                    let f = m.u64_at(0).unwrap_or(0);
                    self.reply_ack.store(
                        f & PROTOCOL_F_REPLY_ACK != 0,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    let mut b = m.body.clone();
                    if b.len() >= 8 {
                        b[..8].copy_from_slice(&(f & !PROTOCOL_F_INFLIGHT_SHMFD).to_le_bytes());
                    }
                    m.set_body(b);
                    send(&self.inner, &m)?;
                }
                SET_VRING_KICK => {
                    let v = m.u64_at(0).unwrap_or(VRING_NOFD);
                    let queue = (v & 0xff) as u16;
                    let kick = if v & VRING_NOFD == 0 && self.inflight.needs_recovery(queue) {
                        m.fds.first().and_then(|f| f.try_clone().ok())
                    } else {
                        None
                    };
                    send(&self.inner, &m)?;
                    if let Some(k) = kick {
                        // The worker recovers the queue on its first event.
                        let _ = std::io::Write::write_all(&mut File::from(k), &1u64.to_le_bytes());
                    }
                }
                _ => send(&self.inner, &m)?,
            }
        }
        Ok(())
    }

    /// Library to frontend; GET_PROTOCOL_FEATURES replies gain INFLIGHT_SHMFD.
    fn backward(&self) -> io::Result<()> {
        while let Some(mut m) = recv(&self.inner)? {
            if m.code() == GET_PROTOCOL_FEATURES && m.flags() & FLAG_REPLY != 0 {
                if let Some(f) = m.u64_at(0) {
                    let mut b = m.body.clone();
                    b[..8].copy_from_slice(&(f | PROTOCOL_F_INFLIGHT_SHMFD).to_le_bytes());
                    m.set_body(b);
                }
            }
            self.to_frontend(&m)?;
        }
        Ok(())
    }
}

/// Relay `outer` (the frontend) to `inner` (vhost-user-backend's end) until either side
/// closes; both sockets are shut down when it ends. Returns the two relay threads.
pub fn relay(
    outer: std::os::unix::net::UnixStream,
    inner: std::os::unix::net::UnixStream,
    inflight: std::sync::Arc<Inflight>,
) -> io::Result<[std::thread::JoinHandle<()>; 2]> {
    let r = std::sync::Arc::new(Relay {
        outer,
        inner,
        out_lock: std::sync::Mutex::new(()),
        inflight,
        reply_ack: std::sync::atomic::AtomicBool::new(false),
    });
    // One thread per direction; when either ends, both sockets are shut down so the other
    // ends too.
    let spawn = |name: &str, what: &'static str, run: fn(&Relay) -> io::Result<()>| {
        let r = r.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Err(e) = run(&r) {
                    tracing::debug!("relay {what} ended: {e}");
                }
                let _ = r.outer.shutdown(std::net::Shutdown::Both);
                let _ = r.inner.shutdown(std::net::Shutdown::Both);
            })
    };
    Ok([
        spawn("vhost-relay-in", "from the frontend", Relay::forward)?,
        spawn("vhost-relay-out", "to the frontend", Relay::backward)?,
    ])
}

/// The descriptors of the chain whose head is `head`, read from the descriptor table the way
/// virtio-queue reads them (one level of indirection, at most `size` descriptors per table);
/// the walk stops at the first descriptor that cannot be read.
pub fn chain_at<M: vm_memory::GuestMemory>(
    mem: &M,
    desc_table: vm_memory::GuestAddress,
    size: u16,
    head: u16,
) -> Vec<virtio_queue::desc::split::Descriptor> {
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::Address;
    let mut out = Vec::new();
    let (mut table, mut table_len, mut idx) = (desc_table, size, head);
    let mut left = size;
    let mut indirect = false;
    while idx < table_len && left > 0 {
        left -= 1;
        let Some(addr) = table.checked_add(u64::from(idx) * DESC_STATE_SIZE) else {
            break;
        };
        let Ok(raw) = mem.read_obj::<RawDescriptor>(addr) else {
            break;
        };
        let d = Descriptor::from(raw);
        if d.refers_to_indirect_table() {
            if indirect || d.len() == 0 || d.len() % 16 != 0 || d.len() / 16 > 32768 {
                break;
            }
            indirect = true;
            table = d.addr();
            table_len = (d.len() / 16) as u16;
            left = table_len;
            idx = 0;
            continue;
        }
        out.push(d);
        if !d.has_next() {
            break;
        }
        idx = d.next();
    }
    out
}

/// Run again, in the order they were taken, the requests a previous backend left in flight on
/// this queue, put them in the used ring, and continue the available ring after them.
/// Returns how many were resubmitted.
pub fn resubmit(
    queue: &mut virtio_queue::Queue,
    mem: &crate::io::GuestMem,
    worker: &mut crate::io::Executor,
    track: &QueueInflight<'_>,
) -> Result<usize, virtio_queue::Error> {
    use virtio_queue::QueueT;
    let used = queue.used_idx(mem, std::sync::atomic::Ordering::Acquire)?.0;
    let heads = track.recover(used);
    if heads.is_empty() {
        return Ok(0);
    }
    let table = vm_memory::GuestAddress(queue.desc_table());
    let size = queue.size();
    let chains: Vec<_> = heads
        .iter()
        .map(|&h| (h, chain_at(mem, table, size, h)))
        .collect();
    let done = worker.execute(mem, chains);
    track.begin_batch(&heads);
    for c in &done {
        queue.add_used(mem, c.head, c.len)?;
    }
    track.end_batch(&heads, queue.next_used());
    // The frontend restarts the ring at the used index; what was resubmitted is skipped.
    queue.set_next_avail(used.wrapping_add(heads.len() as u16));
    tracing::info!(
        "resubmitted {} request(s) left in flight by the previous backend",
        heads.len()
    );
    Ok(heads.len())
}
