//! One guest of a guest comparison: the harness backend that serves the image with the
//! target's program in the host's cache mode, the harness run that boots the guest with the
//! I/O tool's plan, and what the host collects while it runs: each of the tool's lines with the
//! backend's CPU time read the moment it arrives, and the backend's peak memory.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vloop_frontend::backend::Program;
use vloop_guest::io::{IoEvent, IoLine, IoPhase, IoPlan};
use vloop_harness::backend::{Backend, BackendKind};
use vloop_harness::exec::spec::{DiskArg, DiskBackend};
use vloop_harness::exec::{ExecHooks, ExecOptions};
use vloop_harness::setup::Env;

use super::options::{GuestOptions, GUEST_CPUS};
use super::report::Boot;
use super::stats::{self, Lateness, Mark, PhaseRound};
use crate::machine;
use crate::procfs::{self, CpuSample};
use crate::target::{Mode, Target};

/// The harness backend that serves the image for `target`.
pub(super) fn backend_for(opts: &GuestOptions, target: Target) -> Backend {
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
pub(super) fn boot_one(
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

#[cfg(test)]
mod tests {
    use vloop_harness::accel::Accel;
    use vloop_harness::backend::DiskSpec;

    use super::*;
    use crate::guest::fixtures::options;
    use crate::guest::options::GUEST_DEVICE;
    use std::path::Path;

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
    }
}
