//! What a guest comparison is asked to do: its settings ([`GuestOptions`]), the phases every
//! guest runs (the default set, or one phase the command line's workload gives), the
//! backends compared, and the shape of each guest. Pure.

use std::path::PathBuf;
use std::time::Duration;

use vloop_guest::io::{IoPhase, Pattern};
use vloop_harness::setup::SetupOptions;

use crate::load::{self, Workload};
use crate::target::{Mode, Target};

/// Errors of making a phase of the guest's I/O tool out of a workload.
#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    /// A mixed workload has no phase of the guest's tool.
    #[error("--guest runs read, write, randread or randwrite phases")]
    Mixed,
    /// The guest's disk has one queue.
    #[error("--guest drives one virtio-blk queue: --queues must be 1")]
    Queues,
}

/// The device the guest sees its one disk as.
pub const GUEST_DEVICE: &str = "/dev/vda";
/// vCPUs of each guest.
pub const GUEST_CPUS: u32 = 1;

/// Settings of a guest comparison.
#[derive(Debug, Clone)]
pub struct GuestOptions {
    /// The image file (created or reused).
    pub image: PathBuf,
    /// Image size in bytes.
    pub image_size: u64,
    /// Recreate the image even if one of the right size exists.
    pub fresh_image: bool,
    /// The vloop-blk binary.
    pub vloop_bin: PathBuf,
    /// The qemu-storage-daemon binary.
    pub qsd_bin: PathBuf,
    /// Guests per backend.
    pub rounds: u32,
    /// The host's cache mode, the same on every backend (not null).
    pub mode: Mode,
    /// The phases, in the order every guest runs them.
    pub phases: Vec<IoPhase>,
    /// The backends, in table order.
    pub targets: Vec<Target>,
    /// Extra command-line arguments for vloop-blk.
    pub vloop_args: Vec<String>,
    /// Kernel, accelerator, guest memory.
    pub setup: SetupOptions,
    /// The I/O tool's idle time after each phase's begin line and before its end line.
    pub gap: Duration,
    /// Start no further round when it would end after this much wall time.
    pub time_budget: Option<Duration>,
}

/// The phases of the speed issue, `runtime` each, in this order: 1 MiB sequential read and
/// write at depth 1 (what `dd bs=1M iflag=direct` / `oflag=direct` does), 4k random read and
/// write at depth 1, and the same at depth 32.
pub fn default_phases(runtime: Duration) -> Vec<IoPhase> {
    let runtime_ms = u64::try_from(runtime.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let p = |pattern, bs, qd| IoPhase {
        pattern,
        bs,
        qd,
        runtime_ms,
    };
    vec![
        p(Pattern::Read, 1 << 20, 1),
        p(Pattern::Write, 1 << 20, 1),
        p(Pattern::RandRead, 4096, 1),
        p(Pattern::RandWrite, 4096, 1),
        p(Pattern::RandRead, 4096, 32),
        p(Pattern::RandWrite, 4096, 32),
    ]
}

/// The phases of a guest comparison: the one phase of `only`, or the default ones of
/// `runtime` each.
pub fn phases(only: Option<&Workload>, runtime: Duration) -> Result<Vec<IoPhase>, PhaseError> {
    match only {
        Some(w) => Ok(vec![phase_of(w)?]),
        None => Ok(default_phases(runtime)),
    }
}

/// Workload `w` as a phase of the guest's I/O tool: a read, write, randread or randwrite on
/// the guest's one queue.
pub fn phase_of(w: &Workload) -> Result<IoPhase, PhaseError> {
    let pattern = match w.pattern {
        load::Pattern::Read => Pattern::Read,
        load::Pattern::Write => Pattern::Write,
        load::Pattern::RandRead => Pattern::RandRead,
        load::Pattern::RandWrite => Pattern::RandWrite,
        load::Pattern::Mixed { .. } => return Err(PhaseError::Mixed),
    };
    if w.queues != 1 {
        return Err(PhaseError::Queues);
    }
    Ok(IoPhase {
        pattern,
        bs: w.bs,
        qd: u32::from(w.iodepth),
        runtime_ms: u64::try_from(w.runtime.as_millis()).unwrap_or(u64::MAX),
    })
}

/// The backends of a guest comparison: vloop-blk, qemu-storage-daemon from its main loop
/// when `main_loop`, and from an iothread unless `no_qsd`.
pub fn targets(no_qsd: bool, main_loop: bool) -> Vec<Target> {
    let mut t = vec![Target::Vloop];
    if !no_qsd {
        if main_loop {
            t.push(Target::Qsd);
        }
        t.push(Target::QsdIothread);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_is_a_phase_when_the_guest_can_run_it() {
        let w = Workload {
            pattern: load::Pattern::RandWrite,
            bs: 4096,
            iodepth: 4,
            queues: 1,
            runtime: Duration::from_millis(1500),
            one_pass: false,
            think: Duration::ZERO,
        };
        let p = phases(Some(&w), Duration::from_secs(9)).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].name(), p[0].runtime_ms),
            ("4k randwrite QD4".into(), 1500)
        );
        assert_eq!(phases(None, Duration::from_secs(9)).unwrap().len(), 6);
        let mixed = Workload {
            pattern: load::Pattern::Mixed { read_pct: 70 },
            ..w
        };
        assert_eq!(
            phase_of(&mixed).unwrap_err().to_string(),
            "--guest runs read, write, randread or randwrite phases"
        );
        let two = Workload { queues: 2, ..w };
        assert_eq!(
            phase_of(&two).unwrap_err().to_string(),
            "--guest drives one virtio-blk queue: --queues must be 1"
        );
    }

    #[test]
    fn the_default_phases_are_the_issues() {
        let names: Vec<String> = default_phases(Duration::from_millis(1500))
            .iter()
            .map(IoPhase::name)
            .collect();
        assert_eq!(
            names,
            [
                "1M read QD1",
                "1M write QD1",
                "4k randread QD1",
                "4k randwrite QD1",
                "4k randread QD32",
                "4k randwrite QD32"
            ]
        );
        assert!(default_phases(Duration::from_millis(1500))
            .iter()
            .all(|p| p.runtime_ms == 1500));
        assert_eq!(targets(false, false), [Target::Vloop, Target::QsdIothread]);
        assert_eq!(
            targets(false, true),
            [Target::Vloop, Target::Qsd, Target::QsdIothread]
        );
        assert_eq!(targets(true, true), [Target::Vloop]);
    }
}
