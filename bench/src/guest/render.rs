//! The text report of a guest comparison: a header with the machine, its load and the
//! accelerator, one block of rows per phase (a line per backend), the ratios against the
//! better qemu-storage-daemon, and each backend's guests.

use std::fmt::Write as _;

use super::report::{GuestReport, PhaseRow};
use super::stats::PhaseSummary;
use crate::figures::{median, Rounds};
use crate::target::Target;
use crate::text::{
    count, failed_line, machine_lines, median_or_dash, mib, ratio, row_blocks, small, with_range,
};

fn target_line(o: &mut String, name: &str, t: Target, s: &PhaseSummary) {
    if !s.measured() {
        failed_line(o, name, 18, t, &s.failed);
        return;
    }
    let _ = writeln!(
        o,
        "{name:<18} {:<13} {:<22} {:>8} {:<20} {:>8} {:<20} {:>6}",
        t.name(),
        with_range(s.iops, count),
        median_or_dash(s.mib_s),
        with_range(s.p50_us, small),
        median_or_dash(s.p99_us),
        with_range(s.backend_cpu_us_per_io, small),
        median_or_dash(s.backend_cpu_pct),
    );
}

fn rows_table(o: &mut String, r: &GuestReport) {
    let _ = writeln!(
        o,
        "{:<18} {:<13} {:<22} {:>8} {:<20} {:>8} {:<20} {:>6}",
        "phase",
        "backend",
        "IOPS (min-max)",
        "MiB/s",
        "p50 us (min-max)",
        "p99 us",
        "bCPU/IO (min-max)",
        "bCPU%"
    );
    row_blocks(
        o,
        &r.rows,
        &r.targets,
        |row| &row.name,
        PhaseRow::get,
        target_line,
    );
}

fn ratios_table(o: &mut String, rows: &[PhaseRow]) {
    let _ = writeln!(
        o,
        "vloop against the better qemu-storage-daemon of each phase (higher median IOPS), medians\n\
         of per-round ratios: throughput above 1 and p50 and backend CPU/IO below 1 favour vloop\n\
         (the time a fixed amount of I/O takes is the inverse of the throughput ratio):"
    );
    let _ = writeln!(
        o,
        "{:<18} {:<13} {:>10} {:>7} {:>7}",
        "phase", "best qsd", "throughput", "p50", "CPU/IO"
    );
    for row in rows {
        let x = &row.ratios;
        let _ = writeln!(
            o,
            "{:<18} {:<13} {:>10} {:>7} {:>7}",
            row.name,
            x.best_qsd.map_or("-", Target::name),
            ratio(x.vloop_over_qsd),
            ratio(x.vloop_p50_over_qsd),
            ratio(x.vloop_cpu_over_qsd),
        );
    }
}

fn boots_table(o: &mut String, r: &GuestReport) {
    let _ = writeln!(
        o,
        "{:<13} {:>7} {:>8} {:>10} {:>10}  command line",
        "backend", "guests", "boot s", "total s", "peak RSS"
    );
    for b in &r.backends {
        let mine: Vec<_> = r.boots.iter().filter(|x| x.target == b.target).collect();
        let ok = mine.iter().filter(|x| x.ok()).count();
        let boot: Vec<f64> = mine.iter().filter_map(|x| x.boot_s).collect();
        let total: Vec<f64> = mine.iter().map(|x| x.total_s).collect();
        let peak = mine.iter().filter_map(|x| x.peak_rss_kib).max();
        let _ = writeln!(
            o,
            "{:<13} {:>7} {:>8.2} {:>10.2} {:>10}  {}",
            b.target.name(),
            format!("{ok}/{}", mine.len()),
            median(&boot),
            median(&total),
            mib(peak),
            b.command.join(" ")
        );
    }
    for x in r.boots.iter().filter(|x| !x.ok()) {
        let _ = writeln!(
            o,
            "round {} {}: {} ({}){}",
            x.round,
            x.target.name(),
            x.error.as_deref().unwrap_or("failed"),
            x.detail,
            x.kept
                .as_ref()
                .map(|k| format!("; logs in {}", k.display()))
                .unwrap_or_default()
        );
    }
}

/// The human report.
pub fn render(r: &GuestReport) -> String {
    let mut o = String::new();
    let runtime = r
        .rows
        .first()
        .map_or(0.0, |row| row.phase.runtime_ms as f64 / 1000.0);
    let _ = writeln!(
        o,
        "vloop-bench --guest: {} on the host, image {} ({} MiB), {} of {} rounds, {:.1} s per phase",
        r.mode.name(),
        r.image.display(),
        r.image_size >> 20,
        r.rounds,
        r.rounds_requested,
        runtime
    );
    let _ = writeln!(
        o,
        "guests: accelerator {} ({}); {} vCPU, {} MiB, kernel {}; {}",
        r.accel, r.accel_why, r.guest_cpus, r.guest_mem_mib, r.kernel, r.guest_io
    );
    machine_lines(&mut o, &r.started, &r.machine, &r.load);
    if r.interrupted {
        let _ = writeln!(
            o,
            "INTERRUPTED: the figures are those of the guests that ran"
        );
    }
    let _ = writeln!(
        o,
        "\nIOPS, MiB/s and latency by the guest's clock, in the guest; IOPS, p50 and bCPU/IO as the\n\
         median of the rounds (least-greatest), the rest medians; bCPU/IO: the backend's CPU\n\
         (user+sys of all its threads, /proc/PID/stat, read by the host as each phase began and\n\
         ended) per guest request, in us; bCPU%: that CPU in % of one CPU over the phase\n"
    );
    rows_table(&mut o, r);
    let _ = writeln!(o);
    ratios_table(&mut o, &r.rows);
    let _ = writeln!(o);
    boots_table(&mut o, r);
    for row in &r.rows {
        for &t in &r.targets {
            let Some(s) = row.get(t) else { continue };
            if s.errors > 0 {
                let _ = writeln!(o, "{} {}: {} requests failed", t.name(), row.name, s.errors);
            }
            if s.late_windows > 0 {
                let _ = writeln!(
                    o,
                    "{} {}: in {} round(s) a line reached the host more than the gap ({} ms) \
                     late, so that round's CPU window may miss part of the phase or take in \
                     part of the next (raise --guest-gap)",
                    t.name(),
                    row.name,
                    s.late_windows,
                    r.gap_ms
                );
            }
            if s.measured() {
                if let Some(f) = &s.failed.failure {
                    let _ = writeln!(
                        o,
                        "{} {} failed in round(s) {:?}: {}",
                        t.name(),
                        row.name,
                        s.failed.failed_rounds,
                        f.lines().next().unwrap_or("")
                    );
                }
            }
        }
    }
    let _ = writeln!(o, "wall time {:.0} s", r.wall_secs);
    o
}

