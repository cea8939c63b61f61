//! `vloop-blk`: serve a disk image to a QEMU guest as a vhost-user-blk device.

use std::io::IsTerminal;
use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tracing_subscriber::EnvFilter;
use vloop_blk::config::capabilities_json;
use vloop_blk::config::{BackingChoice, ImageFormat, DEFAULT_POLL_MAX};
use vloop_blk::{BlockSize, Config, DiscardMode, EngineKind, Listen, Locking, StopHandle};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DiscardArg {
    /// Punch holes in the image.
    Unmap,
    /// Accept DISCARD and do nothing.
    Ignore,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    /// A file named *.qcow2 must be qcow2, any other must not look like another format.
    Auto,
    /// The bytes of the file as they are.
    Raw,
    /// A qcow2 image with its backing chain.
    Qcow2,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LockingArg {
    /// Lock the image as QEMU does; refuse an image that cannot be locked.
    On,
    /// Take no locks.
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineArg {
    /// io_uring if available, else blocking.
    Auto,
    /// io_uring only.
    IoUring,
    /// Blocking preadv/pwritev.
    Blocking,
    /// No I/O: complete every request at once without touching the image (measures the
    /// vhost-user hop alone).
    Null,
}

/// Serve a disk image (file or block device) to a QEMU guest as a vhost-user-blk device.
///
/// QEMU connects with `-chardev socket,id=c0,path=SOCKET -device vhost-user-blk-pci,chardev=c0`
/// and guest RAM shared (`-object memory-backend-memfd,id=mem,size=...,share=on -numa
/// node,memdev=mem`). The daemon serves one frontend at a time and waits for the next one when
/// it disconnects; SIGINT/SIGTERM finish in-flight requests, flush the image and exit 0.
#[derive(Debug, Parser)]
#[command(name = "vloop-blk", version)]
struct Args {
    /// Listen on a new unix socket at this path.
    #[arg(long, value_name = "PATH", conflicts_with = "fd",
          required_unless_present_any = ["fd", "print_capabilities"])]
    socket_path: Option<PathBuf>,
    /// Use this inherited, already listening unix socket.
    #[arg(long, value_name = "FD")]
    fd: Option<RawFd>,
    /// Print the backend capabilities as JSON (vhost-user backend conventions) and exit.
    #[arg(long)]
    print_capabilities: bool,
    /// The image file or block device to serve.
    #[arg(
        long,
        value_name = "IMAGE",
        required_unless_present = "print_capabilities"
    )]
    blk_file: Option<PathBuf>,
    /// Serve the image read-only (the guest sees a read-only disk).
    #[arg(long)]
    read_only: bool,
    /// Image format: auto (a file named *.qcow2 must be qcow2, any other must not look like
    /// another format: the daemon never reinterprets data a guest may have written), raw or
    /// qcow2.
    #[arg(long, value_enum, default_value = "auto")]
    format: FormatArg,
    /// qcow2: use this backing file instead of the one the image names (`none`: no backing
    /// file; clusters the image does not hold read as zeroes).
    #[arg(long, value_name = "PATH|none")]
    backing: Option<PathBuf>,
    /// Format of --backing (default: decided as --format auto decides).
    #[arg(long, value_enum, requires = "backing")]
    backing_format: Option<FormatArg>,
    /// Number of virtqueues, each served by its own thread (1 to 64).
    #[arg(long, default_value_t = 1, value_name = "N")]
    num_queues: u16,
    /// Largest virtqueue size the frontend may use (power of two).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    queue_size: u16,
    /// Serial number the guest reads with GET_ID (at most 20 bytes; default derived from the
    /// image path).
    #[arg(long, value_name = "STRING")]
    serial: Option<String>,
    /// Logical block size offered to the guest: 512 or 4096.
    #[arg(long, default_value_t = 512, value_name = "BYTES")]
    logical_block_size: u32,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    direct: bool,
    /// What DISCARD does: unmap (punch holes) or ignore (succeed without doing anything).
    #[arg(long, value_enum, default_value = "unmap")]
    discard: DiscardArg,
    /// I/O engine for reads and writes.
    #[arg(long, value_enum, default_value = "auto")]
    io_engine: EngineArg,
    /// Lock the image against other writers with QEMU-compatible OFD locks (`off`: take none,
    /// for file systems that cannot lock).
    #[arg(long, value_enum, default_value = "on")]
    locking: LockingArg,
    /// Longest a queue's thread polls for the guest's next request before it sleeps, in
    /// microseconds (adaptive, up to this; 0: never poll).
    #[arg(long, default_value_t = DEFAULT_POLL_MAX.as_micros() as u64, value_name = "US")]
    poll_max_us: u64,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

struct Cli {
    config: Config,
    listen: Listen,
}

impl TryFrom<Args> for Cli {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Cli> {
        let image = a.blk_file.context("--blk-file IMAGE is required")?;
        let listen = match (a.socket_path, a.fd) {
            (Some(p), None) => Listen::SocketPath(p),
            (None, Some(fd)) => Listen::Fd(fd),
            _ => anyhow::bail!("give exactly one of --socket-path PATH or --fd FD"),
        };
        let fmt = |f: FormatArg| match f {
            FormatArg::Auto => ImageFormat::Auto,
            FormatArg::Raw => ImageFormat::Raw,
            FormatArg::Qcow2 => ImageFormat::Qcow2,
        };
        let backing = match a.backing {
            None => BackingChoice::FromImage,
            Some(p) if p.as_os_str() == "none" => BackingChoice::None,
            Some(p) => BackingChoice::Path(p, a.backing_format.map(fmt)),
        };
        let config = Config {
            image,
            format: fmt(a.format),
            backing,
            read_only: a.read_only,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            serial: a.serial,
            logical_block_size: BlockSize::try_from(a.logical_block_size)?,
            direct: a.direct,
            discard: match a.discard {
                DiscardArg::Unmap => DiscardMode::Unmap,
                DiscardArg::Ignore => DiscardMode::Ignore,
            },
            engine: match a.io_engine {
                EngineArg::Auto => EngineKind::Auto,
                EngineArg::IoUring => EngineKind::IoUring,
                EngineArg::Blocking => EngineKind::Blocking,
                EngineArg::Null => EngineKind::Null,
            },
            poll_max: std::time::Duration::from_micros(a.poll_max_us),
            locking: match a.locking {
                LockingArg::On => Locking::On,
                LockingArg::Off => Locking::Off,
            },
        };
        config.validate()?;
        Ok(Cli { config, listen })
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let cli = Cli::try_from(args)?;
    let stop = StopHandle::new().context("cannot create the stop event")?;
    vloop_blk::stop_on_signals(stop.clone()).context("cannot install signal handling")?;
    vloop_blk::start_backend(cli.config, &cli.listen, stop)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_capabilities {
        println!("{}", capabilities_json());
        return ExitCode::SUCCESS;
    }
    let level = match args.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // virtio-queue logs each bad descriptor or head a guest offers, at any rate; the daemon
    // reports them itself within a budget per queue (WARNINGS_PER_SECOND).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},virtio_queue=off")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
