//! `--guest`: the figures a real guest sees. For each backend in turn (vloop-blk,
//! qemu-storage-daemon from an iothread, and optionally from its main loop), a guest boots
//! through the harness library (`vloop_harness::exec_with`) with the benchmark image as its
//! one virtio-blk disk, served in the same cache mode by every backend, and runs the agent's
//! I/O tool (`vloop_guest::io`): the same phases in the same order, each with O_DIRECT in the
//! guest. The tool prints a line as each phase begins and ends; the host reads the backend's
//! CPU time from /proc when each line arrives, so every phase has the guest's time and
//! throughput and the backend's CPU over it. Backends take turns across rounds.
//!
//! [`run`] does the measuring (the I/O), [`stats`] turns what the host saw into figures and
//! ratios (pure), [`render`] makes the text table.

pub mod render;
pub mod stats;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use render::render;
pub use stats::{Lateness, Mark, PhaseRound, PhaseSummary};

use crate::figures::QsdRatios;
use crate::images::{self, ImageError};
use crate::machine::{self, LoadSpan, Machine, MachineError};
use crate::procfs::{self, CpuSample};
use crate::session::{turn_order, Session};
use crate::target::{self, Mode, Target};
use vloop_frontend::backend::Program;
use vloop_guest::io::{IoEvent, IoLine, IoPhase, IoPlan, IoPlanError, Pattern};
use vloop_harness::accel::Accel;
use vloop_harness::backend::{Backend, BackendKind, DiskSpec};
use vloop_harness::exec::spec::{DiskArg, DiskBackend};
use vloop_harness::exec::{ExecHooks, ExecOptions};
use vloop_harness::setup::{Env, SetupError, SetupOptions};

/// Errors that keep the guest comparison from running at all (a failed guest is recorded in
/// the report instead).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The null mode has no guest form.
    #[error(
        "--guest runs in a cache mode (the page cache, or O_DIRECT with --direct), not --null"
    )]
    NullMode,
    /// The phases cannot be run.
    #[error("the guest phases cannot be run")]
    Plan(#[source] IoPlanError),
    /// The image could not be prepared.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The load average could not be read.
    #[error("cannot read the machine's load average")]
    Load(#[source] MachineError),
    /// The guests cannot be set up (QEMU, kernel, guest agent, busybox).
    #[error("cannot set up the guests")]
    Setup(#[source] SetupError),
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

/// One row of the table: a phase on every backend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PhaseRow {
    /// Phase name (`4k randread QD1`).
    pub name: String,
    /// The phase.
    pub phase: IoPhase,
    /// vloop-blk.
    pub vloop: PhaseSummary,
    /// qemu-storage-daemon, main loop.
    pub qsd: Option<PhaseSummary>,
    /// qemu-storage-daemon, iothread.
    pub qsd_iothread: Option<PhaseSummary>,
    /// vloop against the better qsd.
    #[serde(flatten)]
    pub ratios: QsdRatios,
}

impl PhaseRow {
    fn new(phase: &IoPhase, targets: &[Target]) -> Self {
        let has = |t| targets.contains(&t).then(PhaseSummary::default);
        PhaseRow {
            name: phase.name(),
            phase: *phase,
            vloop: PhaseSummary::default(),
            qsd: has(Target::Qsd),
            qsd_iothread: has(Target::QsdIothread),
            ratios: QsdRatios::default(),
        }
    }

    /// The summary of `t`, when it was measured.
    pub fn get(&self, t: Target) -> Option<&PhaseSummary> {
        match t {
            Target::Vloop => Some(&self.vloop),
            Target::Qsd => self.qsd.as_ref(),
            Target::QsdIothread => self.qsd_iothread.as_ref(),
            Target::Raw | Target::VloopRaw => None,
        }
    }

    fn get_mut(&mut self, t: Target) -> Option<&mut PhaseSummary> {
        match t {
            Target::Vloop => Some(&mut self.vloop),
            Target::Qsd => self.qsd.as_mut(),
            Target::QsdIothread => self.qsd_iothread.as_mut(),
            Target::Raw | Target::VloopRaw => None,
        }
    }
}

/// One guest: a backend in a round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Boot {
    /// Round number, from 1.
    pub round: u32,
    /// The backend.
    pub target: Target,
    /// The 1-minute load average when it started.
    pub load_before: Option<f64>,
    /// The harness's exit status (the I/O tool's, or 125 when the run failed).
    pub status: u8,
    /// How the tool ended, in words.
    pub detail: String,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// Seconds from QEMU's start until the agent was ready.
    pub boot_s: Option<f64>,
    /// Seconds the I/O tool ran, by the guest's clock.
    pub command_s: Option<f64>,
    /// Seconds of the whole run.
    pub total_s: f64,
    /// The disk's size as the guest saw it.
    pub device_bytes: Option<u64>,
    /// The backend's peak resident set (VmHWM, KiB) at the end of the last phase.
    pub peak_rss_kib: Option<u64>,
    /// The run's folder (logs), kept when the run failed.
    pub kept: Option<PathBuf>,
}

impl Boot {
    /// Whether the guest ran every phase and the run had no problem.
    pub fn ok(&self) -> bool {
        self.status == 0 && self.error.is_none()
    }
}

/// A backend's command line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GuestBackend {
    /// Which backend.
    pub target: Target,
    /// Its command line (`SOCKET` stands for the socket the harness gives it).
    pub command: Vec<String>,
}

