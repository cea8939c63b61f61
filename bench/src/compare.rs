//! `--compare`: the same workloads on vloop-blk, on qemu-storage-daemon and straight on the
//! image file with io_uring, one backend at a time (vloop-blk locks the image), interleaved
//! and repeated, summarised in one table with ratios.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::hist::{LatencyHist, Percentiles};
use crate::load::{run_raw, run_vhost, LoadError, Pattern, RunResult, Workload};
use crate::procfs;
use vloop_frontend::backend::{BackendError, BackendProcess, BackendSpec, Export, Program};

/// Errors of the comparison.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// The image could not be created.
    #[error("cannot create the benchmark image {path}")]
    Image {
        /// Image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The socket directory could not be created.
    #[error("cannot create a temporary directory for the sockets")]
    TempDir(#[source] std::io::Error),
    /// No workloads were given.
    #[error("no workloads to compare")]
    NoWorkloads,
}

/// The three targets of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// vloop-blk.
    Vloop,
    /// qemu-storage-daemon.
    Qsd,
    /// io_uring on the raw file.
    Raw,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Vloop => "vloop",
            Self::Qsd => "qsd",
            Self::Raw => "raw",
        }
    }
}

/// Settings of a comparison.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// The image file (created or reused).
    pub image: PathBuf,
    /// Image size in bytes.
    pub image_size: u64,
    /// Recreate the image even if one of the right size exists.
    pub fresh_image: bool,
    /// The vloop-blk binary.
    pub vloop_bin: PathBuf,
    /// Repetitions of every (target, workload) pair.
    pub rounds: u32,
    /// O_DIRECT for all three targets (cache.direct=on for qsd).
    pub direct: bool,
    /// Workloads, each with its runtime.
    pub workloads: Vec<Workload>,
    /// Skip qemu-storage-daemon.
    pub skip_qsd: bool,
    /// Extra command-line arguments for vloop-blk.
    pub vloop_args: Vec<String>,
    /// Start no further round when it would end after this much wall time.
    pub time_budget: Option<Duration>,
}

/// The default comparison set with `runtime` per run.
pub fn default_workloads(runtime: Duration) -> Vec<Workload> {
    let w = |pattern, bs: u32, iodepth, queues| Workload {
        pattern,
        bs,
        iodepth,
        queues,
        runtime,
    };
    vec![
        w(Pattern::RandRead, 4096, 1, 1),
        w(Pattern::RandRead, 4096, 32, 1),
        w(Pattern::RandRead, 4096, 32, 2),
        w(Pattern::RandWrite, 4096, 32, 1),
        w(Pattern::Read, 1 << 20, 8, 1),
        w(Pattern::Write, 1 << 20, 8, 1),
    ]
}

/// One target's results for one workload, over all rounds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// IOPS of each round.
    pub iops_rounds: Vec<f64>,
    /// Median IOPS.
    pub iops: f64,
    /// Median MiB/s.
    pub mib_s: f64,
    /// Latency over all rounds.
    pub latency: Percentiles,
    /// Backend CPU per request over all rounds (microseconds).
    pub cpu_us_per_io: Option<f64>,
    /// CPU of vloop-bench itself per request (frontend, or the raw engine) over all rounds.
    pub client_cpu_us_per_io: Option<f64>,
    /// Kicks per request (frontend to backend notifications).
    pub kicks_per_io: f64,
    /// Sleeps on the call eventfd per request (backend to frontend notifications used).
    pub waits_per_io: f64,
    /// Failed requests.
    pub errors: u64,
    /// Why a run failed, if one did.
    pub failure: Option<String>,
    #[serde(skip)]
    hist: LatencyHist,
    #[serde(skip)]
    mib_rounds: Vec<f64>,
    #[serde(skip)]
    cpu: Option<(f64, u64)>,
    #[serde(skip)]
    client_cpu: Option<(f64, u64)>,
    #[serde(skip)]
    kicks: u64,
    #[serde(skip)]
    waits: u64,
    #[serde(skip)]
    ios: u64,
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

