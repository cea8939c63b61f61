//! The allocator: clusters reserved in batches with their refcounts written first, handed
//! out and given back, new refcount blocks and a grown refcount table, and the unused
//! reserve returned on close.

use super::error::{io_err, LayerError, Result};
use super::state::{Fresh, Qcow2, MAX_BATCH_BYTES};
use crate::header;
use crate::storage::Storage;
use crate::table;

impl Qcow2 {
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
            if !has_block && self.meta.contains(&c) {
                // Counted at open, so not in a range without a block; never written over.
                c += 1;
                continue;
            }
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
        // No sync here: the caller syncs before it writes a table entry that names one of
        // these clusters (see [`Qcow2::refcounts_unsynced`]).
        if let Some(rc) = self.rc.as_mut() {
            rc.free_hint = c;
            rc.unsynced |= !picked.is_empty();
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
}