/// The whole guest comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GuestReport {
    /// When it started (RFC 3339, UTC).
    pub started: String,
    /// The host's cache mode on every backend.
    pub mode: Mode,
    /// O_DIRECT on the host (every backend).
    pub direct: bool,
    /// The machine.
    pub machine: Machine,
    /// The load average before and after.
    pub load: LoadSpan,
    /// The guests' accelerator.
    pub accel: Accel,
    /// Why that accelerator.
    pub accel_why: String,
    /// The guest kernel.
    pub kernel: String,
    /// vCPUs per guest.
    pub guest_cpus: u32,
    /// Guest memory in MiB.
    pub guest_mem_mib: u32,
    /// How the guest does its I/O.
    pub guest_io: String,
    /// Image path.
    pub image: PathBuf,
    /// Image size in bytes.
    pub image_size: u64,
    /// Rounds done.
    pub rounds: u32,
    /// Rounds asked for.
    pub rounds_requested: u32,
    /// The tool's gap around each phase, in milliseconds.
    pub gap_ms: u64,
    /// The backends, in table order.
    pub targets: Vec<Target>,
    /// One row per phase.
    pub rows: Vec<PhaseRow>,
    /// Every guest.
    pub boots: Vec<Boot>,
    /// Each backend's command line.
    pub backends: Vec<GuestBackend>,
    /// Whether Ctrl-C or SIGTERM cut the comparison short.
    pub interrupted: bool,
    /// Wall time in seconds.
    pub wall_secs: f64,
}

/// The harness backend that serves the image for `target`.
fn backend_for(opts: &GuestOptions, target: Target) -> Backend {
    // The raw target has no backend: vloop-blk stands in (no guest comparison names it).
    let program = target
        .program(&opts.vloop_bin, &opts.qsd_bin)
        .unwrap_or_else(|| Program::Vloop(opts.vloop_bin.clone()));
    let b = Backend::program(program).with_direct(opts.mode == Mode::Direct);
    if target == Target::Vloop {
        b.with_args(opts.vloop_args.clone())
    } else {
        b
    }
}

/// What the host collects while one guest runs (shared with the data channel's thread).
#[derive(Debug, Default)]
struct Collected {
    /// The backend's PID, once it listens.
    pid: Option<u32>,
    /// The tool's lines with the CPU readings.
    marks: Vec<Mark>,
    /// The greatest peak RSS read at an end line.
    peak_rss_kib: Option<u64>,
}

