//! `--compare`: the same workloads on vloop-blk, on qemu-storage-daemon (from its main loop and
//! from an iothread) and straight on the image file with io_uring, one target at a time
//! (vloop-blk locks the image), in the same cache mode everywhere, interleaved and repeated;
//! or, in null mode, vloop-blk's null engine against qemu-storage-daemon's `null-co` driver;
//! or, in qcow2 mode, vloop-blk and qemu-storage-daemon on a fully allocated qcow2 copy of the
//! image (and on empty overlays over it) against vloop-blk on the raw image.
//! It also measures each backend idle with a frontend connected, and the machine's load.
//!
//! [`run`] does the measuring (the I/O), `crate::images` prepares what is served, [`stats`]
//! summarises and compares the figures (pure), [`render`] turns a [`Report`] into the text
//! table; `crate::plot` draws it.

#[cfg(test)]
pub(crate) mod fixtures;
pub mod render;
pub mod stats;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use render::render;
pub use stats::{Footprint, Ratios, Round, Summary};

use crate::images::{self, prepare_image, ImageError, Qcow2Image, QemuImg, Scratch};
use crate::load::{client_options, run_raw, run_vhost, LoadError, Pattern, RunResult, Workload};
use crate::machine::{self, LoadSpan, Machine, MachineError};
use crate::procfs::{self, CpuSample, ThreadShare};
use crate::session::{turn_order, Session};
use crate::target;
pub use crate::target::{Mode, Target};
use crate::text::chain;
use vloop_frontend::backend::{BackendError, BackendProcess, BackendSpec, Export, ImageFormat};
use vloop_frontend::client::Client;

/// Errors of the comparison.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// An image could not be prepared.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The socket directory could not be created.
    #[error("cannot create a temporary directory for the sockets")]
    TempDir(#[source] std::io::Error),
    /// No workloads were given.
    #[error("no workloads to compare")]
    NoWorkloads,
    /// The qcow2 mode was asked for together with the null mode.
    #[error("the qcow2 mode serves images: it cannot be combined with the null mode")]
    Qcow2Null,
    /// A workload on an empty overlay was asked for outside the qcow2 mode.
    #[error("{0} runs on an empty qcow2 overlay: that needs the qcow2 mode")]
    OverlayWithoutQcow2(String),
    /// The load average could not be read.
    #[error("cannot read the machine's load average")]
    Load(#[source] MachineError),
}

/// What the runs of a row are served from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageState {
    /// The prepared image: the raw image, or in qcow2 mode (for the qcow2 targets) its fully
    /// allocated qcow2 copy, so writes land in place.
    #[default]
    Allocated,
    /// An empty image made fresh for every run of every target, so writes allocate: a qcow2
    /// overlay over the raw image (`qemu-img create -f qcow2 -F raw -b RAW`), or for
    /// vloop-raw a sparse raw file of the same size. Only in qcow2 mode.
    EmptyOverlay,
}

/// A workload and what it runs on: one row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// The workload.
    pub workload: Workload,
    /// What it runs on.
    pub on: ImageState,
}

impl Case {
    /// `w` on the prepared image.
    pub fn allocated(w: Workload) -> Self {
        Case {
            workload: w,
            on: ImageState::Allocated,
        }
    }

    /// `w` on a fresh empty overlay for every run, a sequential `w` going over the image once
    /// (so every write allocates).
    pub fn empty_overlay(w: Workload) -> Self {
        Case {
            workload: Workload {
                one_pass: true,
                ..w
            },
            on: ImageState::EmptyOverlay,
        }
    }
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.workload)?;
        if self.on == ImageState::EmptyOverlay {
            f.write_str(" overlay")?;
        }
        Ok(())
    }
}

