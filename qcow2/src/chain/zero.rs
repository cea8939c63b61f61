//! Discard and write zeroes: whole clusters become unallocated or zero clusters, partial
//! ones get zeroes written.

use std::io::IoSlice;

use super::error::{Error, Result};
use super::map::Piece;
use super::state::{lock, Chain};
use crate::table::{L2Entry, COPIED, ZERO};

/// What discard and write-zeroes do to whole clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ZeroMode {
    Discard,
    ZeroUnmap,
    ZeroKeep,
}

impl Chain {
    /// Whether `[off, off + len)` of the virtual disk reads as zeroes without reading data.
    fn reads_zero(&self, off: u64, len: u64) -> Result<bool> {
        Ok(self
            .pieces(0, off, len)?
            .iter()
            .all(|p| matches!(p, Piece::Zero { .. })))
    }

    fn write_zero_bytes(&self, off: u64, len: u64) -> Result<()> {
        let chunk = 1u64 << 20;
        let zeros = vec![0u8; chunk.min(len) as usize];
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(chunk);
            self.write_locked(at, n, &[IoSlice::new(&zeros[..n as usize])])?;
            at += n;
        }
        Ok(())
    }

    fn zero_op(&self, off: u64, len: u64, mode: ZeroMode) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(off, len)?;
        if len == 0 {
            return Ok(());
        }
        let st = self.files[0].st.as_ref();
        let _a = lock(&self.alloc);
        let Some((cs, version)) = lock(&self.meta).q[0]
            .as_ref()
            .map(|q| (q.geo.cluster_size(), q.geo.version))
        else {
            return st
                .zero_range(off, len, mode != ZeroMode::ZeroKeep)
                .map_err(self.io_err(0, "zeroing", off));
        };
        let size = self.size();
        let end = off + len;
        // Whole clusters: [first, last), the disk's partial last cluster counting as whole.
        let first = off.div_ceil(cs) * cs;
        let last = if end == size {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        let has_backing = self.files.len() > 1;
        let mut partial = Vec::new();
        if first >= last {
            partial.push((off, len));
        } else {
            if off < first {
                partial.push((off, first - off));
            }
            if last < end {
                partial.push((last, end - last));
            }
        }
        let mut write_real = Vec::new();
        if first < last {
            let mut meta = lock(&self.meta);
            let seq = meta.seq;
            meta.seq += 1;
            let Some(q) = meta.q[0].as_mut() else {
                return Ok(());
            };
            // An image served without the backing file it names (`Backing::None`) zeroes as
            // if it had it, as QEMU does: opened with it again, the range must not show the
            // backing file's data.
            let has_backing = has_backing || q.header.backing_file.is_some();
            let mut c = first;
            let l2_span = q.geo.cluster_size() * q.geo.l2_entries();
            while c < last {
                // Without a backing file, a range with no L2 table already reads as zeroes
                // and nothing in it is freed: skip the whole table's range.
                if !has_backing && !q.has_l2(c) {
                    c = ((c / l2_span + 1) * l2_span).min(last);
                    continue;
                }
                let raw = q.raw_entry(st, c).map_err(self.layer_err(0))?;
                let old = q.geo.decode(raw).map_err(|e| self.layer_err(0)(e.into()))?;
                let target = if version >= 3 {
                    let freeing = if has_backing { ZERO } else { 0 };
                    match (mode, old) {
                        (ZeroMode::ZeroKeep, L2Entry::Normal { host, copied: true })
                            if !q.is_metadata(host) =>
                        {
                            Some(host | ZERO | COPIED)
                        }
                        (
                            ZeroMode::ZeroKeep,
                            L2Entry::Zero {
                                host: Some(_),
                                copied: true,
                            },
                        ) => None,
                        _ => Some(freeing),
                    }
                } else {
                    match (mode, old) {
                        (_, L2Entry::Unallocated) if !has_backing => None,
                        (ZeroMode::Discard, _) if has_backing => None,
                        (ZeroMode::Discard | ZeroMode::ZeroUnmap, _) if !has_backing => Some(0),
                        _ => {
                            write_real.push(c);
                            None
                        }
                    }
                };
                if let Some(new) = target {
                    if new != raw {
                        if new != 0 {
                            q.ensure_l2(st, c).map_err(self.layer_err(0))?;
                        }
                        if q.has_l2(c) {
                            q.replace(st, c, new, seq).map_err(self.layer_err(0))?;
                        }
                    }
                }
                c += cs;
            }
            self.write_back(q)?;
        }
        // Runs of clusters that need real zeroes, written as ranges.
        for (start, n) in crate::table::runs(&write_real, cs) {
            let end = (start + n * cs).min(size);
            self.write_zero_bytes(start, end - start)?;
        }
        if mode != ZeroMode::Discard {
            for (o, l) in partial {
                if !self.reads_zero(o, l)? {
                    self.write_zero_bytes(o, l)?;
                }
            }
        }
        Ok(())
    }

    /// Discards `[off, off + len)`: whole clusters in the range are freed and then read as
    /// zeroes (version 3: zero clusters when there is a backing file, so no backing data
    /// reappears). Partial clusters keep their data. A version 2 image with a backing file
    /// keeps its clusters (version 2 has no zero clusters, and unallocating would let backing
    /// data reappear).
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.zero_op(off, len, ZeroMode::Discard)
    }

    /// Makes `[off, off + len)` read as zeroes: whole clusters become zero clusters (version 3;
    /// `unmap` frees their host clusters, else allocated ones stay preallocated), partial
    /// clusters get zeroes written. Version 2 has no zero clusters: clusters are unallocated
    /// when there is no backing file and `unmap` is set, else zeroes are written.
    pub fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        let mode = if unmap {
            ZeroMode::ZeroUnmap
        } else {
            ZeroMode::ZeroKeep
        };
        self.zero_op(off, len, mode)
    }
}
