//! The machine a comparison ran on: CPU count and model, kernel version, the version of
//! qemu-storage-daemon, and the load average (other work on a shared machine slows the
//! backends unevenly, so every figure carries the load it was taken at). Parsing is pure;
//! the readers beside it do the I/O.

use std::path::Path;
use std::process::{Command, Stdio};

/// Errors of reading the machine's state.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A /proc file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// /proc/loadavg did not have the expected format.
    #[error("unexpected format of /proc/loadavg: '{0}'")]
    LoadFormat(String),
}

/// The 1-minute load average above which figures are not from an idle machine.
pub const IDLE_LOAD: f64 = 1.0;

/// The load average: runnable tasks averaged over 1, 5 and 15 minutes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LoadAvg {
    /// Over 1 minute.
    pub one: f64,
    /// Over 5 minutes.
    pub five: f64,
    /// Over 15 minutes.
    pub fifteen: f64,
}

impl LoadAvg {
    /// Whether the 1-minute load is above [`IDLE_LOAD`].
    pub fn busy(&self) -> bool {
        self.one > IDLE_LOAD
    }
}

impl std::fmt::Display for LoadAvg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} {:.2} {:.2}", self.one, self.five, self.fifteen)
    }
}

/// The load average from the text of /proc/loadavg (`0.52 0.58 0.59 1/467 12345`).
pub fn parse_loadavg(text: &str) -> Result<LoadAvg, MachineError> {
    let bad = || MachineError::LoadFormat(text.trim().to_string());
    let mut f = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0));
    let mut next = || f.next().flatten().ok_or_else(bad);
    Ok(LoadAvg {
        one: next()?,
        five: next()?,
        fifteen: next()?,
    })
}

fn read(path: &str) -> Result<String, MachineError> {
    std::fs::read_to_string(path).map_err(|source| MachineError::Read {
        path: path.to_string(),
        source,
    })
}

/// The machine's load average now.
pub fn loadavg() -> Result<LoadAvg, MachineError> {
    parse_loadavg(&read("/proc/loadavg")?)
}

/// The 1-minute load average now, for a record (None when unreadable).
pub fn load_now() -> Option<f64> {
    loadavg().ok().map(|l| l.one)
}

/// The load average before and after a run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LoadSpan {
    /// Before the first measurement.
    pub before: LoadAvg,
    /// After the last one.
    pub after: LoadAvg,
    /// Whether the 1-minute load was above [`IDLE_LOAD`] at either point.
    pub busy: bool,
}

impl LoadSpan {
    /// The span from `before` to `after`.
    pub fn new(before: LoadAvg, after: LoadAvg) -> Self {
        Self {
            before,
            after,
            busy: before.busy() || after.busy(),
        }
    }

    /// The warning to print when the machine was not idle.
    pub fn warning(&self) -> Option<String> {
        self.busy.then(|| {
            format!(
                "WARNING: the 1-minute load average was above {IDLE_LOAD} (before {:.2}, after {:.2}): \
                 other work shared the CPUs, so these figures are not those of an idle machine",
                self.before.one, self.after.one
            )
        })
    }
}

/// CPU count and model from the text of /proc/cpuinfo.
pub fn parse_cpuinfo(text: &str) -> (usize, Option<String>) {
    let field = |l: &str, key: &str| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    };
    let count = text
        .lines()
        .filter(|l| field(l, "processor").is_some())
        .count();
    let model = text.lines().find_map(|l| field(l, "model name"));
    (count, model)
}

/// What a report says about the machine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Machine {
    /// CPUs this process may run on (its affinity mask).
    pub cpus: usize,
    /// CPUs the machine has (/proc/cpuinfo).
    pub cpus_online: usize,
    /// The CPU model name.
    pub cpu_model: Option<String>,
    /// The kernel release (`uname -r`).
    pub kernel: Option<String>,
    /// The first line of `qemu-storage-daemon --version`.
    pub qsd_version: Option<String>,
}

impl Machine {
    /// One line for a report header.
    pub fn describe(&self) -> String {
        format!(
            "{} CPUs ({}{}), Linux {}, {}",
            self.cpus,
            self.cpu_model.as_deref().unwrap_or("unknown model"),
            if self.cpus_online == self.cpus {
                String::new()
            } else {
                format!(", {} online", self.cpus_online)
            },
            self.kernel.as_deref().unwrap_or("unknown"),
            self.qsd_version
                .as_deref()
                .unwrap_or("qemu-storage-daemon not found")
        )
    }
}

#[cfg(test)]
impl Machine {
    /// A made-up machine for the tests of the reports: 2 CPUs of a "Test CPU", Linux 6.1.0,
    /// no qemu-storage-daemon.
    pub(crate) fn made_up() -> Machine {
        Machine {
            cpus: 2,
            cpus_online: 2,
            cpu_model: Some("Test CPU".into()),
            kernel: Some("6.1.0".into()),
            qsd_version: None,
        }
    }
}

/// The first line of `program --version`, when it runs.
fn version_of(program: &Path) -> Option<String> {
    let out = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    out.status
        .success()
        .then(|| text.lines().next().map(|l| l.trim().to_string()))
        .flatten()
}

/// Reads the machine's description, with the version of the qemu-storage-daemon at `qsd`;
/// unreadable parts are left out.
pub fn machine(qsd: &Path) -> Machine {
    let (online, model) = read("/proc/cpuinfo")
        .map(|t| parse_cpuinfo(&t))
        .unwrap_or((0, None));
    Machine {
        cpus: std::thread::available_parallelism().map_or(online, usize::from),
        cpus_online: online,
        cpu_model: model,
        kernel: read("/proc/sys/kernel/osrelease")
            .ok()
            .map(|k| k.trim().to_string()),
        qsd_version: version_of(qsd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loadavg_parses_and_rejects_garbage() {
        let l = parse_loadavg("0.52 1.58 10.09 1/467 12345\n").unwrap();
        assert_eq!((l.one, l.five, l.fifteen), (0.52, 1.58, 10.09));
        assert!(!l.busy());
        assert_eq!(l.to_string(), "0.52 1.58 10.09");
        assert!(parse_loadavg("").is_err());
        assert!(parse_loadavg("0.5 x 1").is_err());
        assert!(parse_loadavg("0.5 0.5").is_err());
        assert!(parse_loadavg("-1 0 0").is_err());
        assert!(parse_loadavg("NaN 0 0").is_err());
    }

    #[test]
    fn load_above_one_at_either_end_warns() {
        let l = |one| LoadAvg {
            one,
            five: 0.0,
            fifteen: 0.0,
        };
        assert!(LoadSpan::new(l(0.3), l(1.0)).warning().is_none());
        let s = LoadSpan::new(l(0.3), l(1.2));
        assert!(s.busy);
        assert!(s.warning().unwrap().contains("after 1.20"));
        assert!(LoadSpan::new(l(2.5), l(0.1)).busy);
    }

    #[test]
    fn cpuinfo_counts_processors_and_finds_the_model() {
        let t = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\n\
                 processor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(parse_cpuinfo(t), (2, Some("AMD EPYC 7B13".into())));
        assert_eq!(parse_cpuinfo(""), (0, None));
    }

    #[test]
    fn this_machine_is_described() {
        let m = machine(Path::new("qemu-storage-daemon"));
        assert!(m.cpus >= 1);
        assert!(m.kernel.is_some());
        assert!(m.describe().contains("Linux"));
        let l = loadavg().unwrap();
        assert!(l.one >= 0.0);
        assert!(load_now().is_some());
    }
}
