//! The served image: an open, locked file or block device, its format (raw, or a qcow2 image
//! with its backing chain), size, serial, request limits and flush state.
//!
//! One [`Disk`] is shared by every worker thread and every frontend connection; it holds no
//! lock on the data path (the I/O layer issues positional operations on its fds, and asks a
//! qcow2 chain for mappings). [`format`](mod@format) decides the format without trusting guest data;
//! `chain` opens a qcow2 backing chain.

mod atime;
mod chain;
pub mod format;

#[cfg(test)]
pub(crate) use self::atime::is_no_atime;
pub(crate) use self::atime::no_atime;
use self::atime::Atime;
use self::chain::open_chain;
pub use self::chain::Qcow2Files;
pub use self::format::decide_format;
use self::format::read_first;

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use tracing::{info, warn};

use vloop_qcow2::Format;

use crate::config::{Config, DiscardMode, ImageFormat, Locking, SERIAL_LEN};
use crate::lock::{lock_image, LockError, LockMode};
use crate::request::{Limits, SECTOR_SHIFT, SECTOR_SIZE};
use crate::virtio_blk::{MAX_DWZ_SECTORS, MAX_DWZ_SEG, SIZE_MAX};

nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);

/// Errors opening an image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image cannot be opened.
    #[error("cannot open image {path}{hint}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// Advice for the user.
        hint: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The image is neither a regular file nor a block device.
    #[error("{0} is not a regular file or a block device")]
    NotAFile(PathBuf),
    /// `--direct` on a writable qcow2 image with clusters smaller than a page.
    #[error(
        "{path} has clusters of {cluster_size} bytes: --direct needs 4 KiB or more (its \
         metadata would share page-cache pages with O_DIRECT data); drop --direct, serve it \
         --read-only, or convert it (qemu-img convert -O qcow2 -o cluster_size=64k)"
    )]
    DirectSmallClusters {
        /// Image path.
        path: PathBuf,
        /// Its cluster size.
        cluster_size: u64,
    },
    /// A qcow2 image on a block device, to be served writable.
    #[error(
        "{0} is a qcow2 image on a block device, which vloop-blk serves read-only only: it \
         allocates clusters at the end of a qcow2 file, and a block device cannot grow (serve \
         it with --read-only, or convert it to a file)"
    )]
    Qcow2OnBlockDevice(PathBuf),
    /// The size of the image cannot be read.
    #[error("cannot read the size of {path}")]
    Size {
        /// Image path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The image is smaller than one logical block.
    #[error("{path} is {size} bytes, smaller than one {block}-byte block")]
    TooSmall {
        /// Image path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Logical block size.
        block: u32,
    },
    /// The file system cannot lock the image.
    #[error(
        "cannot lock {0}: its file system does not support OFD locks; serve it with \
         --locking off if nothing else can write it"
    )]
    LockUnsupported(PathBuf),
    /// The image is in use.
    #[error("cannot lock {path}")]
    Lock {
        /// Image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: LockError,
    },
    /// The image's content does not match what `--format auto` expects of its name.
    #[error("{path}: {why}; name the format with --format raw (the bytes as they are) or --format qcow2")]
    Format {
        /// Image path.
        path: PathBuf,
        /// What was found.
        why: String,
    },
    /// The qcow2 chain cannot be opened.
    #[error("cannot open the qcow2 image {path}")]
    Qcow2 {
        /// Image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: vloop_qcow2::Error,
    },
}

