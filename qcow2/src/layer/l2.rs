//! L2 tables: the cache (LRU within a byte budget, dirty tables never evicted), entries read
//! and replaced, tables allocated, and the allocation count over every table.

use super::error::{check_inside, LayerError, Result};
use super::state::{be_words, read_exact, L2Table, Qcow2, Span};
use crate::storage::Storage;
use crate::table::{self, ClusterCounts, L2Entry, COPIED};

impl Qcow2 {
    /// Whether L2 table `offset` is a valid place for a table: aligned (checked by the
    /// geometry), inside the file, not the header, L1 or refcount table.
    fn check_l2_offset(&self, offset: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        check_inside("L2 table", offset, cs, self.file_len)?;
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

    /// Counts the host clusters the L2 tables reference, reading every table that is not
    /// cached.
    pub fn cluster_counts(&mut self, st: &dyn Storage) -> Result<ClusterCounts> {
        let mut counts = ClusterCounts::default();
        // An L2 table named twice is corrupt; counted each time, an L1 table of millions of
        // entries naming one table would take hours.
        let mut seen = std::collections::HashSet::new();
        for l1i in 0..self.l1.len() as u64 {
            let off = self.geo.l1_offset(l1i, self.l1[l1i as usize])?;
            if off != 0 && !seen.insert(off) {
                return Err(LayerError::Overlap {
                    what: "L2 table",
                    offset: off,
                });
            }
            let entries: Vec<u64> = if let Some(t) = self.l2.peek(&l1i) {
                t.entries.to_vec()
            } else {
                if off == 0 {
                    continue;
                }
                self.check_l2_offset(off)?;
                be_words(&read_exact(st, "L2 table", off, self.geo.cluster_size())?)
            };
            for raw in entries {
                counts.add(self.geo.decode(raw)?);
            }
        }
        Ok(counts)
    }

    /// Whether the L2 table for `off` exists.
    pub fn has_l2(&self, off: u64) -> bool {
        let (l1i, _) = self.geo.split(off);
        self.l1
            .get(l1i as usize)
            .is_some_and(|&e| e & table::OFFSET_MASK != 0)
    }
}
