//! Typed configuration of one export: which image, how it is offered to the guest, where to
//! listen. The command line front end builds a [`Config`]; tests and other crates can build one
//! directly with [`Config::new`].

use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::time::Duration;

/// Largest number of queues: one worker thread per queue, and the queue-to-thread mask of
/// vhost-user-backend is 64 bits wide.
pub const MAX_QUEUES: u16 = 64;
/// Largest split-virtqueue size.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Length of a virtio-blk serial (GET_ID answer).
pub const SERIAL_LEN: usize = 20;

/// Errors in a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The queue count is outside 1..=64.
    #[error("--num-queues {0} is out of range: use 1 to {MAX_QUEUES}")]
    NumQueues(u16),
    /// The queue size is not a power of two in range.
    #[error("--queue-size {0} is invalid: use a power of two from 4 to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    /// The logical block size is not supported.
    #[error("--logical-block-size {0} is not supported: use 512 or 4096")]
    BlockSize(u32),
    /// The serial is too long.
    #[error("--serial {0:?} is longer than {SERIAL_LEN} bytes")]
    SerialTooLong(String),
}

/// Logical block size offered to the guest (`blk_size`). Sectors stay 512 bytes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BlockSize {
    /// 512-byte blocks.
    #[default]
    B512,
    /// 4096-byte blocks.
    B4096,
}

impl BlockSize {
    /// Size in bytes.
    pub fn bytes(self) -> u32 {
        match self {
            BlockSize::B512 => 512,
            BlockSize::B4096 => 4096,
        }
    }
}

impl TryFrom<u32> for BlockSize {
    type Error = ConfigError;

    fn try_from(v: u32) -> Result<Self, ConfigError> {
        match v {
            512 => Ok(BlockSize::B512),
            4096 => Ok(BlockSize::B4096),
            other => Err(ConfigError::BlockSize(other)),
        }
    }
}

/// What DISCARD does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// Punch holes in the image (BLKDISCARD on block devices); WRITE_ZEROES with UNMAP may
    /// punch holes too.
    #[default]
    Unmap,
    /// DISCARD is still offered but completes without touching the image (as QEMU's
    /// `discard=ignore`); WRITE_ZEROES never deallocates.
    Ignore,
}

/// Which I/O engine serves reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring when the kernel allows it, else blocking preadv/pwritev.
    #[default]
    Auto,
    /// io_uring only: fail if it cannot be set up.
    IoUring,
    /// Blocking preadv/pwritev on the worker thread.
    Blocking,
    /// No I/O at all: every request completes at once with OK and the image is never read
    /// or written (reads leave the guest buffers as they were). Measures the cost of the
    /// vhost-user hop itself, like qemu-storage-daemon's `null-co` driver.
    Null,
}

/// Whether the image is locked against other users (QEMU's `locking=` option of the file
/// driver).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Locking {
    /// Take QEMU-compatible OFD locks; an image whose file system cannot lock is refused.
    #[default]
    On,
    /// Take no locks (the user guarantees nobody else writes the image).
    Off,
}

/// The image format (QEMU's `driver=` of the format layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// Decided without reinterpreting anyone's data: a file named `*.qcow2` must be qcow2,
    /// any other must not look like another format (the daemon refuses it, asking for an
    /// explicit format); a guest may not make a raw image decided this way look like another
    /// format (see `crate::disk`).
    #[default]
    Auto,
    /// The file is the disk, byte for byte.
    Raw,
    /// A qcow2 image (v2 or v3) with its backing chain.
    Qcow2,
}

/// The backing file of a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum BackingChoice {
    /// The one the image names.
    #[default]
    FromImage,
    /// None: clusters the image does not hold read as zeroes.
    None,
    /// This file, in this format (`None`: the same rule as the top image's `Auto`).
    Path(PathBuf, Option<ImageFormat>),
}

/// Where the daemon listens for its frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// Create a unix socket at this path.
    SocketPath(PathBuf),
    /// Use this already listening unix socket file descriptor.
    Fd(RawFd),
}

/// One export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The image file or block device.
    pub image: PathBuf,
    /// Serve it read-only (opened O_RDONLY, VIRTIO_BLK_F_RO offered).
    pub read_only: bool,
    /// Number of virtqueues (one worker thread each).
    pub num_queues: u16,
    /// Largest virtqueue size the frontend may set.
    pub queue_size: u16,
    /// GET_ID serial; derived from the image path when absent.
    pub serial: Option<String>,
    /// Logical block size.
    pub logical_block_size: BlockSize,
    /// Open the image with O_DIRECT.
    pub direct: bool,
    /// DISCARD behaviour.
    pub discard: DiscardMode,
    /// I/O engine.
    pub engine: EngineKind,
    /// Image locking.
    pub locking: Locking,
    /// Image format.
    pub format: ImageFormat,
    /// Backing file of a qcow2 image.
    pub backing: BackingChoice,
    /// Largest window a worker polls its available ring for between requests (zero: never
    /// poll); see `crate::poll`.
    pub poll_max: Duration,
}

/// Default largest polling window. Twice QEMU's iothread `poll-max-ns` default: a frontend
/// that takes a little over 32 us to come back (a woken vCPU) would otherwise turn polling
/// off for good, since the wake-up the poll did not save makes every gap longer still.
pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(64);

impl Config {
    /// A configuration with the defaults for everything but the image.
    pub fn new(image: impl Into<PathBuf>) -> Self {
        Config {
            image: image.into(),
            read_only: false,
            num_queues: 1,
            queue_size: 1024,
            serial: None,
            logical_block_size: BlockSize::B512,
            direct: false,
            discard: DiscardMode::Unmap,
            engine: EngineKind::Auto,
            locking: Locking::On,
            format: ImageFormat::Auto,
            backing: BackingChoice::FromImage,
            poll_max: DEFAULT_POLL_MAX,
        }
    }

    /// Check the values that the type system does not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(ConfigError::NumQueues(self.num_queues));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 4 {
            return Err(ConfigError::QueueSize(self.queue_size));
        }
        if let Some(s) = &self.serial {
            if s.len() > SERIAL_LEN {
                return Err(ConfigError::SerialTooLong(s.clone()));
            }
        }
        Ok(())
    }
}

/// The `--print-capabilities` answer of a vhost-user "block" backend (vhost-user.json,
/// `VHostUserBackendCapabilitiesBlock`).
pub fn capabilities_json() -> String {
    let caps = serde_json::json!({
        "type": "block",
        "features": ["read-only", "blk-file"],
    });
    // A json! value always serialises.
    serde_json::to_string_pretty(&caps).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let mut c = Config::new("/x");
        assert!(c.validate().is_ok());
        c.num_queues = 0;
        assert!(c.validate().is_err());
        c.num_queues = 16;
        c.queue_size = 100;
        assert!(c.validate().is_err());
        c.queue_size = 1024;
        c.serial = Some("x".repeat(21));
        assert!(c.validate().is_err());
        c.serial = Some("x".repeat(20));
        assert!(c.validate().is_ok());
        assert!(BlockSize::try_from(1024).is_err());
        assert_eq!(BlockSize::try_from(4096).unwrap().bytes(), 4096);
    }

    #[test]
    fn capabilities() {
        let v: serde_json::Value = serde_json::from_str(&capabilities_json()).unwrap();
        assert_eq!(v["type"], "block");
        assert_eq!(v["features"], serde_json::json!(["read-only", "blk-file"]));
    }
}
