//! The text report of a comparison: a header with the machine, its load and what each target
//! serves, one block of rows per workload (a line per target), the ratios against the better
//! qemu-storage-daemon (and raw, or vloop-raw), and each backend's idle CPU and memory.

use std::fmt::Write as _;

use super::options::ImageState;
use super::report::{Report, Row};
use super::stats::Summary;
use crate::figures::Rounds;
use crate::target::Target;
use crate::text::{
    count, failed_line, machine_lines, median_or_dash, mib, ratio, row_blocks, small, with_range,
};

fn target_line(o: &mut String, name: &str, t: Target, s: &Summary) {
    if !s.measured() {
        failed_line(o, name, 22, t, &s.failed);
        return;
    }
    let _ = writeln!(
        o,
        "{name:<22} {:<13} {:<24} {:>8} {:<20} {:>7} {:>7} {:>7} {:>7}",
        t.name(),
        with_range(s.iops, count),
        median_or_dash(s.mib_s),
        with_range(s.p50_us, small),
        median_or_dash(s.p99_us),
        median_or_dash(s.p999_us),
        median_or_dash(s.backend_cpu_us_per_io),
        median_or_dash(s.frontend_cpu_us_per_io),
    );
}

fn rows_table(o: &mut String, r: &Report) {
    let _ = writeln!(
        o,
        "{:<22} {:<13} {:<24} {:>8} {:<20} {:>7} {:>7} {:>7} {:>7}",
        "workload",
        "target",
        "IOPS (min-max)",
        "MiB/s",
        "p50 us (min-max)",
        "p99 us",
        "p99.9",
        "bCPU/IO",
        "fCPU/IO"
    );
    row_blocks(
        o,
        &r.rows,
        &r.targets,
        |row| &row.name,
        Row::get,
        target_line,
    );
}

fn ratios_table(o: &mut String, rows: &[Row], targets: &[Target]) {
    // The columns after the ones against qsd: raw io_uring and vloop-blk on the raw image.
    let extra: Vec<(Target, &str)> = [
        (Target::Raw, "IOPS vs raw"),
        (Target::VloopRaw, "IOPS vs vloop-raw"),
    ]
    .into_iter()
    .filter(|(t, _)| targets.contains(t))
    .collect();
    let _ = writeln!(
        o,
        "vloop against the better qemu-storage-daemon of each row (higher median IOPS), medians of\n\
         per-round ratios: IOPS above 1 and p50 and backend CPU/IO below 1 favour vloop:"
    );
    let mut head = format!(
        "{:<22} {:<13} {:>7} {:>7} {:>7}",
        "workload", "best qsd", "IOPS", "p50", "CPU/IO"
    );
    for (_, title) in &extra {
        let _ = write!(head, "  {title}");
    }
    let _ = writeln!(o, "{head}");
    for row in rows {
        let x = &row.ratios;
        let mut line = format!(
            "{:<22} {:<13} {:>7} {:>7} {:>7}",
            row.name,
            x.qsd.best_qsd.map_or("-", Target::name),
            ratio(x.qsd.vloop_over_qsd),
            ratio(x.qsd.vloop_p50_over_qsd),
            ratio(x.qsd.vloop_cpu_over_qsd),
        );
        for (t, title) in &extra {
            let r = match t {
                Target::Raw => x.vloop_over_raw,
                _ => x.vloop_over_vloop_raw,
            };
            let _ = write!(line, "  {:>w$}", ratio(r), w = title.len());
        }
        let _ = writeln!(o, "{line}");
    }
}

/// What each target serves, when that is more than the one raw image.
fn images_note(o: &mut String, r: &Report) {
    let Some(q) = &r.qcow2 else { return };
    let _ = writeln!(
        o,
        "qcow2: vloop, qsd and qsd-iothread serve {} ({}, a fully allocated copy of the raw image: \
         {} of {} clusters of {} KiB{}); vloop-raw serves the raw image {}",
        q.path.display(),
        if q.reused { "reused" } else { "converted" },
        q.check.allocated_clusters,
        q.check.total_clusters,
        q.info.cluster_size.unwrap_or(0) >> 10,
        q.convert_secs
            .map_or_else(String::new, |s| format!(", made in {s:.1} s")),
        r.image.display(),
    );
    if r.rows.iter().any(|row| row.on == ImageState::EmptyOverlay) {
        let _ = writeln!(
            o,
            "overlay rows: every run of vloop, qsd and qsd-iothread serves a new empty qcow2 overlay \
             over the raw image, every run of vloop-raw a new sparse raw file of the same size, \
             written once from start to end (the run ends there, or at the runtime), so every \
             write allocates"
        );
    }
}