impl Summary {
    fn add(&mut self, r: &RunResult) {
        self.iops_rounds.push(r.iops);
        self.mib_rounds.push(r.mib_s);
        self.hist.merge(&r.hist);
        self.errors += r.errors;
        self.ios += r.ios;
        self.kicks += r.frontend.kicks;
        self.waits += r.frontend.waits;
        if let Some(c) = r.backend_cpu_us_per_io {
            let (t, n) = self.cpu.unwrap_or((0.0, 0));
            self.cpu = Some((t + c * r.ios as f64, n + r.ios));
        }
        if let Some(c) = r.client_cpu_us_per_io {
            let (t, n) = self.client_cpu.unwrap_or((0.0, 0));
            self.client_cpu = Some((t + c * r.ios as f64, n + r.ios));
        }
        self.client_cpu_us_per_io = self.client_cpu.map(|(t, n)| t / n.max(1) as f64);
        self.iops = median(&self.iops_rounds);
        self.mib_s = median(&self.mib_rounds);
        self.latency = self.hist.percentiles();
        self.cpu_us_per_io = self.cpu.map(|(t, n)| t / n.max(1) as f64);
        let ios = self.ios.max(1) as f64;
        self.kicks_per_io = self.kicks as f64 / ios;
        self.waits_per_io = self.waits as f64 / ios;
    }
}

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Workload name.
    pub name: String,
    /// The workload.
    pub workload: Workload,
    /// vloop-blk.
    pub vloop: Summary,
    /// qemu-storage-daemon.
    pub qsd: Summary,
    /// io_uring on the file.
    pub raw: Summary,
    /// vloop IOPS / qsd IOPS: median of the per-round ratios.
    pub vloop_over_qsd: Option<f64>,
    /// vloop IOPS / raw IOPS: median of the per-round ratios.
    pub vloop_over_raw: Option<f64>,
    /// qsd backend CPU per I/O / vloop backend CPU per I/O (efficiency; above 1 is better).
    pub qsd_cpu_over_vloop_cpu: Option<f64>,
}

/// Memory of one backend.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Memory {
    /// VmRSS in KiB after start-up, before any client connected.
    pub idle_rss_kib: Option<u64>,
    /// Largest VmRSS in KiB seen right after a workload.
    pub after_rss_kib: Option<u64>,
}

/// The whole comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Image path.
    pub image: PathBuf,
    /// Image size in bytes.
    pub image_size: u64,
    /// O_DIRECT or page cache.
    pub direct: bool,
    /// Rounds.
    pub rounds: u32,
    /// Queues each daemon was started with.
    pub daemon_queues: u16,
    /// Rows, one per workload.
    pub rows: Vec<Row>,
    /// vloop-blk memory (one export).
    pub vloop_memory: Memory,
    /// qemu-storage-daemon memory (one export).
    pub qsd_memory: Memory,
    /// Wall time of the comparison in seconds.
    pub wall_secs: f64,
}

/// Creates (or reuses) an image of `size` bytes whose every 4 KiB block holds non-zero data.
pub fn prepare_image(path: &Path, size: u64, fresh: bool) -> Result<(), CompareError> {
    let err = |source| CompareError::Image {
        path: path.to_owned(),
        source,
    };
    if !fresh {
        if let Ok(m) = std::fs::metadata(path) {
            if m.len() == size {
                eprintln!(
                    "using existing image {} ({} MiB)",
                    path.display(),
                    size >> 20
                );
                return Ok(());
            }
        }
    }
    eprintln!("creating image {} ({} MiB)", path.display(), size >> 20);
    let mut f = File::create(path).map_err(err)?;
    let chunk_len = 1u64 << 20;
    let mut chunk = vec![0u8; chunk_len as usize];
    let mut off = 0;
    while off < size {
        let n = chunk_len.min(size - off) as usize;
        for (i, block) in chunk[..n].chunks_mut(4096).enumerate() {
            let tag = (off / 4096 + i as u64) | 1 << 63;
            for w in block.chunks_mut(8) {
                w.copy_from_slice(&tag.to_le_bytes()[..w.len()]);
            }
        }
        f.write_all(&chunk[..n]).map_err(err)?;
        off += n as u64;
    }
    f.sync_all().map_err(err)?;
    Ok(())
}

