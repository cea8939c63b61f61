//! How a chain is opened: the options, the backing file choice, the opener callback and the
//! limits every other part of the chain relies on.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::format::Format;

/// Longest backing chain accepted (QEMU accepts deeper ones; 64 layers is far beyond any
/// real use and bounds the recursion of a lookup).
pub const MAX_CHAIN: usize = 64;
/// Default byte budget of each qcow2 layer's L2 table cache: with 64 KiB clusters one table
/// maps 512 MiB, so 64 MiB holds every table of a 512 GiB image.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;
/// Default size of the first cluster reservation.
pub const DEFAULT_RESERVE_BYTES: u64 = 1 << 20;

/// Index of a layer in the chain: 0 is the top image, 1 its backing file, and so on.
pub type LayerId = usize;

/// Which backing file the top image uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// The one the image names (resolved relative to the image's directory).
    #[default]
    FromImage,
    /// None: unallocated clusters read as zeroes.
    None,
    /// This file (a path as given, relative to the current directory) in this format
    /// (`None`: probed).
    Path(PathBuf, Option<Format>),
}

/// How to open a chain.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// The top image's format; `None` probes it (see [`crate::Chain::probed_raw`]).
    pub format: Option<Format>,
    /// Open the top image read-only.
    pub read_only: bool,
    /// Backing file of the top image.
    pub backing: Backing,
    /// L2 cache budget per qcow2 layer, bytes.
    pub cache_bytes: usize,
    /// Bytes of clusters the first allocation reserves; each later reservation doubles, up to
    /// 64 MiB. Unused reserved clusters are what a crash leaks.
    pub reserve_bytes: u64,
    /// Punch the host blocks of clusters that discards, write-zeroes with unmap and
    /// rewrites free, once they are reclaimed (as QEMU's `discard=unmap`): the image file
    /// then shrinks on disk as the guest frees space.
    pub punch_freed: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            read_only: false,
            backing: Backing::FromImage,
            cache_bytes: DEFAULT_CACHE_BYTES,
            reserve_bytes: DEFAULT_RESERVE_BYTES,
            punch_freed: true,
        }
    }
}

/// Opens a backing file read-only, as the caller wants it opened (and locked); the format is
/// the one the naming image declares, `None` when it will be probed.
pub type Opener<'a> = &'a mut dyn FnMut(&Path, Option<Format>) -> io::Result<File>;
