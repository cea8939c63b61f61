//! `--compare`: the same workloads on vloop-blk, on qemu-storage-daemon (from its main loop and
//! from an iothread) and straight on the image file with io_uring, one target at a time
//! (vloop-blk locks the image), in the same cache mode everywhere, interleaved and repeated;
//! or, in null mode, vloop-blk's null engine against qemu-storage-daemon's `null-co` driver.
//! It also measures each backend idle with a frontend connected, and the machine's load.
//!
//! [`run`] does the measuring (the I/O), [`stats`] summarises and compares the figures (pure),
//! [`render`] turns a [`Report`] into the text table; `crate::plot` draws it.

pub mod render;
pub mod stats;

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use render::render;
pub use stats::{Footprint, Ratios, Round, Stat, Summary, Target};

use crate::load::{client_options, run_raw, run_vhost, LoadError, Pattern, RunResult, Workload};
use crate::machine::{self, LoadSpan, Machine, MachineError};
use crate::procfs::{self, ThreadShare};
use vloop_frontend::backend::{BackendError, BackendProcess, BackendSpec, Export, Program};
use vloop_frontend::client::Client;

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
    /// The load average could not be read.
    #[error("cannot read the machine's load average")]
    Load(#[source] MachineError),
}

/// What the backends serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The image through the page cache.
    PageCache,
    /// The image with O_DIRECT (qemu-storage-daemon: `cache.direct=on`).
    Direct,
    /// No image I/O: vloop-blk's null engine, qemu-storage-daemon's `null-co` driver.
    Null,
}

impl Mode {
    /// Name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::PageCache => "page cache",
            Self::Direct => "O_DIRECT",
            Self::Null => "null (no image I/O)",
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
    /// The qemu-storage-daemon binary.
    pub qsd_bin: PathBuf,
    /// Repetitions of every (target, workload) pair.
    pub rounds: u32,
    /// Cache mode, or null.
    pub mode: Mode,
    /// Workloads, each with its runtime.
    pub workloads: Vec<Workload>,
    /// Leave qemu-storage-daemon out.
    pub skip_qsd: bool,
    /// Extra command-line arguments for vloop-blk.
    pub vloop_args: Vec<String>,
    /// Start no further round when it would end after this much wall time.
    pub time_budget: Option<Duration>,
    /// Measure each backend idle (frontend connected, queues set up, no I/O) for this long.
    pub idle: Option<Duration>,
}

impl CompareOptions {
    /// The targets measured, in table order.
    pub fn targets(&self) -> Vec<Target> {
        Target::ALL
            .into_iter()
            .filter(|t| !(self.skip_qsd && t.is_qsd()))
            .filter(|t| !(self.mode == Mode::Null && *t == Target::Raw))
            .collect()
    }
}

/// The issue's workload set with `runtime` per run: 4k random reads at depth 1 and 32 on one
/// queue and at depth 32 on two, 4k random writes at depth 1 and 32, 1 MiB sequential reads
/// and writes at depth 8.
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
        w(Pattern::RandWrite, 4096, 1, 1),
        w(Pattern::RandWrite, 4096, 32, 1),
        w(Pattern::Read, 1 << 20, 8, 1),
        w(Pattern::Write, 1 << 20, 8, 1),
    ]
}

/// One row of the table: a workload on every target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Workload name.
    pub name: String,
    /// The workload.
    pub workload: Workload,
    /// vloop-blk.
    pub vloop: Summary,
    /// qemu-storage-daemon, main loop.
    pub qsd: Option<Summary>,
    /// qemu-storage-daemon, iothread.
    pub qsd_iothread: Option<Summary>,
    /// io_uring on the file.
    pub raw: Option<Summary>,
    /// vloop against the better qsd and raw.
    #[serde(flatten)]
    pub ratios: Ratios,
}

impl Row {
    fn new(w: &Workload, targets: &[Target]) -> Self {
        let has = |t| targets.contains(&t).then(Summary::default);
        Row {
            name: w.to_string(),
            workload: *w,
            vloop: Summary::default(),
            qsd: has(Target::Qsd),
            qsd_iothread: has(Target::QsdIothread),
            raw: has(Target::Raw),
            ratios: Ratios::default(),
        }
    }