/// Reads the whole file once so that it is in the page cache.
fn warm_page_cache(path: &Path) -> std::io::Result<()> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// Runs the comparison; progress goes to stderr.
pub fn run(opts: &CompareOptions) -> Result<Report, CompareError> {
    if opts.workloads.is_empty() {
        return Err(CompareError::NoWorkloads);
    }
    let started = Instant::now();
    prepare_image(&opts.image, opts.image_size, opts.fresh_image)?;
    if !opts.direct {
        // Every target should find the image in the page cache, the first one too.
        warm_page_cache(&opts.image).map_err(|source| CompareError::Image {
            path: opts.image.clone(),
            source,
        })?;
    }
    let dir = tempfile::Builder::new()
        .prefix("vloop-bench")
        .tempdir()
        .map_err(CompareError::TempDir)?;
    let queues = opts.workloads.iter().map(|w| w.queues).max().unwrap_or(1);
    let mut rows: Vec<Row> = opts
        .workloads
        .iter()
        .map(|w| Row {
            name: w.to_string(),
            workload: *w,
            vloop: Summary::default(),
            qsd: Summary::default(),
            raw: Summary::default(),
            vloop_over_qsd: None,
            vloop_over_raw: None,
            qsd_cpu_over_vloop_cpu: None,
        })
        .collect();
    let mut vloop_mem = Memory::default();
    let mut qsd_mem = Memory::default();
    let mut targets = vec![Target::Vloop, Target::Qsd, Target::Raw];
    if opts.skip_qsd {
        targets.retain(|t| *t != Target::Qsd);
    }
    let mut rounds_done = 0;
    for round in 0..opts.rounds {
        if let Some(budget) = opts.time_budget {
            let per_round = started.elapsed() / round.max(1);
            if round > 0 && started.elapsed() + per_round > budget {
                eprintln!(
                    "stopping after {round} rounds: another would pass the {budget:?} time budget"
                );
                break;
            }
        }
        rounds_done += 1;
        for (wi, row) in rows.iter_mut().enumerate() {
            // Rotate the order for every (round, workload) so drift (page cache, writeback,
            // other load on the machine) spreads evenly over the targets.
            let mut order = targets.clone();
            order.rotate_left((round as usize + wi) % targets.len());
            for target in order {
                let mem = match target {
                    Target::Vloop => Some(&mut vloop_mem),
                    Target::Qsd => Some(&mut qsd_mem),
                    Target::Raw => None,
                };
                let res = run_one(opts, dir.path(), queues, target, &row.workload, mem);
                let sum = match target {
                    Target::Vloop => &mut row.vloop,
                    Target::Qsd => &mut row.qsd,
                    Target::Raw => &mut row.raw,
                };
                match res {
                    Ok(r) => {
                        eprintln!(
                            "[round {}/{}] {:5} {:22} {:>9.0} IOPS {:>8.1} MiB/s  p99 {:>8.1} us",
                            round + 1,
                            opts.rounds,
                            target.name(),
                            row.name,
                            r.iops,
                            r.mib_s,
                            r.latency.p99_us
                        );
                        sum.add(&r);
                    }
                    Err(msg) => {
                        eprintln!(
                            "[round {}/{}] {:5} {:22} FAILED: {msg}",
                            round + 1,
                            opts.rounds,
                            target.name(),
                            row.name
                        );
                        sum.failure.get_or_insert(msg);
                    }
                }
            }
        }
    }
    for row in &mut rows {
        row.vloop_over_qsd = paired_ratio(&row.vloop, &row.qsd);
        row.vloop_over_raw = paired_ratio(&row.vloop, &row.raw);
        row.qsd_cpu_over_vloop_cpu = match (row.qsd.cpu_us_per_io, row.vloop.cpu_us_per_io) {
            (Some(q), Some(v)) if v > 0.0 => Some(q / v),
            _ => None,
        };
    }
    Ok(Report {
        image: opts.image.clone(),
        image_size: opts.image_size,
        direct: opts.direct,
        rounds: rounds_done,
        daemon_queues: queues,
        rows,
        vloop_memory: vloop_mem,
        qsd_memory: qsd_mem,
        wall_secs: started.elapsed().as_secs_f64(),
    })
}

