//! `vloop-harness`: boots QEMU guests on vhost-user-blk disks; `run` runs the scenarios (the
//! conformance suite of any backend with `--backend-cmd`), `exec` runs any command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use vloop_frontend::backend::Template;
use vloop_harness::accel::AccelChoice;
use vloop_harness::backend::BackendKind;
use vloop_harness::exec::spec::{CopyIn, CopyOut, DiskArg, MountArg};
use vloop_harness::images::ImageTools;
use vloop_harness::report;
use vloop_harness::run::parse_shard;
use vloop_harness::scenario::{Status, SCENARIOS};
use vloop_harness::setup::SetupOptions;
use vloop_harness::{BackendChoice, ExecOptions, RunError, RunOptions};

#[derive(Parser)]
#[command(
    name = "vloop-harness",
    version,
    about = "Boots real Linux guests on vhost-user-blk disks: runs vloop's scenarios (the conformance suite of any backend) or any command"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenarios (default: ext2-format and iso) and print a table of results.
    ///
    /// Exit status: 0 when every scenario passed, 1 when one failed, 2 when one could not
    /// run here (the table says "not run" and why) or the command line is wrong.
    Run(RunArgs),
    /// Boot a guest on the given disks, run COMMAND in it, stream its output, exit with its
    /// status.
    ///
    /// The disks are /dev/vda, /dev/vdb... in --disk order, each served by its own backend
    /// process; busybox's applets are on PATH; the command runs in /root with stdin empty.
    /// Exit status: COMMAND's (128+N for signal N, 127 not found, 126 not runnable); 125
    /// when the harness, the guest or a backend failed before the command finished (or files
    /// could not be copied out after a command that succeeded); 130/143 on Ctrl-C/SIGTERM
    /// (the guest and backends are stopped, what the run created is removed). With
    /// --console the terminal is the guest's console: quit with Ctrl-a x.
    #[command(
        after_help = "Examples:\n  vloop-harness exec -- uname -a\n  vloop-harness exec --disk my.img,ro --copy-in /sbin/e2fsck.static:/bin/e2fsck -- e2fsck -fn /dev/vda\n  vloop-harness exec --disk new.img,size=64M --copy-out /root/hello.txt:. -- sh -c 'mke2fs -q /dev/vda && echo hi > hello.txt'\n  vloop-harness exec --disk data.img --mount 0:/mnt --console"
    )]
    Exec(ExecArgs),
}

/// Options of both commands: kernel, guest, accelerator.
#[derive(clap::Args)]
struct GuestArgs {
    /// Accelerator: auto probes KVM (a vCPU must run) and falls back to TCG; e.g. `--accel tcg`.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// Guest kernel image (default: the distribution's cloud/virtual kernel, fetched and
    /// cached); e.g. `--kernel /boot/vmlinuz-6.1.0-57-cloud-amd64`.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Modules tree of --kernel; e.g. `--modules /lib/modules/6.1.0-57-cloud-amd64`.
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,
    /// Static guest agent (default: built from the workspace with cargo); e.g.
    /// `--guest-bin target/x86_64-unknown-linux-gnu/release/vloop-guest`.
    #[arg(long, value_name = "PATH", env = "VLOOP_GUEST")]
    guest_bin: Option<PathBuf>,
    /// Guest RAM in MiB; e.g. `--memory 512`.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Time-out in seconds under KVM for a guest to start (and for a scenario's guest to
    /// finish); TCG gets ten times this; e.g. `--timeout 20`.
    #[arg(long, default_value_t = 12)]
    timeout: u64,
    /// Extra kernel command-line words; e.g. `--append "loglevel=7"`.
    #[arg(long, default_value = "")]
    append: String,
    /// Boot the bzImage through the firmware instead of the extracted vmlinux's PVH entry;
    /// e.g. `--no-pvh`.
    #[arg(long)]
    no_pvh: bool,
    /// Which program serves the disks; e.g. `--backend qsd`.
    #[arg(long, value_enum, default_value = "vloop")]
    backend: BackendKind,
    /// Backend program (default: vloop-blk beside this program, or qemu-storage-daemon);
    /// e.g. `--backend-bin ./target/release/vloop-blk`.
    #[arg(long, value_name = "PATH")]
    backend_bin: Option<PathBuf>,
    /// Any vhost-user-blk backend, as a command with {socket}, {image}, {writable} (on/off)
    /// and {queues} filled in per disk; e.g. `--backend-cmd 'qemu-storage-daemon --blockdev
    /// driver=file,node-name=f,filename={image} --export
    /// type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={socket},writable={writable}'`.
    #[arg(long, value_name = "TEMPLATE", value_parser = parse_template)]
    backend_cmd: Option<Template>,
}