    /// The summary of `t`, when it was measured.
    pub fn get(&self, t: Target) -> Option<&Summary> {
        match t {
            Target::Vloop => Some(&self.vloop),
            Target::Qsd => self.qsd.as_ref(),
            Target::QsdIothread => self.qsd_iothread.as_ref(),
            Target::Raw => self.raw.as_ref(),
        }
    }

    fn get_mut(&mut self, t: Target) -> Option<&mut Summary> {
        match t {
            Target::Vloop => Some(&mut self.vloop),
            Target::Qsd => self.qsd.as_mut(),
            Target::QsdIothread => self.qsd_iothread.as_mut(),
            Target::Raw => self.raw.as_mut(),
        }
    }
}

/// A backend measured idle: a frontend connected, its queues set up, no request.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Idle {
    /// Queues set up.
    pub queues: u16,
    /// Seconds measured.
    pub secs: f64,
    /// CPU used, in percent of one CPU (the sum of its threads' exact run times).
    pub cpu_pct: Option<f64>,
    /// The same in clock ticks of /proc/PID/stat (10 ms resolution; counts exited threads).
    pub cpu_pct_ticks: Option<f64>,
    /// Percent of one CPU by thread name.
    pub threads: Vec<ThreadShare>,
    /// Resident set (VmRSS, KiB) at the end.
    pub rss_kib: Option<u64>,
    /// Why the measurement failed, if it did.
    pub failure: Option<String>,
}

/// What is known of one backend program over the whole comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendFacts {
    /// Which backend.
    pub target: Target,
    /// The command line of its first start.
    pub command: Vec<String>,
    /// Resident set (VmRSS, KiB) right after start-up, before any frontend connected.
    pub idle_rss_kib: Option<u64>,
    /// Greatest peak resident set (VmHWM, KiB) of one export over every run of it, idle
    /// included; it counts the guest memory pages the backend touched.
    pub peak_rss_kib: Option<u64>,
    /// Greatest anonymous resident memory (RssAnon, KiB) at the end of a run: the backend's own
    /// memory, without the guest memory it maps.
    pub anon_rss_kib: Option<u64>,
    /// Idle CPU, when measured.
    pub idle: Option<Idle>,
}

/// The whole comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// When the comparison started (RFC 3339, UTC).
    pub started: String,
    /// Cache mode, or null.
    pub mode: Mode,
    /// O_DIRECT on every side.
    pub direct: bool,
    /// The machine.
    pub machine: Machine,
    /// The load average before and after the measurements.
    pub load: LoadSpan,
    /// Image path.
    pub image: PathBuf,
    /// Image size in bytes.
    pub image_size: u64,
    /// Rounds done.
    pub rounds: u32,
    /// Rounds asked for (fewer are done when the time budget runs out).
    pub rounds_requested: u32,
    /// The targets measured.
    pub targets: Vec<Target>,
    /// Rows, one per workload.
    pub rows: Vec<Row>,
    /// One entry per backend program.
    pub backends: Vec<BackendFacts>,
    /// Wall time of the comparison in seconds.
    pub wall_secs: f64,
}

