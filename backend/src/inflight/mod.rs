//! Inflight I/O tracking (vhost-user `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): the backend keeps,
//! in memory the frontend holds on to across backend restarts, which descriptor chains it took
//! from the available ring and has not returned yet, so a restarted backend resubmits exactly
//! those.
//!
//! - [`region`]: the shared-memory region format (per queue: a header and one state per
//!   descriptor);
//! - [`recovery`]: after a restart, walk what was in flight and resubmit it through the
//!   executor;
//! - this module: [`Inflight`], one connection's tracking state, which the relay installs
//!   regions into and the queue workers report to (as the I/O layer's [`Tracker`]).

pub mod recovery;
pub mod region;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use self::recovery::{chain_at, resubmit};
pub use self::region::{queue_region_size, InflightError, InflightRegion, QueueInflight};
use crate::io::Tracker;
use crate::LockUnpoisoned;

/// The inflight region of one connection, shared by the relay and the queue workers.
#[derive(Debug)]
pub struct Inflight {
    region: Mutex<Option<Arc<InflightRegion>>>,
    /// Per queue: the region came from a previous backend and is not recovered yet.
    recover: Vec<AtomicBool>,
    counter: AtomicU64,
    /// Largest queue size the device accepts.
    max_queue_size: u16,
}

impl Inflight {
    /// No region yet, for a device with `num_queues` queues of at most `max_queue_size`.
    pub fn new(num_queues: u16, max_queue_size: u16) -> Inflight {
        Inflight {
            max_queue_size,
            region: Mutex::new(None),
            recover: (0..num_queues).map(|_| AtomicBool::new(false)).collect(),
            counter: AtomicU64::new(0),
        }
    }

    /// Whether a region of `num_queues` queues of `queue_size` fits the device: the frontend
    /// does not get to size the backend's memory.
    pub fn fits(&self, num_queues: u16, queue_size: u16) -> bool {
        self.misfit(num_queues, queue_size).is_none()
    }

    /// Why a frontend with `num_queues` queues of `queue_size` does not fit the device, with
    /// the settings that would make it fit (the first message that tells a frontend's queue
    /// size, GET_INFLIGHT_FD, is where a frontend configured for more than the device learns
    /// it, and QEMU reports only that the message failed).
    pub fn misfit(&self, num_queues: u16, queue_size: u16) -> Option<String> {
        let (queues, max) = (self.recover.len(), self.max_queue_size);
        if usize::from(num_queues) > queues {
            Some(format!(
                "the frontend has {num_queues} queues and the device {queues}: start vloop-blk \
                 with --num-queues {num_queues}, or give the frontend num-queues={queues}"
            ))
        } else if !queue_size.is_power_of_two() || queue_size > crate::config::MAX_QUEUE_SIZE {
            Some(format!(
                "a queue size of {queue_size} is not a power of two up to {}",
                crate::config::MAX_QUEUE_SIZE
            ))
        } else if queue_size > max {
            Some(format!(
                "the frontend's queues have {queue_size} entries, more than --queue-size {max}: \
                 start vloop-blk with --queue-size {queue_size}, or give the frontend \
                 queue-size={max}"
            ))
        } else {
            None
        }
    }

    /// The current region, if the frontend set one up.
    pub fn region(&self) -> Option<Arc<InflightRegion>> {
        self.region.lock_unpoisoned().clone()
    }

    /// Use `region` from now on; with `recover`, it comes from a previous backend and each of
    /// its queues is recovered before it serves requests.
    pub fn install(&self, region: InflightRegion, recover: bool) {
        let max = (0..region.num_queues())
            .filter_map(|q| region.queue(q).map(|s| s.max_counter()))
            .max()
            .unwrap_or(0);
        self.counter.fetch_max(max, Ordering::Relaxed);
        for (q, flag) in self.recover.iter().enumerate() {
            flag.store(
                recover && q < usize::from(region.num_queues()),
                Ordering::Release,
            );
        }
        *self.region.lock_unpoisoned() = Some(Arc::new(region));
    }

    /// The next request counter value. It saturates: a hostile region whose counters are at
    /// the maximum only loses the order of what it marked in flight.
    pub fn next_counter(&self) -> u64 {
        let prev = self
            .counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_add(1))
            })
            .unwrap_or(u64::MAX);
        prev.saturating_add(1)
    }

    /// True once for each queue whose region must be recovered before it serves requests.
    pub fn take_recovery(&self, queue: u16) -> bool {
        self.recover
            .get(usize::from(queue))
            .is_some_and(|f| f.swap(false, Ordering::AcqRel))
    }

    /// Whether `queue` waits for recovery.
    pub fn needs_recovery(&self, queue: u16) -> bool {
        self.recover
            .get(usize::from(queue))
            .is_some_and(|f| f.load(Ordering::Acquire))
    }

    /// The tracker of queue `queue`, while a region is installed.
    pub fn tracker(&self, queue: u16) -> Option<QueueTracker<'_>> {
        let region = self.region()?;
        (queue < region.num_queues()).then_some(QueueTracker {
            inflight: self,
            region,
            queue,
        })
    }
}

/// One queue's [`Tracker`]: records each chain taken and returned in the queue's region.
#[derive(Debug)]
pub struct QueueTracker<'a> {
    inflight: &'a Inflight,
    region: Arc<InflightRegion>,
    queue: u16,
}

impl QueueTracker<'_> {
    /// The queue's part of the region.
    pub fn state(&self) -> Option<QueueInflight<'_>> {
        self.region.queue(self.queue)
    }
}

impl Tracker for QueueTracker<'_> {
    fn taken(&self, head: u16) {
        if let Some(q) = self.state() {
            q.take(head, self.inflight.next_counter());
        }
    }

    fn completing(&self, heads: &[u16]) {
        if let Some(q) = self.state() {
            q.begin_batch(heads);
        }
    }

    fn completed(&self, heads: &[u16], used_idx: u16) {
        if let Some(q) = self.state() {
            q.end_batch(heads, used_idx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_saturate() {
        let i = Inflight::new(1, 8);
        let (r, _f) = InflightRegion::create(1, 8).unwrap();
        r.queue(0).unwrap().take(3, u64::MAX);
        i.install(r, true);
        assert_eq!(i.next_counter(), u64::MAX);
        assert_eq!(i.next_counter(), u64::MAX);
        assert!(i.needs_recovery(0));
        assert!(i.take_recovery(0));
        assert!(!i.take_recovery(0));
        assert!(!i.fits(2, 8) && !i.fits(1, 16) && i.fits(1, 4));
    }
}