/// The median over rounds of a's IOPS / b's IOPS in the same round (the runs of one round
/// are adjacent in time, so they share the machine's background load); when a round failed
/// for either side, the ratio of the medians.
fn paired_ratio(a: &Summary, b: &Summary) -> Option<f64> {
    if a.iops <= 0.0 || b.iops <= 0.0 {
        return None;
    }
    if a.failure.is_none() && b.failure.is_none() && a.iops_rounds.len() == b.iops_rounds.len() {
        let r: Vec<f64> = a
            .iops_rounds
            .iter()
            .zip(&b.iops_rounds)
            .filter(|(_, y)| **y > 0.0)
            .map(|(x, y)| x / y)
            .collect();
        if r.len() == a.iops_rounds.len() {
            return Some(median(&r));
        }
    }
    Some(a.iops / b.iops)
}

/// `e` and its sources, joined with ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Starts `target`'s backend (if any), runs `w` once, stops it; records memory in `mem`.
fn run_one(
    opts: &CompareOptions,
    dir: &Path,
    queues: u16,
    target: Target,
    w: &Workload,
    mem: Option<&mut Memory>,
) -> Result<RunResult, String> {
    // Start every run with no dirty pages left over from the previous one, so writeback
    // throttling hits the run that caused it.
    if let Ok(f) = File::open(&opts.image) {
        let _ = f.sync_all();
    }
    let program = match target {
        Target::Vloop => Program::Vloop(opts.vloop_bin.clone()),
        Target::Qsd => Program::qsd(),
        Target::Raw => return run_raw(&opts.image, w, opts.direct).map_err(|e| chain(&e)),
    };
    let socket = dir.join(format!("{}.sock", target.name()));
    let mut spec = BackendSpec::new(
        program,
        Export {
            queues,
            direct: opts.direct,
            ..Export::new(&opts.image, &socket)
        },
    );
    if target == Target::Vloop {
        spec.extra_args = opts.vloop_args.clone();
    }
    let mut d = BackendProcess::spawn(
        &spec,
        &socket.with_extension("log"),
        Duration::from_secs(10),
    )
    .map_err(|e: BackendError| format!("cannot start: {}", chain(&e)))?;
    let mem = mem.ok_or_else(|| "no memory record".to_owned())?;
    if mem.idle_rss_kib.is_none() {
        // Let it settle before reading its idle footprint.
        std::thread::sleep(Duration::from_millis(300));
        mem.idle_rss_kib = procfs::rss_kib(d.pid()).ok();
    }
    let r = run_vhost(d.socket(), w, Some(d.pid())).map_err(|e: LoadError| chain(&e));
    mem.after_rss_kib = procfs::rss_kib(d.pid()).ok().max(mem.after_rss_kib);
    if !d.is_running() {
        return Err(format!(
            "{} exited during the run; its log:\n{}",
            d.name(),
            d.log_tail(20)
        ));
    }
    d.kill();
    r
}

fn num(s: &Summary) -> String {
    if s.failure.is_some() && s.iops_rounds.is_empty() {
        "failed".into()
    } else if s.iops >= 100_000.0 {
        format!("{:.0}k", s.iops / 1000.0)
    } else {
        format!("{:.0}", s.iops)
    }
}

fn ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
}

fn lat(s: &Summary) -> String {
    if s.iops_rounds.is_empty() {
        return "-".into();
    }
    let l = s.latency;
    format!("{:.0}/{:.0}/{:.0}", l.p50_us, l.p99_us, l.p999_us)
}

fn cpu(s: &Summary) -> String {
    s.cpu_us_per_io
        .map_or_else(|| "-".into(), |c| format!("{c:.1}"))
}

