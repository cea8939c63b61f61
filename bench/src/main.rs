//! vloop-bench: drive a vhost-user-blk backend (or a raw file) with a workload, compare
//! vloop-blk with qemu-storage-daemon (main loop and iothread) and raw io_uring on a raw image
//! or on its qcow2 copy, or compare them from inside a guest.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use vloop_bench::compare::{self, CompareOptions};
use vloop_bench::guest::{self, GuestOptions};
use vloop_bench::load::{self, Workload, WorkloadWords};
use vloop_bench::target::{self, Mode};
use vloop_bench::text::{parse_duration, parse_optional_duration};
use vloop_harness::accel::AccelChoice;
use vloop_harness::setup::SetupOptions;
use vloop_images::size::parse_bytes;

/// A vhost-user-blk frontend load generator.
///
/// One workload against a backend socket (--socket), or on a file with io_uring (--raw),
/// or the full comparison of vloop-blk, qemu-storage-daemon (main loop and iothread) and raw
/// io_uring (--compare), or of vloop-blk and qemu-storage-daemon seen from a guest (--guest).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// vhost-user-blk socket of a running backend.
    #[arg(long, conflicts_with_all = ["raw", "compare"])]
    socket: Option<PathBuf>,
    /// Run the workload directly on this file with io_uring.
    #[arg(long, conflicts_with = "compare")]
    raw: Option<PathBuf>,
    /// Compare vloop-blk, qemu-storage-daemon (main loop and iothread) and raw io_uring on one
    /// image, in the same cache mode on every side.
    #[arg(long)]
    compare: bool,
    /// With --compare: vloop-blk's null engine against qemu-storage-daemon's null-co driver
    /// (no image I/O, no raw column): what the vhost-user hop itself costs.
    #[arg(long, requires = "compare", conflicts_with = "direct")]
    null: bool,
    /// With --compare: vloop-blk, qemu-storage-daemon and its iothread serve a fully allocated
    /// qcow2 copy of the image (made beside it with qemu-img convert), vloop-blk on the raw
    /// image (vloop-raw) takes the raw column's place; the workloads are 4k random reads and
    /// writes at QD1 and QD32 and 1 MiB sequential writes at QD8 on an empty overlay.
    #[arg(long, requires = "compare", conflicts_with = "null")]
    qcow2: bool,
    /// With --qcow2 --only: run the workload on an empty qcow2 overlay over the raw image (for
    /// vloop-raw a sparse raw file), made fresh for every run, so writes allocate.
    #[arg(long, requires_all = ["qcow2", "only"])]
    empty_overlay: bool,
    /// qemu-img binary for --qcow2.
    #[arg(long, default_value = "qemu-img")]
    qemu_img_bin: PathBuf,
    /// Boot a guest (TCG unless KVM provably works) on each backend in turn, vloop-blk and
    /// qemu-storage-daemon with an iothread, the image its one virtio-blk disk in the same
    /// cache mode on both, and run 1 MiB sequential and 4k random phases with O_DIRECT in it;
    /// the host reads the backend's CPU time as each phase begins and ends.
    #[arg(long, conflicts_with_all = ["socket", "raw", "compare", "null"])]
    guest: bool,
    /// With --guest: also qemu-storage-daemon serving from its main loop.
    #[arg(long, requires = "guest")]
    qsd_main_loop: bool,
    /// With --guest: the guests' accelerator (auto: KVM only when a probe runs a vCPU).
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// With --guest: the guest kernel (default: Debian's cloud kernel, fetched into the cache).
    #[arg(long, requires = "guest")]
    kernel: Option<PathBuf>,
    /// With --guest: the idle time in the guest after each phase begins and before it ends,
    /// while the host reads the backend's CPU time ("0" for none).
    #[arg(long, default_value = "200ms")]
    guest_gap: String,

    /// read, write, randread, randwrite or mixed.
    #[arg(short, long, default_value = "randread")]
    workload: String,
    /// Percentage of reads for the mixed workload.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmixread: u8,
    /// Block size (512-byte multiple; k/M suffixes).
    #[arg(long, default_value = "4k")]
    bs: String,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1)]
    iodepth: u16,
    /// Queues, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// With --socket or --raw: each of the --iodepth requests in flight is a stream that waits
    /// this long after its completion before it sends the next (a process computing between
    /// its I/Os), so requests arrive while others are in flight; the queue's thread spins
    /// meanwhile, so they go out on time.
    #[arg(long, default_value_t = 0)]
    think_us: u64,
    /// Duration of each run ("5s", "500ms"; default 5s, 2s per run with --compare, 3s per
    /// phase with --guest).
    #[arg(long)]
    runtime: Option<String>,
    /// Open the image with O_DIRECT (raw runs and the backends --compare and --guest start).
    #[arg(long)]
    direct: bool,
    /// With --socket: random reads and writes (half each) whose data is checked; fails on
    /// any mismatch.
    #[arg(long, requires = "socket")]
    verify: bool,
    /// Do not negotiate INFLIGHT_SHMFD (QEMU does).
    #[arg(long)]
    no_inflight: bool,
    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    no_event_idx: bool,
    /// With --socket: do not negotiate VIRTIO_BLK_F_FLUSH (nor CONFIG_WCE), so the backend
    /// writes every write through to stable storage, as for a guest without a write cache.
    #[arg(long, requires = "socket")]
    no_flush: bool,
    /// PID of the backend, for its CPU time per request.
    #[arg(long)]
    backend_pid: Option<u32>,

    /// Image for --compare and --guest (created if missing or of another size).
    #[arg(long, default_value = "/var/tmp/vloop-bench.img")]
    image: PathBuf,
    /// Size of the --compare image.
    #[arg(long, default_value = "1G")]
    image_size: String,
    /// Recreate the --compare image (and its qcow2 copy) even if it exists.
    #[arg(long)]
    fresh_image: bool,
    /// vloop-blk binary for --compare (default: beside this program).
    #[arg(long)]
    vloop_bin: Option<PathBuf>,
    /// Rounds of --compare (interleaved: each round runs every workload on every target) or
    /// of --guest (each round boots one guest per backend, the order rotating).
    #[arg(long, default_value_t = 4)]
    rounds: u32,
    /// With --compare: measure each backend's CPU for this long with a frontend connected and
    /// its queues set up but no I/O ("0" skips it).
    #[arg(long, default_value = "10s")]
    idle: String,
    /// qemu-storage-daemon binary for --compare.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd_bin: PathBuf,
    /// Extra argument for vloop-blk in --compare and --guest (repeatable, e.g.
    /// --vloop-arg=--queue-size=512).
    #[arg(long = "vloop-arg", allow_hyphen_values = true)]
    vloop_args: Vec<String>,
    /// --compare starts no round that would end after this much time.
    #[arg(long, default_value = "900s")]
    time_budget: String,
    /// Leave qemu-storage-daemon out of --compare.
    #[arg(long)]
    no_qsd: bool,
    /// With --compare or --guest: run only the workload given by the options above, not the
    /// default set.
    #[arg(long)]
    only: bool,

    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// With --compare: draw IOPS and p50 latency per workload and target into this SVG file.
    #[arg(long, requires = "compare")]
    plot: Option<PathBuf>,
}

