//! One qcow2 image's metadata: the L1 table, cached L2 tables, refcounts and the allocator.
//!
//! [`Qcow2`] knows nothing of backing files or locks; [`crate::chain`] keeps one per qcow2
//! layer behind the chain's metadata lock and does the data I/O. This module owns the
//! metadata write order that makes the image crash safe (the scheme is described in the crate
//! docs): clusters are reserved in batches whose refcounts are written before any of them is
//! used (and durable before any L2 entry naming them is written); L2 and L1 changes stay in memory until [`Qcow2::flush_plan`] and friends
//! write them after the data they point to is durable; refcount decrements wait until the L2
//! entries that dropped the reference are durable, and freed clusters then sit in a
//! quarantine until the caller says no I/O mapped before the free is still in flight.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io;

use lru::LruCache;
use thiserror::Error;

use crate::header::{self, Header, HeaderError};
use crate::storage::Storage;
use crate::table::{self, Geometry, L2Entry, TableError, COPIED};

/// Errors of one qcow2 layer's metadata.
#[derive(Debug, Error)]
pub enum LayerError {
    /// Reading or writing the image failed.
    #[error("{what} at byte {offset:#x} failed")]
    Io {
        /// What was being read or written.
        what: &'static str,
        /// File offset.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The header is invalid or its features forbid the open.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// A table entry is invalid.
    #[error(transparent)]
    Table(#[from] TableError),
    /// A table lies (partly) past the end of the file.
    #[error("the {what} at {offset:#x} ({len} bytes) lies past the end of the file ({file_len} bytes); the image is corrupt or truncated")]
    PastEnd {
        /// Which table.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A table overlaps other metadata (the header, the L1 or the refcount table).
    #[error("the {what} at {offset:#x} overlaps other metadata; the image is corrupt (`qemu-img check -r all`)")]
    Overlap {
        /// Which table or cluster.
        what: &'static str,
        /// Its offset.
        offset: u64,
    },
    /// A refcount would drop below zero: the image counts fewer references than it has.
    #[error("the refcount of cluster {0:#x} would drop below zero; the image is corrupt (`qemu-img check -r all`)")]
    RefcountUnderflow(u64),
    /// An L2 table is shared (refcount above one), which only internal snapshots do.
    #[error("the L2 table at {0:#x} is shared (internal snapshots); writing it is not supported")]
    SharedL2(u64),
    /// The refcount table cannot grow past QEMU's 8 MiB limit.
    #[error("the image is full: its refcount table would exceed 8 MiB")]
    Full,
    /// A data cluster that an L2 entry names is metadata of the image.
    #[error("an L2 entry points to host cluster {0:#x}, which holds metadata; the image is corrupt (`qemu-img check -r all`)")]
    DataInMetadata(u64),
    /// An allocation was asked of an image opened read-only.
    #[error("the image is open read-only")]
    ReadOnly,
}

/// Result of this module's operations.
pub type Result<T> = std::result::Result<T, LayerError>;

fn io_err(what: &'static str, offset: u64) -> impl FnOnce(io::Error) -> LayerError {
    move |source| LayerError::Io {
        what,
        offset,
        source,
    }
}

/// A dirty range of a table, as [start, end) in entries or bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Span(Option<(usize, usize)>);

impl Span {
    fn add(&mut self, a: usize, b: usize) {
        self.0 = Some(match self.0 {
            None => (a, b),
            Some((x, y)) => (x.min(a), y.max(b)),
        });
    }
}

/// A cached L2 table, entries in native byte order.
struct L2Table {
    entries: Box<[u64]>,
    /// Entries changed since the table was last written.
    dirty: Span,
}

/// Bytes at file offset `off` to be written.
pub(crate) struct Write {
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// What a flush must write, gathered under the metadata lock.
pub(crate) struct FlushPlan {
    /// Dirty L2 spans, with the L1 index of each table.
    pub l2: Vec<(u64, Write)>,
    /// The dirty span of the L1 table.
    pub l1: Option<Write>,
}

/// A cluster the allocator handed out: its refcount is one on disk already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fresh {
    /// Host byte offset.
    pub host: u64,
    /// The cluster lies past the file's old end: it reads as zeroes.
    pub zeroed: bool,
}

/// Refcount state of a writable image.
struct Refcounts {
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    /// Refcount blocks by table index, raw bytes (always written back before the metadata
    /// lock is released, so never dirty at rest).
    blocks: LruCache<u64, Box<[u8]>>,
    dirty_blocks: BTreeMap<u64, Span>,
    /// Lowest cluster index that may be free.
    free_hint: u64,
    /// Reserved clusters (refcount one on disk, unused), ascending.
    reserved: VecDeque<Fresh>,
    /// Clusters in the next reservation.
    batch: u64,
    /// Decrements waiting for the L2 entries that dropped the references to be durable:
    /// cluster index to (count, sequence number of the latest free).
    pending: BTreeMap<u64, (u64, u64)>,
    /// Free clusters not to be reused until the caller reclaims them: index to sequence.
    quarantine: BTreeMap<u64, u64>,
}

/// Most clusters reserved at once.
const MAX_BATCH_BYTES: u64 = 64 << 20;
/// Refcount blocks kept in memory.
const REFBLOCK_CACHE_BYTES: usize = 8 << 20;

/// One qcow2 image's metadata.
pub(crate) struct Qcow2 {
    pub header: Header,
    pub geo: Geometry,
    l1: Vec<u64>,
    l1_dirty: Span,
    l2: LruCache<u64, L2Table>,
    l2_budget: usize,
    /// The file's length as this writer knows it (reads past it see zeroes).
    pub file_len: u64,
    /// Cluster indices holding metadata, for writable images.
    meta: HashSet<u64>,
    rc: Option<Refcounts>,
}

fn read_exact(st: &dyn Storage, what: &'static str, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let n = st.read_at(&mut buf, offset).map_err(io_err(what, offset))?;
    if n < buf.len() {
        return Err(LayerError::Io {
            what,
            offset,
            source: io::Error::from(io::ErrorKind::UnexpectedEof),
        });
    }
    Ok(buf)
}

fn be_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// The bytes of entries `[a, b)` of `entries`, widened to whole 512-byte sectors.
fn sector_span(entries: &[u64], a: usize, b: usize) -> (usize, Vec<u8>) {
    let first = a & !63;
    let last = (b.div_ceil(64) * 64).min(entries.len());
    let mut bytes = Vec::with_capacity((last - first) * 8);
    for e in &entries[first..last] {
        bytes.extend_from_slice(&e.to_be_bytes());
    }
    (first * 8, bytes)
}

impl Qcow2 {
    /// Reads the header and tables of the image in `st`. `writable`: checks the features for a
    /// read-write open, loads the refcount table and clears autoclear bits. `first_batch`: bytes
    /// of clusters reserved at the first allocation (later batches double).
    pub fn open(
        st: &dyn Storage,
        writable: bool,
        l2_budget: usize,
        first_batch: u64,
    ) -> Result<Qcow2> {
        let file_len = st.file_size().map_err(io_err("size of the image", 0))?;
        let mut first = vec![0u8; 4096.min(file_len as usize)];
        let n = st.read_at(&mut first, 0).map_err(io_err("header", 0))?;
        first.truncate(n);
        let bits = Header::peek_cluster_bits(&first)?;
        let cs = 1u64 << bits;
        let mut area = vec![0u8; cs.min(file_len) as usize];
        let n = st.read_at(&mut area, 0).map_err(io_err("header", 0))?;
        area.truncate(n);
        let header = Header::parse(&area)?;
        header.check_open(writable)?;
        let geo = Geometry::of(&header);
        let l1_bytes = u64::from(header.l1_size) * 8;
        let check_range = |what: &'static str, offset: u64, len: u64| -> Result<()> {
            if offset.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(LayerError::PastEnd {
                    what,
                    offset,
                    len,
                    file_len,
                });
            }
            Ok(())
        };
        check_range("L1 table", header.l1_table_offset, l1_bytes)?;
        let l1 = be_words(&read_exact(
            st,
            "L1 table",
            header.l1_table_offset,
            l1_bytes,
        )?);
        let rt_bytes = u64::from(header.refcount_table_clusters) * cs;
        let l1_range = (header.l1_table_offset, header.l1_table_offset + l1_bytes);
        let rt_range = (
            header.refcount_table_offset,
            header.refcount_table_offset + rt_bytes,
        );
        if l1_bytes > 0 && l1_range.0 < rt_range.1 && rt_range.0 < l1_range.1 {
            return Err(LayerError::Overlap {
                what: "L1 table",
                offset: l1_range.0,
            });
        }
        let mut q = Qcow2 {
            header,
            geo,
            l1,
            l1_dirty: Span::default(),
            l2: LruCache::unbounded(),
            l2_budget,
            file_len,
            meta: HashSet::new(),
            rc: None,
        };
        for (i, &raw) in q.l1.iter().enumerate() {
            q.geo.l1_offset(i as u64, raw)?;
        }
        if writable {
            check_range("refcount table", rt_range.0, rt_bytes)?;
            let table = be_words(&read_exact(st, "refcount table", rt_range.0, rt_bytes)?);
            q.meta.insert(0);
            for c in (l1_range.0 >> bits)..l1_range.1.div_ceil(cs) {
                q.meta.insert(c);
            }
            for c in (rt_range.0 >> bits)..(rt_range.1 >> bits) {
                q.meta.insert(c);
            }
            for (i, &raw) in table.iter().enumerate() {
                let off = q.geo.reft_offset(i as u64, raw)?;
                if off != 0 {
                    q.meta.insert(off >> bits);
                }
            }
            for (i, &raw) in q.l1.iter().enumerate() {
                let off = q.geo.l1_offset(i as u64, raw)?;
                if off != 0 {
                    q.meta.insert(off >> bits);
                }
            }
            q.rc = Some(Refcounts {
                table,
                table_offset: rt_range.0,
                table_clusters: u64::from(q.header.refcount_table_clusters),
                blocks: LruCache::unbounded(),
                dirty_blocks: BTreeMap::new(),
                free_hint: 0,
                reserved: VecDeque::new(),
                batch: (first_batch >> bits).max(1),
                pending: BTreeMap::new(),
                quarantine: BTreeMap::new(),
            });
            if q.header.version == 3 && q.header.autoclear != q.header.autoclear_after_open() {
                let v = q.header.autoclear_after_open();
                st.write_at(&v.to_be_bytes(), header::AUTOCLEAR_OFFSET)
                    .map_err(io_err("header autoclear bits", header::AUTOCLEAR_OFFSET))?;
                st.sync().map_err(io_err("sync", 0))?;
                q.header.autoclear = v;
            }
        }
        Ok(q)
    }

    /// Whether L2 table `offset` is a valid place for a table: aligned (checked by the
    /// geometry), inside the file, not the header, L1 or refcount table.
    fn check_l2_offset(&self, offset: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        if offset.checked_add(cs).is_none_or(|e| e > self.file_len) {
            return Err(LayerError::PastEnd {
                what: "L2 table",
                offset,
                len: cs,
                file_len: self.file_len,
            });
        }
        let l1 = (
            self.header.l1_table_offset,
            self.header.l1_table_offset + u64::from(self.header.l1_size) * 8,
        );
        let (rt_off, rt_clusters) = match &self.rc {
            Some(rc) => (rc.table_offset, rc.table_clusters),
            None => (
                self.header.refcount_table_offset,
                u64::from(self.header.refcount_table_clusters),
            ),
        };
        let rt = (rt_off, rt_off + rt_clusters * cs);
        let overlaps = |(a, b): (u64, u64)| offset < b && a < offset + cs;
        if offset < cs || overlaps(l1) || overlaps(rt) {
            return Err(LayerError::Overlap {
                what: "L2 table",
                offset,
            });
        }
        Ok(())
    }

    /// Loads L2 table `l1i` into the cache; `false` when the L1 entry is empty.
    fn load_l2(&mut self, st: &dyn Storage, l1i: u64) -> Result<bool> {
        if self.l2.contains(&l1i) {
            return Ok(true);
        }
        let Some(&raw) = self.l1.get(l1i as usize) else {
            return Ok(false);
        };
        let offset = self.geo.l1_offset(l1i, raw)?;
        if offset == 0 {
            return Ok(false);
        }
        self.check_l2_offset(offset)?;
        let bytes = read_exact(st, "L2 table", offset, self.geo.cluster_size())?;
        let entries = be_words(&bytes).into_boxed_slice();
        self.evict();
        self.l2.put(
            l1i,
            L2Table {
                entries,
                dirty: Span::default(),
            },
        );
        Ok(true)
    }

    /// Drops clean tables, least recently used first, while the cache is over its budget.
    fn evict(&mut self) {
        let table_bytes = self.geo.cluster_size() as usize;
        while (self.l2.len() + 1) * table_bytes > self.l2_budget {
            let victim = self
                .l2
                .iter()
                .rev()
                .find(|(_, t)| t.dirty.0.is_none())
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    self.l2.pop(&k);
                }
                None => break,
            }
        }
    }

    /// Bytes of dirty L2 tables in the cache.
    pub fn dirty_bytes(&self) -> usize {
        let n = self.l2.iter().filter(|(_, t)| t.dirty.0.is_some()).count();
        n * self.geo.cluster_size() as usize
    }

    /// Dirty L2 bytes beyond which a slow write flushes: half the cache budget (dirty tables
    /// cannot be evicted), at least one table.
    pub fn dirty_limit(&self) -> usize {
        (self.l2_budget / 2).max(self.geo.cluster_size() as usize)
    }

    /// Whether flushing has anything to write besides syncing data.
    pub fn is_dirty(&self) -> bool {
        self.l1_dirty.0.is_some()
            || self.l2.iter().any(|(_, t)| t.dirty.0.is_some())
            || self.rc.as_ref().is_some_and(|rc| !rc.pending.is_empty())
    }

    /// The raw L2 entry for virtual byte `off` (0 when no L2 table).
    pub fn raw_entry(&mut self, st: &dyn Storage, off: u64) -> Result<u64> {
        let (l1i, l2i) = self.geo.split(off);
        if !self.load_l2(st, l1i)? {
            return Ok(0);
        }
        Ok(self.l2.get(&l1i).map_or(0, |t| t.entries[l2i]))
    }

    /// The decoded L2 entry for virtual byte `off`.
    pub fn entry(&mut self, st: &dyn Storage, off: u64) -> Result<L2Entry> {
        let raw = self.raw_entry(st, off)?;
        Ok(self.geo.decode(raw)?)
    }

    /// Sets the raw L2 entry for `off`; the table must be loaded (see [`Qcow2::ensure_l2`]).
    fn set_raw(&mut self, off: u64, raw: u64) {
        let (l1i, l2i) = self.geo.split(off);
        if let Some(t) = self.l2.get_mut(&l1i) {
            if t.entries[l2i] != raw {
                t.entries[l2i] = raw;
                t.dirty.add(l2i, l2i + 1);
            }
        }
    }

    /// Whether writing host cluster `host` would overwrite metadata.
    pub fn is_metadata(&self, host: u64) -> bool {
        self.meta.contains(&(host >> self.geo.cluster_bits))
    }

    /// Makes sure the L2 table for `off` exists and is loaded and writable, allocating it.
    pub fn ensure_l2(&mut self, st: &dyn Storage, off: u64) -> Result<()> {
        let (l1i, _) = self.geo.split(off);
        let raw = self.l1[l1i as usize];
        if self.load_l2(st, l1i)? {
            if raw & COPIED == 0 {
                let offset = raw & table::OFFSET_MASK;
                if self.refcount(st, offset >> self.geo.cluster_bits)? != 1 {
                    return Err(LayerError::SharedL2(offset));
                }
                self.l1[l1i as usize] = raw | COPIED;
                self.l1_dirty.add(l1i as usize, l1i as usize + 1);
            }
            return Ok(());
        }
        let c = self.take(st, 1)?[0];
        let entries = vec![0u64; self.geo.l2_entries() as usize].into_boxed_slice();
        self.evict();
        let n = entries.len();
        self.l2.put(
            l1i,
            L2Table {
                entries,
                dirty: Span(Some((0, n))),
            },
        );
        self.meta.insert(c.host >> self.geo.cluster_bits);
        self.l1[l1i as usize] = c.host | COPIED;
        self.l1_dirty.add(l1i as usize, l1i as usize + 1);
        Ok(())
    }

    /// Sets the L2 entry for `off` to `entry`, queueing the free of the host clusters the old
    /// entry referenced (sequence `seq`). The table must exist (see [`Qcow2::ensure_l2`]).
    pub fn replace(&mut self, st: &dyn Storage, off: u64, entry: u64, seq: u64) -> Result<()> {
        let old_raw = self.raw_entry(st, off)?;
        if old_raw == entry {
            return Ok(());
        }
        let old = self.geo.decode(old_raw)?;
        let new = self.geo.decode(entry)?;
        let cs = self.geo.cluster_size();
        let keep = old.host_range(cs).is_some() && old.host_range(cs) == new.host_range(cs);
        if !keep {
            if let Some((a, b)) = old.host_range(cs) {
                self.queue_free(st, a, b, seq)?;
            }
        }
        self.set_raw(off, entry);
        Ok(())
    }

    /// Queues a decrement of every cluster overlapping host bytes [a, b).
    fn queue_free(&mut self, st: &dyn Storage, a: u64, b: u64, seq: u64) -> Result<()> {
        let bits = self.geo.cluster_bits;
        let (first, last) = (a >> bits, (b - 1) >> bits);
        for c in first..=last {
            let rc = self.refcount(st, c)?;
            let pending = self
                .rc
                .as_ref()
                .and_then(|r| r.pending.get(&c))
                .map_or(0, |p| p.0);
            if self.meta.contains(&c) {
                return Err(LayerError::DataInMetadata(c << bits));
            }
            if rc <= pending {
                return Err(LayerError::RefcountUnderflow(c << bits));
            }
        }
        if let Some(r) = self.rc.as_mut() {
            for c in first..=last {
                let p = r.pending.entry(c).or_insert((0, seq));
                p.0 += 1;
                p.1 = seq;
            }
        }
        Ok(())
    }

    // ---- refcounts and allocation ----

    fn block_mut(&mut self, st: &dyn Storage, ti: u64) -> Result<Option<&mut [u8]>> {
        let cs = self.geo.cluster_size();
        let file_len = self.file_len;
        let Some(rc) = self.rc.as_mut() else {
            return Ok(None);
        };
        let Some(&raw) = rc.table.get(ti as usize) else {
            return Ok(None);
        };
        let off = self.geo.reft_offset(ti, raw)?;
        if off == 0 {
            return Ok(None);
        }
        if !rc.blocks.contains(&ti) {
            if off.checked_add(cs).is_none_or(|e| e > file_len) {
                return Err(LayerError::PastEnd {
                    what: "refcount block",
                    offset: off,
                    len: cs,
                    file_len,
                });
            }
            let b = read_exact(st, "refcount block", off, cs)?.into_boxed_slice();
            while (rc.blocks.len() + 1) * cs as usize > REFBLOCK_CACHE_BYTES.max(cs as usize) {
                let victim = rc
                    .blocks
                    .iter()
                    .rev()
                    .find(|(k, _)| !rc.dirty_blocks.contains_key(k))
                    .map(|(k, _)| *k);
                match victim {
                    Some(k) => {
                        rc.blocks.pop(&k);
                    }
                    None => break,
                }
            }
            rc.blocks.put(ti, b);
        }
        Ok(rc.blocks.get_mut(&ti).map(|b| &mut b[..]))
    }

    /// The refcount of cluster index `c`.
    pub fn refcount(&mut self, st: &dyn Storage, c: u64) -> Result<u64> {
        let (rb_bits, order) = (self.geo.rb_bits, self.geo.refcount_order);
        let idx = (c & ((1 << rb_bits) - 1)) as usize;
        Ok(self
            .block_mut(st, c >> rb_bits)?
            .map_or(0, |b| table::get_refcount(b, order, idx)))
    }

    /// Sets the refcount of cluster `c`, whose block exists; the change is written by
    /// [`Qcow2::write_blocks`].
    fn set_refcount(&mut self, st: &dyn Storage, c: u64, v: u64) -> Result<()> {
        let (rb_bits, order) = (self.geo.rb_bits, self.geo.refcount_order);
        let ti = c >> rb_bits;
        let idx = (c & ((1 << rb_bits) - 1)) as usize;
        let span = match self.block_mut(st, ti)? {
            Some(b) => table::set_refcount(b, order, idx, v),
            None => return Ok(()),
        };
        if let Some(rc) = self.rc.as_mut() {
            rc.dirty_blocks.entry(ti).or_default().add(span.0, span.1);
        }
        Ok(())
    }

    /// Writes the changed parts of refcount blocks (whole sectors).
    fn write_blocks(&mut self, st: &dyn Storage) -> Result<()> {
        let Some(rc) = self.rc.as_mut() else {
            return Ok(());
        };
        let cs = self.geo.cluster_size() as usize;
        for (ti, span) in std::mem::take(&mut rc.dirty_blocks) {
            let Some((a, b)) = span.0 else { continue };
            let off = rc.table[ti as usize] & table::REFT_OFFSET_MASK;
            let Some(block) = rc.blocks.peek(&ti) else {
                continue;
            };
            let (a, b) = (a & !511, (b.div_ceil(512) * 512).min(cs));
            let at = off + a as u64;
            st.write_at(&block[a..b], at)
                .map_err(io_err("refcount block", at))?;
        }
        Ok(())
    }

    /// Hands out `n` clusters whose refcount of one is written, reserving a new batch when
    /// the reserve runs out.
    pub fn take(&mut self, st: &dyn Storage, n: usize) -> Result<Vec<Fresh>> {
        if self.rc.is_none() {
            return Err(LayerError::ReadOnly);
        }
        let have = self.rc.as_ref().map_or(0, |r| r.reserved.len());
        if have < n {
            let batch = self.rc.as_ref().map_or(0, |r| r.batch);
            self.reserve(st, (n as u64).max(batch))?;
            if let Some(r) = self.rc.as_mut() {
                let max = (MAX_BATCH_BYTES >> self.geo.cluster_bits).max(16);
                r.batch = (r.batch * 2).min(max);
            }
        }
        let Some(rc) = self.rc.as_mut() else {
            return Err(LayerError::ReadOnly);
        };
        if rc.reserved.len() < n {
            return Err(LayerError::Full);
        }
        Ok(rc.reserved.drain(..n).collect())
    }

    /// Gives clusters back to the reserve (after a failed write: they may hold garbage).
    pub fn give_back(&mut self, clusters: &[Fresh]) {
        if let Some(rc) = self.rc.as_mut() {
            for c in clusters.iter().rev() {
                rc.reserved.push_front(Fresh {
                    host: c.host,
                    zeroed: false,
                });
            }
        }
    }

    /// Reserves `n` free clusters: refcounts set to one and written.
    fn reserve(&mut self, st: &dyn Storage, n: u64) -> Result<()> {
        let bits = self.geo.cluster_bits;
        let cs = self.geo.cluster_size();
        let rb_bits = self.geo.rb_bits;
        let Some(mut c) = self.rc.as_ref().map(|r| r.free_hint) else {
            return Ok(());
        };
        let end_before = self.file_len.div_ceil(cs);
        let mut picked = Vec::new();
        let mut new_end = self.file_len;
        while (picked.len() as u64) < n {
            let ti = c >> rb_bits;
            let table_len = self.rc.as_ref().map_or(0, |r| r.table.len() as u64);
            if ti >= table_len {
                self.write_blocks(st)?;
                let area_end = self.grow_table(st, c.max(new_end.div_ceil(cs)))?;
                new_end = new_end.max(area_end << bits);
                continue;
            }
            let has_block = self.rc.as_ref().is_some_and(|r| r.table[ti as usize] != 0);
            if !has_block {
                self.new_block(st, ti, c)?;
                new_end = new_end.max((c + 1) << bits);
                c += 1;
                continue;
            }
            let quarantined = self
                .rc
                .as_ref()
                .is_some_and(|r| r.quarantine.contains_key(&c));
            // A metadata cluster whose refcount is wrongly zero is never handed out.
            if !quarantined && !self.meta.contains(&c) && self.refcount(st, c)? == 0 {
                self.set_refcount(st, c, 1)?;
                picked.push(Fresh {
                    host: c << bits,
                    zeroed: c >= end_before,
                });
                new_end = new_end.max((c + 1) << bits);
            }
            c += 1;
        }
        self.write_blocks(st)?;
        if new_end > self.file_len {
            st.set_len(new_end)
                .map_err(io_err("extending the image", new_end))?;
            self.file_len = new_end;
        }
        // No sync here: no L2 entry names these clusters on disk before the flush, whose
        // first sync makes these refcounts durable.
        if let Some(rc) = self.rc.as_mut() {
            rc.free_hint = c;
            rc.reserved.extend(picked);
        }
        Ok(())
    }

    /// Creates the refcount block for table index `ti` in cluster `c` (in that block's range),
    /// counting itself: block written and synced before the table entry that points to it.
    fn new_block(&mut self, st: &dyn Storage, ti: u64, c: u64) -> Result<()> {
        let (bits, order, rb_bits) = (
            self.geo.cluster_bits,
            self.geo.refcount_order,
            self.geo.rb_bits,
        );
        let cs = self.geo.cluster_size();
        let mut block = vec![0u8; cs as usize].into_boxed_slice();
        table::set_refcount(&mut block, order, (c & ((1 << rb_bits) - 1)) as usize, 1);
        let off = c << bits;
        st.write_at(&block, off)
            .map_err(io_err("refcount block", off))?;
        if off + cs > self.file_len {
            self.file_len = off + cs;
        }
        st.sync().map_err(io_err("sync", 0))?;
        let Some(rc) = self.rc.as_mut() else {
            return Ok(());
        };
        let entry_at = rc.table_offset + ti * 8;
        st.write_at(&off.to_be_bytes(), entry_at)
            .map_err(io_err("refcount table", entry_at))?;
        rc.table[ti as usize] = off;
        rc.blocks.put(ti, block);
        self.meta.insert(c);
        Ok(())
    }

    /// Moves the refcount table to a bigger one at cluster `at` (the file's end or past it),
    /// with new refcount blocks that count the new area. Returns the area's end (cluster).
    fn grow_table(&mut self, st: &dyn Storage, at: u64) -> Result<u64> {
        let (bits, order, rb_bits) = (
            self.geo.cluster_bits,
            self.geo.refcount_order,
            self.geo.rb_bits,
        );
        let cs = self.geo.cluster_size();
        let Some(rc) = self.rc.as_ref() else {
            return Ok(at);
        };
        let old_len = rc.table.len() as u64;
        let (old_off, old_clusters) = (rc.table_offset, rc.table_clusters);
        let g0 = at >> rb_bits;
        let (mut nb, mut tc, mut entries) = (1u64, 1u64, 0u64);
        for _ in 0..32 {
            let last_group = (at + nb + tc - 1) >> rb_bits;
            entries = (old_len * 2).max(last_group + 1);
            let tc2 = (entries * 8).div_ceil(cs);
            let nb2 = ((at + nb + tc2 - 1) >> rb_bits) - g0 + 1;
            if tc2 == tc && nb2 == nb {
                break;
            }
            tc = tc2;
            nb = nb2;
        }
        if entries * 8 > header::MAX_REFTABLE_BYTES {
            return Err(LayerError::Full);
        }
        entries = tc * cs / 8;
        let area_end = at + nb + tc;
        let mut blocks: Vec<Box<[u8]>> = (0..nb)
            .map(|_| vec![0u8; cs as usize].into_boxed_slice())
            .collect();
        for c in at..area_end {
            let g = (c >> rb_bits) - g0;
            table::set_refcount(
                &mut blocks[g as usize],
                order,
                (c & ((1 << rb_bits) - 1)) as usize,
                1,
            );
        }
        let mut new_table = rc.table.clone();
        new_table.resize(entries as usize, 0);
        for i in 0..nb {
            new_table[(g0 + i) as usize] = (at + i) << bits;
        }
        st.set_len(area_end << bits)
            .map_err(io_err("extending the image", area_end << bits))?;
        self.file_len = self.file_len.max(area_end << bits);
        for (i, b) in blocks.iter().enumerate() {
            let off = (at + i as u64) << bits;
            st.write_at(b, off).map_err(io_err("refcount block", off))?;
        }
        let table_off = (at + nb) << bits;
        let mut bytes = Vec::with_capacity((tc * cs) as usize);
        for e in &new_table {
            bytes.extend_from_slice(&e.to_be_bytes());
        }
        st.write_at(&bytes, table_off)
            .map_err(io_err("refcount table", table_off))?;
        st.sync().map_err(io_err("sync", 0))?;
        let mut field = [0u8; 12];
        field[..8].copy_from_slice(&table_off.to_be_bytes());
        field[8..].copy_from_slice(&(tc as u32).to_be_bytes());
        st.write_at(&field, header::REFTABLE_OFFSET_FIELD)
            .map_err(io_err("header", header::REFTABLE_OFFSET_FIELD))?;
        st.sync().map_err(io_err("sync", 0))?;
        if let Some(rc) = self.rc.as_mut() {
            rc.table = new_table;
            rc.table_offset = table_off;
            rc.table_clusters = tc;
            for (i, b) in blocks.into_iter().enumerate() {
                rc.blocks.put(g0 + i as u64, b);
            }
        }
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = tc as u32;
        for c in at..area_end {
            self.meta.insert(c);
        }
        // The old table is no longer referenced: free it (nothing maps metadata, so no
        // quarantine is needed).
        for c in (old_off >> bits)..(old_off >> bits) + old_clusters {
            self.meta.remove(&c);
            self.set_refcount(st, c, 0)?;
            if let Some(rc) = self.rc.as_mut() {
                rc.free_hint = rc.free_hint.min(c);
            }
        }
        self.write_blocks(st)?;
        Ok(area_end)
    }

    // ---- flushing ----

    /// What a flush writes: dirty L2 spans and the dirty L1 span (nothing changes state).
    pub fn flush_plan(&self) -> FlushPlan {
        let mut l2 = Vec::new();
        for (&l1i, t) in self.l2.iter() {
            if let Some((a, b)) = t.dirty.0 {
                let (at, bytes) = sector_span(&t.entries, a, b);
                let base = self.l1[l1i as usize] & table::OFFSET_MASK;
                l2.push((
                    l1i,
                    Write {
                        offset: base + at as u64,
                        bytes,
                    },
                ));
            }
        }
        let l1 = self.l1_dirty.0.map(|(a, b)| {
            let (at, bytes) = sector_span(&self.l1, a, b);
            Write {
                offset: self.header.l1_table_offset + at as u64,
                bytes,
            }
        });
        FlushPlan { l2, l1 }
    }

    /// Marks what `plan` wrote as clean (no table changed since the plan was made).
    pub fn flushed(&mut self, plan: &FlushPlan) {
        for (l1i, _) in &plan.l2 {
            if let Some(t) = self.l2.peek_mut(l1i) {
                t.dirty = Span::default();
            }
        }
        if plan.l1.is_some() {
            self.l1_dirty = Span::default();
        }
    }

    /// Applies the queued refcount decrements (their L2 entries are durable now) and writes
    /// them; clusters that became free go to the quarantine.
    pub fn apply_frees(&mut self, st: &dyn Storage) -> Result<()> {
        let Some(pending) = self.rc.as_mut().map(|r| std::mem::take(&mut r.pending)) else {
            return Ok(());
        };
        for (&c, &(count, seq)) in &pending {
            let rc = self.refcount(st, c)?;
            let v = rc.saturating_sub(count);
            self.set_refcount(st, c, v)?;
            if v == 0 {
                if let Some(r) = self.rc.as_mut() {
                    r.quarantine.insert(c, seq);
                }
            }
        }
        self.write_blocks(st)
    }

    /// Makes clusters freed with a sequence number below `mark` reusable.
    pub fn reclaim(&mut self, mark: u64) {
        if let Some(rc) = self.rc.as_mut() {
            let ready: Vec<u64> = rc
                .quarantine
                .iter()
                .filter(|(_, &s)| s < mark)
                .map(|(&c, _)| c)
                .collect();
            for c in ready {
                rc.quarantine.remove(&c);
                rc.free_hint = rc.free_hint.min(c);
            }
        }
    }

    /// Number of clusters waiting in the quarantine.
    pub fn quarantined(&self) -> usize {
        self.rc.as_ref().map_or(0, |r| r.quarantine.len())
    }

    /// Releases the unused reserve (refcounts back to zero) and truncates the file when the
    /// reserve was its tail. For a clean close, after a flush.
    pub fn release_reserve(&mut self, st: &dyn Storage) -> Result<()> {
        let Some(reserved) = self.rc.as_mut().map(|r| std::mem::take(&mut r.reserved)) else {
            return Ok(());
        };
        if reserved.is_empty() {
            return Ok(());
        }
        let bits = self.geo.cluster_bits;
        for f in &reserved {
            self.set_refcount(st, f.host >> bits, 0)?;
        }
        self.write_blocks(st)?;
        let mut end = self.file_len;
        for f in reserved.iter().rev() {
            if f.host + self.geo.cluster_size() >= end && f.host < end {
                end = f.host;
            }
        }
        if end < self.file_len {
            st.set_len(end)
                .map_err(io_err("truncating the image", end))?;
            self.file_len = end;
        }
        if let Some(rc) = self.rc.as_mut() {
            rc.free_hint = 0;
        }
        st.sync().map_err(io_err("sync", 0))
    }

    /// Counts allocated data clusters (standard and compressed) by reading every L2 table.
    pub fn allocated_clusters(&mut self, st: &dyn Storage) -> Result<u64> {
        let mut n = 0;
        for l1i in 0..self.l1.len() as u64 {
            let entries: Vec<u64> = if let Some(t) = self.l2.peek(&l1i) {
                t.entries.to_vec()
            } else {
                let off = self.geo.l1_offset(l1i, self.l1[l1i as usize])?;
                if off == 0 {
                    continue;
                }
                self.check_l2_offset(off)?;
                be_words(&read_exact(st, "L2 table", off, self.geo.cluster_size())?)
            };
            for raw in entries {
                if matches!(
                    self.geo.decode(raw)?,
                    L2Entry::Normal { .. } | L2Entry::Compressed { .. }
                ) {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Whether the L2 table for `off` exists.
    pub fn has_l2(&self, off: u64) -> bool {
        let (l1i, _) = self.geo.split(off);
        self.l1
            .get(l1i as usize)
            .is_some_and(|&e| e & table::OFFSET_MASK != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_span_widens_to_sectors() {
        let entries: Vec<u64> = (0..512).collect();
        let (at, bytes) = sector_span(&entries, 70, 71);
        assert_eq!(at, 512);
        assert_eq!(bytes.len(), 512);
        assert_eq!(&bytes[48..56], &70u64.to_be_bytes());
        let (at, bytes) = sector_span(&entries[..10], 3, 4);
        assert_eq!((at, bytes.len()), (0, 80));
    }

    #[test]
    fn span_grows_to_cover() {
        let mut s = Span::default();
        s.add(5, 6);
        s.add(2, 3);
        s.add(9, 12);
        assert_eq!(s.0, Some((2, 12)));
    }
}
