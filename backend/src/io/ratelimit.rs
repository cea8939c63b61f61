//! A per-second budget for log lines the guest can cause, so a hostile guest cannot flood the
//! host's logs.

use std::time::{Duration, Instant};

/// Allows `per_second` events per one-second window and counts the rest.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: u32,
    window: Instant,
    count: u32,
    suppressed: u64,
    /// Events dropped since the limiter was made.
    dropped: u64,
}

impl RateLimiter {
    /// A limiter allowing `per_second` events per second.
    pub fn new(per_second: u32) -> Self {
        RateLimiter {
            per_second,
            window: Instant::now(),
            count: 0,
            suppressed: 0,
            dropped: 0,
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
        if self.count < self.per_second {
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
    fn budget_per_window() {
        let mut r = RateLimiter::new(3);
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
