//! The write slow path: clusters allocated, the rest of partly written clusters filled from
//! the backing chain, a copy or a decompressed cluster, and the L2 entries set afterwards.

use std::io::IoSlice;

use super::error::{Error, Result};
use super::iov::{copy_from_iov, sub_iov};
use super::state::{lock, Chain, Meta};
use crate::layer::{Fresh, LayerError};
use crate::table::{L2Entry, COPIED};

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
    /// The data must be durable before the new entry is written: until then, a power cut
    /// could leave the entry on disk and the cluster's bytes not, so that sectors would read
    /// neither their old content nor the new one (a cluster that held other data, or zeroes
    /// where the old content was not zero).
    sync_first: bool,
}

impl Chain {
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
                sync_first: false,
            };
            if let L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } = entry
            {
                // As a read of it would be refused: an entry pointing past the end of the
                // file is corrupt, and writing there would grow the file to it.
                if host >= q.file_len {
                    return Err(self.layer_err(0)(LayerError::PastEnd {
                        what: "data cluster",
                        offset: host,
                        len: cs,
                        file_len: q.file_len,
                    }));
                }
            }
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
                    t.sync_first = true;
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
                    // A fresh cluster past the file's old end reads as zeroes: enough where
                    // the old content was zeroes too.
                    t.sync_first = !(matches!(entry, L2Entry::Zero { .. })
                        || matches!(entry, L2Entry::Unallocated) && !has_backing);
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
            t.sync_first |= !f.zeroed;
        }
        Ok(targets)
    }

    pub(super) fn write_locked(&self, off: u64, len: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
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
        // The new entries may reach the disk as soon as they are written (they are written
        // before the request completes, so that it survives the death of the process), so what
        // they point to that a power cut must not lose is synced first: the data where the
        // cluster could otherwise read as neither old nor new (see `Target::sync_first`; this
        // includes the rest of a cluster filled here, data the guest did not write this time),
        // and the refcounts of the clusters reserved for them.
        let sync_first = targets.iter().any(|t| t.sync_first);
        let unsynced = lock(&self.meta).q[0]
            .as_ref()
            .is_some_and(|q| q.refcounts_unsynced());
        let result = self.write_targets(off, &targets, bufs).and_then(|()| {
            if sync_first || unsynced {
                st.sync().map_err(self.io_err(0, "sync", 0))?;
            }
            Ok(())
        });
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
        if unsynced {
            q.synced();
        }
        // A cluster written in place may have reached past the end of the file (an image cut
        // short): the file grew, and reads are mapped against its length.
        let cs = q.geo.cluster_size();
        for t in &targets {
            let end = match t.fill {
                Fill::Nothing => t.host + t.b,
                _ => t.host + cs,
            };
            q.file_len = q.file_len.max(end);
        }
        for t in &targets {
            if let Some(entry) = t.entry {
                q.replace(st, t.cluster, entry, seq)
                    .map_err(self.layer_err(0))?;
            }
        }
        // Written while the metadata lock is held, so that no mapping hands out a new entry
        // (and no request completes through it) before it is in the file.
        self.write_back(q)
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
}