/// Settings of a comparison.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// The raw image file (created or reused).
    pub image: PathBuf,
    /// Image size in bytes.
    pub image_size: u64,
    /// Recreate the image (and its qcow2 copy) even if one of the right size exists.
    pub fresh_image: bool,
    /// qcow2 mode: vloop-blk and qemu-storage-daemon serve the qcow2 copy of the image (or
    /// empty overlays over it), and vloop-blk on the raw image takes the raw column's place.
    pub qcow2: bool,
    /// The qemu-img binary (qcow2 mode).
    pub qemu_img_bin: PathBuf,
    /// The vloop-blk binary.
    pub vloop_bin: PathBuf,
    /// The qemu-storage-daemon binary.
    pub qsd_bin: PathBuf,
    /// Repetitions of every (target, workload) pair.
    pub rounds: u32,
    /// Cache mode, or null.
    pub mode: Mode,
    /// Workloads, each with its runtime and what it runs on.
    pub cases: Vec<Case>,
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
            .filter(|t| match t {
                Target::Vloop => true,
                Target::Qsd | Target::QsdIothread => !self.skip_qsd,
                Target::Raw => self.mode != Mode::Null && !self.qcow2,
                Target::VloopRaw => self.qcow2,
            })
            .collect()
    }

    /// The image `t` serves on the rows of the prepared image, and its format.
    pub fn image_of(&self, t: Target) -> (PathBuf, ImageFormat) {
        if self.qcow2 && t != Target::VloopRaw && t != Target::Raw {
            (
                images::qcow2_path(&self.image),
                ImageFormat::Qcow2 { cache_size: None },
            )
        } else {
            (self.image.clone(), ImageFormat::Raw)
        }
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
        one_pass: false,
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

/// The issue's qcow2 set with `runtime` per run: 4k random reads and writes at depth 1 and 32
/// on the fully allocated image (writes land in allocated clusters), and 1 MiB sequential
/// writes at depth 8 on an empty overlay (every write allocates).
pub fn qcow2_cases(runtime: Duration) -> Vec<Case> {
    let w = |pattern, bs: u32, iodepth| Workload {
        pattern,
        bs,
        iodepth,
        queues: 1,
        runtime,
        one_pass: false,
    };
    vec![
        Case::allocated(w(Pattern::RandRead, 4096, 1)),
        Case::allocated(w(Pattern::RandRead, 4096, 32)),
        Case::allocated(w(Pattern::RandWrite, 4096, 1)),
        Case::allocated(w(Pattern::RandWrite, 4096, 32)),
        Case::empty_overlay(w(Pattern::Write, 1 << 20, 8)),
    ]
}

/// One row of the table: a workload on every target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Row name: the workload's, with " overlay" on an empty overlay.
    pub name: String,
    /// The workload.
    pub workload: Workload,
    /// What it runs on.
    pub on: ImageState,
    /// vloop-blk.
    pub vloop: Summary,
    /// qemu-storage-daemon, main loop.
    pub qsd: Option<Summary>,
    /// qemu-storage-daemon, iothread.
    pub qsd_iothread: Option<Summary>,
    /// io_uring on the file.
    pub raw: Option<Summary>,
    /// vloop-blk on the raw image (qcow2 mode).
    pub vloop_raw: Option<Summary>,
    /// vloop against the better qsd, raw and vloop-raw.
    #[serde(flatten)]
    pub ratios: Ratios,
}

impl Row {
    fn new(c: &Case, targets: &[Target]) -> Self {
        let has = |t| targets.contains(&t).then(Summary::default);
        Row {
            name: c.to_string(),
            workload: c.workload,
            on: c.on,
            vloop: Summary::default(),
            qsd: has(Target::Qsd),
            qsd_iothread: has(Target::QsdIothread),
            raw: has(Target::Raw),
            vloop_raw: has(Target::VloopRaw),
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
            Target::VloopRaw => self.vloop_raw.as_ref(),
        }
    }

