//! `vloop-harness`: boots QEMU guests against vhost-user-blk disks and reports what works.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vloop_harness::accel::AccelChoice;
use vloop_harness::backend::BackendKind;
use vloop_harness::run::parse_shard;
use vloop_harness::scenario::SCENARIOS;
use vloop_harness::{RunError, RunOptions};

#[derive(Parser)]
#[command(
    name = "vloop-harness",
    version,
    about = "Boots real Linux guests on vhost-user-blk disks and verifies them inside the guest and on the host"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenarios (default: ext2-format and iso) and print a table of results.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Scenario to run (repeatable; `all` for every one).
    #[arg(long = "scenario", short = 's', value_name = "NAME")]
    scenarios: Vec<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Guests running at once (default: number of CPUs).
    #[arg(long, short = 'j')]
    jobs: Option<usize>,
    /// Run a stable subset I of N (1-based), for CI matrices.
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Which backend serves the disks.
    #[arg(long, value_enum, default_value = "vloop")]
    backend: BackendKind,
    /// Backend program (default: vloop-blk beside this program, or qemu-storage-daemon).
    #[arg(long, value_name = "PATH")]
    backend_bin: Option<PathBuf>,
    /// Accelerator: auto probes KVM and falls back to TCG.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// Guest kernel image (default: the distribution's cloud/virtual kernel, fetched and cached).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Modules tree of --kernel (lib/modules/VERSION).
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,
    /// Static guest agent (default: built from the workspace with cargo).
    #[arg(long, value_name = "PATH", env = "VLOOP_GUEST")]
    guest_bin: Option<PathBuf>,
    /// vloop-image program (default: beside this program; standard tools if absent).
    #[arg(long, value_name = "PATH")]
    image_bin: Option<PathBuf>,
    /// Directory for the logs and images of failed scenarios.
    #[arg(long, value_name = "DIR", default_value = "results")]
    results: PathBuf,
    /// Write a JSON report.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a JUnit XML report.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Keep logs and images of passed scenarios too.
    #[arg(long)]
    keep: bool,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Per-boot time-out in seconds under KVM; TCG gets ten times this.
    #[arg(long, default_value_t = 12)]
    timeout: u64,
    /// Extra kernel command-line words.
    #[arg(long, default_value = "")]
    append: String,
    /// Boot the bzImage through the firmware instead of the extracted vmlinux's PVH entry.
    #[arg(long)]
    no_pvh: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Cmd::Run(a) = Cli::parse().cmd;
    if a.list {
        for s in SCENARIOS {
            println!(
                "{:<12} {}{}",
                s.name,
                if s.default { "(default) " } else { "" },
                s.about
            );
        }
        return ExitCode::SUCCESS;
    }
    let opts = RunOptions {
        scenarios: a.scenarios,
        jobs: a
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        shard: a.shard,
        backend: a.backend,
        backend_bin: a.backend_bin,
        accel: a.accel,
        kernel: a.kernel,
        modules: a.modules,
        guest_bin: a.guest_bin,
        image_bin: a.image_bin,
        results: a.results,
        json: a.json,
        junit: a.junit,
        keep: a.keep,
        mem_mib: a.memory,
        timeout_s: a.timeout,
        append: a.append,
        pvh: !a.no_pvh,
    };
    match vloop_harness::run(&opts) {
        Ok(outcomes) if outcomes.iter().all(|o| o.passed) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            match e {
                RunError::Write(..) => ExitCode::from(1),
                _ => ExitCode::from(2),
            }
        }
    }
}
