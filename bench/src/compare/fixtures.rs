//! Made-up reports for the tests of the table and the chart.

use std::time::Duration;

use super::options::{default_workloads, Case, CompareOptions, ImageState};
use super::report::{Report, Row};
use super::stats::{Ratios, Round, Summary};
use crate::hist::{LatencyHist, Percentiles};
use crate::images::{Check, Info, Qcow2Image};
use crate::load::{Pattern, Workload};
use crate::machine::{LoadAvg, LoadSpan, Machine};
use crate::target::{Mode, Target};

/// A summary with one round per entry of `iops` (p50 the inverse of IOPS, 10 I/Os each).
pub(crate) fn summary(iops: &[f64]) -> Summary {
    summary_cpu(iops, &[])
}

/// [`summary`] with the backend CPU per request of each round where `cpu` has an entry.
pub(crate) fn summary_cpu(iops: &[f64], cpu: &[f64]) -> Summary {
    let mut s = Summary::default();
    for (i, &x) in iops.iter().enumerate() {
        let r = Round {
            round: i as u32 + 1,
            iops: x,
            backend_cpu_us_per_io: cpu.get(i).copied(),
            latency: Percentiles {
                p50_us: 1e6 / x,
                ..Percentiles::default()
            },
            ios: 10,
            ..Round::default()
        };
        s.add(r, &LatencyHist::new());
    }
    s
}

fn row(w: Workload, on: ImageState, base: f64, targets: &[Target]) -> Row {
    let has = |t| targets.contains(&t);
    let mut row = Row {
        name: Case { workload: w, on }.to_string(),
        workload: w,
        on,
        vloop: summary(&[base, base * 1.1, base * 0.9]),
        qsd: Some(summary(&[base * 0.8, base * 0.7])),
        qsd_iothread: Some(Summary::default()),
        raw: has(Target::Raw).then(|| summary(&[base * 20.0])),
        vloop_raw: has(Target::VloopRaw).then(|| summary(&[base * 1.25, base * 1.1])),
        ratios: Ratios::default(),
    };
    row.set_ratios();
    row
}

/// A page-cache report on `targets` with two 4k randread rows (QD1, and QD32 on two queues).
pub(crate) fn report(targets: Vec<Target>) -> Report {
    let w = |iodepth, queues| Workload {
        pattern: Pattern::RandRead,
        bs: 4096,
        iodepth,
        queues,
        runtime: Duration::from_secs(2),
        one_pass: false,
        think: Duration::ZERO,
    };
    let load = LoadAvg {
        one: 0.25,
        five: 0.5,
        fifteen: 0.75,
    };
    Report {
        started: "2026-12-01T09:00:00Z".into(),
        mode: Mode::PageCache,
        direct: false,
        qcow2: None,
        machine: Machine::made_up(),
        load: LoadSpan::new(load, load),
        image: "/tmp/i.img".into(),
        image_size: 1 << 30,
        rounds: 3,
        rounds_requested: 3,
        rows: vec![
            row(w(1, 1), ImageState::Allocated, 17_000.0, &targets),
            row(w(32, 2), ImageState::Allocated, 900_000.0, &targets),
        ],
        targets,
        images: Vec::new(),
        backends: Vec::new(),
        wall_secs: 10.0,
    }
}

/// A qcow2-mode report: a 4k randread row on the allocated copy and a 1 MiB write row on empty
/// overlays.
pub(crate) fn qcow2_report() -> Report {
    let targets = vec![
        Target::Vloop,
        Target::Qsd,
        Target::QsdIothread,
        Target::VloopRaw,
    ];
    let mut r = report(targets.clone());
    let write = Workload {
        pattern: Pattern::Write,
        bs: 1 << 20,
        iodepth: 8,
        queues: 1,
        runtime: Duration::from_secs(2),
        one_pass: true,
        think: Duration::ZERO,
    };
    r.rows[1] = row(write, ImageState::EmptyOverlay, 500.0, &targets);
    r.qcow2 = Some(Qcow2Image {
        path: "/tmp/i.img.qcow2".into(),
        reused: false,
        convert_secs: Some(2.5),
        info: Info {
            virtual_size: 1 << 30,
            cluster_size: Some(65536),
            actual_size: Some(1 << 30),
        },
        check: Check {
            total_clusters: 16384,
            allocated_clusters: 16384,
            ..Check::default()
        },
    });
    r
}

/// Page-cache (or `mode`) settings over the default workload set on a 1 MiB image, with a
/// vloop-blk argument; qemu-storage-daemon left out when `skip_qsd`.
pub(crate) fn options(mode: Mode, skip_qsd: bool) -> CompareOptions {
    CompareOptions {
        image: "/tmp/i.img".into(),
        image_size: 1 << 20,
        fresh_image: false,
        qcow2: false,
        qemu_img_bin: "qemu-img".into(),
        vloop_bin: "/bin/vloop-blk".into(),
        qsd_bin: "qemu-storage-daemon".into(),
        rounds: 1,
        mode,
        cases: default_workloads(Duration::from_secs(1))
            .into_iter()
            .map(Case::allocated)
            .collect(),
        skip_qsd,
        vloop_args: vec!["--queue-size=512".into()],
        time_budget: None,
        idle: None,
    }
}
