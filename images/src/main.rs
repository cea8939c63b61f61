//! `vloop-image`: create, build, copy and inspect disk images.
//!
//! A thin front end: parse the command line, call the `vloop_images` library, print a short
//! summary. Every error is one `error: …` line and exit status 1 (usage errors: 2).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tracing_subscriber::EnvFilter;
use vloop_images::convert::{self, ConvertError, ConvertOptions};
use vloop_images::copy::{self, CopyOptions};
use vloop_images::create::{self, BackingOptions, CreateOptions};
use vloop_images::folder::{self, BuildOptions, Hashing};
use vloop_images::image::Format;
use vloop_images::input::Cancel;
use vloop_images::output::Unfinished;
use vloop_images::size::Size;
use vloop_images::{ext2, info, iso, report};

/// Create, build, copy, convert and inspect disk images (raw and qcow2).
///
/// Sizes are bytes or take a suffix: K, M, G, T (powers of 1024, also KiB...), KB, MB, GB,
/// TB (powers of 1000), s (512-byte sectors): 10M, 1GiB, 20480s, 1.5G.
#[derive(Debug, Parser)]
#[command(name = "vloop-image", version)]
struct Cli {
    /// More log output on stderr (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a blank image: raw (sparse unless --preallocate) or qcow2 (optionally over a
    /// backing file).
    Create(CreateArgs),
    /// Build an ext2 file system image from a folder.
    Ext2(Ext2Args),
    /// Build an ISO 9660 image (Rock Ridge, Joliet) from a folder.
    Iso(IsoArgs),
    /// Copy a block device or image file to an image file, keeping holes.
    Copy(CopyArgs),
    /// Convert an image between raw and qcow2 (a backing chain is flattened), keeping holes.
    Convert(ConvertArgs),
    /// Show what an image holds.
    Info(InfoArgs),
}

/// `raw` or `qcow2`, for clap.
fn format_parser() -> impl clap::builder::TypedValueParser<Value = Format> {
    clap::builder::PossibleValuesParser::new(["raw", "qcow2"])
        .map(|s| Format::from_name(&s).expect("listed values are formats"))
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// The image file to create.
    file: PathBuf,
    /// Size, e.g. 10M, 1GiB, 20480s; rounded up to a multiple of 512 bytes. With --backing
    /// the default is the backing file's virtual size.
    #[arg(long, short, allow_hyphen_values = true)]
    size: Option<Size>,
    /// Image format (default: qcow2 for a FILE named *.qcow2 or with --backing, else raw).
    #[arg(long, value_name = "FORMAT", value_parser = format_parser())]
    format: Option<Format>,
    /// qcow2: the backing file, stored as given; a relative name is relative to FILE's
    /// folder (as QEMU resolves it).
    #[arg(long, short, value_name = "BASE")]
    backing: Option<PathBuf>,
    /// qcow2: the backing file's format (default: probed and stored; a file that looks like
    /// qcow2 must be named *.qcow2 or given this option).
    #[arg(long, short = 'F', value_name = "FORMAT", value_parser = format_parser(),
          requires = "backing")]
    backing_format: Option<Format>,
    /// qcow2: cluster size, a power of two from 512 to 2M (default 64K).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    cluster_size: Option<Size>,
    /// Raw: allocate every block now (posix_fallocate) instead of leaving the file sparse.
    #[arg(long)]
    preallocate: bool,
    /// Replace FILE if it exists.
    #[arg(long, short)]
    force: bool,
}

/// `--size` of the ext2 builder: a size or `auto`.
#[derive(Debug, Clone, Copy)]
enum FsSize {
    Auto,
    Fixed(Size),
}

fn parse_fs_size(s: &str) -> Result<FsSize, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        Ok(FsSize::Auto)
    } else {
        s.parse()
            .map(FsSize::Fixed)
            .map_err(|e| format!("{e}, or auto"))
    }
}

#[derive(Debug, Args)]
struct TreeArgs {
    /// The folder whose content goes into the image.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    /// Build timestamp in seconds since 1970 (default: SOURCE_DATE_EPOCH, else the newest
    /// mtime in the folder); later mtimes are clamped to it.
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    timestamp: Option<i64>,
    /// Keep the files' owners and groups (default: everything owned by root).
    #[arg(long)]
    keep_owners: bool,
    /// Replace FILE if it exists.
    #[arg(long, short)]
    force: bool,
    /// Print the image's SHA-256 whatever its size. Without it the hash is printed for
    /// images up to 4 GiB only: hashing reads every byte, holes included (about 1 s per GiB).
    #[arg(long)]
    sha256: bool,
}