fn backends_table(o: &mut String, r: &Report) {
    let _ = writeln!(
        o,
        "{:<13} {:<44} {:>9} {:>9} {:>9} {:>9}",
        "backend",
        "idle CPU, % of one CPU (connected, no I/O)",
        "RSS",
        "conn RSS",
        "peak RSS",
        "anon RSS"
    );
    for b in &r.backends {
        let idle = match &b.idle {
            None => "not measured".to_string(),
            Some(i) => match (&i.failure, i.cpu_pct) {
                (Some(f), _) => format!("failed: {}", f.lines().next().unwrap_or("")),
                (None, Some(p)) => {
                    let top = i
                        .threads
                        .first()
                        .filter(|t| t.value > 0.0)
                        .map(|t| format!(", most: {} {:.3}%", t.thread, t.value))
                        .unwrap_or_default();
                    format!("{p:.3}% over {:.0} s, {}q{top}", i.secs, i.queues)
                }
                (None, None) => "unreadable".into(),
            },
        };
        let _ = writeln!(
            o,
            "{:<13} {:<44} {:>9} {:>9} {:>9} {:>9}",
            b.target.name(),
            idle,
            mib(b.idle_rss_kib),
            mib(b.idle.as_ref().and_then(|i| i.rss_kib)),
            mib(b.peak_rss_kib),
            mib(b.anon_rss_kib),
        );
    }
    let _ = writeln!(
        o,
        "RSS: after start-up, no frontend; conn RSS: idle with a frontend connected; peak RSS:\n\
         VmHWM over all runs of one export (it counts the guest memory pages the backend\n\
         touched); anon RSS: the greatest RssAnon at the end of a run (the backend's own memory)"
    );
}

/// The human report.
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let runtime = r
        .rows
        .first()
        .map_or(0.0, |row| row.workload.runtime.as_secs_f64());
    let _ = writeln!(
        o,
        "vloop-bench --compare: {}{}, image {} ({} MiB), {} of {} rounds, {:.1} s per run",
        r.mode.name(),
        if r.qcow2.is_some() { ", qcow2" } else { "" },
        r.image.display(),
        r.image_size >> 20,
        r.rounds,
        r.rounds_requested,
        runtime
    );
    machine_lines(&mut o, &r.started, &r.machine, &r.load);
    images_note(&mut o, r);
    let _ = writeln!(
        o,
        "\nIOPS and p50: median of the rounds (least-greatest); MiB/s, p99, p99.9 and CPU/IO: medians;\n\
         latency in us; CPU/IO in us of CPU per request: b = the backend process (user+sys, all\n\
         threads), f = vloop-bench itself (the frontend, or for raw the io_uring engine)\n"
    );
    rows_table(&mut o, r);
    let _ = writeln!(o);
    ratios_table(&mut o, &r.rows, &r.targets);
    let _ = writeln!(o);
    backends_table(&mut o, r);
    let _ = writeln!(o);
    let _ = writeln!(o, "notifications per I/O (kicks / call waits):");
    for row in &r.rows {
        let parts: Vec<String> = r
            .targets
            .iter()
            .filter(|t| t.is_backend())
            .filter_map(|&t| {
                let s = row.get(t).filter(|s| s.measured())?;
                Some(format!(
                    "{} {:.2}/{:.2}",
                    t.name(),
                    s.kicks_per_io,
                    s.waits_per_io
                ))
            })
            .collect();
        let _ = writeln!(o, "  {:<22} {}", row.name, parts.join("  "));
    }
    let mut seen = std::collections::HashSet::new();
    for row in &r.rows {
        for &t in &r.targets {
            let Some(s) = row.get(t) else { continue };
            if let Some(f) = &s.failed.failure {
                if seen.insert((t, f.clone())) {
                    let _ = writeln!(
                        o,
                        "{} failed in round(s) {:?} of {} (maybe others): {f}",
                        t.name(),
                        s.failed.failed_rounds,
                        row.name
                    );
                }
            }
            if s.errors > 0 {
                let _ = writeln!(o, "{} {}: {} requests failed", t.name(), row.name, s.errors);
            }
        }
    }
    let _ = writeln!(o, "wall time {:.0} s", r.wall_secs);
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::fixtures::{qcow2_report, report};

    #[test]
    fn the_qcow2_table_names_the_images_and_the_vloop_raw_ratios() {
        let text = render(&qcow2_report());
        assert!(
            text.starts_with("vloop-bench --compare: page cache, qcow2, image /tmp/i.img"),
            "{text}"
        );
        assert!(
            text.contains(
                "qcow2: vloop, qsd and qsd-iothread serve /tmp/i.img.qcow2 (converted, a fully \
                 allocated copy of the raw image: 16384 of 16384 clusters of 64 KiB, made in 2.5 s)"
            ),
            "{text}"
        );
        assert!(text.contains("overlay rows: every run"), "{text}");
        // The ratio table: a vloop-raw column and no raw one.
        assert!(text.contains("CPU/IO  IOPS vs vloop-raw\n"), "{text}");
        assert!(!text.contains("IOPS vs raw"), "{text}");
        // vloop 17.0k and 18.7k against vloop-raw 21.2k and 18.7k, round by round: 0.8x and
        // 1.0x, median 0.9x.
        let line = text
            .lines()
            .find(|l| l.starts_with("4k randread QD1 ") && l.contains("qsd "))
            .unwrap();
        assert!(line.ends_with("              0.90x"), "{line:?}");
        assert!(text.contains("1M write QD8 overlay   vloop "), "{text}");
        // The page-cache table keeps its raw column and has no qcow2 lines.
        let plain = render(&report(vec![Target::Vloop, Target::Qsd, Target::Raw]));
        assert!(plain.contains("CPU/IO  IOPS vs raw\n"), "{plain}");
        assert!(
            !plain.contains("qcow2") && !plain.contains("vloop-raw"),
            "{plain}"
        );
    }
}