/// How one phase went, for the progress lines.
fn progress(tag: &str, name: &str, r: &PhaseRound) -> String {
    format!(
        "{tag} {name:<20} {:>8.0} IOPS {:>8.1} MiB/s  p50 {:>8.1} us  backend CPU {} us/IO",
        r.iops,
        r.mib_s,
        r.p50_us,
        r.backend_cpu_us_per_io
            .map_or_else(|| "-".into(), |c| format!("{c:.1}"))
    )
}

/// The exec options of one guest running `plan`.
fn exec_options(opts: &GuestOptions, env: &Env, plan: &IoPlan) -> ExecOptions {
    let phases: Duration = plan
        .phases
        .iter()
        .map(|p| Duration::from_millis(p.runtime_ms) + 2 * Duration::from_millis(plan.gap_ms))
        .sum();
    ExecOptions {
        disks: vec![DiskArg {
            path: opts.image.clone(),
            readonly: false,
            size: None,
            queues: 1,
            backend: DiskBackend::Default,
        }],
        copy_in: Vec::new(),
        copy_out: Vec::new(),
        mounts: Vec::new(),
        console: false,
        backend: BackendKind::Vloop,
        backend_bin: None,
        backend_cmd: None,
        setup: opts.setup.clone(),
        cpus: GUEST_CPUS,
        timeout: Some(
            env.boot_timeout * env.accel.slowness() + 2 * phases + Duration::from_secs(60),
        ),
        results: None,
        keep: false,
        command: plan.argv(),
    }
}

/// Boots one guest on `target` and runs `plan`; returns the guest's record and each phase's.
fn boot_one(
    opts: &GuestOptions,
    env: &Env,
    plan: &IoPlan,
    target: Target,
    round: u32,
) -> (Boot, Vec<Result<PhaseRound, String>>) {
    let load = machine::load_now();
    let shared = Arc::new(Mutex::new(Collected::default()));
    let t0 = Instant::now();
    let names: Vec<String> = plan.phases.iter().map(IoPhase::name).collect();
    let tag = format!("[round {round}/{}] {:12}", opts.rounds, target.name());
    let s2 = shared.clone();
    let on_line = move |text: &str| {
        let Some(line) = IoLine::parse(text) else {
            eprintln!("guest: {text}");
            return;
        };
        let mut c = s2.lock().unwrap_or_else(PoisonError::into_inner);
        let cpu = match (&line.event, c.pid) {
            (IoEvent::Begin { .. } | IoEvent::End { .. }, Some(pid)) => CpuSample::read(pid),
            _ => CpuSample::default(),
        };
        if let (IoEvent::End { .. }, Some(pid)) = (&line.event, c.pid) {
            c.peak_rss_kib = c.peak_rss_kib.max(procfs::peak_rss_kib(pid).ok());
        }
        let mark = Mark {
            line,
            at_s: t0.elapsed().as_secs_f64(),
            cpu,
        };
        if let IoEvent::End { phase, result } = &mark.line.event {
            let begin = c
                .marks
                .iter()
                .find(|m| m.line.event == IoEvent::Begin { phase: *phase });
            if let (Some(b), Some(name)) = (begin, names.get(*phase)) {
                let r = PhaseRound::new(round, load, result, b, &mark, Lateness::default());
                eprintln!("{}", progress(&tag, name, &r));
            }
        }
        c.marks.push(mark);
    };
    let s3 = shared.clone();
    let mut on_backends = move |pids: &[u32]| {
        s3.lock().unwrap_or_else(PoisonError::into_inner).pid = pids.first().copied();
    };
    let hooks = ExecHooks {
        env: Some(env),
        backend: Some(backend_for(opts, target)),
        on_backends: Some(&mut on_backends),
        on_stdout_line: Some(Box::new(on_line)),
    };
    let report = vloop_harness::exec_with(&exec_options(opts, env, plan), hooks);
    let c = std::mem::take(&mut *shared.lock().unwrap_or_else(PoisonError::into_inner));
    let device_bytes = c.marks.iter().find_map(|m| match m.line.event {
        IoEvent::Device { bytes, .. } => Some(bytes),
        _ => None,
    });
    let gap_s = Duration::from_millis(plan.gap_ms).as_secs_f64();
    let mut phases = stats::phases_of_run(plan.phases.len(), round, load, gap_s, &c.marks);
    if let Some(e) = &report.error {
        for p in &mut phases {
            if let Err(why) = p {
                *why = format!("{why}; the run: {e}");
            }
        }
    }
    let boot = Boot {
        round,
        target,
        load_before: load,
        status: report.status,
        detail: report.detail,
        error: report.error,
        boot_s: report.timings.boot_s,
        command_s: report.timings.command_s,
        total_s: report.timings.total_s,
        device_bytes,
        peak_rss_kib: c.peak_rss_kib,
        kept: report.kept,
    };
    (boot, phases)
}

