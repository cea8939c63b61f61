//! Opening one qcow2 image's metadata: the header read and checked, the L1 table loaded and
//! checked against the file, and for a writable image the refcount table and the set of
//! metadata clusters, with unknown autoclear bits cleared.

use std::collections::{BTreeMap, HashSet, VecDeque};

use lru::LruCache;

use super::error::{check_inside, io_err, LayerError, Result};
use super::state::{be_words, read_exact, Qcow2, Refcounts, Span};
use crate::header::{self, Header};
use crate::storage::Storage;
use crate::table::Geometry;

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
        check_inside("L1 table", header.l1_table_offset, l1_bytes, file_len)?;
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
            check_inside("refcount table", rt_range.0, rt_bytes, file_len)?;
            let table = be_words(&read_exact(st, "refcount table", rt_range.0, rt_bytes)?);
            q.meta.insert(0);
            for c in (l1_range.0 >> bits)..l1_range.1.div_ceil(cs) {
                q.meta.insert(c);
            }
            for c in (rt_range.0 >> bits)..(rt_range.1 >> bits) {
                q.meta.insert(c);
            }
            // Refcount blocks and L2 tables each have a cluster of their own: one that is
            // also other metadata would have refcounts or entries written over that metadata
            // (QEMU refuses such writes with its overlap checks and marks the image corrupt).
            for (i, &raw) in table.iter().enumerate() {
                let off = q.geo.reft_offset(i as u64, raw)?;
                if off != 0 && !q.meta.insert(off >> bits) {
                    return Err(LayerError::Overlap {
                        what: "refcount block",
                        offset: off,
                    });
                }
            }
            for (i, &raw) in q.l1.iter().enumerate() {
                let off = q.geo.l1_offset(i as u64, raw)?;
                if off != 0 && !q.meta.insert(off >> bits) {
                    return Err(LayerError::Overlap {
                        what: "L2 table",
                        offset: off,
                    });
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
                unsynced: false,
            });
            // Every metadata cluster is counted: the allocator hands out clusters whose
            // refcount is zero, and would put data or a new refcount block over one that is
            // not (a refcount table entry cleared, a block of zeroes).
            let mut metadata: Vec<u64> = q.meta.iter().copied().collect();
            metadata.sort_unstable();
            for c in metadata {
                if q.refcount(st, c)? == 0 {
                    return Err(LayerError::Uncounted(c << bits));
                }
            }
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
}