#[cfg(test)]
mod tests {
    use super::super::report::{Boot, GuestBackend};
    use super::super::stats::PhaseRound;
    use super::*;
    use crate::figures::QsdRatios;
    use crate::machine::{LoadAvg, LoadSpan, Machine};
    use crate::target::Mode;
    use vloop_guest::io::{IoPhase, Pattern};
    use vloop_harness::accel::Accel;

    fn summary(iops: f64, cpu: f64) -> PhaseSummary {
        let mut s = PhaseSummary::default();
        s.add(PhaseRound {
            round: 1,
            iops,
            mib_s: iops / 256.0,
            p50_us: 1e6 / iops,
            p99_us: 2e6 / iops,
            backend_cpu_us_per_io: Some(cpu),
            backend_run_us_per_io: Some(cpu),
            backend_cpu_pct: Some(cpu * iops / 1e4),
            window_ok: true,
            ..PhaseRound::default()
        });
        s
    }

    #[test]
    fn the_table_has_every_phase_backend_ratio_and_guest() {
        let l = LoadAvg {
            one: 1.5,
            five: 1.0,
            fifteen: 0.5,
        };
        let phase = IoPhase {
            pattern: Pattern::RandRead,
            bs: 4096,
            qd: 1,
            runtime_ms: 2000,
        };
        let (vloop, qsd) = (summary(3000.0, 20.0), summary(2500.0, 30.0));
        let ratios = QsdRatios::of(&vloop, &[(Target::QsdIothread, Some(&qsd))]);
        let mut failed = PhaseSummary::default();
        failed.fail(1, "the guest never started this phase".into());
        let boot = |target, status: u8| Boot {
            round: 1,
            target,
            load_before: Some(1.5),
            status,
            detail: "exited with status 0".into(),
            error: (status != 0).then(|| "boom".to_string()),
            boot_s: Some(1.2),
            command_s: Some(2.5),
            total_s: 4.0,
            device_bytes: Some(1 << 30),
            peak_rss_kib: Some(4096),
            kept: None,
        };
        let r = GuestReport {
            started: "2026-12-01T00:00:00Z".into(),
            mode: Mode::Direct,
            direct: true,
            machine: Machine::made_up(),
            load: LoadSpan::new(l, l),
            accel: Accel::Tcg,
            accel_why: "KVM unusable: no".into(),
            kernel: "cache".into(),
            guest_cpus: 1,
            guest_mem_mib: 256,
            guest_io: "io_uring".into(),
            image: "/i.img".into(),
            image_size: 1 << 30,
            rounds: 1,
            rounds_requested: 1,
            gap_ms: 200,
            targets: vec![Target::Vloop, Target::QsdIothread],
            rows: vec![
                PhaseRow {
                    name: phase.name(),
                    phase,
                    vloop,
                    qsd: None,
                    qsd_iothread: Some(qsd),
                    ratios,
                },
                PhaseRow {
                    name: "4k randwrite QD1".into(),
                    phase,
                    vloop: summary(1000.0, 10.0),
                    qsd: None,
                    qsd_iothread: Some(failed),
                    ratios: QsdRatios::default(),
                },
            ],
            boots: vec![boot(Target::Vloop, 0), boot(Target::QsdIothread, 125)],
            backends: vec![GuestBackend {
                target: Target::Vloop,
                command: vec!["vloop-blk".into(), "--direct".into()],
            }],
            interrupted: false,
            wall_secs: 9.0,
        };
        let t = render(&r);
        assert!(t.contains("O_DIRECT on the host"), "{t}");
        assert!(t.contains("accelerator tcg (KVM unusable: no)"), "{t}");
        assert!(
            t.contains("WARNING: the 1-minute load average was above 1"),
            "{t}"
        );
        let line = t
            .lines()
            .find(|l| l.starts_with("4k randread QD1"))
            .unwrap();
        assert!(line.contains("vloop") && line.contains("3000") && line.contains("20.0"));
        assert!(t
            .lines()
            .any(|l| l.contains("qsd-iothread") && l.contains("2500")));
        let ratio_line = t
            .lines()
            .filter(|l| l.starts_with("4k randread QD1"))
            .nth(1)
            .unwrap();
        assert!(
            ratio_line.contains("qsd-iothread") && ratio_line.contains("1.20x"),
            "{ratio_line}"
        );
        assert!(ratio_line.contains("0.67x"), "{ratio_line}");
        assert!(
            t.contains("failed: the guest never started this phase"),
            "{t}"
        );
        assert!(t.contains("vloop-blk --direct"), "{t}");
        assert!(t.contains("round 1 qsd-iothread: boom"), "{t}");
    }
}
