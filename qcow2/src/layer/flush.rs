//! Flushing: what a flush must write (dirty L2 spans and the dirty L1 span, widened to whole
//! sectors), gathered under the metadata lock, and marked clean once written.

use super::state::{Qcow2, Span};
use crate::table;

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
    /// Whether flushing has anything to write besides syncing data.
    pub fn is_dirty(&self) -> bool {
        self.l1_dirty.0.is_some()
            || self.l2.iter().any(|(_, t)| t.dirty.0.is_some())
            || self.rc.as_ref().is_some_and(|rc| !rc.pending.is_empty())
    }

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

    /// Whether refcounts of reserved clusters were written since the last sync: a table entry
    /// naming one of them may be written only after a sync, or a power cut could leave a
    /// reference to a cluster whose refcount is still zero.
    pub fn refcounts_unsynced(&self) -> bool {
        self.rc.as_ref().is_some_and(|rc| rc.unsynced)
    }

    /// Records a sync of the image file: every refcount written so far is durable.
    pub fn synced(&mut self) {
        if let Some(rc) = self.rc.as_mut() {
            rc.unsynced = false;
        }
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
}