fn parse_template(s: &str) -> Result<Template, String> {
    Template::parse(s).map_err(|e| e.to_string())
}

impl GuestArgs {
    fn setup(&self) -> SetupOptions {
        SetupOptions {
            accel: self.accel,
            kernel: self.kernel.clone(),
            modules: self.modules.clone(),
            guest_bin: self.guest_bin.clone(),
            mem_mib: self.memory,
            timeout_s: self.timeout,
            append: self.append.clone(),
            pvh: !self.no_pvh,
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Scenario to run (repeatable; `all` for every one); e.g. `--scenario iso`.
    #[arg(long = "scenario", short = 's', value_name = "NAME")]
    scenarios: Vec<String>,
    /// List the scenarios and the options, and exit; e.g. `--list`.
    #[arg(long)]
    list: bool,
    /// Guests running at once (default: number of CPUs); e.g. `--jobs 2`.
    #[arg(long, short = 'j')]
    jobs: Option<usize>,
    /// Run a stable subset I of N (1-based), for CI matrices; e.g. `--shard 2/3`.
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Which writers make the scenarios' images: vloop's own, or system tools (truncate,
    /// mke2fs -d, xorriso, cp) to compare; e.g. `--image-tools system`.
    #[arg(long, value_enum, default_value = "vloop")]
    image_tools: ImageTools,
    /// Directory for the logs and images of failed scenarios; e.g. `--results out/guests`.
    #[arg(long, value_name = "DIR", default_value = "results")]
    results: PathBuf,
    /// Write a JSON report; e.g. `--json results/report.json`.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a JUnit XML report; e.g. `--junit results/junit.xml`.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Keep logs and images of passed scenarios too; e.g. `--keep`.
    #[arg(long)]
    keep: bool,
    #[command(flatten)]
    guest: GuestArgs,
}

#[derive(clap::Args)]
struct ExecArgs {
    /// A disk: an image and QEMU-style options (ro, size=SIZE to create it sparse when
    /// missing, queues=N, backend=vloop|qsd|cmd); repeatable, /dev/vda first; e.g.
    /// `--disk cd.iso,ro` or `--disk new.img,size=64M`.
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<DiskArg>,
    /// Put a host file or folder in the guest before the command (default: into /root;
    /// a GUEST ending in / or naming a folder gets it inside); e.g. `--copy-in test.sh:/root/`.
    #[arg(long = "copy-in", value_name = "HOST[:GUEST]")]
    copy_in: Vec<CopyIn>,
    /// Bring a guest file or folder back after the command, also when it failed (into HOST
    /// when that is a folder); e.g. `--copy-out /root/out.txt:results/`.
    #[arg(long = "copy-out", value_name = "GUEST:HOST")]
    copy_out: Vec<CopyOut>,
    /// Mount disk N (0 is /dev/vda; or its name, vdb) at a guest path before the command:
    /// ext2/3/4 or ISO 9660, read-only when the disk is; e.g. `--mount 0:/mnt`.
    #[arg(long = "mount", value_name = "N:PATH")]
    mounts: Vec<MountArg>,
    /// Attach the terminal to the guest's console (a busybox shell when no COMMAND is
    /// given); quit with Ctrl-a x; e.g. `--console`.
    #[arg(long)]
    console: bool,
    /// vCPUs; e.g. `--cpus 2`.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Stop the guest after this many seconds (default: no limit once it started); e.g.
    /// `--run-timeout 600`.
    #[arg(long, value_name = "SECS")]
    run_timeout: Option<u64>,
    /// Where the run's folder (console, QEMU and backend logs) goes (default: the temporary
    /// directory); it is kept when the run fails; e.g. `--results out/`.
    #[arg(long, value_name = "DIR")]
    results: Option<PathBuf>,
    /// Keep the run's folder when the command succeeds too; e.g. `--keep`.
    #[arg(long)]
    keep: bool,
    /// Print no summary line on stderr when the command succeeds; e.g. `--quiet`.
    #[arg(long, short = 'q')]
    quiet: bool,
    #[command(flatten)]
    guest: GuestArgs,
    /// The command and its arguments, after `--`; e.g. `-- sh -c 'echo hi'`.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// The scenarios, then every option of `run` with its help (and example).
fn list() -> String {
    let mut s = String::from("Scenarios (`--scenario NAME`, `all` for every one):\n");
    for sc in SCENARIOS {
        s.push_str(&format!(
            "  {:<12} {}{}\n  {:<12} exercises: {}\n",
            sc.name,
            if sc.default { "(default) " } else { "" },
            sc.about,
            "",
            sc.exercises
        ));
    }
    s.push_str("\nOptions of `vloop-harness run`:\n");
    let cmd = Cli::command();
    if let Some(run) = cmd.find_subcommand("run") {
        for a in run.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            s.push_str(&format!("  --{long:<14} {help}\n"));
        }
    }
    s
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run(a) => run(a),
        Cmd::Exec(a) => exec(a),
    }
}

fn backend_choice(g: &GuestArgs) -> BackendChoice {
    match &g.backend_cmd {
        Some(t) => BackendChoice::Template(t.clone()),
        None => BackendChoice::Known {
            kind: g.backend,
            bin: g.backend_bin.clone(),
        },
    }
}

fn run(a: RunArgs) -> ExitCode {
    if a.list {
        print!("{}", list());
        return ExitCode::SUCCESS;
    }
    let opts = RunOptions {
        scenarios: a.scenarios,
        jobs: a
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        shard: a.shard,
        backend: backend_choice(&a.guest),
        setup: a.guest.setup(),
        image_tools: a.image_tools,
        results: a.results,
        json: a.json,
        junit: a.junit,
        keep: a.keep,
    };
    match vloop_harness::run(&opts) {
        Ok(outcomes) => {
            let (_, failed, not_run) = report::counts(&outcomes);
            if let Some(sig) = vloop_harness::interrupt::requested() {
                eprintln!(
                    "vloop-harness: interrupted by {sig}; the guests and backends were stopped"
                );
                ExitCode::from(vloop_harness::interrupt::exit_status(sig))
            } else if failed > 0 {
                ExitCode::from(1)
            } else if not_run > 0 {
                let names: Vec<&str> = outcomes
                    .iter()
                    .filter(|o| o.status == Status::NotRun)
                    .map(|o| o.name.as_str())
                    .collect();
                eprintln!("vloop-harness: not run: {}", names.join(", "));
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {}", vloop_harness::scenario::chain(&e));
            match e {
                RunError::Write(..) => ExitCode::from(1),
                RunError::Usage(_) => ExitCode::from(2),
            }
        }
    }
}

fn exec(a: ExecArgs) -> ExitCode {
    let opts = ExecOptions {
        disks: a.disks,
        copy_in: a.copy_in,
        copy_out: a.copy_out,
        mounts: a.mounts,
        console: a.console,
        backend: a.guest.backend,
        backend_bin: a.guest.backend_bin.clone(),
        backend_cmd: a.guest.backend_cmd.clone(),
        setup: a.guest.setup(),
        cpus: a.cpus,
        timeout: a.run_timeout.map(Duration::from_secs),
        results: a.results,
        keep: a.keep,
        command: a.command,
    };
    let r = vloop_harness::exec(&opts);
    if let Some(e) = &r.error {
        eprintln!("vloop-harness: error: {e}");
    }
    if let Some(k) = &r.kept {
        eprintln!(
            "vloop-harness: console, QEMU and backend logs kept in {}",
            k.display()
        );
    }
    if !(a.quiet && r.status == 0) {
        eprintln!("{}", r.summary());
    }
    ExitCode::from(r.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_has_an_example() {
        let cmd = Cli::command();
        for sub in ["run", "exec"] {
            let c = cmd.find_subcommand(sub).unwrap();
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(
                    help.contains("e.g. `"),
                    "{sub} {id}: no example in {help:?}"
                );
            }
        }
        let l = list();
        assert!(l.contains("ext2-format") && l.contains("--backend-cmd") && l.contains("e.g."));
    }

    #[test]
    fn exec_takes_its_command_after_the_options() {
        let cli = Cli::try_parse_from([
            "vloop-harness",
            "exec",
            "--disk",
            "a.img,ro",
            "--mount",
            "0:/mnt",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .unwrap();
        let Cmd::Exec(a) = cli.cmd else {
            panic!("not exec")
        };
        assert_eq!(a.command, ["sh", "-c", "exit 3"]);
        assert!(a.disks[0].readonly);
        assert!(
            Cli::try_parse_from(["vloop-harness", "exec", "--disk", "a,bogus", "--", "true"])
                .is_err()
        );
        assert!(Cli::try_parse_from([
            "vloop-harness",
            "run",
            "--backend-cmd",
            "blk --image {image}"
        ])
        .is_err());
    }
}
