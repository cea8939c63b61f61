//! Adaptive polling of a queue's available ring.
//!
//! After a pass over its queue, a worker may watch the available ring for a short while
//! before it re-enables guest notifications and sleeps: a request that arrives meanwhile is
//! taken at once, without the frontend's kick (suppressed while notifications are off) and
//! without the worker's wake-up, the two costs that dominate a request at queue depth 1. The
//! window adapts the way QEMU's iothread polling does (`poll-max-ns`, `poll-grow`,
//! `poll-shrink`): a sleep shorter than the largest window means polling for it would have
//! paid, so the window grows (doubling from [`POLL_START`]); a sleep longer than the largest
//! window shrinks it (halving, to zero below [`POLL_START`]); a poll that found work keeps it.
//! An idle export therefore never polls, and a busy one polls only across the short gaps
//! between its requests.
//!
//! Polling takes a CPU, so at most `CPUs - 1` workers of a device poll at once: the frontend
//! (QEMU's vCPU and I/O threads, or a load generator) always keeps a CPU to submit on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First window after polling starts to pay.
pub const POLL_START: Duration = Duration::from_micros(4);

/// The CPUs a device's workers may spend polling, shared by its workers.
#[derive(Debug)]
pub struct PollBudget {
    free: AtomicUsize,
}

impl PollBudget {
    /// A budget for a machine with `cpus` CPUs: one is left to the frontend.
    pub fn new(cpus: usize) -> Arc<PollBudget> {
        Arc::new(PollBudget {
            free: AtomicUsize::new(cpus.saturating_sub(1)),
        })
    }

    /// A budget for this machine.
    pub fn for_this_machine() -> Arc<PollBudget> {
        PollBudget::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    fn take(&self) -> bool {
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    fn give(&self) {
        self.free.fetch_add(1, Ordering::AcqRel);
    }
}

/// What one poll did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polled {
    /// A request arrived within the window.
    Found,
    /// The window passed (or no CPU was free, or polling is off): sleep.
    Idle,
}

/// The polling state of one worker.
#[derive(Debug)]
pub struct Poller {
    /// Largest window; zero turns polling off.
    max: Duration,
    /// Current window.
    window: Duration,
    /// When the worker last went to sleep, with the time it had polled before.
    slept: Option<(Instant, Duration)>,
    budget: Arc<PollBudget>,
}

impl Poller {
    /// A poller whose window never exceeds `max` (zero: never poll), spending CPUs from
    /// `budget`.
    pub fn new(max: Duration, budget: Arc<PollBudget>) -> Poller {
        Poller {
            max,
            window: Duration::ZERO,
            slept: None,
            budget,
        }
    }

    /// The current window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Watch `has_work` for up to the current window.
    pub fn poll(&mut self, mut has_work: impl FnMut() -> bool) -> Polled {
        if self.window.is_zero() || !self.budget.take() {
            return Polled::Idle;
        }
        let start = Instant::now();
        let found = loop {
            if has_work() {
                break true;
            }
            if start.elapsed() >= self.window {
                break false;
            }
            std::hint::spin_loop();
        };
        self.budget.give();
        if found {
            Polled::Found
        } else {
            // Counted with the sleep that follows.
            self.slept = Some((Instant::now(), self.window));
            Polled::Idle
        }
    }

    /// The worker goes to sleep without having polled (polling is off or had no CPU).
    pub fn sleeping(&mut self) {
        if self.slept.is_none() {
            self.slept = Some((Instant::now(), Duration::ZERO));
        }
    }

    /// The worker goes to sleep after a pass that does not call for polling: the gap that
    /// follows leaves the window as it is.
    pub fn not_polling(&mut self) {
        self.slept = None;
    }

    /// The worker woke up to work: adapt the window to how long it waited.
    pub fn woke(&mut self) {
        let Some((since, polled)) = self.slept.take() else {
            return;
        };
        self.adapt(since.elapsed() + polled);
    }

    /// Adapt the window to a wait of `waited` between two passes.
    fn adapt(&mut self, waited: Duration) {
        if self.max.is_zero() {
            return;
        }
        if waited > self.max {
            // Polling for it would have taken too long: poll less.
            self.window /= 2;
            if self.window < POLL_START {
                self.window = Duration::ZERO;
            }
        } else if waited > self.window {
            // A longer window would have caught it.
            self.window = (self.window * 2).clamp(POLL_START, self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_gaps_grow_the_window_and_long_ones_shrink_it() {
        let us = Duration::from_micros;
        let mut p = Poller::new(us(64), PollBudget::new(2));
        assert_eq!(p.poll(|| true), Polled::Idle, "no window yet");
        p.adapt(us(10));
        assert_eq!(p.window(), POLL_START);
        p.adapt(us(10));
        assert_eq!(p.window(), us(8));
        p.adapt(us(5));
        assert_eq!(p.window(), us(8), "caught by the window: kept");
        for _ in 0..10 {
            p.adapt(us(60));
        }
        assert_eq!(p.window(), us(64), "capped at the largest window");
        assert_eq!(p.poll(|| true), Polled::Found);
        // A gap longer than the largest window halves it, down to zero.
        for _ in 0..4 {
            p.adapt(us(200));
        }
        assert_eq!(p.window(), us(4));
        p.adapt(us(200));
        assert_eq!(p.window(), Duration::ZERO);
        // Sleeping and waking measure the gap.
        p.sleeping();
        std::thread::sleep(us(500));
        p.woke();
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn the_frontend_keeps_a_cpu() {
        let budget = PollBudget::new(2);
        let mut a = Poller::new(Duration::from_micros(64), budget.clone());
        a.window = Duration::from_millis(50);
        assert!(budget.take(), "one CPU of two may poll");
        // The only pollable CPU is taken: the second worker does not poll.
        let t = Instant::now();
        assert_eq!(a.poll(|| false), Polled::Idle);
        assert!(t.elapsed() < Duration::from_millis(10));
        budget.give();
        assert_eq!(a.poll(|| true), Polled::Found);
        let mut none = Poller::new(Duration::from_micros(64), PollBudget::new(1));
        none.window = Duration::from_micros(64);
        assert_eq!(none.poll(|| true), Polled::Idle, "one CPU: never poll");
        let mut off = Poller::new(Duration::ZERO, PollBudget::new(8));
        off.sleeping();
        off.woke();
        assert_eq!(off.window(), Duration::ZERO);
    }
}
