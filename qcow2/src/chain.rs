//! A backing chain: the top image (qcow2 or raw) and its backing files, as one virtual disk.
//!
//! [`Chain`] is what the daemon and the image tool use. The fast path, [`Chain::map_read`] and
//! [`Chain::map_write`], turns a virtual byte range into [`Extent`]s of files without doing any
//! data I/O, so the caller can issue it with iovecs straight into guest memory. Everything the
//! fast path cannot express (compressed clusters, allocation, copy-on-write, discard, write
//! zeroes, flush) is a synchronous slow path, safe to call from several threads at once.
//!
//! Locking: the metadata of every layer sits behind one mutex, taken briefly by the map
//! functions (an L2 table cache miss reads the table with a plain pread while holding it).
//! Operations that change metadata also take a second mutex, so they run one at a time; they
//! release the metadata mutex while they do data I/O and syncs.
//!
//! Reuse of freed clusters: a discarded cluster's host offset may still be named by an extent
//! the caller mapped earlier and has not finished writing. Freed clusters therefore wait in a
//! quarantine until the caller passes [`Chain::reclaim_freed`] a [`FreeMark`] taken at a time
//! after which no such extent is in flight (see [`Chain::free_mark`]).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use thiserror::Error;

use crate::compress::{self, CompressError};
use crate::format::{self, Format, ProbeError, PROBE_BYTES};
use crate::header::Compression;
use crate::layer::{Fresh, LayerError, Qcow2};
use crate::storage::Storage;
use crate::table::{L2Entry, COPIED, ZERO};

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

/// A piece of a mapped range, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes at `host` in the file of `layer` (descriptor `fd`, valid while the chain
    /// lives).
    Data {
        /// Which layer's file.
        layer: LayerId,
        /// That file's descriptor.
        fd: RawFd,
        /// File offset.
        host: u64,
        /// Bytes.
        len: u64,
    },
    /// `len` bytes that read as zeroes.
    Zero {
        /// Bytes.
        len: u64,
    },
    /// `len` bytes that only [`Chain::read_slow`] can read (compressed clusters).
    Slow {
        /// Bytes.
        len: u64,
    },
}

impl Extent {
    /// Bytes the extent covers.
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Data { len, .. } | Extent::Zero { len } | Extent::Slow { len } => len,
        }
    }

    /// Whether the extent is empty (never, for extents a chain returns).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a write must be done, from [`Chain::map_write`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePath {
    /// Write the data straight to the returned extents.
    Direct,
    /// Call [`Chain::write_slow`]: some cluster needs allocation or copy-on-write.
    Slow,
}

/// A point in the sequence of frees, from [`Chain::free_mark`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FreeMark(u64);

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
    /// The top image's format; `None` probes it (see [`Chain::probed_raw`]).
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
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            read_only: false,
            backing: Backing::FromImage,
            cache_bytes: DEFAULT_CACHE_BYTES,
            reserve_bytes: DEFAULT_RESERVE_BYTES,
        }
    }
}

/// Opens a backing file read-only, as the caller wants it opened (and locked); the format is
/// the one the naming image declares, `None` when it will be probed.
pub type Opener<'a> = &'a mut dyn FnMut(&Path, Option<Format>) -> io::Result<File>;

/// Errors of a chain.
#[derive(Debug, Error)]
pub enum Error {
    /// The metadata of a qcow2 layer is invalid, or reading or writing it failed.
    #[error("{}", path.display())]
    Layer {
        /// The layer's file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: LayerError,
    },
    /// Reading or writing data failed.
    #[error("{what} of {} at byte {offset:#x} failed", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// File offset.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A backing file could not be opened.
    #[error("cannot open backing file {} (named by {})", path.display(), by.display())]
    OpenBacking {
        /// The backing file.
        path: PathBuf,
        /// The image naming it.
        by: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Probing found a format this crate does not read.
    #[error("{}", path.display())]
    Probe {
        /// The file probed.
        path: PathBuf,
        /// What it looks like.
        #[source]
        source: ProbeError,
    },
    /// A backing format name this crate does not read.
    #[error("{} names backing format {name:?}, which is not supported (only raw and qcow2)", by.display())]
    BackingFormat {
        /// The format name.
        name: String,
        /// The image naming it.
        by: PathBuf,
    },
    /// The backing file name is not usable.
    #[error("{} names an empty backing file", by.display())]
    BackingName {
        /// The image naming it.
        by: PathBuf,
    },
    /// A raw top image was given a backing file.
    #[error("a raw image cannot have a backing file")]
    RawBacking,
    /// The chain has more than [`MAX_CHAIN`] layers.
    #[error("the backing chain of {} is longer than {MAX_CHAIN} images", top.display())]
    TooLong {
        /// The top image.
        top: PathBuf,
    },
    /// The same file appears twice in the chain.
    #[error("backing chain loop: {} is already in the chain", path.display())]
    Loop {
        /// The file seen twice.
        path: PathBuf,
    },
    /// A request outside the virtual disk.
    #[error("request of {len} bytes at {offset} is outside the {size}-byte disk")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// A write to a read-only chain.
    #[error("the image is open read-only")]
    ReadOnly,
    /// A compressed cluster is invalid.
    #[error("{} at host byte {host:#x}", path.display())]
    Compressed {
        /// The file.
        path: PathBuf,
        /// Host offset of the compressed data.
        host: u64,
        /// What is wrong.
        #[source]
        source: CompressError,
    },
    /// Compressed data that lies past the end of its file.
    #[error("compressed cluster at {host:#x} of {} lies past the end of the file; the image is corrupt", path.display())]
    CompressedPastEnd {
        /// The file.
        path: PathBuf,
        /// Host offset.
        host: u64,
    },
}

/// Result of chain operations.
pub type Result<T> = std::result::Result<T, Error>;

/// A file of the chain.
struct LayerFile {
    st: Box<dyn Storage>,
    fd: RawFd,
    path: PathBuf,
    format: Format,
    /// Virtual size (a raw layer: its length).
    size: u64,
}

/// Metadata behind the chain's lock.
struct Meta {
    /// One per layer; `None` for raw layers.
    q: Vec<Option<Qcow2>>,
    /// Sequence number of the next free.
    seq: u64,
}

/// Inside-the-crate pieces of a mapping, before they become [`Extent`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    Data {
        layer: LayerId,
        host: u64,
        len: u64,
    },
    Zero {
        len: u64,
    },
    Compressed {
        layer: LayerId,
        host: u64,
        clen: u64,
        skip: u64,
        len: u64,
    },
}

