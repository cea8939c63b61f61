//! Durability and reuse: flush (the metadata write order of the crate docs), the quarantine
//! of freed clusters, and close.

use super::error::Result;
use super::state::{lock, Chain};
use crate::layer::Qcow2;

/// A point in the sequence of frees, from [`Chain::free_mark`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FreeMark(u64);

impl Chain {
    /// Makes every write completed before the call durable, with the metadata that reaches it.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _a = lock(&self.alloc);
        self.flush_locked()
    }

    pub(super) fn flush_locked(&self) -> Result<()> {
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
        if let Some(q) = lock(&self.meta).q[0].as_mut() {
            q.synced();
        }
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

    /// Writes the metadata changed in memory (`q`: the top layer's, with the metadata lock
    /// held) into the image file, so that what a completed request did survives the death
    /// of the process: the dirty L2 spans, then, after a sync that makes new L2 tables
    /// durable before anything points to them, the dirty L1 span. The caller has synced
    /// first what the new entries point to that a power cut must not lose. Nothing else is
    /// synced: a flush makes it durable.
    pub(super) fn write_back(&self, q: &mut Qcow2) -> Result<()> {
        let st = self.files[0].st.as_ref();
        let plan = q.flush_plan();
        for (_, w) in &plan.l2 {
            st.write_at(&w.bytes, w.offset).map_err(self.io_err(
                0,
                "writing an L2 table",
                w.offset,
            ))?;
        }
        if let Some(w) = &plan.l1 {
            st.sync().map_err(self.io_err(0, "sync", 0))?;
            q.synced();
            st.write_at(&w.bytes, w.offset).map_err(self.io_err(
                0,
                "writing the L1 table",
                w.offset,
            ))?;
        }
        q.flushed(&plan);
        Ok(())
    }

    /// A mark in the sequence of frees: clusters freed before it become reusable when
    /// [`Chain::reclaim_freed`] gets it. Take the mark, wait until every extent mapped before
    /// the mark was taken has finished its I/O, then reclaim with it.
    pub fn free_mark(&self) -> FreeMark {
        FreeMark(lock(&self.meta).seq)
    }

    /// Makes clusters freed before `mark` reusable (they were freed on disk at a flush, and
    /// have been kept from reuse since); unless the chain was opened without
    /// [`crate::OpenOptions::punch_freed`], their blocks go back to the file system. A failed
    /// punch is returned, the clusters are reusable all the same.
    pub fn reclaim_freed(&self, mark: FreeMark) -> Result<()> {
        let st = self.files[0].st.as_ref();
        let mut meta = lock(&self.meta);
        match meta.q[0].as_mut() {
            Some(q) => q
                .reclaim(st, mark.0, self.punch_freed)
                .map_err(self.layer_err(0)),
            None => Ok(()),
        }
    }

    /// Clusters freed on disk and waiting for [`Chain::reclaim_freed`].
    pub fn quarantined(&self) -> usize {
        lock(&self.meta).q[0]
            .as_ref()
            .map_or(0, |q| q.quarantined())
    }

    /// Flushes, returns unused reserved clusters, gives the clusters freed by the flush back
    /// to the file system (as [`Chain::reclaim_freed`]) and trims the file: the image is then
    /// free of leaks. No I/O may be in flight. Later writes reserve clusters again; dropping a
    /// writable chain closes it (ignoring errors), so call this to see them.
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _a = lock(&self.alloc);
        self.flush_locked()?;
        let st = self.files[0].st.as_ref();
        let mut meta = lock(&self.meta);
        if let Some(q) = meta.q[0].as_mut() {
            q.reclaim(st, u64::MAX, self.punch_freed)
                .map_err(self.layer_err(0))?;
            q.release_reserve(st).map_err(self.layer_err(0))?;
        }
        Ok(())
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
