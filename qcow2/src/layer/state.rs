//! One qcow2 image's metadata in memory: the [`Qcow2`] state every other part of the layer
//! works on, and the table reading helpers.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io;

use lru::LruCache;

use super::error::{io_err, LayerError, Result};
use crate::header::Header;
use crate::storage::Storage;
use crate::table::Geometry;

/// A dirty range of a table, as [start, end) in entries or bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Span(pub(super) Option<(usize, usize)>);

impl Span {
    pub(super) fn add(&mut self, a: usize, b: usize) {
        self.0 = Some(match self.0 {
            None => (a, b),
            Some((x, y)) => (x.min(a), y.max(b)),
        });
    }
}

/// A cached L2 table, entries in native byte order.
pub(super) struct L2Table {
    pub(super) entries: Box<[u64]>,
    /// Entries changed since the table was last written.
    pub(super) dirty: Span,
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
pub(super) struct Refcounts {
    pub(super) table: Vec<u64>,
    pub(super) table_offset: u64,
    pub(super) table_clusters: u64,
    /// Refcount blocks by table index, raw bytes (always written back before the metadata
    /// lock is released, so never dirty at rest).
    pub(super) blocks: LruCache<u64, Box<[u8]>>,
    pub(super) dirty_blocks: BTreeMap<u64, Span>,
    /// Lowest cluster index that may be free.
    pub(super) free_hint: u64,
    /// Reserved clusters (refcount one on disk, unused), ascending.
    pub(super) reserved: VecDeque<Fresh>,
    /// Clusters in the next reservation.
    pub(super) batch: u64,
    /// Decrements waiting for the L2 entries that dropped the references to be durable:
    /// cluster index to (count, sequence number of the latest free).
    pub(super) pending: BTreeMap<u64, (u64, u64)>,
    /// Free clusters not to be reused until the caller reclaims them: index to sequence.
    pub(super) quarantine: BTreeMap<u64, u64>,
    /// Refcounts of reserved clusters were written since the last sync: they must be durable
    /// before a table entry that names one of those clusters is written.
    pub(super) unsynced: bool,
}

/// Most clusters reserved at once.
pub(super) const MAX_BATCH_BYTES: u64 = 64 << 20;
/// Refcount blocks kept in memory.
pub(super) const REFBLOCK_CACHE_BYTES: usize = 8 << 20;

/// One qcow2 image's metadata.
pub(crate) struct Qcow2 {
    pub header: Header,
    pub geo: Geometry,
    pub(super) l1: Vec<u64>,
    pub(super) l1_dirty: Span,
    pub(super) l2: LruCache<u64, L2Table>,
    pub(super) l2_budget: usize,
    /// The file's length as this writer knows it (reads past it see zeroes).
    pub file_len: u64,
    /// Cluster indices holding metadata, for writable images.
    pub(super) meta: HashSet<u64>,
    pub(super) rc: Option<Refcounts>,
}

pub(super) fn read_exact(
    st: &dyn Storage,
    what: &'static str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
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

pub(super) fn be_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

impl Qcow2 {
    /// Whether writing host cluster `host` would overwrite metadata.
    pub fn is_metadata(&self, host: u64) -> bool {
        self.meta.contains(&(host >> self.geo.cluster_bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_grows_to_cover() {
        let mut s = Span::default();
        s.add(5, 6);
        s.add(2, 3);
        s.add(9, 12);
        assert_eq!(s.0, Some((2, 12)));
    }
}
