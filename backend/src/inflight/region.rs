//! The inflight region format for split virtqueues (vhost-user
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`).
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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vm_memory::mmap::MmapRegion;
use vm_memory::volatile_memory::VolatileSlice;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

use crate::config::MAX_QUEUE_SIZE;

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
    /// No queues.
    #[error("an inflight region for no queues")]
    NoQueues,
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
    /// The memfd could not be created, sized or sealed.
    #[error("cannot create the inflight memfd")]
    Memfd(#[source] io::Error),
    /// The frontend's region fd could shrink under the mapping.
    #[error("the inflight region's fd is not a memfd sealed against shrinking ({0})")]
    Unsealed(#[source] io::Error),
    /// The region could not be mapped.
    #[error("cannot map the inflight region: {0}")]
    Map(String),
    /// The frontend's region fd is not shared memory (a memfd, as a backend hands out).
    #[error("the inflight region's fd is not a memfd (shared memory): {0}")]
    NotShmem(&'static str),
}

fn add_seals(file: &File, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS on an fd owned by `file`, with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Make sure `file` cannot shrink: it must be a memfd (or other sealable file) that carries
/// F_SEAL_SHRINK, which is added when the file still allows sealing.
pub fn seal_against_shrinking(file: &File) -> io::Result<()> {
    // SAFETY: F_GET_SEALS on an fd owned by `file`.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::last_os_error());
    }
    if seals & libc::F_SEAL_SHRINK != 0 {
        return Ok(());
    }
    add_seals(file, libc::F_SEAL_SHRINK)
}

/// A region's queues must be at least one, each of a split virtqueue's size.
fn check_shape(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0 {
        return Err(InflightError::NoQueues);
    }
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::BadQueueSize(queue_size));
    }
    Ok(())
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
        check_shape(num_queues, queue_size)?;
        let size = queue_region_size(queue_size) * u64::from(num_queues);
        // SAFETY: memfd_create with a NUL-terminated name and flags; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"vloop-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(InflightError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size).map_err(InflightError::Memfd)?;
        // The frontend keeps this fd: sealed, it can neither shrink it under our mapping
        // (a SIGBUS in the backend) nor grow it.
        add_seals(
            &file,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
        .map_err(InflightError::Memfd)?;
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
        check_shape(num_queues, queue_size)?;
        // A frontend hands back a memfd that a backend created. Another sealable file, one on
        // hugetlbfs, may have no page to give where the region has a hole: the daemon's first
        // access to it would raise SIGBUS.
        match nix::sys::statfs::fstatfs(file) {
            Ok(s) if s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC => {}
            Ok(s) if s.filesystem_type() == nix::sys::statfs::HUGETLBFS_MAGIC => {
                return Err(InflightError::NotShmem("it is on hugetlbfs"));
            }
            Ok(_) => return Err(InflightError::NotShmem("it is on another file system")),
            Err(_) => return Err(InflightError::NotShmem("its file system is unknown")),
        }
        // The size is checked below, against a file that can no longer shrink.
        seal_against_shrinking(file).map_err(InflightError::Unsealed)?;
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
        // Each counter is read once: the frontend may rewrite them while they are sorted.
        let mut taken: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.inflight(h))
            .map(|h| (self.counter(h), h))
            .collect();
        taken.sort_unstable();
        taken.into_iter().map(|(_, h)| h).collect()
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

    /// One queue of 4 where `done` were taken and fully returned (`counter` from 1 on), then
    /// `taken` were taken and begun as one batch: what a restart with the used ring at
    /// `used` finds still in flight, and the used index it repairs to.
    fn recover_after(done: &[u16], taken: &[u16], used: u16) -> (Vec<u16>, u16) {
        let (r, _file) = InflightRegion::create(1, 4).unwrap();
        let q = r.queue(0).unwrap();
        let mut counter = 0;
        for &h in done {
            counter += 1;
            q.take(h, counter);
        }
        if !done.is_empty() {
            q.begin_batch(done);
            q.end_batch(done, done.len() as u16);
        }
        for &h in taken {
            counter += 1;
            q.take(h, counter);
        }
        q.begin_batch(&taken[..2.min(taken.len())]);
        (q.recover(used), q.used_idx())
    }

    #[test]
    fn a_batch_half_returned_is_repaired() {
        // Taken 1, 3, 0; the batch [1, 3] begun: died after the used ring reached 2, before
        // end_batch.
        assert_eq!(recover_after(&[], &[1, 3, 0], 2), (vec![0], 2));
        // Died after the first of the two reached the used ring: the second and the request
        // taken later are still in flight.
        assert_eq!(recover_after(&[], &[1, 3, 0], 1).0, vec![3, 0]);
        // A later batch after a completed one: only its own first head is cleared.
        assert_eq!(recover_after(&[2], &[0, 1], 2).0, vec![1]);
        // Died before the used ring was updated: the whole batch is still in flight.
        assert_eq!(recover_after(&[], &[2, 1], 0).0, vec![2, 1]);
    }

    #[test]
    fn counters_rewritten_during_recovery_give_some_order_of_the_heads() {
        let (r, file) = InflightRegion::create(1, 1024).unwrap();
        let q = r.queue(0).unwrap();
        for h in 0..1024 {
            q.take(h, u64::from(h) + 1);
        }
        // The frontend's mapping of the region, where it swaps the counters between two
        // orders while the backend sorts them.
        let size = file.metadata().unwrap().len();
        let theirs = InflightRegion::open(&file, size, 0, 1, 1024).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let q = theirs.queue(0).unwrap();
                let mut pass = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for h in 0..1024u16 {
                        let c = u64::from(h).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ pass;
                        q.take(h, c % 4096);
                    }
                    pass = pass.wrapping_add(0x2545_f491);
                }
            });
            let recovered = std::panic::catch_unwind(|| {
                for _ in 0..200 {
                    let mut heads = q.recover(0);
                    heads.sort_unstable();
                    assert_eq!(heads, (0..1024).collect::<Vec<u16>>());
                }
            });
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            recovered.unwrap();
        });
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
        // A regular file.
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        assert!(InflightRegion::open(&f, size, 0, 1, 8).is_err());
        // Out-of-range heads are ignored.
        let (r, _f) = InflightRegion::create(1, 4).unwrap();
        let q = r.queue(0).unwrap();
        q.take(9, 1);
        q.begin_batch(&[9]);
        q.end_batch(&[9], 1);
        assert!(q.recover(1).is_empty());
        assert!(r.queue(1).is_none());
    }

    #[test]
    fn a_region_on_hugetlbfs_is_refused() {
        // Where the huge page pool is empty, the first access to such a region would raise
        // SIGBUS in the daemon; sealed against shrinking it passes every other check.
        let size = 2 << 20;
        let file = match vloop_frontend::raw::fds::hugetlb_memfd(size) {
            Ok(f) => f,
            Err(e) => {
                vloop_frontend::skip::skip(&format!("no hugetlb memfd here: {e}"));
                return;
            }
        };
        let err = InflightRegion::open(&file, size, 0, 1, 256).unwrap_err();
        assert!(matches!(err, InflightError::NotShmem(_)), "{err}");
    }
}
