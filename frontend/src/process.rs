//! Child processes that are always reaped: a guard kills its child when dropped, on every
//! path (success, error, panic), and every wait has a time-out; and what a test observes of a
//! running process through /proc (CPU time, descriptors, threads).

use std::io;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// A child process killed (SIGKILL) and reaped when the guard is dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    /// Guards `child`; `what` names it in messages.
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child: Some(child),
            what: what.into(),
        }
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the child has exited (and its status).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `limit` for the child to exit; `None` on time-out (the child keeps running).
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if t.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asks the child to stop with SIGTERM, waits up to `grace`, then kills it.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_wait() {
            return Some(s);
        }
        if let Ok(pid) = i32::try_from(self.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Some(s) = self.wait_timeout(grace) {
            return Some(s);
        }
        tracing::warn!(
            "{} did not stop within {grace:?} of SIGTERM; killing it",
            self.what
        );
        self.kill()
    }

    /// Kills the child and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// CPU time (user plus system) process `pid` has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: fields are counted from the
    // last ')'. utime and stime are fields 14 and 15, in clock ticks.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no ')' in stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short stat"))
    };
    let ticks = field(11)? + field(12)?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    Ok(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / hz,
    ))
}

/// Number of descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Number of threads of process `pid`.
pub fn threads(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn drop_kills_the_child() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        drop(ChildGuard::new(child, "sleep"));
        // The pid is reaped: /proc/<pid> is gone (or reused by something that is not sleep).
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "sleep");
    }

    #[test]
    fn proc_counters_of_a_spinning_child() {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let g = ChildGuard::new(child, "sh");
        let pid = g.id();
        assert!(open_fds(pid).unwrap() >= 3);
        assert_eq!(threads(pid).unwrap(), 1);
        let deadline = Instant::now() + Duration::from_secs(20);
        while cpu_time(pid).unwrap() < Duration::from_millis(50) {
            assert!(Instant::now() < deadline, "a spinning shell used no CPU");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(cpu_time(u32::MAX).is_err());
    }

    #[test]
    fn wait_timeout_times_out_then_stop_ends_it() {
        let mut g = ChildGuard::new(Command::new("sleep").arg("30").spawn().unwrap(), "sleep");
        assert!(g.wait_timeout(Duration::from_millis(50)).is_none());
        let st = g.stop(Duration::from_secs(5)).unwrap();
        assert!(!st.success());
    }
}