impl Args {
    /// `--runtime`, `default` when not given.
    fn runtime(&self, default: &str) -> Result<Duration> {
        Ok(parse_duration(self.runtime.as_deref().unwrap_or(default))?)
    }

    /// The workload of `-w`, `--rwmixread`, `--bs`, `--iodepth` and `--queues`, run for
    /// `runtime`.
    fn workload(&self, runtime: Duration) -> Result<Workload> {
        let words = WorkloadWords {
            pattern: &self.workload,
            rwmixread: self.rwmixread,
            bs: &self.bs,
            iodepth: self.iodepth,
            queues: self.queues,
        };
        let mut w = words.workload(runtime)?;
        w.think = Duration::from_micros(self.think_us);
        Ok(w)
    }
}

/// Prints to stdout; a closed stdout (`| head`) is not an error worth a panic.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn write_json<T: serde::Serialize>(path: &PathBuf, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text + "\n")
        .with_context(|| format!("cannot write JSON to {}", path.display()))
}

fn run_guest(a: &Args) -> Result<()> {
    let runtime = a.runtime("3s")?;
    let only = a.only.then(|| a.workload(runtime)).transpose()?;
    let phases = guest::phases(only.as_ref(), runtime)?;
    if !a.no_qsd {
        target::require_qsd(&a.qsd_bin)?;
    }
    let opts = GuestOptions {
        image: a.image.clone(),
        image_size: parse_bytes(&a.image_size)?,
        fresh_image: a.fresh_image,
        vloop_bin: target::vloop_bin(a.vloop_bin.clone()),
        qsd_bin: a.qsd_bin.clone(),
        rounds: a.rounds.max(1),
        mode: Mode::of(false, a.direct),
        phases,
        targets: guest::targets(a.no_qsd, a.qsd_main_loop),
        vloop_args: a.vloop_args.clone(),
        setup: SetupOptions {
            accel: a.accel,
            kernel: a.kernel.clone(),
            ..SetupOptions::default()
        },
        gap: parse_optional_duration(&a.guest_gap)?.unwrap_or(Duration::ZERO),
        time_budget: Some(parse_duration(&a.time_budget)?),
    };
    let report = guest::run(&opts)?;
    out(&guest::render(&report));
    if let Some(p) = &a.json {
        write_json(p, &report)?;
    }
    if report.interrupted {
        bail!("interrupted: the table shows the guests that ran");
    }
    Ok(())
}