    fn get_mut(&mut self, t: Target) -> Option<&mut Summary> {
        match t {
            Target::Vloop => Some(&mut self.vloop),
            Target::Qsd => self.qsd.as_mut(),
            Target::QsdIothread => self.qsd_iothread.as_mut(),
            Target::Raw => self.raw.as_mut(),
            Target::VloopRaw => self.vloop_raw.as_mut(),
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

/// What one target serves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetImage {
    /// Which target.
    pub target: Target,
    /// The format it serves: `raw` or `qcow2`.
    pub format: &'static str,
    /// The image of the rows on the prepared image.
    pub image: PathBuf,
    /// What the rows on an empty overlay serve instead, made fresh for every run (None when
    /// no row does).
    pub empty_overlay: Option<String>,
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
    /// The qcow2 mode's fully allocated copy of the image (None outside that mode).
    pub qcow2: Option<Qcow2Image>,
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
    /// What each target serves, and in which format.
    pub images: Vec<TargetImage>,
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

/// Runs the comparison; progress goes to stderr.
pub fn run(opts: &CompareOptions) -> Result<Report, CompareError> {
    if opts.cases.is_empty() {
        return Err(CompareError::NoWorkloads);
    }
    if opts.qcow2 && opts.mode == Mode::Null {
        return Err(CompareError::Qcow2Null);
    }
    if let Some(c) = opts
        .cases
        .iter()
        .find(|c| !opts.qcow2 && c.on == ImageState::EmptyOverlay)
    {
        return Err(CompareError::OverlayWithoutQcow2(c.to_string()));
    }
    let session = Session::start(&opts.qsd_bin).map_err(CompareError::Load)?;
    let written = prepare_image(&opts.image, opts.image_size, opts.fresh_image)?;
    let qcow2 = if opts.qcow2 {
        let q = QemuImg(opts.qemu_img_bin.clone()).prepare_qcow2(
            &opts.image,
            opts.image_size,
            opts.fresh_image || written,
        )?;
        eprintln!(
            "qcow2 copy {}: {} of {} clusters allocated, {} MiB on disk",
            q.path.display(),
            q.check.allocated_clusters,
            q.check.total_clusters,
            q.info.actual_size.unwrap_or(0) >> 20
        );
        Some(q)
    } else {
        None
    };
    if opts.mode == Mode::PageCache {
        // Every target should find its image in the page cache, the first one too.
        images::warm_page_cache(&opts.image)?;
        if let Some(q) = &qcow2 {
            images::warm_page_cache(&q.path)?;
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("vloop-bench")
        .tempdir()
        .map_err(CompareError::TempDir)?;
    // The empty overlays live beside the image, on its file system (O_DIRECT and allocation
    // behave as they do for the image).
    let scratch_dir = opts
        .image
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let scratch = tempfile::Builder::new()
        .prefix(".vloop-bench-overlays")
        .tempdir_in(scratch_dir)
        .map_err(CompareError::TempDir)?;
    let targets = opts.targets();
    let overlays = opts.cases.iter().any(|c| c.on == ImageState::EmptyOverlay);
    let target_images = targets
        .iter()
        .map(|&t| {
            let (image, format) = opts.image_of(t);
            TargetImage {
                target: t,
                format: format.name(),
                image,
                empty_overlay: overlays.then(|| match format {
                    ImageFormat::Qcow2 { .. } => {
                        format!("an empty qcow2 overlay over {} (raw)", opts.image.display())
                    }
                    _ => format!("a sparse raw file of {} bytes", opts.image_size),
                }),
            }
        })
        .collect();
    let mut rows: Vec<Row> = opts.cases.iter().map(|c| Row::new(c, &targets)).collect();
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
        let queues = opts
            .cases
            .iter()
            .map(|c| c.workload.queues)
            .max()
            .unwrap_or(1);
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
    let budget = session.rounds(opts.time_budget);
    let mut rounds_done = 0;
    for round in 0..opts.rounds {
        if !budget.allows(round) {
            break;
        }
        rounds_done += 1;
        for (wi, row) in rows.iter_mut().enumerate() {
            // A new order for every (round, workload).
            for target in turn_order(&targets, round as usize + wi) {
                let facts = backends.iter_mut().find(|b| b.target == target);
                let load = machine::load_now();
                let case = Case {
                    workload: row.workload,
                    on: row.on,
                };
                let res = run_one(opts, dir.path(), scratch.path(), target, &case, facts);
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
            row.vloop_raw.as_ref(),
        );
    }
    let load = session.load_span().map_err(CompareError::Load)?;
    Ok(Report {
        started: session.started_at.clone(),
        mode: opts.mode,
        direct: opts.mode == Mode::Direct,
        qcow2,
        machine: session.machine.clone(),
        load,
        image: opts.image.clone(),
        image_size: opts.image_size,
        rounds: rounds_done,
        rounds_requested: opts.rounds,
        targets,
        images: target_images,
        rows,
        backends,
        wall_secs: session.wall_secs(),
    })
}

/// The spec that exports `image` (in `format`) with backend `target` and `queues` queues (None
/// for the raw target, which has no backend process).
fn spec(
    opts: &CompareOptions,
    dir: &Path,
    target: Target,
    queues: u16,
    (image, format): (&Path, ImageFormat),
) -> Option<BackendSpec> {
    let program = target.program(&opts.vloop_bin, &opts.qsd_bin)?;
    let socket = dir.join(format!("{}.sock", target.name()));
    let mut spec = BackendSpec::new(
        program,
        Export {
            queues,
            format,
            direct: opts.mode == Mode::Direct,
            null: (opts.mode == Mode::Null).then_some(opts.image_size),
            ..Export::new(image, &socket)
        },
    );
    if target.is_vloop() {
        spec.extra_args = opts.vloop_args.clone();
    }
    Some(spec)
}

/// Starts backend `target` on `image` and records its command line and start-up footprint in
/// `facts`.
fn start(
    opts: &CompareOptions,
    dir: &Path,
    target: Target,
    queues: u16,
    image: (&Path, ImageFormat),
    facts: &mut BackendFacts,
) -> Result<BackendProcess, String> {
    let spec = spec(opts, dir, target, queues, image).ok_or("no backend process to start")?;
    if facts.command.is_empty() {
        facts.command = target::command_line(&spec);
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
    let (image, format) = opts.image_of(target);
    let d = match start(opts, dir, target, queues, (&image, format), facts) {
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
        one_pass: false,
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
    let before = CpuSample::read(pid);
    let t0 = Instant::now();
    std::thread::sleep(secs);
    let elapsed = t0.elapsed().as_secs_f64();
    let used = before.until(&CpuSample::read(pid));
    idle.secs = elapsed;
    idle.rss_kib = procfs::rss_kib(pid).ok();
    let pct = |ns: f64| ns / 1e9 / elapsed * 100.0;
    idle.cpu_pct = used.threads_ns().map(|ns| pct(ns as f64));
    idle.threads = used.shares(|ns| pct(ns as f64));
    idle.cpu_pct_ticks = used.ticks.map(|t| pct(t.as_nanos() as f64));
    drop(client);
    if let Err(e) = finish(d, facts) {
        idle.failure = Some(e);
    }
    idle
}

/// The image `target` serves for one run of `case`: the prepared one, or a fresh empty overlay
/// made in `scratch` (removed when the returned guard is dropped).
fn served_image(
    opts: &CompareOptions,
    scratch: &Path,
    target: Target,
    case: &Case,
) -> Result<(PathBuf, ImageFormat, Option<Scratch>), String> {
    let (image, format) = opts.image_of(target);
    if case.on == ImageState::Allocated {
        return Ok((image, format, None));
    }
    let made = match format {
        ImageFormat::Qcow2 { .. } => {
            let s = Scratch::new(scratch.join(format!("{}.qcow2", target.name())));
            QemuImg(opts.qemu_img_bin.clone())
                .create_overlay(&opts.image, s.path())
                .map(|()| s)
        }
        _ => {
            let s = Scratch::new(scratch.join(format!("{}.raw", target.name())));
            images::create_sparse(s.path(), opts.image_size).map(|()| s)
        }
    };
    let s = made.map_err(|e| format!("cannot make the empty overlay: {}", chain(&e)))?;
    Ok((s.path().to_path_buf(), format, Some(s)))
}

/// Starts `target`'s backend (if any) with the workload's queue count on the image `case`
/// runs on, runs the workload once, stops it; returns the run and the backend's memory at its
/// end.
fn run_one(
    opts: &CompareOptions,
    dir: &Path,
    scratch: &Path,
    target: Target,
    case: &Case,
    facts: Option<&mut BackendFacts>,
) -> Result<(RunResult, Footprint), String> {
    let w = &case.workload;
    // Start every run with no dirty pages left over from the previous one, so writeback
    // throttling hits the run that caused it.
    let qcow2 = opts.qcow2.then(|| images::qcow2_path(&opts.image));
    images::sync(
        std::iter::once(&opts.image)
            .chain(&qcow2)
            .map(PathBuf::as_path),
    );
    let Some(facts) = facts else {
        let direct = opts.mode == Mode::Direct;
        return run_raw(&opts.image, w, direct)
            .map(|r| (r, Footprint::default()))
            .map_err(|e| chain(&e));
    };
    let (image, format, _scratch) = served_image(opts, scratch, target, case)?;
    let d = start(opts, dir, target, w.queues, (&image, format), facts)?;
    let r = run_vhost(d.socket(), w, Some(d.pid())).map_err(|e: LoadError| chain(&e));
    let memory = finish(d, facts)?;
    r.map(|r| (r, memory))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(mode: Mode, skip_qsd: bool) -> CompareOptions {
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
        // qcow2: vloop-blk on the raw image takes the raw column's place.
        let q = |mode, skip_qsd| CompareOptions {
            qcow2: true,
            ..options(mode, skip_qsd)
        };
        assert_eq!(
            q(Mode::PageCache, false).targets(),
            [Vloop, Qsd, QsdIothread, VloopRaw]
        );
        assert_eq!(q(Mode::Direct, true).targets(), [Vloop, VloopRaw]);
    }

    fn args(o: &CompareOptions, t: Target, queues: u16) -> Vec<String> {
        let (image, format) = o.image_of(t);
        spec(o, Path::new("/tmp/d"), t, queues, (&image, format))
            .unwrap()
            .args()
    }

    #[test]
    fn the_qcow2_mode_serves_the_qcow2_copy_and_vloop_raw_the_raw_image() {
        let o = CompareOptions {
            qcow2: true,
            ..options(Mode::Direct, false)
        };
        let v = args(&o, Target::Vloop, 1);
        assert_eq!(
            v[..6],
            [
                "--socket-path",
                "/tmp/d/vloop.sock",
                "--blk-file",
                "/tmp/i.img.qcow2",
                "--format",
                "qcow2"
            ]
        );
        assert!(v.contains(&"--direct".to_string()), "{v:?}");
        let r = args(&o, Target::VloopRaw, 1);
        assert_eq!(
            r[..6],
            [
                "--socket-path",
                "/tmp/d/vloop-raw.sock",
                "--blk-file",
                "/tmp/i.img",
                "--format",
                "raw"
            ]
        );
        assert!(r.ends_with(&["--queue-size=512".to_string()]), "{r:?}");
        for t in [Target::Qsd, Target::QsdIothread] {
            let q = args(&o, t, 1);
            let at = if t == Target::Qsd { 0 } else { 2 };
            assert!(
                q[at + 1].contains("filename=/tmp/i.img.qcow2,")
                    && q[at + 1].contains("cache.direct=on"),
                "{q:?}"
            );
            assert_eq!(q[at + 3], "driver=qcow2,node-name=q,file=f,discard=unmap");
            assert!(q[at + 5].contains(",node-name=q,"), "{q:?}");
        }
        // Outside the qcow2 mode every side serves the raw image as raw.
        let p = options(Mode::PageCache, false);
        assert_eq!(p.image_of(Target::Vloop).1, ImageFormat::Raw);
        assert!(args(&p, Target::Vloop, 1).ends_with(&[
            "--format".to_string(),
            "raw".to_string(),
            "--queue-size=512".to_string()
        ]));
        assert!(!args(&p, Target::Qsd, 1).concat().contains("qcow2"));
    }

    #[test]
    fn the_qcow2_set_is_the_issues() {
        let cases = qcow2_cases(Duration::from_secs(1));
        let names: Vec<String> = cases.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "4k randread QD1",
                "4k randread QD32",
                "4k randwrite QD1",
                "4k randwrite QD32",
                "1M write QD8 overlay"
            ]
        );
        assert!(cases[..4]
            .iter()
            .all(|c| c.on == ImageState::Allocated && !c.workload.one_pass));
        // The overlay is written once per run: every write allocates.
        assert_eq!(cases[4].on, ImageState::EmptyOverlay);
        assert!(cases[4].workload.one_pass);
    }

    #[test]
    fn modes_that_cannot_hold_together_are_refused_before_any_work() {
        let mut o = options(Mode::Null, false);
        o.qcow2 = true;
        assert!(matches!(run(&o), Err(CompareError::Qcow2Null)));
        let mut o = options(Mode::PageCache, false);
        o.cases = qcow2_cases(Duration::from_secs(1));
        match run(&o) {
            Err(CompareError::OverlayWithoutQcow2(name)) => {
                assert_eq!(name, "1M write QD8 overlay")
            }
            other => panic!("{other:?}"),
        }
        o.cases.clear();
        assert!(matches!(run(&o), Err(CompareError::NoWorkloads)));
    }

    #[test]
    fn every_side_gets_the_same_cache_mode() {
        let o = options(Mode::Direct, false);
        let v = args(&o, Target::Vloop, 2);
        assert!(v.contains(&"--direct".to_string()), "{v:?}");
        assert!(v.ends_with(&["--queue-size=512".to_string()]), "{v:?}");
        let q = args(&o, Target::QsdIothread, 2);
        assert!(q[0..2] == ["--object", "iothread,id=iothread0"], "{q:?}");
        assert!(q[3].contains("cache.direct=on"), "{q:?}");
        assert!(q[5].contains("num-queues=2") && q[5].ends_with("iothread=iothread0"));
        let q = args(&options(Mode::PageCache, false), Target::Qsd, 1);
        assert!(q[1].contains("cache.direct=off"), "{q:?}");
        let n = options(Mode::Null, false);
        let q = args(&n, Target::Qsd, 1);
        assert!(q[1].starts_with("driver=null-co,") && q[1].contains("size=1048576"));
        let v = args(&n, Target::Vloop, 1);
        assert!(v.windows(2).any(|p| p == ["--io-engine", "null"]), "{v:?}");
        assert!(!v.contains(&"--direct".to_string()));
        let image = Path::new("/tmp/i.img");
        let raw = (image, ImageFormat::Raw);
        assert!(spec(&n, Path::new("/tmp/d"), Target::Raw, 1, raw).is_none());
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