#[derive(Debug, Args)]
struct Ext2Args {
    /// The image file to write.
    file: PathBuf,
    #[command(flatten)]
    tree: TreeArgs,
    /// Image size, or `auto` for the tree's size plus headroom.
    #[arg(long, short, default_value = "auto", value_parser = parse_fs_size,
          allow_hyphen_values = true)]
    size: FsSize,
    /// Volume label (at most 16 bytes).
    #[arg(long, short = 'L', default_value = "")]
    label: String,
    /// File system UUID, e.g. 0b2c6c3e-4bd1-4d8e-9f43-5a2f8f8a3c1e (default: derived from
    /// the content, so that builds are reproducible).
    #[arg(long, short = 'U')]
    uuid: Option<String>,
    /// Block size in bytes.
    #[arg(long, short, default_value_t = 4096,
          value_parser = clap::builder::PossibleValuesParser::new(["1024", "2048", "4096"])
              .map(|s| s.parse::<u32>().expect("listed values are numbers")))]
    block_size: u32,
}

#[derive(Debug, Args)]
struct IsoArgs {
    /// The image file to write.
    file: PathBuf,
    #[command(flatten)]
    tree: TreeArgs,
    /// Volume identifier: up to 32 of A-Z, 0-9 and _.
    #[arg(long, short = 'V', default_value = "CDROM")]
    volume_id: String,
}

#[derive(Debug, Args)]
struct CopyArgs {
    /// The block device or image file to copy.
    src: PathBuf,
    /// The image file to write.
    dst: PathBuf,
    /// Read the source and the copy back afterwards and compare their SHA-256.
    #[arg(long)]
    verify: bool,
    /// Replace DST if it exists.
    #[arg(long, short)]
    force: bool,
}

#[derive(Debug, Args)]
struct ConvertArgs {
    /// The image to convert (a qcow2 image is read through its backing chain).
    src: PathBuf,
    /// The image file to write.
    dst: PathBuf,
    /// Output format (default: qcow2 when DST ends in .qcow2, else raw).
    #[arg(long, short = 'O', value_name = "FORMAT", value_parser = format_parser())]
    format: Option<Format>,
    /// The source's format (default: probed; a file that looks like qcow2 must be named
    /// *.qcow2 or given this option).
    #[arg(long, short = 'f', value_name = "FORMAT", value_parser = format_parser())]
    source_format: Option<Format>,
    /// qcow2 output: cluster size, a power of two from 512 to 2M (default 64K).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    cluster_size: Option<Size>,
    /// Read the source and the output back afterwards and compare their SHA-256.
    #[arg(long)]
    verify: bool,
    /// Replace DST if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct InfoArgs {
    /// The image file or block device to examine.
    file: PathBuf,
    /// Print JSON instead of aligned lines.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // Like other command-line tools, end quietly when the reader of stdout goes away
    // (`vloop-image info x | head -1`) instead of failing to print.
    // SAFETY: called first thing, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::ValueValidation | clap::error::ErrorKind::InvalidValue
            ) =>
        {
            eprintln!("{}", value_error_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    init_tracing(cli.verbose);
    let stop = Stop::default();
    watch_signals(
        matches!(cli.command, Command::Copy(_) | Command::Convert(_)),
        stop.clone(),
    );
    match run(cli.command, &stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}`: the message and its causes, `: `-separated, on one line (no message
            // repeats its cause: a `#[source]` is never also part of the text).
            eprintln!("error: {e:#}");
            if matches!(
                e.downcast_ref::<copy::CopyError>(),
                Some(copy::CopyError::Interrupted)
            ) || matches!(
                e.downcast_ref::<ConvertError>(),
                Some(ConvertError::Interrupted)
            ) {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A bad value (a size, a block size) on one line: clap's message with the accepted values
/// when it lists them, without its tips and usage hints.
fn value_error_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How the signal thread stops the running command: a copy or a conversion through its
/// cancel flag, any
/// other command by removing the temporary files listed in `unfinished` and exiting.
#[derive(Debug, Clone, Default)]
struct Stop {
    cancel: Cancel,
    unfinished: Unfinished,
}

/// Handles Ctrl-C (and SIGTERM, SIGHUP) on a thread of its own. A copy or a conversion is
/// asked to stop
/// (`cooperative`), so that it removes its unfinished output and reports; anything else
/// ends at once with status 130.
fn watch_signals(cooperative: bool, stop: Stop) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(sig);
    }
    // Blocked here, before any other thread exists, so only the waiting thread sees them.
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            if cooperative {
                stop.cancel.cancel();
            } else {
                // Exit at once, without the unfinished output: destructors do not run on
                // exit, so the temporary files are removed here.
                let removed = stop.unfinished.remove_all();
                if removed > 0 {
                    eprintln!("error: interrupted; the unfinished image was removed");
                } else {
                    eprintln!("error: interrupted");
                }
                std::process::exit(130);
            }
        }
    });
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "vloop_images=debug,info",
        _ => "vloop_images=trace,debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    if verbose == 0 {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

