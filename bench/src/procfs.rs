//! Reading a process's CPU time (in all, and per thread) and resident memory (now and at its
//! peak) from /proc, and the CPU it used between two readings: the parsing is pure, the
//! readers beside it do the I/O.

use std::time::Duration;

/// Errors of reading /proc.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The file could not be read (the process may have exited).
    #[error("cannot read {path}: has process {pid} exited?")]
    Read {
        /// Process id.
        pid: u32,
        /// File read.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file did not have the expected format.
    #[error("unexpected format of {0}")]
    Format(String),
}

fn read(pid: u32, file: &str) -> Result<String, ProcError> {
    let path = format!("/proc/{pid}/{file}");
    std::fs::read_to_string(&path).map_err(|source| ProcError::Read { pid, path, source })
}

/// utime + stime (in clock ticks) from the text of /proc/PID/stat.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces; fields restart after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time (user + system, all threads) the process has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration, ProcError> {
    let text = read(pid, "stat")?;
    let ticks =
        parse_stat_ticks(&text).ok_or_else(|| ProcError::Format(format!("/proc/{pid}/stat")))?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000 / hz),
    ))
}

/// The value in KiB of the `key:` line (`VmRSS`, `VmHWM`, ...) of /proc/PID/status.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// VmRSS in KiB from the text of /proc/PID/status.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    parse_status_kib(status, "VmRSS")
}

fn status_kib(pid: u32, key: &str) -> Result<u64, ProcError> {
    let text = read(pid, "status")?;
    parse_status_kib(&text, key).ok_or_else(|| ProcError::Format(format!("/proc/{pid}/status")))
}

/// Resident set size of the process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, ProcError> {
    status_kib(pid, "VmRSS")
}

/// Peak resident set size of the process (VmHWM) in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64, ProcError> {
    status_kib(pid, "VmHWM")
}

/// Anonymous resident memory of the process (RssAnon) in KiB: heap and stacks, no file or
/// shared-memory pages.
pub fn anon_rss_kib(pid: u32) -> Result<u64, ProcError> {
    status_kib(pid, "RssAnon")
}

/// The CPU time one thread has run, with its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadCpu {
    /// Thread id.
    pub tid: u32,
    /// Thread name (/proc/PID/task/TID/comm).
    pub name: String,
    /// Time on a CPU in nanoseconds (first field of /proc/PID/task/TID/schedstat).
    pub cpu_ns: u64,
}

/// A figure (its unit said where it is used) for the threads of one name.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ThreadShare {
    /// Thread name, digits dropped.
    pub thread: String,
    /// The figure.
    pub value: f64,
}

/// The on-CPU nanoseconds (first field) of the text of a schedstat file.
pub fn parse_schedstat_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Every live thread of the process with its CPU time, in nanoseconds (exact, unlike the
/// clock ticks of /proc/PID/stat; a thread that has exited is no longer listed).
pub fn threads(pid: u32) -> Result<Vec<ThreadCpu>, ProcError> {
    let path = format!("/proc/{pid}/task");
    let dir = std::fs::read_dir(&path).map_err(|source| ProcError::Read {
        pid,
        path: path.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread may exit between the listing and the reads: skip it.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let cpu_ns = parse_schedstat_ns(&stat)
            .ok_or_else(|| ProcError::Format(format!("{path}/{tid}/schedstat")))?;
        out.push(ThreadCpu {
            tid,
            name: name.trim_end().to_string(),
            cpu_ns,
        });
    }
    out.sort_by_key(|t| t.tid);
    Ok(out)
}

/// CPU time used by each thread between two [`threads`] snapshots, summed by thread name with
/// its digits dropped (`iou-wrk-123` and `iou-wrk-456` are one `iou-wrk-` entry), largest
/// first; a thread born after `before` counts from zero.
pub fn thread_cpu_delta(before: &[ThreadCpu], after: &[ThreadCpu]) -> Vec<(String, u64)> {
    let mut by_name: Vec<(String, u64)> = Vec::new();
    for t in after {
        let start = before
            .iter()
            .find(|b| b.tid == t.tid)
            .map_or(0, |b| b.cpu_ns);
        let used = t.cpu_ns.saturating_sub(start);
        let name: String = t.name.chars().filter(|c| !c.is_ascii_digit()).collect();
        match by_name.iter_mut().find(|(n, _)| *n == name) {
            Some((_, ns)) => *ns += used,
            None => by_name.push((name, used)),
        }
    }
    by_name.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    by_name
}

/// A process's CPU time as the host read it at one moment, both ways /proc gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuSample {
    /// utime + stime of the process and all its threads, exited ones included
    /// (/proc/PID/stat, in clock ticks).
    pub ticks: Option<Duration>,
    /// Each live thread's exact run time (/proc/PID/task/TID/schedstat).
    pub threads: Option<Vec<ThreadCpu>>,
}

impl CpuSample {
    /// Process `pid`'s CPU time now (what cannot be read is None).
    pub fn read(pid: u32) -> Self {
        Self {
            ticks: cpu_time(pid).ok(),
            threads: threads(pid).ok(),
        }
    }

    /// The CPU used from this sample to `later`, where both have the figure.
    pub fn until(&self, later: &CpuSample) -> CpuUsed {
        CpuUsed {
            ticks: match (self.ticks, later.ticks) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            },
            threads: match (&self.threads, &later.threads) {
                (Some(a), Some(b)) => Some(thread_cpu_delta(a, b)),
                _ => None,
            },
        }
    }
}

