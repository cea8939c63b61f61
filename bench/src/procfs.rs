//! Reading a process's CPU time and resident memory from /proc.

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

/// VmRSS in KiB from the text of /proc/PID/status.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident set size of the process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, ProcError> {
    let text = read(pid, "status")?;
    parse_status_rss_kib(&text).ok_or_else(|| ProcError::Format(format!("/proc/{pid}/status")))
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
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        cpu_time(me).unwrap();
        assert!(cpu_time(u32::MAX).is_err());
    }
}