fn run(command: Command, stop: &Stop) -> Result<()> {
    match command {
        Command::Create(a) => run_create(a, stop),
        Command::Ext2(a) => run_ext2(a, stop),
        Command::Iso(a) => run_iso(a, stop),
        Command::Copy(a) => run_copy(a, stop),
        Command::Convert(a) => run_convert(a, stop),
        Command::Info(a) => run_info(a),
    }
}

fn run_create(a: CreateArgs, stop: &Stop) -> Result<()> {
    let start = Instant::now();
    let s = create::create(
        &a.file,
        &CreateOptions {
            size: a.size,
            format: a.format,
            backing: a.backing.map(|name| BackingOptions {
                name,
                format: a.backing_format,
            }),
            cluster_size: a.cluster_size,
            preallocate: a.preallocate,
            force: a.force,
            unfinished: Some(stop.unfinished.clone()),
        },
    )?;
    print!(
        "{}",
        report::created(&a.file, &s, a.preallocate, start.elapsed())
    );
    Ok(())
}

/// How the builders read `t`'s folder, write the image and hash it.
fn build_options(t: &TreeArgs, stop: &Stop) -> BuildOptions {
    BuildOptions {
        timestamp: t.timestamp,
        keep_owners: t.keep_owners,
        force: t.force,
        sha256: if t.sha256 {
            Hashing::Always
        } else {
            Hashing::UpTo(report::AUTO_SHA256_MAX)
        },
        progress: progress_bar(),
        unfinished: Some(stop.unfinished.clone()),
    }
}

fn run_ext2(a: Ext2Args, stop: &Stop) -> Result<()> {
    let uuid = a.uuid.as_deref().map(ext2::parse_uuid).transpose()?;
    let opts = ext2::Ext2Options {
        size: match a.size {
            FsSize::Auto => None,
            FsSize::Fixed(s) => Some(s.bytes()),
        },
        block_size: a.block_size,
        label: a.label,
        uuid,
        ..Default::default()
    };
    let b = folder::ext2(&a.tree.from, &a.file, &build_options(&a.tree, stop), &opts)?;
    let asked = match a.size {
        FsSize::Auto => None,
        FsSize::Fixed(s) => Some(s),
    };
    print!("{}", report::ext2_built(&a.file, asked, &b));
    Ok(())
}

fn run_iso(a: IsoArgs, stop: &Stop) -> Result<()> {
    let opts = iso::IsoOptions {
        volume_id: a.volume_id,
        ..Default::default()
    };
    let b = folder::iso(&a.tree.from, &a.file, &build_options(&a.tree, stop), &opts)?;
    print!("{}", report::iso_built(&a.file, &b));
    Ok(())
}

fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:16} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

fn run_copy(a: CopyArgs, stop: &Stop) -> Result<()> {
    let bar = progress_bar();
    let s = copy::copy(
        &a.src,
        &a.dst,
        &CopyOptions {
            verify: a.verify,
            force: a.force,
            progress: bar.clone(),
            cancel: stop.cancel.clone(),
        },
    );
    bar.finish_and_clear();
    print!("{}", report::copied(&a.src, &a.dst, &s?));
    Ok(())
}

fn run_convert(a: ConvertArgs, stop: &Stop) -> Result<()> {
    let bar = progress_bar();
    let s = convert::convert(
        &a.src,
        &a.dst,
        &ConvertOptions {
            format: a.format,
            source_format: a.source_format,
            cluster_size: a.cluster_size,
            verify: a.verify,
            force: a.force,
            progress: bar.clone(),
            cancel: stop.cancel.clone(),
        },
    );
    bar.finish_and_clear();
    print!("{}", report::converted(&a.src, &a.dst, &s?));
    Ok(())
}

fn run_info(a: InfoArgs) -> Result<()> {
    let i = info::info(&a.file)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&i)?);
    } else {
        print!("{}", info::describe(&i));
    }
    Ok(())
}
