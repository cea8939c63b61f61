//! A per-second budget for log lines the guest can cause, so a hostile guest cannot flood the
//! host's logs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::LockUnpoisoned;

/// Lines a second all the limiters of the process made by [`RateLimiter::new`] together allow
/// (the lines about the guest's requests): each connection and queue has budgets of its own,
/// which a frontend that reconnects in a loop would get afresh every time.
pub const PROCESS_LINES_PER_SECOND: u32 = 40;

/// A budget shared by limiters, for the whole process.
#[derive(Debug)]
pub struct Pool {
    per_second: u32,
    limiter: Mutex<Option<RateLimiter>>,
}

impl Pool {
    /// A pool allowing `per_second` lines a second.
    pub const fn new(per_second: u32) -> Pool {
        Pool {
            per_second,
            limiter: Mutex::new(None),
        }
    }

    /// Whether the pool has room for one more line in this second.
    fn allows(&self) -> bool {
        self.limiter
            .lock_unpoisoned()
            .get_or_insert_with(|| RateLimiter::alone(self.per_second))
            .allow()
            .is_some()
    }
}

/// The pool of [`RateLimiter::new`]: lines about the guest's requests.
static REQUEST_LINES: Pool = Pool::new(PROCESS_LINES_PER_SECOND);

/// Allows `per_second` events per one-second window and counts the rest.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: u32,
    window: Instant,
    count: u32,
    suppressed: u64,
    /// Events dropped since the limiter was made.
    dropped: u64,
    /// The budget an event must also fit in.
    pool: Option<&'static Pool>,
}

impl RateLimiter {
    /// A limiter allowing `per_second` events per second, within the process's budget of
    /// [`PROCESS_LINES_PER_SECOND`] shared by every limiter made so.
    pub fn new(per_second: u32) -> Self {
        Self::in_pool(per_second, &REQUEST_LINES)
    }

    /// A limiter allowing `per_second` events per second, within `pool`.
    pub fn in_pool(per_second: u32, pool: &'static Pool) -> Self {
        RateLimiter {
            pool: Some(pool),
            ..Self::alone(per_second)
        }
    }

    /// A limiter allowing `per_second` events per second, whatever other limiters allow: for
    /// one that is itself the process's only one of its kind.
    pub fn alone(per_second: u32) -> Self {
        RateLimiter {
            per_second,
            window: Instant::now(),
            count: 0,
            suppressed: 0,
            dropped: 0,
            pool: None,
        }
    }

    /// `Some(n)` when the event may be logged (`n` events were suppressed since the last one
    /// logged), `None` when it must be dropped.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.count = 0;
        }
        if self.count < self.per_second && self.pool.is_none_or(Pool::allows) {
            self.count += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            self.dropped += 1;
            None
        }
    }

    /// Events dropped since the limiter was made.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiters_made_afresh_share_the_process_budget() {
        // As for a frontend that reconnects in a loop: each connection's limiters are new.
        let t = Instant::now();
        let allowed = (0..100)
            .filter(|_| RateLimiter::new(5).allow().is_some())
            .count() as u32;
        // At most two windows of the process's budget (the count may cross a second).
        let windows = t.elapsed().as_secs() as u32 + 2;
        assert!(
            allowed <= windows * PROCESS_LINES_PER_SECOND,
            "{allowed} of 100 first lines of fresh limiters allowed"
        );
        // A line the process's budget refused is counted where it was refused.
        let mut r = RateLimiter::new(5);
        while r.allow().is_some() {}
        assert!(r.dropped() >= 1);
    }

    #[test]
    fn a_pool_of_its_own_is_not_crowded_out_by_the_lines_about_requests() {
        static OWN: Pool = Pool::new(2);
        for _ in 0..2 * PROCESS_LINES_PER_SECOND {
            RateLimiter::new(5).allow();
        }
        let mut r = RateLimiter::in_pool(5, &OWN);
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), Some(0));
        // The pool's own budget still holds.
        assert_eq!(RateLimiter::in_pool(5, &OWN).allow(), None);
    }

    #[test]
    fn budget_per_window() {
        let mut r = RateLimiter::alone(3);
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        r.window -= Duration::from_secs(2);
        assert_eq!(r.allow(), Some(2));
    }
}

/// An error with its causes, "what: why: deeper why", for one log line.
pub struct Causes<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod causes_tests {
    use super::Causes;

    #[test]
    fn causes_follow_the_error() {
        let e = std::io::Error::other(vloop_qcow2::Error::Io {
            what: "reading",
            path: "/i.qcow2".into(),
            offset: 0,
            source: std::io::Error::from_raw_os_error(libc::EIO),
        });
        let line = Causes(&e).to_string();
        assert!(
            line.contains("/i.qcow2") && line.contains("os error 5"),
            "{line}"
        );
    }
}