fn rss(k: Option<u64>) -> String {
    k.map_or_else(|| "-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// The human table.
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "image {} ({} MiB, {}), {} rounds; IOPS are medians; latency p50/p99/p99.9 in us over all rounds;\nv/qsd and v/raw are medians of per-round IOPS ratios; CPU/IO in us: v/q = backend process,\nr = the raw io_uring engine itself; q/vCPU = qsd CPU per I/O over vloop's (efficiency)",
        r.image.display(),
        r.image_size >> 20,
        if r.direct { "O_DIRECT" } else { "page cache" },
        r.rounds
    );
    let _ = writeln!(
        o,
        "{:<20} {:>9} {:>9} {:>9} {:>7} {:>7} {:>9} {:>9} {:>16} {:>16} {:>16} {:>7} {:>7} {:>7} {:>7}",
        "workload",
        "vloop",
        "qsd",
        "raw",
        "v/qsd",
        "v/raw",
        "vMiB/s",
        "qMiB/s",
        "vloop lat",
        "qsd lat",
        "raw lat",
        "vCPU/IO",
        "qCPU/IO",
        "rCPU/IO",
        "q/vCPU"
    );
    for row in &r.rows {
        let _ = writeln!(
            o,
            "{:<20} {:>9} {:>9} {:>9} {:>7} {:>7} {:>9.1} {:>9.1} {:>16} {:>16} {:>16} {:>7} {:>7} {:>7} {:>7}",
            row.name,
            num(&row.vloop),
            num(&row.qsd),
            num(&row.raw),
            ratio(row.vloop_over_qsd),
            ratio(row.vloop_over_raw),
            row.vloop.mib_s,
            row.qsd.mib_s,
            lat(&row.vloop),
            lat(&row.qsd),
            lat(&row.raw),
            cpu(&row.vloop),
            cpu(&row.qsd),
            row.raw
                .client_cpu_us_per_io
                .map_or_else(|| "-".into(), |c| format!("{c:.1}")),
            ratio(row.qsd_cpu_over_vloop_cpu),
        );
    }
    let _ = writeln!(
        o,
        "idle RSS per export ({} queues): vloop {}, qsd {}; largest after a run: vloop {}, qsd {}",
        r.daemon_queues,
        rss(r.vloop_memory.idle_rss_kib),
        rss(r.qsd_memory.idle_rss_kib),
        rss(r.vloop_memory.after_rss_kib),
        rss(r.qsd_memory.after_rss_kib),
    );
    let _ = writeln!(
        o,
        "notifications per I/O (kicks / call waits): {}",
        r.rows
            .iter()
            .map(|row| format!(
                "{}: vloop {:.2}/{:.2} qsd {:.2}/{:.2}",
                row.name,
                row.vloop.kicks_per_io,
                row.vloop.waits_per_io,
                row.qsd.kicks_per_io,
                row.qsd.waits_per_io
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let mut seen = std::collections::HashSet::new();
    for row in &r.rows {
        for (n, s) in [("vloop", &row.vloop), ("qsd", &row.qsd), ("raw", &row.raw)] {
            if let Some(f) = &s.failure {
                if seen.insert((n, f.clone())) {
                    let _ = writeln!(o, "{n} failed ({}, maybe others): {f}", row.name);
                }
            }
            if s.errors > 0 {
                let _ = writeln!(o, "{n} {}: {} requests failed", row.name, s.errors);
            }
        }
    }
    let _ = writeln!(o, "wall time {:.0} s", r.wall_secs);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_pair_rounds() {
        let s = |rounds: &[f64]| Summary {
            iops: median(rounds),
            iops_rounds: rounds.to_vec(),
            ..Summary::default()
        };
        // Round by round: 2x, 2x, 1x -> median 2x (the ratio of medians would be 1.5x).
        let a = s(&[200.0, 40.0, 30.0]);
        let b = s(&[100.0, 20.0, 30.0]);
        assert_eq!(paired_ratio(&a, &b), Some(2.0));
        // Unpaired (a failed round): ratio of medians.
        let mut c = s(&[200.0, 40.0]);
        c.failure = Some("x".into());
        assert_eq!(paired_ratio(&c, &b), Some(120.0 / 30.0));
        assert_eq!(paired_ratio(&Summary::default(), &b), None);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn image_blocks_are_tagged_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.img");
        prepare_image(&p, 3 << 20, false).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 3 << 20);
        let tag = |b: usize| u64::from_le_bytes(data[b * 4096..b * 4096 + 8].try_into().unwrap());
        assert_eq!(tag(0), 1 << 63);
        assert_eq!(tag(700), 700 | 1 << 63);
        assert!(!data.chunks(4096).any(|c| c.iter().all(|&b| b == 0)));
        // Same size: reused, not rewritten.
        std::fs::write(&p, vec![7u8; 3 << 20]).unwrap();
        prepare_image(&p, 3 << 20, false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap()[0], 7);
    }
}