/// How long a conflicting lock may take to go away before the image counts as in use: a
/// backend killed a moment ago keeps its locks until the kernel has torn down its io_uring
/// (measured up to about 80 ms on a loaded machine), and a supervisor restarts it at once.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// [`lock_image`], retried while another holder's lock may be on its way out (see
/// [`LOCK_WAIT`]).
fn lock_waiting(file: &File, mode: LockMode) -> Result<bool, LockError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match lock_image(file, mode) {
            Err(LockError::Conflict { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// How the guest's bytes map to files.
#[derive(Debug)]
pub enum Layout {
    /// The image file itself; `probed`: decided by `--format auto` (guest writes to its first
    /// sector are checked).
    Raw {
        /// Decided by `--format auto`.
        probed: bool,
    },
    /// A qcow2 image and its backing chain.
    Qcow2(Qcow2Files),
}

/// The size of the image behind `file`: (raw bytes, bytes rounded down to `block`).
fn image_size(file: &File, block_device: bool, block: u64) -> io::Result<(u64, u64)> {
    let raw = if block_device {
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live
        // local; the fd is open.
        unsafe { blk_getsize64(file.as_raw_fd(), &mut size) }?;
        size
    } else {
        file.metadata()?.len()
    };
    Ok((raw, raw - raw % block.max(1)))
}

/// The served size before and after [`Disk::refresh_size`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resize {
    /// Bytes served before.
    pub old: u64,
    /// Bytes served from now on.
    pub new: u64,
}

impl Resize {
    /// True when the served size changed.
    pub fn changed(&self) -> bool {
        self.old != self.new
    }
}

/// A copy of the request limits carrying the capacity of the moment it was taken; it
/// dereferences to [`Limits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CurrentLimits(Limits);

impl Deref for CurrentLimits {
    type Target = Limits;

    fn deref(&self) -> &Limits {
        &self.0
    }
}

/// An open, locked image.
#[derive(Debug)]
pub struct Disk {
    path: PathBuf,
    file: File,
    /// A second, buffered descriptor used when `file` is O_DIRECT and a request's buffers are
    /// not aligned for it.
    buffered: Option<File>,
    block_device: bool,
    /// Served size in bytes; changes when [`Disk::refresh_size`] adopts a new image size.
    size: AtomicU64,
    /// Logical block size in bytes: the served size is rounded down to a multiple of it.
    block: u64,
    serial: [u8; SERIAL_LEN],
    limits: Limits,
    discard: DiscardMode,
    direct: bool,
    layout: Layout,
    /// errno of a failed fdatasync: after one, every flush fails (the page cache may have
    /// dropped dirty pages, so nothing is known to be on disk any more). With `--direct` too:
    /// writes whose buffers O_DIRECT refuses go through the page cache.
    flush_poisoned: AtomicI32,
    /// A request's work panicked: the image's metadata may be half updated in memory.
    failed: AtomicBool,
    atime: Atime,
}

fn default_serial(path: &Path) -> [u8; SERIAL_LEN] {
    // FNV-1a of the canonical path: stable across restarts, distinct per image.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let s = format!("vloop-{h:014x}");
    serial_bytes(&s)
}

fn serial_bytes(s: &str) -> [u8; SERIAL_LEN] {
    let mut out = [0u8; SERIAL_LEN];
    let b = s.as_bytes();
    let n = b.len().min(SERIAL_LEN);
    out[..n].copy_from_slice(&b[..n]);
    out
}

/// The ring size seg_max is sized for: QEMU's default queue size.
const SEG_MAX_RING: u16 = 128;

impl Disk {
    /// Open and lock the image named by `config`.
    pub fn open(config: &Config) -> Result<Disk, DiskError> {
        let path = config.image.clone();
        let open = |direct: bool| {
            let mut flags = 0;
            if direct {
                flags |= libc::O_DIRECT;
            }
            // Refuses a FIFO without waiting on it for a writer.
            let file = vloop_qcow2::open_image(&path, !config.read_only, flags)?;
            no_atime(&file);
            Ok::<_, io::Error>(file)
        };
        let file = open(config.direct).map_err(|source| match source.kind() {
            io::ErrorKind::InvalidInput => DiskError::NotAFile(path.clone()),
            _ => DiskError::Open {
                path: path.clone(),
                hint: match source.kind() {
                    io::ErrorKind::NotFound => {
                        ": no such file (create it first, e.g. with `truncate -s 1G IMAGE`)"
                    }
                    io::ErrorKind::PermissionDenied if !config.read_only => {
                        ": permission denied (serve it with --read-only or fix its permissions)"
                    }
                    _ if config.direct && source.raw_os_error() == Some(libc::EINVAL) => {
                        ": the file system does not support O_DIRECT (drop --direct)"
                    }
                    _ => "",
                },
                source,
            },
        })?;
        let meta = file.metadata().map_err(|source| DiskError::Size {
            path: path.clone(),
            source,
        })?;
        // open_image refused anything but a regular file or a block device.
        let block_device = meta.file_type().is_block_device();
        let mode = if config.read_only {
            LockMode::ReadOnly
        } else {
            LockMode::ReadWrite
        };
        match config.locking {
            Locking::On => match lock_waiting(&file, mode) {
                Ok(true) => {}
                Ok(false) => return Err(DiskError::LockUnsupported(path)),
                Err(source) => {
                    return Err(DiskError::Lock {
                        path: path.clone(),
                        source,
                    })
                }
            },
            Locking::Off => warn!(
                "{}: serving without image locks (--locking off): nothing stops another \
                 process from writing it",
                path.display()
            ),
        }
        let block = u64::from(config.logical_block_size.bytes());
        let format = match config.format {
            ImageFormat::Raw => Format::Raw,
            ImageFormat::Qcow2 => Format::Qcow2,
            ImageFormat::Auto => {
                let first = read_first(&file).map_err(|source| DiskError::Size {
                    path: path.clone(),
                    source,
                })?;
                decide_format(&path, &first).map_err(|why| DiskError::Format {
                    path: path.clone(),
                    why,
                })?
            }
        };
        if format == Format::Qcow2 && block_device && !config.read_only {
            return Err(DiskError::Qcow2OnBlockDevice(path));
        }
        let layout = match format {
            Format::Raw => Layout::Raw {
                probed: config.format == ImageFormat::Auto,
            },
            Format::Qcow2 => Layout::Qcow2(open_chain(config, &path)?),
        };
        let (raw_size, size) = match &layout {
            Layout::Raw { .. } => {
                image_size(&file, block_device, block).map_err(|source| DiskError::Size {
                    path: path.clone(),
                    source,
                })?
            }
            Layout::Qcow2(q) => {
                let v = q.chain.size();
                (v, v - v % block.max(1))
            }
        };
        if size != raw_size {
            warn!(
                "{}: size {raw_size} is not a multiple of {block}; the last {} bytes are not served",
                path.display(),
                raw_size - size
            );
        }
        if size == 0 {
            return Err(DiskError::TooSmall {
                path,
                size: raw_size,
                block: config.logical_block_size.bytes(),
            });
        }
        let buffered = if config.direct {
            Some(open(false).map_err(|source| DiskError::Open {
                path: path.clone(),
                hint: "",
                source,
            })?)
        } else {
            None
        };
        let serial = match &config.serial {
            Some(s) => serial_bytes(s),
            None => default_serial(&std::fs::canonicalize(&path).unwrap_or(path.clone())),
        };
        // The driver reads seg_max before the frontend sets the ring's size, and a driver
        // without indirect descriptors puts every segment in the ring: a request needing more
        // descriptors than the ring has never fits, and its I/O hangs. QEMU's rings are 128
        // entries by default (and qemu-storage-daemon advertises 126 too).
        let seg_max = u32::from(config.queue_size.min(SEG_MAX_RING))
            .saturating_sub(2)
            .max(1);
        let limits = Limits {
            capacity: size >> SECTOR_SHIFT,
            logical_block_size: config.logical_block_size.bytes(),
            read_only: config.read_only,
            seg_max,
            size_max: SIZE_MAX,
            discard: !config.read_only,
            write_zeroes: !config.read_only,
            max_discard_sectors: MAX_DWZ_SECTORS,
            max_discard_seg: MAX_DWZ_SEG,
            max_write_zeroes_sectors: MAX_DWZ_SECTORS,
            max_write_zeroes_seg: MAX_DWZ_SEG,
        };
        info!(
            "serving {} ({}, {} bytes, {} sectors{}{})",
            path.display(),
            match &layout {
                Layout::Raw { .. } => "raw".to_string(),
                Layout::Qcow2(q) if q.chain.layers() > 1 => {
                    format!("qcow2 over {} backing files", q.chain.layers() - 1)
                }
                Layout::Qcow2(_) => "qcow2".to_string(),
            },
            size,
            limits.capacity,
            if config.read_only { ", read-only" } else { "" },
            if block_device { ", block device" } else { "" },
        );
        let atime = Atime::new(match &layout {
            Layout::Raw { .. } => vec![file.as_raw_fd()],
            Layout::Qcow2(q) => q.buffered_fds.clone(),
        });
        Ok(Disk {
            path,
            file,
            buffered,
            block_device,
            size: AtomicU64::new(size),
            block,
            serial,
            limits,
            discard: config.discard,
            direct: config.direct,
            atime,
            layout,
            flush_poisoned: AtomicI32::new(0),
            failed: AtomicBool::new(false),
        })
    }

    /// Set the image's access time if the last one is a day old ([`atime`]): a worker calls
    /// this as it starts serving a pass.
    pub fn refresh_atime(&self, now: std::time::Instant) {
        self.atime.refresh(now);
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Served size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.size() / SECTOR_SIZE
    }

    /// Re-read the size of a raw image (grown or shrunk by someone else, e.g. `truncate -s` or
    /// an `lvresize` of a block device) and serve that size from now on: requests past the new
    /// end fail, requests into grown space succeed. Returns the served sizes before and after.
    pub fn refresh_size(&self) -> Result<Resize, DiskError> {
        if let Layout::Qcow2(_) = &self.layout {
            // The virtual size lives in the header, which nobody else may change while the
            // image is locked.
            let size = self.size();
            return Ok(Resize {
                old: size,
                new: size,
            });
        }
        let (raw, size) =
            image_size(&self.file, self.block_device, self.block).map_err(|source| {
                DiskError::Size {
                    path: self.path.clone(),
                    source,
                }
            })?;
        if size != raw {
            warn!(
                "{}: size {raw} is not a multiple of {}; the last {} bytes are not served",
                self.path.display(),
                self.block,
                raw - size
            );
        }
        let old = self.size.swap(size, Ordering::AcqRel);
        Ok(Resize { old, new: size })
    }

    /// The GET_ID serial, NUL padded.
    pub fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    /// Request validation limits, with the capacity of this moment.
    pub fn limits(&self) -> CurrentLimits {
        let mut l = self.limits;
        l.capacity = self.capacity();
        CurrentLimits(l)
    }

    /// DISCARD behaviour.
    pub fn discard_mode(&self) -> DiscardMode {
        self.discard
    }

    /// True when the image is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// True when opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The fd reads and writes go to.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// A buffered fd for requests whose buffers do not suit O_DIRECT (the main fd when the
    /// image is not opened O_DIRECT).
    pub fn buffered_fd(&self) -> RawFd {
        self.buffered.as_ref().unwrap_or(&self.file).as_raw_fd()
    }

    /// Make every completed write durable (fdatasync). A failure is reported, and every later
    /// flush fails too.
    pub fn flush(&self) -> io::Result<()> {
        self.flush_poisoned()?;
        if self.limits.read_only {
            return Ok(());
        }
        if let Layout::Qcow2(q) = &self.layout {
            return q
                .chain
                .flush()
                .map_err(io::Error::other)
                .inspect_err(|e| self.poison_flush(e));
        }
        // File::sync_data is fdatasync, retried on EINTR.
        self.file.sync_data().inspect_err(|e| self.poison_flush(e))
    }

    /// How the guest's bytes map to files.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Close a qcow2 chain cleanly (flush, return unused reserved clusters, trim the file):
    /// the daemon's last step.
    pub fn close(&self) -> io::Result<()> {
        match &self.layout {
            Layout::Qcow2(q) if !self.limits.read_only => q.chain.close().map_err(io::Error::other),
            _ => self.flush(),
        }
    }

    /// An error when an earlier flush of this image failed: the page cache may have dropped
    /// the dirty pages, so no later flush can say the data is on disk.
    pub fn flush_poisoned(&self) -> io::Result<()> {
        match self.flush_poisoned.load(Ordering::Relaxed) {
            0 => Ok(()),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }

    /// Stop all I/O on the image: the work of a request panicked (a bug) and may have left
    /// the image's metadata (a qcow2 mapping, its refcounts) half updated in memory, which
    /// later requests would build on. Reads, writes and flushes fail from now on.
    pub fn fail(&self) {
        if !self.failed.swap(true, Ordering::Relaxed) {
            tracing::error!(
                "a request failed inside the daemon (a bug): all I/O on the image fails from \
                 now on; restart vloop-blk after checking the image (qemu-img check)"
            );
        }
    }

    /// Whether [`Disk::fail`] was called.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Record that a flush failed with `e`. An image opened with O_DIRECT is poisoned too:
    /// writes whose buffers O_DIRECT refuses (not 512-byte aligned, or refused by the file)
    /// went through the page cache.
    pub fn poison_flush(&self, e: &io::Error) {
        let _ = self.flush_poisoned.compare_exchange(
            0,
            e.raw_os_error().unwrap_or(libc::EIO),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}