fn run_compare(a: &Args) -> Result<()> {
    let runtime = a.runtime("2s")?;
    let only = a.only.then(|| a.workload(runtime)).transpose()?;
    let cases = compare::cases(only, a.empty_overlay, a.qcow2, runtime);
    let vloop_bin = target::vloop_bin(a.vloop_bin.clone());
    if !a.no_qsd {
        target::require_qsd(&a.qsd_bin)?;
    }
    let opts = CompareOptions {
        image: a.image.clone(),
        image_size: parse_bytes(&a.image_size)?,
        fresh_image: a.fresh_image,
        qcow2: a.qcow2,
        qemu_img_bin: a.qemu_img_bin.clone(),
        vloop_bin,
        qsd_bin: a.qsd_bin.clone(),
        rounds: a.rounds.max(1),
        mode: Mode::of(a.null, a.direct),
        cases,
        skip_qsd: a.no_qsd,
        vloop_args: a.vloop_args.clone(),
        time_budget: Some(parse_duration(&a.time_budget)?),
        idle: parse_optional_duration(&a.idle)?,
    };
    let report = compare::run(&opts)?;
    out(&compare::render(&report));
    if let Some(p) = &a.json {
        write_json(p, &report)?;
    }
    if let Some(p) = &a.plot {
        let svg = vloop_bench::plot::svg(&report)?;
        std::fs::write(p, svg)
            .with_context(|| format!("cannot write the chart to {}", p.display()))?;
    }
    Ok(())
}

fn run(a: Args) -> Result<()> {
    if a.guest {
        return run_guest(&a);
    }
    if a.compare {
        return run_compare(&a);
    }
    let w = a.workload(a.runtime("5s")?)?;
    if let (true, Some(sock)) = (a.verify, &a.socket) {
        let r = vloop_bench::verify::run_verify(sock, &w)
            .with_context(|| format!("verifying {w} against {}", sock.display()))?;
        out(&r.text(&w));
        if let Some(p) = &a.json {
            write_json(p, &r)?;
        }
        if let Some(why) = r.failure() {
            bail!("{why}");
        }
        return Ok(());
    }
    let result = if let Some(sock) = &a.socket {
        load::run_vhost_with(sock, &w, a.backend_pid, |o| {
            o.inflight &= !a.no_inflight;
            o.event_idx &= !a.no_event_idx;
            o.flush &= !a.no_flush;
        })
        .with_context(|| format!("running {w} against {}", sock.display()))?
    } else if let Some(file) = &a.raw {
        load::run_raw(file, &w, a.direct)
            .with_context(|| format!("running {w} on {}", file.display()))?
    } else {
        bail!("nothing to do: pass --socket PATH, --raw FILE, --compare or --guest");
    };
    out(&result.text(&w));
    if let Some(p) = &a.json {
        write_json(
            p,
            &serde_json::json!({ "workload": w, "name": w.to_string(), "result": result }),
        )?;
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
