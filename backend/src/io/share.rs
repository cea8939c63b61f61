//! How much of a worker's page-cache reads go to its engine's helper CPU.
//!
//! A worker that is saturated (busy at least `SATURATED_PERCENT` of the time over
//! `LOAD_WINDOW`s, time blocked on the engine not counted) gives part of each launch's
//! page-cache reads to the helper ring, whose kernel thread copies them on another CPU while
//! the worker copies the rest. The part, in sixteenths, starts at `SHARE_START` and adapts:
//! one more each time the helper had caught up, one less each time the worker had to wait for
//! it; after it reached zero it is tried again every `PROBE_EVERY` launches. Sharing only
//! happens while every saturated worker of the device can have two CPUs and the frontend one
//! more, so an idle or lightly loaded export never wakes a polling thread, and on two CPUs
//! the helper never takes the CPU the frontend submits on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Fewest shareable reads in one launch worth giving part of to the helper.
pub const SHARE_MIN: usize = 4;
/// Largest part given to the helper, in sixteenths.
const SHARE_MAX: usize = 15;
/// Part given to the helper when a worker first saturates, in sixteenths.
const SHARE_START: usize = 12;
/// Part tried again after sharing stopped paying, in sixteenths.
const SHARE_PROBE: usize = 4;
/// Launches without sharing before sharing is tried again.
const PROBE_EVERY: usize = 256;
/// Window over which a worker's busy time is measured.
const LOAD_WINDOW: Duration = Duration::from_millis(20);
/// Busy share of a window (in percent) from which a worker counts as saturated: below it, the
/// worker keeps up alone and a helper's polling thread would spin for a trickle.
const SATURATED_PERCENT: u32 = 75;

/// The share policy of one worker.
#[derive(Debug)]
pub struct SharePolicy {
    /// Sixteenths of a launch's shareable reads given to the helper.
    share: usize,
    /// Launches since sharing stopped.
    probe: usize,
    window: Instant,
    busy: Duration,
    /// Time blocked waiting for the engine since the last [`SharePolicy::account`].
    blocked: Duration,
    /// The last full window was busy for at least [`SATURATED_PERCENT`].
    saturated: bool,
    /// Saturated workers of the device, this one included while `saturated`.
    counter: Arc<AtomicUsize>,
    cpus: usize,
    /// Share regardless of the load (tests and fuzzing exercise the helper path with it).
    always: bool,
}

impl Default for SharePolicy {
    fn default() -> Self {
        SharePolicy::new(Arc::new(AtomicUsize::new(0)))
    }
}

impl SharePolicy {
    /// A policy counting its worker in `counter`, the device's number of saturated workers.
    pub fn new(counter: Arc<AtomicUsize>) -> SharePolicy {
        SharePolicy {
            share: SHARE_START,
            probe: 0,
            window: Instant::now(),
            busy: Duration::ZERO,
            blocked: Duration::ZERO,
            saturated: false,
            counter,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            always: false,
        }
    }

    /// Count this worker in `counter` from now on.
    pub fn set_counter(&mut self, counter: Arc<AtomicUsize>) {
        if self.saturated {
            self.counter.fetch_sub(1, Ordering::Relaxed);
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.counter = counter;
    }

    /// Share whenever a launch has enough reads, saturated or not.
    pub fn always(&mut self) {
        self.always = true;
    }

    /// Whether every saturated worker of the device can have two CPUs while the frontend
    /// keeps one (it needs a CPU to submit requests on, or the helper only moves work from
    /// it to the backend).
    fn may_share(&self) -> bool {
        self.always || self.saturated && 2 * self.counter.load(Ordering::Relaxed) < self.cpus
    }

    /// Whether a wave should publish its inline completions in parts: only without a helper
    /// (which takes part of the copies instead) and while the saturated workers leave a CPU
    /// for the frontend to refill the ring on. Where they do not, waking the frontend more
    /// often only takes CPU time from the workers.
    pub fn publish_early(&self) -> bool {
        !self.may_share() && self.counter.load(Ordering::Relaxed) < self.cpus
    }

    /// How many of a launch's `shareable` reads go to the helper, given whether the helper
    /// has caught up with everything it was given.
    pub fn portion(&mut self, shareable: usize, helper_idle: bool) -> usize {
        if !self.may_share() || shareable < SHARE_MIN {
            return 0;
        }
        if self.share == 0 {
            // Sharing stopped paying: try again now and then.
            self.probe += 1;
            if self.probe == PROBE_EVERY {
                self.probe = 0;
                self.share = SHARE_PROBE;
            }
        } else if helper_idle && self.share < SHARE_MAX {
            self.share += 1;
        }
        shareable * self.share / 16
    }

    /// The worker is about to wait although the helper still copies: give it less.
    pub fn worker_waits(&mut self) {
        self.share = self.share.saturating_sub(1);
    }

    /// The worker spent `d` blocked waiting for the engine.
    pub fn blocked(&mut self, d: Duration) {
        self.blocked += d;
    }

    /// Count the time since `since`, less the time blocked, as busy, and close the window when
    /// it is full.
    pub fn account(&mut self, since: Instant) {
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
}

impl Drop for SharePolicy {
    fn drop(&mut self) {
        if self.saturated {
            self.counter.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_cpus_leave_no_room_for_a_helper() {
        let mut p = SharePolicy::default();
        p.cpus = 2;
        p.window -= LOAD_WINDOW;
        p.account(Instant::now() - LOAD_WINDOW);
        assert!(p.saturated);
        assert_eq!(p.portion(16, true), 0);
    }

    #[test]
    fn an_idle_worker_never_shares() {
        let mut p = SharePolicy::default();
        assert_eq!(p.portion(32, true), 0);
        p.account(Instant::now());
        assert_eq!(p.portion(32, true), 0);
    }

    #[test]
    fn a_saturated_worker_shares_and_adapts() {
        let counter = Arc::new(AtomicUsize::new(0));
        let mut p = SharePolicy::new(counter.clone());
        p.cpus = 3;
        // A window that was busy all the time.
        p.window -= LOAD_WINDOW;
        p.account(Instant::now() - LOAD_WINDOW);
        assert!(p.saturated);
        assert_eq!(counter.load(Ordering::Relaxed), 1);
        assert_eq!(p.portion(SHARE_MIN - 1, true), 0);
        assert_eq!(p.portion(16, false), SHARE_START);
        assert_eq!(p.portion(16, true), SHARE_START + 1);
        for _ in 0..16 {
            p.worker_waits();
        }
        assert_eq!(p.portion(16, true), 0);
        for _ in 0..PROBE_EVERY - 2 {
            assert_eq!(p.portion(16, true), 0);
        }
        assert_eq!(p.portion(16, true), SHARE_PROBE);
        // A second saturated worker on three CPUs: no CPU left for a helper.
        counter.fetch_add(1, Ordering::Relaxed);
        assert_eq!(p.portion(16, true), 0);
        counter.fetch_sub(1, Ordering::Relaxed);
        drop(p);
        assert_eq!(counter.load(Ordering::Relaxed), 0);
    }
}