impl Piece {
    fn len(&self) -> u64 {
        match *self {
            Piece::Data { len, .. } | Piece::Zero { len } | Piece::Compressed { len, .. } => len,
        }
    }
}

/// Appends `p` to `out`, merging it into the last piece when they continue each other.
fn push_piece(out: &mut Vec<Piece>, p: Piece) {
    if p.len() == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        match (last, p) {
            (
                Piece::Data { layer, host, len },
                Piece::Data {
                    layer: l2,
                    host: h2,
                    len: n2,
                },
            ) if *layer == l2 && *host + *len == h2 => {
                *len += n2;
                return;
            }
            (Piece::Zero { len }, Piece::Zero { len: n2 }) => {
                *len += n2;
                return;
            }
            _ => {}
        }
    }
    out.push(p);
}

/// Receives the pieces of a mapping in order.
trait Sink {
    fn put(&mut self, p: Piece);
}

impl Sink for Vec<Piece> {
    fn put(&mut self, p: Piece) {
        push_piece(self, p);
    }
}

/// Turns pieces straight into [`Extent`]s, merged, so that mapping allocates nothing beyond
/// the caller's vector.
struct Extents<'a> {
    out: &'a mut Vec<Extent>,
    files: &'a [LayerFile],
}

impl Sink for Extents<'_> {
    fn put(&mut self, p: Piece) {
        if p.len() == 0 {
            return;
        }
        let e = match p {
            Piece::Data { layer, host, len } => Extent::Data {
                layer,
                fd: self.files[layer].fd,
                host,
                len,
            },
            Piece::Zero { len } => Extent::Zero { len },
            Piece::Compressed { len, .. } => Extent::Slow { len },
        };
        if let Some(last) = self.out.last_mut() {
            match (last, e) {
                (
                    Extent::Data {
                        layer, host, len, ..
                    },
                    Extent::Data {
                        layer: l2,
                        host: h2,
                        len: n2,
                        ..
                    },
                ) if *layer == l2 && *host + *len == h2 => {
                    *len += n2;
                    return;
                }
                (Extent::Zero { len }, Extent::Zero { len: n2 })
                | (Extent::Slow { len }, Extent::Slow { len: n2 }) => {
                    *len += n2;
                    return;
                }
                _ => {}
            }
        }
        self.out.push(e);
    }
}

/// Where the rest of a partly written cluster comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    /// Nothing: the write covers the cluster, or the rest already holds the right bytes.
    Nothing,
    /// Zeroes.
    Zeroes,
    /// The layers below the top.
    Backing,
    /// A copy of host cluster `0` of the top.
    Copy(u64),
    /// Decompressed data.
    Compressed(u64, u64),
}

/// The plan for one cluster of a slow write.
#[derive(Clone, Copy, Debug)]
struct Target {
    /// Virtual offset of the cluster.
    cluster: u64,
    /// Written range within the cluster.
    a: u64,
    b: u64,
    /// Host cluster written.
    host: u64,
    fill: Fill,
    /// The L2 entry to set once the data is written.
    entry: Option<u64>,
    /// The cluster was newly allocated.
    fresh: Option<Fresh>,
}