/// Runs the guest comparison; progress goes to stderr.
pub fn run(opts: &GuestOptions) -> Result<GuestReport, GuestError> {
    if opts.mode == Mode::Null {
        return Err(GuestError::NullMode);
    }
    let plan = IoPlan {
        dev: GUEST_DEVICE.to_string(),
        phases: opts.phases.clone(),
        gap_ms: u64::try_from(opts.gap.as_millis()).unwrap_or(u64::MAX),
        seed: 1,
    };
    plan.check().map_err(GuestError::Plan)?;
    let session = Session::start(&opts.qsd_bin).map_err(GuestError::Load)?;
    images::prepare_image(&opts.image, opts.image_size, opts.fresh_image)?;
    if opts.mode == Mode::PageCache {
        images::warm_page_cache(&opts.image)?;
    }
    let env = Env::prepare(&opts.setup).map_err(GuestError::Setup)?;
    eprintln!(
        "guests: {}, kernel {}, {} MiB",
        env.accel_line(),
        env.kernel_source,
        env.mem_mib
    );
    let mut rows: Vec<PhaseRow> = opts
        .phases
        .iter()
        .map(|p| PhaseRow::new(p, &opts.targets))
        .collect();
    let disk = DiskSpec::rw(opts.image.clone());
    let backends = opts
        .targets
        .iter()
        .map(|&target| {
            let spec = backend_for(opts, target).spec(&disk, Path::new("SOCKET"));
            GuestBackend {
                target,
                command: target::command_line(&spec),
            }
        })
        .collect();
    let mut boots = Vec::new();
    let mut rounds_done = 0;
    let mut interrupted = false;
    let budget = session.rounds(opts.time_budget);
    'rounds: for round in 0..opts.rounds {
        if !budget.allows(round) {
            break;
        }
        rounds_done += 1;
        for target in turn_order(&opts.targets, round as usize) {
            // Leave no dirty pages of the previous guest for this one's writeback.
            images::sync([opts.image.as_path()]);
            let (boot, phases) = boot_one(opts, &env, &plan, target, round + 1);
            if let Some(e) = &boot.error {
                eprintln!(
                    "[round {}/{}] {:12} FAILED: {e}",
                    round + 1,
                    opts.rounds,
                    target.name()
                );
            }
            for (row, p) in rows.iter_mut().zip(phases) {
                let Some(sum) = row.get_mut(target) else {
                    continue;
                };
                match p {
                    Ok(r) => sum.add(r),
                    Err(why) => sum.fail(round + 1, why),
                }
            }
            boots.push(boot);
            if vloop_harness::interrupt::requested().is_some() {
                interrupted = true;
                break 'rounds;
            }
        }
    }
    for row in &mut rows {
        row.ratios = QsdRatios::of(
            &row.vloop,
            &[
                (Target::Qsd, row.qsd.as_ref()),
                (Target::QsdIothread, row.qsd_iothread.as_ref()),
            ],
        );
    }
    let load = session.load_span().map_err(GuestError::Load)?;
    Ok(GuestReport {
        started: session.started_at.clone(),
        mode: opts.mode,
        direct: opts.mode == Mode::Direct,
        machine: session.machine.clone(),
        load,
        accel: env.accel,
        accel_why: env.accel_why.clone(),
        kernel: env.kernel_source.clone(),
        guest_cpus: GUEST_CPUS,
        guest_mem_mib: env.mem_mib,
        guest_io: "the agent's I/O tool: io_uring, O_DIRECT on /dev/vda, one virtio-blk queue"
            .into(),
        image: opts.image.clone(),
        image_size: opts.image_size,
        rounds: rounds_done,
        rounds_requested: opts.rounds,
        gap_ms: plan.gap_ms,
        targets: opts.targets.clone(),
        rows,
        boots,
        backends,
        interrupted,
        wall_secs: session.wall_secs(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(mode: Mode) -> GuestOptions {
        GuestOptions {
            image: "/tmp/i.img".into(),
            image_size: 1 << 20,
            fresh_image: false,
            vloop_bin: "/bin/vloop-blk".into(),
            qsd_bin: "qemu-storage-daemon".into(),
            rounds: 1,
            mode,
            phases: default_phases(Duration::from_secs(1)),
            targets: targets(false, false),
            vloop_args: vec!["--queue-size=512".into()],
            setup: SetupOptions::default(),
            gap: Duration::from_millis(200),
            time_budget: None,
        }
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

    #[test]
    fn every_backend_gets_the_hosts_cache_mode() {
        let disk = DiskSpec::rw("/tmp/i.img".into());
        let sock = Path::new("/s");
        let o = options(Mode::Direct);
        let v = backend_for(&o, Target::Vloop).spec(&disk, sock).args();
        assert!(v.contains(&"--direct".to_string()), "{v:?}");
        assert_eq!(v.last().map(String::as_str), Some("--queue-size=512"));
        let q = backend_for(&o, Target::QsdIothread)
            .spec(&disk, sock)
            .args();
        assert!(q[0..2] == ["--object", "iothread,id=iothread0"], "{q:?}");
        assert!(q[3].contains("cache.direct=on") && q[5].ends_with("iothread=iothread0"));
        let o = options(Mode::PageCache);
        let v = backend_for(&o, Target::Vloop).spec(&disk, sock).args();
        assert!(!v.contains(&"--direct".to_string()), "{v:?}");
        let q = backend_for(&o, Target::Qsd).spec(&disk, sock).args();
        assert!(
            q[1].contains("cache.direct=off") && !q[3].contains("iothread"),
            "{q:?}"
        );
    }

    #[test]
    fn the_guest_runs_the_plan_on_one_disk_within_a_time_limit() {
        let o = options(Mode::PageCache);
        let env = Env {
            qemu: "q".into(),
            accel: Accel::Tcg,
            accel_why: "forced".into(),
            kernel: "k".into(),
            kernel_source: "s".into(),
            base_initrd: "i".into(),
            modules: vec![],
            mem_mib: 256,
            boot_timeout: Duration::from_secs(12),
            append: String::new(),
        };
        let plan = IoPlan {
            dev: GUEST_DEVICE.into(),
            phases: o.phases.clone(),
            gap_ms: 200,
            seed: 1,
        };
        let e = exec_options(&o, &env, &plan);
        assert_eq!(e.disks.len(), 1);
        assert_eq!(e.disks[0].path, o.image);
        assert_eq!((e.disks[0].queues, e.disks[0].readonly), (1, false));
        assert_eq!(e.command[..2], ["/init", "io"]);
        assert_eq!(IoPlan::from_arg(&e.command[2]).unwrap(), plan);
        // 120 s to boot under TCG, twice the 6 x 1.4 s of phases and gaps, and a minute.
        assert_eq!(
            e.timeout,
            Some(Duration::from_millis(120_000 + 16_800 + 60_000))
        );
        assert!(matches!(
            run(&options(Mode::Null)),
            Err(GuestError::NullMode)
        ));
        let mut none = options(Mode::Direct);
        none.phases.clear();
        assert!(matches!(run(&none), Err(GuestError::Plan(_))));
    }
}