/// The CPU a process used between two [`CpuSample`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuUsed {
    /// utime + stime of all its threads, in clock ticks (10 ms resolution; counts the threads
    /// that exited in between).
    pub ticks: Option<Duration>,
    /// Exact run time by thread name (digits dropped) in nanoseconds, largest first
    /// ([`thread_cpu_delta`]; threads that exited in between are missing).
    pub threads: Option<Vec<(String, u64)>>,
}

impl CpuUsed {
    /// The run time of all threads together, in nanoseconds.
    pub fn threads_ns(&self) -> Option<u64> {
        self.threads
            .as_ref()
            .map(|t| t.iter().map(|(_, ns)| ns).sum())
    }

    /// Each thread name's run time as the figure `per` makes of its nanoseconds (empty
    /// without per-thread readings).
    pub fn shares(&self, per: impl Fn(u64) -> f64) -> Vec<ThreadShare> {
        self.threads
            .iter()
            .flatten()
            .map(|(thread, ns)| ThreadShare {
                thread: thread.clone(),
                value: per(*ns),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_skip_command_names_with_spaces() {
        let stat = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 111 222 13 14 15";
        assert_eq!(parse_stat_ticks(stat), Some(333));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn rss_from_status() {
        let s = "Name:\tx\nVmPeak:\t  9 kB\nVmRSS:\t   4242 kB\n";
        assert_eq!(parse_status_rss_kib(s), Some(4242));
        assert_eq!(parse_status_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn status_keys_match_whole_names() {
        let s = "VmHWMx:\t 1 kB\nVmHWM:\t  5120 kB\nVmRSS:\t 4096 kB\n";
        assert_eq!(parse_status_kib(s, "VmHWM"), Some(5120));
        assert_eq!(parse_status_kib(s, "VmRSS"), Some(4096));
        assert_eq!(parse_status_kib(s, "VmPeak"), None);
    }

    #[test]
    fn thread_deltas_group_names_without_digits() {
        let t = |tid, name: &str, cpu_ns| ThreadCpu {
            tid,
            name: name.into(),
            cpu_ns,
        };
        let before = [t(1, "main", 100), t(2, "iou-wrk-1", 50)];
        let after = [
            t(1, "main", 150),
            t(2, "iou-wrk-1", 80),
            t(3, "iou-wrk-1", 40),
            t(4, "iou-sqp-1", 500),
        ];
        assert_eq!(
            thread_cpu_delta(&before, &after),
            [
                ("iou-sqp-".to_string(), 500),
                ("iou-wrk-".to_string(), 70),
                ("main".to_string(), 50)
            ]
        );
        assert_eq!(parse_schedstat_ns("123 456 7\n"), Some(123));
        assert_eq!(parse_schedstat_ns(""), None);
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(peak_rss_kib(me).unwrap() >= rss_kib(me).unwrap() / 2);
        cpu_time(me).unwrap();
        assert!(cpu_time(u32::MAX).is_err());
        assert!(anon_rss_kib(me).unwrap() > 0);
        let ts = threads(me).unwrap();
        assert!(ts.iter().any(|t| t.tid == me), "{ts:?}");
        let s = CpuSample::read(me);
        assert!(s.ticks.is_some() && s.threads.is_some());
        let used = s.until(&CpuSample::read(me));
        assert!(used.ticks.is_some() && used.threads_ns().is_some());
        assert_eq!(
            CpuSample::read(u32::MAX).until(&s),
            CpuUsed::default(),
            "nothing of a process that does not exist"
        );
    }

    /// CPU time the calling thread has used.
    fn own_thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn a_spinning_thread_shows_in_the_thread_delta() {
        let me = std::process::id();
        let before = threads(me).unwrap();
        let (spun_tx, spun) = std::sync::mpsc::channel();
        let (done, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::Builder::new()
            .name("spin77".into())
            .spawn(move || {
                // 50 ms of this thread's own CPU time, however loaded the machine is.
                while own_thread_cpu() < Duration::from_millis(50) {
                    std::hint::spin_loop();
                }
                spun_tx.send(()).unwrap();
                // Stay alive until the snapshot is taken.
                let _ = done_rx.recv();
            })
            .unwrap();
        spun.recv().unwrap();
        let after = threads(me).unwrap();
        done.send(()).unwrap();
        h.join().unwrap();
        let d = thread_cpu_delta(&before, &after);
        let spin = d.iter().find(|(n, _)| n == "spin").map(|(_, ns)| *ns);
        let sample = |threads| CpuSample {
            ticks: None,
            threads: Some(threads),
        };
        let used = sample(before).until(&sample(after));
        assert_eq!(used.ticks, None);
        assert!(used.threads_ns() >= spin, "{used:?}");
        let shares = used.shares(|ns| ns as f64);
        assert!(shares.iter().any(|s| s.thread == "spin"), "{shares:?}");
        assert!(
            spin.is_some_and(|ns| (50_000_000..1_000_000_000).contains(&ns)),
            "{d:?}"
        );
    }
}