/// Iovec helpers: the byte range `[start, start + len)` of a scatter list.
fn sub_iov<'a>(bufs: &'a [IoSlice<'a>], start: u64, len: u64) -> Vec<IoSlice<'a>> {
    let mut out = Vec::new();
    let (mut pos, end) = (0u64, start + len);
    for b in bufs {
        let (bs, be) = (pos, pos + b.len() as u64);
        pos = be;
        if be <= start || bs >= end {
            continue;
        }
        let x = start.max(bs) - bs;
        let y = end.min(be) - bs;
        out.push(IoSlice::new(&b[x as usize..y as usize]));
    }
    out
}

fn sub_iov_mut<'a>(bufs: &'a mut [IoSliceMut<'_>], start: u64, len: u64) -> Vec<IoSliceMut<'a>> {
    let mut out = Vec::new();
    let (mut pos, end) = (0u64, start + len);
    for b in bufs.iter_mut() {
        let (bs, be) = (pos, pos + b.len() as u64);
        pos = be;
        if be <= start || bs >= end {
            continue;
        }
        let x = (start.max(bs) - bs) as usize;
        let y = (end.min(be) - bs) as usize;
        out.push(IoSliceMut::new(&mut b[x..y]));
    }
    out
}

fn copy_from_iov(bufs: &[IoSlice<'_>], start: u64, dst: &mut [u8]) {
    let mut at = 0;
    for s in sub_iov(bufs, start, dst.len() as u64) {
        dst[at..at + s.len()].copy_from_slice(&s);
        at += s.len();
    }
}

fn fill_iov(bufs: &mut [IoSliceMut<'_>], start: u64, src: Option<&[u8]>, len: u64) {
    let mut at = 0;
    for mut s in sub_iov_mut(bufs, start, len) {
        let n = s.len();
        match src {
            Some(src) => s.copy_from_slice(&src[at..at + n]),
            None => s.fill(0),
        }
        at += n;
    }
}

/// What discard and write-zeroes do to whole clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ZeroMode {
    Discard,
    ZeroUnmap,
    ZeroKeep,
}

/// A qcow2 backing chain (or a raw image) as one virtual disk.
pub struct Chain {
    files: Vec<LayerFile>,
    meta: Mutex<Meta>,
    alloc: Mutex<()>,
    read_only: bool,
    probed_raw: bool,
}

/// Inspection results, from [`Chain::info`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// The top image's format.
    pub format: Format,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// qcow2: cluster size.
    pub cluster_size: Option<u64>,
    /// qcow2: version (2 or 3).
    pub version: Option<u32>,
    /// qcow2: compression type of compressed clusters.
    pub compression: Option<&'static str>,
    /// qcow2: data clusters allocated in the top image (standard and compressed).
    pub allocated_clusters: Option<u64>,
    /// Bytes allocated in the top image (allocated clusters times the cluster size; a raw
    /// image: its length).
    pub allocated_bytes: u64,
    /// The layers, top first.
    pub chain: Vec<LayerInfo>,
}

/// One layer, from [`Chain::info`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// Its file.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Its virtual size.
    pub virtual_size: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The path QEMU uses for backing name `name` of the image at `image`: relative names are
/// relative to the directory of the image.
pub fn resolve_backing(image: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(name),
        None => name.to_path_buf(),
    }
}

fn probe_storage(st: &dyn Storage, path: &Path) -> Result<Format> {
    let mut first = [0u8; PROBE_BYTES];
    let n = st.read_at(&mut first, 0).map_err(|source| Error::Io {
        what: "probing",
        path: path.to_path_buf(),
        offset: 0,
        source,
    })?;
    format::probe(&first[..n]).map_err(|source| Error::Probe {
        path: path.to_path_buf(),
        source,
    })
}

impl Chain {
    /// Opens the image `top` (its path `top_path` resolves relative backing names) and its
    /// backing chain, opening each backing file with `opener`.
    pub fn open(
        top: File,
        top_path: &Path,
        opts: &OpenOptions,
        opener: Opener<'_>,
    ) -> Result<Chain> {
        Self::open_storage(Box::new(top), top_path, opts, opener)
    }

    /// [`Chain::open`] over any [`Storage`] for the top image (tests record its writes).
    pub fn open_storage(
        top: Box<dyn Storage>,
        top_path: &Path,
        opts: &OpenOptions,
        opener: Opener<'_>,
    ) -> Result<Chain> {
        let mut files: Vec<LayerFile> = Vec::new();
        let mut metas = Vec::new();
        let mut seen = HashSet::new();
        let mut probed_raw = false;
        let mut next: Option<(Box<dyn Storage>, PathBuf, Option<Format>)> =
            Some((top, top_path.to_path_buf(), opts.format));
        while let Some((st, path, fmt)) = next.take() {
            let depth = files.len();
            if depth >= MAX_CHAIN {
                return Err(Error::TooLong {
                    top: top_path.to_path_buf(),
                });
            }
            let id = st.identity().map_err(|source| Error::Io {
                what: "stat",
                path: path.clone(),
                offset: 0,
                source,
            })?;
            if !seen.insert(id) {
                return Err(Error::Loop { path });
            }
            let format = match fmt {
                Some(f) => f,
                None => {
                    let f = probe_storage(st.as_ref(), &path)?;
                    if depth == 0 && f == Format::Raw {
                        probed_raw = true;
                    }
                    f
                }
            };
            let writable = depth == 0 && !opts.read_only;
            let layer_err = |p: &Path| {
                let p = p.to_path_buf();
                move |source| Error::Layer { path: p, source }
            };
            let (size, backing) = match format {
                Format::Raw => {
                    if depth == 0 && matches!(opts.backing, Backing::Path(..)) {
                        return Err(Error::RawBacking);
                    }
                    let len = st.file_size().map_err(|source| Error::Io {
                        what: "size",
                        path: path.clone(),
                        offset: 0,
                        source,
                    })?;
                    metas.push(None);
                    (len, None)
                }
                Format::Qcow2 => {
                    let q =
                        Qcow2::open(st.as_ref(), writable, opts.cache_bytes, opts.reserve_bytes)
                            .map_err(layer_err(&path))?;
                    let size = q.header.size;
                    let named = match q.header.backing_file.as_deref() {
                        None => None,
                        Some(name) => {
                            use std::os::unix::ffi::OsStrExt;
                            let name = Path::new(std::ffi::OsStr::from_bytes(name));
                            let fmt = match q.header.backing_format.as_deref() {
                                None => None,
                                Some(n) => Some(Format::from_name(n).ok_or_else(|| {
                                    Error::BackingFormat {
                                        name: n.to_owned(),
                                        by: path.clone(),
                                    }
                                })?),
                            };
                            Some((resolve_backing(&path, name), fmt))
                        }
                    };
                    let backing = if depth == 0 {
                        match &opts.backing {
                            Backing::FromImage => named,
                            Backing::None => None,
                            Backing::Path(p, f) => Some((p.clone(), *f)),
                        }
                    } else {
                        named
                    };
                    metas.push(Some(q));
                    (size, backing)
                }
            };
            let fd = st.fd();
            files.push(LayerFile {
                st,
                fd,
                path: path.clone(),
                format,
                size,
            });
            if let Some((bpath, bfmt)) = backing {
                if bpath.as_os_str().is_empty() {
                    return Err(Error::BackingName { by: path });
                }
                let f = opener(&bpath, bfmt).map_err(|source| Error::OpenBacking {
                    path: bpath.clone(),
                    by: path.clone(),
                    source,
                })?;
                next = Some((Box::new(f), bpath, bfmt));
            }
        }
        Ok(Chain {
            files,
            meta: Mutex::new(Meta { q: metas, seq: 0 }),
            alloc: Mutex::new(()),
            read_only: opts.read_only,
            probed_raw,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.files[0].size
    }

    /// The top image's format.
    pub fn format(&self) -> Format {
        self.files[0].format
    }

    /// Whether the top image's format was probed and found raw: the caller must then check
    /// writes to the first sector with [`crate::probed_raw_write`].
    pub fn probed_raw(&self) -> bool {
        self.probed_raw
    }

    /// Whether the chain is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Number of layers (1: no backing file).
    pub fn layers(&self) -> usize {
        self.files.len()
    }

    /// The descriptor of each layer's file, top first (for registering them with io_uring).
    pub fn fds(&self) -> Vec<RawFd> {
        self.files.iter().map(|f| f.fd).collect()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    fn layer_err(&self, k: LayerId) -> impl FnOnce(LayerError) -> Error + '_ {
        move |source| Error::Layer {
            path: self.files[k].path.clone(),
            source,
        }
    }

    fn io_err(
        &self,
        k: LayerId,
        what: &'static str,
        offset: u64,
    ) -> impl FnOnce(io::Error) -> Error + '_ {
        move |source| Error::Io {
            what,
            path: self.files[k].path.clone(),
            offset,
            source,
        }
    }

    /// Maps `[off, off + len)` of layer `k` (its virtual space) into pieces.
    fn map_layer(
        &self,
        meta: &mut Meta,
        k: LayerId,
        off: u64,
        len: u64,
        out: &mut dyn Sink,
    ) -> Result<()> {
        let Some(file) = self.files.get(k) else {
            out.put(Piece::Zero { len });
            return Ok(());
        };
        let inside = len.min(file.size.saturating_sub(off));
        let past = len - inside;
        if inside > 0 {
            match meta.q[k].as_mut() {
                None => out.put(Piece::Data {
                    layer: k,
                    host: off,
                    len: inside,
                }),
                Some(_) => self.map_qcow2(meta, k, off, inside, out)?,
            }
        }
        if past > 0 {
            out.put(Piece::Zero { len: past });
        }
        Ok(())
    }

    fn map_qcow2(
        &self,
        meta: &mut Meta,
        k: LayerId,
        off: u64,
        len: u64,
        out: &mut dyn Sink,
    ) -> Result<()> {
        let st = self.files[k].st.as_ref();
        let end = off + len;
        let mut at = off;
        // A run of unallocated clusters goes to the layer below in one piece.
        let mut below: Option<(u64, u64)> = None;
        while at < end {
            let Some(q) = meta.q[k].as_mut() else { break };
            let cs = q.geo.cluster_size();
            let n = (q.geo.cluster_start(at) + cs).min(end) - at;
            let entry = q.entry(st, at).map_err(self.layer_err(k))?;
            let file_len = q.file_len;
            let in_c = q.geo.in_cluster(at);
            if !matches!(entry, L2Entry::Unallocated) {
                if let Some((b_off, b_len)) = below.take() {
                    self.map_layer(meta, k + 1, b_off, b_len, out)?;
                }
            }
            match entry {
                L2Entry::Unallocated => {
                    below = match below {
                        Some((b, l)) => Some((b, l + n)),
                        None => Some((at, n)),
                    };
                }
                L2Entry::Zero { .. } => out.put(Piece::Zero { len: n }),
                L2Entry::Normal { host, .. } => {
                    if host >= file_len {
                        return Err(self.layer_err(k)(LayerError::PastEnd {
                            what: "data cluster",
                            offset: host,
                            len: cs,
                            file_len,
                        }));
                    }
                    let h = host + in_c;
                    // Bytes past the end of the file read as zeroes, as in QEMU.
                    let data = n.min(file_len.saturating_sub(h));
                    out.put(Piece::Data {
                        layer: k,
                        host: h,
                        len: data,
                    });
                    out.put(Piece::Zero { len: n - data });
                }
                L2Entry::Compressed { host, len: clen } => out.put(Piece::Compressed {
                    layer: k,
                    host,
                    clen,
                    skip: in_c,
                    len: n,
                }),
            }
            at += n;
        }
        if let Some((b_off, b_len)) = below {
            self.map_layer(meta, k + 1, b_off, b_len, out)?;
        }
        Ok(())
    }

    fn pieces(&self, k: LayerId, off: u64, len: u64) -> Result<Vec<Piece>> {
        let mut out = Vec::new();
        let mut meta = lock(&self.meta);
        self.map_layer(&mut meta, k, off, len, &mut out)?;
        Ok(out)
    }

    /// Maps a read of `len` bytes at virtual byte `off` into `out` (cleared first): extents in
    /// order, covering exactly the range. No data I/O; an L2 cache miss reads the table.
    pub fn map_read(&self, off: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        self.check_range(off, len)?;
        out.clear();
        let mut sink = Extents {
            out,
            files: &self.files,
        };
        let mut meta = lock(&self.meta);
        self.map_layer(&mut meta, 0, off, len, &mut sink)
    }

    /// Maps a write of `len` bytes at `off`: [`WritePath::Direct`] with `out` holding data
    /// extents of the top image when every cluster is allocated there and writable in place
    /// (contiguous clusters merged), else [`WritePath::Slow`] (and `out` empty).
    pub fn map_write(&self, off: u64, len: u64, out: &mut Vec<Extent>) -> Result<WritePath> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(off, len)?;
        out.clear();
        let fd = self.files[0].fd;
        let mut meta = lock(&self.meta);
        let Some(q) = meta.q[0].as_mut() else {
            out.push(Extent::Data {
                layer: 0,
                fd,
                host: off,
                len,
            });
            return Ok(WritePath::Direct);
        };
        let st = self.files[0].st.as_ref();
        let cs = q.geo.cluster_size();
        let end = off + len;
        let mut at = off;
        while at < end {
            let n = (q.geo.cluster_start(at) + cs).min(end) - at;
            let host = match q.entry(st, at).map_err(self.layer_err(0))? {
                L2Entry::Normal { host, copied: true }
                    if !q.is_metadata(host) && host + cs <= q.file_len =>
                {
                    host
                }
                _ => {
                    out.clear();
                    return Ok(WritePath::Slow);
                }
            };
            let h = host + q.geo.in_cluster(at);
            match out.last_mut() {
                Some(Extent::Data {
                    host: lh, len: ll, ..
                }) if *lh + *ll == h => *ll += n,
                _ => out.push(Extent::Data {
                    layer: 0,
                    fd,
                    host: h,
                    len: n,
                }),
            }
            at += n;
        }
        Ok(WritePath::Direct)
    }

    /// Reads compressed cluster data of layer `k` and decompresses the whole cluster.
    fn decompress(&self, k: LayerId, host: u64, clen: u64, out: &mut [u8]) -> Result<()> {
        let (compression, file_len) = {
            let meta = lock(&self.meta);
            match meta.q[k].as_ref() {
                Some(q) => (q.header.compression, q.file_len),
                None => (Compression::Deflate, 0),
            }
        };
        let path = || self.files[k].path.clone();
        if host >= file_len {
            return Err(Error::CompressedPastEnd { path: path(), host });
        }
        // The last compressed cluster of a file may end inside its last sector.
        let n = clen.min(file_len - host);
        let mut buf = vec![0u8; n as usize];
        let got = self.files[k]
            .st
            .read_at(&mut buf, host)
            .map_err(self.io_err(k, "reading compressed data", host))?;
        buf.truncate(got);
        compress::decompress(compression, &buf, out).map_err(|source| Error::Compressed {
            path: path(),
            host,
            source,
        })
    }

    fn cluster_size_of(&self, k: LayerId) -> u64 {
        lock(&self.meta).q[k]
            .as_ref()
            .map_or(65536, |q| q.geo.cluster_size())
    }

    /// Reads `pieces` (covering `[0, total)` of `bufs`) with data I/O.
    fn read_pieces(&self, pieces: &[Piece], bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let mut pos = 0u64;
        for p in pieces {
            match *p {
                Piece::Data { layer, host, len } => {
                    let mut iov = sub_iov_mut(bufs, pos, len);
                    let n = self.files[layer]
                        .st
                        .read_vectored_at(&mut iov, host)
                        .map_err(self.io_err(layer, "reading data", host))?
                        as u64;
                    drop(iov);
                    if n < len {
                        // Past the end of the file: zeroes, as QEMU reads them.
                        fill_iov(bufs, pos + n, None, len - n);
                    }
                }
                Piece::Zero { len } => fill_iov(bufs, pos, None, len),
                Piece::Compressed {
                    layer,
                    host,
                    clen,
                    skip,
                    len,
                } => {
                    let cs = self.cluster_size_of(layer);
                    let mut cluster = vec![0u8; cs as usize];
                    self.decompress(layer, host, clen, &mut cluster)?;
                    fill_iov(
                        bufs,
                        pos,
                        Some(&cluster[skip as usize..(skip + len) as usize]),
                        len,
                    );
                }
            }
            pos += p.len();
        }
        Ok(())
    }

    /// Reads at virtual byte `off` into `bufs`: any range, including compressed clusters.
    pub fn read_slow(&self, off: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(off, len)?;
        let pieces = self.pieces(0, off, len)?;
        self.read_pieces(&pieces, bufs)
    }

    /// Reads `buf.len()` bytes at `off` of layer `k`'s virtual disk.
    fn read_layer(&self, k: LayerId, off: u64, buf: &mut [u8]) -> Result<()> {
        let pieces = self.pieces(k, off, buf.len() as u64)?;
        self.read_pieces(&pieces, &mut [IoSliceMut::new(buf)])
    }

    /// Writes `bufs` at virtual byte `off`: allocates clusters, copies the rest of partly
    /// written clusters from the backing chain (or decompresses them), and fills zero clusters.
    pub fn write_slow(&self, off: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(off, len)?;
        let _a = lock(&self.alloc);
        self.write_locked(off, len, bufs)
    }

    /// Plans the clusters of a write (allocating what it needs); metadata lock held.
    fn plan(&self, meta: &mut Meta, off: u64, len: u64) -> Result<Vec<Target>> {
        let st = self.files[0].st.as_ref();
        let size = self.size();
        let has_backing = self.files.len() > 1;
        let Some(q) = meta.q[0].as_mut() else {
            return Ok(Vec::new());
        };
        let cs = q.geo.cluster_size();
        let mut targets = Vec::new();
        let mut needs = 0usize;
        let end = off + len;
        let mut c = q.geo.cluster_start(off);
        while c < end {
            let a = off.max(c) - c;
            let b = end.min(c + cs) - c;
            let vend = (c + cs).min(size) - c;
            let whole = a == 0 && b >= vend;
            let entry = q.entry(st, c).map_err(self.layer_err(0))?;
            let mut t = Target {
                cluster: c,
                a,
                b,
                host: 0,
                fill: Fill::Nothing,
                entry: None,
                fresh: None,
            };
            let in_place = match entry {
                L2Entry::Normal { host, copied } if !q.is_metadata(host) => {
                    copied
                        || q.refcount(st, host >> q.geo.cluster_bits)
                            .map_err(self.layer_err(0))?
                            == 1
                }
                L2Entry::Zero {
                    host: Some(host),
                    copied: true,
                } => !q.is_metadata(host),
                _ => false,
            };
            match entry {
                L2Entry::Normal { host, copied } if in_place => {
                    t.host = host;
                    if !copied {
                        t.entry = Some(host | COPIED);
                    }
                }
                L2Entry::Zero {
                    host: Some(host), ..
                } if in_place => {
                    t.host = host;
                    t.entry = Some(host | COPIED);
                    if !whole {
                        t.fill = Fill::Zeroes;
                    }
                }
                L2Entry::Normal { host, .. } if q.is_metadata(host) => {
                    return Err(self.layer_err(0)(LayerError::DataInMetadata(host)));
                }
                _ => {
                    needs += 1;
                    if !whole {
                        t.fill = match entry {
                            L2Entry::Unallocated if has_backing => Fill::Backing,
                            L2Entry::Unallocated | L2Entry::Zero { .. } => Fill::Zeroes,
                            L2Entry::Normal { host, .. } => Fill::Copy(host),
                            L2Entry::Compressed { host, len } => Fill::Compressed(host, len),
                        };
                    }
                    // Marks the target as needing a cluster.
                    t.entry = Some(u64::MAX);
                }
            }
            if t.entry.is_some() {
                q.ensure_l2(st, c).map_err(self.layer_err(0))?;
            }
            targets.push(t);
            c += cs;
        }
        let fresh = q.take(st, needs).map_err(self.layer_err(0))?;
        let mut fresh = fresh.into_iter();
        for t in targets.iter_mut().filter(|t| t.entry == Some(u64::MAX)) {
            let Some(f) = fresh.next() else { break };
            t.host = f.host;
            t.fresh = Some(f);
            t.entry = Some(f.host | COPIED);
            if t.fill == Fill::Zeroes && f.zeroed {
                t.fill = Fill::Nothing;
            }
        }
        Ok(targets)
    }

    fn write_locked(&self, off: u64, len: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let st = self.files[0].st.as_ref();
        let targets = {
            let mut meta = lock(&self.meta);
            if meta.q[0].is_none() {
                drop(meta);
                return st.write_vectored_at(bufs, off).map_err(self.io_err(
                    0,
                    "writing data",
                    off,
                ));
            }
            self.plan(&mut meta, off, len)?
        };
        let result = self.write_targets(off, &targets, bufs);
        let mut meta = lock(&self.meta);
        let seq = meta.seq;
        meta.seq += 1;
        let Some(q) = meta.q[0].as_mut() else {
            return result;
        };
        if let Err(e) = result {
            let fresh: Vec<Fresh> = targets.iter().filter_map(|t| t.fresh).collect();
            q.give_back(&fresh);
            return Err(e);
        }
        for t in &targets {
            if let Some(entry) = t.entry {
                q.replace(st, t.cluster, entry, seq)
                    .map_err(self.layer_err(0))?;
            }
        }
        let too_dirty = q.dirty_bytes() > q.dirty_limit();
        drop(meta);
        if too_dirty {
            self.flush_locked()?;
        }
        Ok(())
    }

    /// The data I/O of a planned write.
    fn write_targets(&self, off: u64, targets: &[Target], bufs: &[IoSlice<'_>]) -> Result<()> {
        let st = self.files[0].st.as_ref();
        let cs = self.cluster_size_of(0);
        let size = self.size();
        let mut i = 0;
        while i < targets.len() {
            let t = targets[i];
            if t.fill != Fill::Nothing {
                let mut buf = vec![0u8; cs as usize];
                let vend = ((t.cluster + cs).min(size) - t.cluster) as usize;
                match t.fill {
                    Fill::Nothing | Fill::Zeroes => {}
                    Fill::Backing => self.read_layer(1, t.cluster, &mut buf[..vend])?,
                    Fill::Copy(h) => {
                        // Only the part inside the file is read; the rest reads as zeroes.
                        let file_len =
                            st.file_size()
                                .map_err(self.io_err(0, "size of the image", 0))?;
                        let n = (cs.min(file_len.saturating_sub(h))) as usize;
                        st.read_at(&mut buf[..n], h).map_err(self.io_err(
                            0,
                            "copying a cluster",
                            h,
                        ))?;
                    }
                    Fill::Compressed(h, l) => self.decompress(0, h, l, &mut buf)?,
                }
                let v = t.cluster + t.a;
                copy_from_iov(bufs, v - off, &mut buf[t.a as usize..t.b as usize]);
                st.write_at(&buf, t.host)
                    .map_err(self.io_err(0, "writing data", t.host))?;
                i += 1;
                continue;
            }
            // A run of clusters written straight from the caller's buffers.
            let mut j = i + 1;
            while j < targets.len() {
                let (p, n) = (targets[j - 1], targets[j]);
                if n.fill != Fill::Nothing || p.host + p.b != n.host + n.a {
                    break;
                }
                j += 1;
            }
            let first = targets[i];
            let last = targets[j - 1];
            let vstart = first.cluster + first.a;
            let vend = last.cluster + last.b;
            let iov = sub_iov(bufs, vstart - off, vend - vstart);
            let h = first.host + first.a;
            st.write_vectored_at(&iov, h)
                .map_err(self.io_err(0, "writing data", h))?;
            i = j;
        }
        Ok(())
    }

    /// Whether `[off, off + len)` of the virtual disk reads as zeroes without reading data.
    fn reads_zero(&self, off: u64, len: u64) -> Result<bool> {
        Ok(self
            .pieces(0, off, len)?
            .iter()
            .all(|p| matches!(p, Piece::Zero { .. })))
    }

    fn write_zero_bytes(&self, off: u64, len: u64) -> Result<()> {
        let chunk = 1u64 << 20;
        let zeros = vec![0u8; chunk.min(len) as usize];
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(chunk);
            self.write_locked(at, n, &[IoSlice::new(&zeros[..n as usize])])?;
            at += n;
        }
        Ok(())
    }

    fn zero_op(&self, off: u64, len: u64, mode: ZeroMode) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(off, len)?;
        if len == 0 {
            return Ok(());
        }
        let st = self.files[0].st.as_ref();
        let _a = lock(&self.alloc);
        let Some((cs, version)) = lock(&self.meta).q[0]
            .as_ref()
            .map(|q| (q.geo.cluster_size(), q.geo.version))
        else {
            return st
                .zero_range(off, len, mode != ZeroMode::ZeroKeep)
                .map_err(self.io_err(0, "zeroing", off));
        };
        let size = self.size();
        let end = off + len;
        // Whole clusters: [first, last), the disk's partial last cluster counting as whole.
        let first = off.div_ceil(cs) * cs;
        let last = if end == size {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        let has_backing = self.files.len() > 1;
        let mut partial = Vec::new();
        if first >= last {
            partial.push((off, len));
        } else {
            if off < first {
                partial.push((off, first - off));
            }
            if last < end {
                partial.push((last, end - last));
            }
        }
        let mut write_real = Vec::new();
        if first < last {
            let mut meta = lock(&self.meta);
            let seq = meta.seq;
            meta.seq += 1;
            let Some(q) = meta.q[0].as_mut() else {
                return Ok(());
            };
            let mut c = first;
            let l2_span = q.geo.cluster_size() * q.geo.l2_entries();
            while c < last {
                // Without a backing file, a range with no L2 table already reads as zeroes
                // and nothing in it is freed: skip the whole table's range.
                if !has_backing && !q.has_l2(c) {
                    c = ((c / l2_span + 1) * l2_span).min(last);
                    continue;
                }
                let raw = q.raw_entry(st, c).map_err(self.layer_err(0))?;
                let old = q.geo.decode(raw).map_err(|e| self.layer_err(0)(e.into()))?;
                let target = if version >= 3 {
                    let freeing = if has_backing { ZERO } else { 0 };
                    match (mode, old) {
                        (ZeroMode::ZeroKeep, L2Entry::Normal { host, copied: true })
                            if !q.is_metadata(host) =>
                        {
                            Some(host | ZERO | COPIED)
                        }
                        (
                            ZeroMode::ZeroKeep,
                            L2Entry::Zero {
                                host: Some(_),
                                copied: true,
                            },
                        ) => None,
                        _ => Some(freeing),
                    }
                } else {
                    match (mode, old) {
                        (_, L2Entry::Unallocated) if !has_backing => None,
                        (ZeroMode::Discard, _) if has_backing => None,
                        (ZeroMode::Discard | ZeroMode::ZeroUnmap, _) if !has_backing => Some(0),
                        _ => {
                            write_real.push(c);
                            None
                        }
                    }
                };
                if let Some(new) = target {
                    if new != raw {
                        if new != 0 {
                            q.ensure_l2(st, c).map_err(self.layer_err(0))?;
                        }
                        if q.has_l2(c) {
                            q.replace(st, c, new, seq).map_err(self.layer_err(0))?;
                        }
                    }
                }
                c += cs;
            }
        }
        // Runs of clusters that need real zeroes, written as ranges.
        let mut i = 0;
        while i < write_real.len() {
            let mut j = i + 1;
            while j < write_real.len() && write_real[j] == write_real[j - 1] + cs {
                j += 1;
            }
            let start = write_real[i];
            let end = (write_real[j - 1] + cs).min(size);
            self.write_zero_bytes(start, end - start)?;
            i = j;
        }
        if mode != ZeroMode::Discard {
            for (o, l) in partial {
                if !self.reads_zero(o, l)? {
                    self.write_zero_bytes(o, l)?;
                }
            }
        }
        Ok(())
    }

    /// Discards `[off, off + len)`: whole clusters in the range are freed and then read as
    /// zeroes (version 3: zero clusters when there is a backing file, so no backing data
    /// reappears). Partial clusters keep their data. A version 2 image with a backing file
    /// keeps its clusters (version 2 has no zero clusters, and unallocating would let backing
    /// data reappear).
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.zero_op(off, len, ZeroMode::Discard)
    }

    /// Makes `[off, off + len)` read as zeroes: whole clusters become zero clusters (version 3;
    /// `unmap` frees their host clusters, else allocated ones stay preallocated), partial
    /// clusters get zeroes written. Version 2 has no zero clusters: clusters are unallocated
    /// when there is no backing file and `unmap` is set, else zeroes are written.
    pub fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        let mode = if unmap {
            ZeroMode::ZeroUnmap
        } else {
            ZeroMode::ZeroKeep
        };
        self.zero_op(off, len, mode)
    }

    /// Makes every write completed before the call durable, with the metadata that reaches it.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _a = lock(&self.alloc);
        self.flush_locked()
    }

    fn flush_locked(&self) -> Result<()> {
        let st = self.files[0].st.as_ref();
        let sync = |what| st.sync().map_err(self.io_err(0, what, 0));
        let plan = {
            let meta = lock(&self.meta);
            match meta.q[0].as_ref() {
                None => None,
                Some(q) => q.is_dirty().then(|| q.flush_plan()),
            }
        };
        // The data (and the copy-on-write data new L2 entries point to) first.
        sync("sync")?;
        let Some(plan) = plan else {
            return Ok(());
        };
        for (_, w) in &plan.l2 {
            st.write_at(&w.bytes, w.offset).map_err(self.io_err(
                0,
                "writing an L2 table",
                w.offset,
            ))?;
        }
        // L2 tables durable before the L1 entries that point to them and before the
        // refcount decrements of clusters they no longer reference.
        sync("sync")?;
        if let Some(w) = &plan.l1 {
            st.write_at(&w.bytes, w.offset).map_err(self.io_err(
                0,
                "writing the L1 table",
                w.offset,
            ))?;
        }
        {
            let mut meta = lock(&self.meta);
            if let Some(q) = meta.q[0].as_mut() {
                q.flushed(&plan);
                q.apply_frees(st).map_err(self.layer_err(0))?;
            }
        }
        if plan.l1.is_some() {
            sync("sync")?;
        }
        Ok(())
    }

    /// A mark in the sequence of frees: clusters freed before it become reusable when
    /// [`Chain::reclaim_freed`] gets it. Take the mark, wait until every extent mapped before
    /// the mark was taken has finished its I/O, then reclaim with it.
    pub fn free_mark(&self) -> FreeMark {
        FreeMark(lock(&self.meta).seq)
    }

    /// Makes clusters freed before `mark` reusable (they were freed on disk at a flush, and
    /// have been kept from reuse since).
    pub fn reclaim_freed(&self, mark: FreeMark) {
        let mut meta = lock(&self.meta);
        if let Some(q) = meta.q[0].as_mut() {
            q.reclaim(mark.0);
        }
    }

    /// Clusters freed on disk and waiting for [`Chain::reclaim_freed`].
    pub fn quarantined(&self) -> usize {
        lock(&self.meta).q[0]
            .as_ref()
            .map_or(0, |q| q.quarantined())
    }

    /// Flushes, returns unused reserved clusters and trims the file: the image is then free
    /// of leaks. Later writes reserve clusters again; dropping a writable chain closes it
    /// (ignoring errors), so call this to see them.
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _a = lock(&self.alloc);
        self.flush_locked()?;
        let st = self.files[0].st.as_ref();
        let mut meta = lock(&self.meta);
        if let Some(q) = meta.q[0].as_mut() {
            q.release_reserve(st).map_err(self.layer_err(0))?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `off` (buffered; for tools).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.read_slow(off, &mut [IoSliceMut::new(buf)])
    }

    /// Writes `buf` at `off` (buffered; for tools): whole clusters of zeroes become holes
    /// (unallocated or zero clusters) instead of allocated clusters.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let len = buf.len() as u64;
        self.check_range(off, len)?;
        let Some(cs) = lock(&self.meta).q[0].as_ref().map(|q| q.geo.cluster_size()) else {
            return self.write_slow(off, &[IoSlice::new(buf)]);
        };
        let size = self.size();
        let end = off + len;
        let mut at = off;
        // Runs of data and runs of whole zero clusters.
        while at < end {
            let c = at / cs * cs;
            let cend = (c + cs).min(end);
            let whole = at == c && (cend == c + cs || cend == size);
            let chunk = &buf[(at - off) as usize..(cend - off) as usize];
            if whole && chunk.iter().all(|&b| b == 0) {
                let mut zend = cend;
                while zend < end {
                    let nend = (zend + cs).min(end);
                    let w = nend == zend + cs || nend == size;
                    let ch = &buf[(zend - off) as usize..(nend - off) as usize];
                    if !w || ch.iter().any(|&b| b != 0) {
                        break;
                    }
                    zend = nend;
                }
                self.write_zeroes(at, zend - at, true)?;
                at = zend;
                continue;
            }
            let mut dend = cend;
            while dend < end {
                let nend = (dend + cs).min(end);
                let ch = &buf[(dend - off) as usize..(nend - off) as usize];
                if ch.iter().all(|&b| b == 0) {
                    break;
                }
                dend = nend;
            }
            let data = &buf[(at - off) as usize..(dend - off) as usize];
            let mut ext = Vec::new();
            match self.map_write(at, dend - at, &mut ext)? {
                WritePath::Direct => {
                    let mut pos = 0usize;
                    for e in ext {
                        if let Extent::Data { host, len, .. } = e {
                            let n = len as usize;
                            self.files[0]
                                .st
                                .write_at(&data[pos..pos + n], host)
                                .map_err(self.io_err(0, "writing data", host))?;
                            pos += n;
                        }
                    }
                }
                WritePath::Slow => self.write_slow(at, &[IoSlice::new(data)])?,
            }
            at = dend;
        }
        Ok(())
    }

    /// Format, size, allocation and the backing chain.
    pub fn info(&self) -> Result<Info> {
        let mut meta = lock(&self.meta);
        let chain = self
            .files
            .iter()
            .map(|f| LayerInfo {
                path: f.path.clone(),
                format: f.format,
                virtual_size: f.size,
            })
            .collect();
        let st = self.files[0].st.as_ref();
        Ok(match meta.q[0].as_mut() {
            None => Info {
                format: Format::Raw,
                virtual_size: self.size(),
                cluster_size: None,
                version: None,
                compression: None,
                allocated_clusters: None,
                allocated_bytes: self.size(),
                chain,
            },
            Some(q) => {
                let n = q.allocated_clusters(st).map_err(self.layer_err(0))?;
                Info {
                    format: Format::Qcow2,
                    virtual_size: self.size(),
                    cluster_size: Some(q.geo.cluster_size()),
                    version: Some(q.geo.version),
                    compression: Some(match q.header.compression {
                        Compression::Deflate => "zlib",
                        Compression::Zstd => "zstd",
                    }),
                    allocated_clusters: Some(n),
                    allocated_bytes: n * q.geo.cluster_size(),
                    chain,
                }
            }
        })
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        if !self.read_only {
            // Best effort: a failure leaves leaked clusters at worst.
            let _ = self.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_merge_when_contiguous() {
        let mut v = Vec::new();
        push_piece(
            &mut v,
            Piece::Data {
                layer: 0,
                host: 100,
                len: 10,
            },
        );
        push_piece(
            &mut v,
            Piece::Data {
                layer: 0,
                host: 110,
                len: 5,
            },
        );
        push_piece(
            &mut v,
            Piece::Data {
                layer: 1,
                host: 115,
                len: 5,
            },
        );
        push_piece(&mut v, Piece::Zero { len: 3 });
        push_piece(&mut v, Piece::Zero { len: 4 });
        push_piece(&mut v, Piece::Zero { len: 0 });
        assert_eq!(
            v,
            vec![
                Piece::Data {
                    layer: 0,
                    host: 100,
                    len: 15
                },
                Piece::Data {
                    layer: 1,
                    host: 115,
                    len: 5
                },
                Piece::Zero { len: 7 },
            ]
        );
    }

    #[test]
    fn sub_iov_slices_across_buffers() {
        let (a, b) = ([1u8; 4], [2u8; 4]);
        let bufs = [IoSlice::new(&a), IoSlice::new(&b)];
        let s = sub_iov(&bufs, 2, 4);
        let flat: Vec<u8> = s.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(flat, vec![1, 1, 2, 2]);
        let mut out = [0u8; 3];
        copy_from_iov(&bufs, 3, &mut out);
        assert_eq!(out, [1, 2, 2]);
    }

    #[test]
    fn backing_names_resolve_relative_to_the_image() {
        assert_eq!(
            resolve_backing(Path::new("/a/b/top.qcow2"), Path::new("base.raw")),
            PathBuf::from("/a/b/base.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("/a/b/top.qcow2"), Path::new("/c/base.raw")),
            PathBuf::from("/c/base.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("top.qcow2"), Path::new("../base")),
            PathBuf::from("../base")
        );
    }
}
