//! Refcounts: refcount blocks cached and read on demand, entries of any width read and set,
//! and the changed parts written back in whole sectors.

use super::error::{check_inside, io_err, Result};
use super::state::{read_exact, Qcow2, REFBLOCK_CACHE_BYTES};
use crate::storage::Storage;
use crate::table;

impl Qcow2 {
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
            check_inside("refcount block", off, cs, file_len)?;
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
    pub(super) fn set_refcount(&mut self, st: &dyn Storage, c: u64, v: u64) -> Result<()> {
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
    pub(super) fn write_blocks(&mut self, st: &dyn Storage) -> Result<()> {
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
}
