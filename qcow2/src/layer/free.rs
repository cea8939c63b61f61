//! Frees: refcount decrements queued until the L2 entries that dropped the references are
//! durable, then applied, and the freed clusters kept in a quarantine until reclaimed.

use super::error::{io_err, LayerError, Result};
use super::state::Qcow2;
use crate::storage::Storage;

impl Qcow2 {
    /// Queues a decrement of every cluster overlapping host bytes [a, b).
    pub(super) fn queue_free(&mut self, st: &dyn Storage, a: u64, b: u64, seq: u64) -> Result<()> {
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

    /// Makes clusters freed with a sequence number below `mark` reusable; with `punch`, their
    /// blocks go back to the file system first (runs of clusters punched as one range), while
    /// no allocation can take them yet. Every ready cluster is reusable afterwards, also when
    /// a punch failed (its content does not matter): the first failure is returned.
    pub fn reclaim(&mut self, st: &dyn Storage, mark: u64, punch: bool) -> Result<()> {
        let bits = self.geo.cluster_bits;
        let Some(rc) = self.rc.as_mut() else {
            return Ok(());
        };
        let ready: Vec<u64> = rc
            .quarantine
            .iter()
            .filter(|(_, &s)| s < mark)
            .map(|(&c, _)| c)
            .collect();
        let mut failed = None;
        if punch {
            for (first, n) in crate::table::runs(&ready, 1) {
                if let Err(e) = st.punch(first << bits, n << bits) {
                    failed.get_or_insert(io_err("punching freed clusters", first << bits)(e));
                }
            }
        }
        for c in ready {
            rc.quarantine.remove(&c);
            rc.free_hint = rc.free_hint.min(c);
        }
        failed.map_or(Ok(()), Err)
    }

    /// Number of clusters waiting in the quarantine.
    pub fn quarantined(&self) -> usize {
        self.rc.as_ref().map_or(0, |r| r.quarantine.len())
    }
}