impl Report {
    /// The facts of backend `t`.
    pub fn backend(&self, t: Target) -> Option<&BackendFacts> {
        self.backends.iter().find(|b| b.target == t)
    }
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
pub fn warm_page_cache(path: &Path) -> std::io::Result<()> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// The 1-minute load average now, for a record (None when unreadable).
fn load_one() -> Option<f64> {
    machine::loadavg().ok().map(|l| l.one)
}

/// Runs the comparison; progress goes to stderr.
pub fn run(opts: &CompareOptions) -> Result<Report, CompareError> {
    if opts.workloads.is_empty() {
        return Err(CompareError::NoWorkloads);
    }
    let started = Instant::now();
    let started_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let machine = machine::machine(&opts.qsd_bin);
    let load_before = machine::loadavg().map_err(CompareError::Load)?;
    eprintln!("machine: {}", machine.describe());
    eprintln!("load average before: {load_before}");
    if load_before.busy() {
        eprintln!(
            "warning: the 1-minute load average is {:.2}: the machine is not idle, figures will be noisy",
            load_before.one
        );
    }
    prepare_image(&opts.image, opts.image_size, opts.fresh_image)?;
    if opts.mode == Mode::PageCache {
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
    let targets = opts.targets();
    let mut rows: Vec<Row> = opts
        .workloads
        .iter()
        .map(|w| Row::new(w, &targets))
        .collect();
    let mut backends: Vec<BackendFacts> = targets
        .iter()
        .filter(|t| t.is_backend())
        .map(|&t| BackendFacts {
            target: t,
            command: Vec::new(),
            idle_rss_kib: None,
            peak_rss_kib: None,
            anon_rss_kib: None,
            idle: None,
        })
        .collect();
    if let Some(secs) = opts.idle {
        let queues = opts.workloads.iter().map(|w| w.queues).max().unwrap_or(1);
        for facts in &mut backends {
            eprintln!(
                "[idle] {:12} {queues} queue(s), connected, no I/O, for {secs:?}",
                facts.target.name()
            );
            let idle = measure_idle(opts, dir.path(), queues, secs, facts);
            match (&idle.failure, idle.cpu_pct) {
                (Some(f), _) => eprintln!("[idle] {:12} FAILED: {f}", facts.target.name()),
                (None, Some(p)) => {
                    eprintln!("[idle] {:12} {p:.3}% of one CPU", facts.target.name())
                }
                (None, None) => {}
            }
            facts.idle = Some(idle);
        }
    }
    let rounds_started = Instant::now();
    let mut rounds_done = 0;
    for round in 0..opts.rounds {
        if let Some(budget) = opts.time_budget {
            let per_round = rounds_started.elapsed() / round.max(1);
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
                let facts = backends.iter_mut().find(|b| b.target == target);
                let load = load_one();
                let res = run_one(opts, dir.path(), target, &row.workload, facts);
                let tag = format!(
                    "[round {}/{}] {:12} {:22}",
                    round + 1,
                    opts.rounds,
                    target.name(),
                    row.name
                );
                let Some(sum) = row.get_mut(target) else {
                    continue;
                };
                match res {
                    Ok((r, memory)) => {
                        eprintln!(
                            "{tag} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>8.1} us  p99 {:>8.1} us",
                            r.iops, r.mib_s, r.latency.p50_us, r.latency.p99_us
                        );
                        sum.add(Round::new(round + 1, load, &r, memory), &r.hist);
                    }
                    Err(msg) => {
                        eprintln!("{tag} FAILED: {msg}");
                        sum.fail(round + 1, msg);
                    }
                }
            }
        }
    }
    for row in &mut rows {
        row.ratios = Ratios::of(
            &row.vloop,
            row.qsd.as_ref(),
            row.qsd_iothread.as_ref(),
            row.raw.as_ref(),
        );
    }
    let load_after = machine::loadavg().map_err(CompareError::Load)?;
    eprintln!("load average after: {load_after}");
    Ok(Report {
        started: started_at,
        mode: opts.mode,
        direct: opts.mode == Mode::Direct,
        machine,
        load: LoadSpan::new(load_before, load_after),
        image: opts.image.clone(),
        image_size: opts.image_size,
        rounds: rounds_done,
        rounds_requested: opts.rounds,
        targets,
        rows,
        backends,
        wall_secs: started.elapsed().as_secs_f64(),
    })
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

/// The spec that exports the image with backend `target` and `queues` queues (None for the raw
/// target, which has no backend process).
fn spec(opts: &CompareOptions, dir: &Path, target: Target, queues: u16) -> Option<BackendSpec> {
    let program = match target {
        Target::Vloop => Program::Vloop(opts.vloop_bin.clone()),
        Target::Qsd | Target::QsdIothread => Program::Qsd {
            bin: opts.qsd_bin.clone(),
            iothread: target == Target::QsdIothread,
        },
        Target::Raw => return None,
    };
    let socket = dir.join(format!("{}.sock", target.name()));
    let mut spec = BackendSpec::new(
        program,
        Export {
            queues,
            direct: opts.mode == Mode::Direct,
            null: (opts.mode == Mode::Null).then_some(opts.image_size),
            ..Export::new(&opts.image, &socket)
        },
    );
    if target == Target::Vloop {
        spec.extra_args = opts.vloop_args.clone();
    }
    Some(spec)
}

/// Starts backend `target` and records its command line and start-up footprint in `facts`.
fn start(
    opts: &CompareOptions,
    dir: &Path,
    target: Target,
    queues: u16,
    facts: &mut BackendFacts,
) -> Result<BackendProcess, String> {
    let spec = spec(opts, dir, target, queues).ok_or("no backend process to start")?;
    if facts.command.is_empty() {
        facts.command = std::iter::once(spec.command().get_program().to_string_lossy().into())
            .chain(spec.args())
            .collect();
    }
    let d = BackendProcess::spawn(
        &spec,
        &spec.export.socket.with_extension("log"),
        Duration::from_secs(10),
    )
    .map_err(|e: BackendError| format!("cannot start: {}", chain(&e)))?;
    if facts.idle_rss_kib.is_none() {
        // Let it settle before reading its idle footprint.
        std::thread::sleep(Duration::from_millis(300));
        facts.idle_rss_kib = procfs::rss_kib(d.pid()).ok();
    }
    Ok(d)
}

/// Stops `d` after reading its memory into `facts`; an exit during the run is an error.
fn finish(mut d: BackendProcess, facts: &mut BackendFacts) -> Result<Footprint, String> {
    let memory = Footprint {
        peak_rss_kib: procfs::peak_rss_kib(d.pid()).ok(),
        anon_rss_kib: procfs::anon_rss_kib(d.pid()).ok(),
    };
    facts.peak_rss_kib = facts.peak_rss_kib.max(memory.peak_rss_kib);
    facts.anon_rss_kib = facts.anon_rss_kib.max(memory.anon_rss_kib);
    if !d.is_running() {
        return Err(format!(
            "{} exited during the run; its log:\n{}",
            d.name(),
            d.log_tail(20)
        ));
    }
    d.kill();
    Ok(memory)
}

/// Measures backend `facts.target` with a frontend connected and `queues` queues set up, but no
/// request, for `secs`.
fn measure_idle(
    opts: &CompareOptions,
    dir: &Path,
    queues: u16,
    secs: Duration,
    facts: &mut BackendFacts,
) -> Idle {
    let mut idle = Idle {
        queues,
        ..Idle::default()
    };
    let target = facts.target;
    let d = match start(opts, dir, target, queues, facts) {
        Ok(d) => d,
        Err(e) => {
            idle.failure = Some(e);
            return idle;
        }
    };
    let w = Workload {
        pattern: Pattern::RandRead,
        bs: 4096,
        iodepth: 1,
        queues,
        runtime: secs,
    };
    let client = match Client::connect(d.socket(), &client_options(&w)) {
        Ok(c) => c,
        Err(e) => {
            idle.failure = Some(format!("cannot connect: {}", chain(&e)));
            let _ = finish(d, facts);
            return idle;
        }
    };
    // Let the set-up settle (threads started, first polls done) before measuring.
    std::thread::sleep(Duration::from_millis(200));
    let pid = d.pid();
    let threads0 = procfs::threads(pid).ok();
    let ticks0 = procfs::cpu_time(pid).ok();
    let t0 = Instant::now();
    std::thread::sleep(secs);
    let elapsed = t0.elapsed().as_secs_f64();
    let threads1 = procfs::threads(pid).ok();
    let ticks1 = procfs::cpu_time(pid).ok();
    idle.secs = elapsed;
    idle.rss_kib = procfs::rss_kib(pid).ok();
    let pct = |ns: f64| ns / 1e9 / elapsed * 100.0;
    if let (Some(a), Some(b)) = (&threads0, &threads1) {
        let by_name = procfs::thread_cpu_delta(a, b);
        idle.cpu_pct = Some(pct(by_name.iter().map(|(_, ns)| *ns as f64).sum()));
        idle.threads = by_name
            .into_iter()
            .map(|(thread, ns)| ThreadShare {
                thread,
                value: pct(ns as f64),
            })
            .collect();
    }
    if let (Some(a), Some(b)) = (ticks0, ticks1) {
        idle.cpu_pct_ticks = Some(pct(b.saturating_sub(a).as_nanos() as f64));
    }
    drop(client);
    if let Err(e) = finish(d, facts) {
        idle.failure = Some(e);
    }
    idle
}

/// Starts `target`'s backend (if any) with the workload's queue count, runs `w` once, stops it;
/// returns the run and the backend's memory at its end.
fn run_one(
    opts: &CompareOptions,
    dir: &Path,
    target: Target,
    w: &Workload,
    facts: Option<&mut BackendFacts>,
) -> Result<(RunResult, Footprint), String> {
    // Start every run with no dirty pages left over from the previous one, so writeback
    // throttling hits the run that caused it.
    if let Ok(f) = File::open(&opts.image) {
        let _ = f.sync_all();
    }
    let Some(facts) = facts else {
        let direct = opts.mode == Mode::Direct;
        return run_raw(&opts.image, w, direct)
            .map(|r| (r, Footprint::default()))
            .map_err(|e| chain(&e));
    };
    let d = start(opts, dir, target, w.queues, facts)?;
    let r = run_vhost(d.socket(), w, Some(d.pid())).map_err(|e: LoadError| chain(&e));
    let memory = finish(d, facts)?;
    r.map(|r| (r, memory))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn options(mode: Mode, skip_qsd: bool) -> CompareOptions {
        CompareOptions {
            image: "/tmp/i.img".into(),
            image_size: 1 << 20,
            fresh_image: false,
            vloop_bin: "/bin/vloop-blk".into(),
            qsd_bin: "qemu-storage-daemon".into(),
            rounds: 1,
            mode,
            workloads: default_workloads(Duration::from_secs(1)),
            skip_qsd,
            vloop_args: vec!["--queue-size=512".into()],
            time_budget: None,
            idle: None,
        }
    }

    #[test]
    fn targets_follow_the_mode() {
        use Target::*;
        assert_eq!(
            options(Mode::PageCache, false).targets(),
            [Vloop, Qsd, QsdIothread, Raw]
        );
        assert_eq!(
            options(Mode::Null, false).targets(),
            [Vloop, Qsd, QsdIothread]
        );
        assert_eq!(options(Mode::Direct, true).targets(), [Vloop, Raw]);
    }

    #[test]
    fn every_side_gets_the_same_cache_mode() {
        let dir = Path::new("/tmp/d");
        let o = options(Mode::Direct, false);
        let v = spec(&o, dir, Target::Vloop, 2).unwrap().args();
        assert!(v.contains(&"--direct".to_string()), "{v:?}");
        assert!(v.ends_with(&["--queue-size=512".to_string()]), "{v:?}");
        let q = spec(&o, dir, Target::QsdIothread, 2).unwrap().args();
        assert!(q[0..2] == ["--object", "iothread,id=iothread0"], "{q:?}");
        assert!(q[3].contains("cache.direct=on"), "{q:?}");
        assert!(q[5].contains("num-queues=2") && q[5].ends_with("iothread=iothread0"));
        let q = spec(&options(Mode::PageCache, false), dir, Target::Qsd, 1)
            .unwrap()
            .args();
        assert!(q[1].contains("cache.direct=off"), "{q:?}");
        let n = options(Mode::Null, false);
        let q = spec(&n, dir, Target::Qsd, 1).unwrap().args();
        assert!(q[1].starts_with("driver=null-co,") && q[1].contains("size=1048576"));
        let v = spec(&n, dir, Target::Vloop, 1).unwrap().args();
        assert!(v.windows(2).any(|p| p == ["--io-engine", "null"]), "{v:?}");
        assert!(!v.contains(&"--direct".to_string()));
        assert!(spec(&n, dir, Target::Raw, 1).is_none());
    }

    #[test]
    fn the_default_set_is_the_issues() {
        let names: Vec<String> = default_workloads(Duration::from_secs(1))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            names,
            [
                "4k randread QD1",
                "4k randread QD32",
                "4k randread QD32 x2q",
                "4k randwrite QD1",
                "4k randwrite QD32",
                "1M read QD8",
                "1M write QD8"
            ]
        );
    }
}
