//! Mapping: a virtual byte range turned into pieces of the chain's files, and those pieces
//! into the [`Extent`]s the fast path hands out, with no data I/O.

use std::os::fd::RawFd;

use super::error::{Error, Result};
use super::options::LayerId;
use super::state::{lock, Chain, LayerFile, Meta};
use crate::layer::LayerError;
use crate::table::L2Entry;

/// A piece of a mapped range, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes at `host` in the file of `layer` (descriptor `fd`, valid while the chain
    /// lives).
    Data {
        /// Which layer's file.
        layer: LayerId,
        /// That file's descriptor.
        fd: RawFd,
        /// File offset.
        host: u64,
        /// Bytes.
        len: u64,
    },
    /// `len` bytes that read as zeroes.
    Zero {
        /// Bytes.
        len: u64,
    },
    /// `len` bytes that only [`Chain::read_slow`] can read (compressed clusters).
    Slow {
        /// Bytes.
        len: u64,
    },
}

impl Extent {
    /// Bytes the extent covers.
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Data { len, .. } | Extent::Zero { len } | Extent::Slow { len } => len,
        }
    }

    /// Whether the extent is empty (never, for extents a chain returns).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a write must be done, from [`Chain::map_write`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePath {
    /// Write the data straight to the returned extents.
    Direct,
    /// Call [`Chain::write_slow`]: some cluster needs allocation or copy-on-write.
    Slow,
}

/// A piece or an extent that can absorb the next one of its kind when that one continues it.
trait Run: Copy {
    /// Grows `self` by `next` and returns true when `next` continues it.
    fn absorb(&mut self, next: Self) -> bool;
}

/// Appends `r` to `out`, merged into the last run when it continues it.
fn push_run<R: Run>(out: &mut Vec<R>, r: R) {
    if let Some(last) = out.last_mut() {
        if last.absorb(r) {
            return;
        }
    }
    out.push(r);
}

/// Whether `(layer, host)` continues the data run `(l, h, len)` in the same file.
fn continues(l: LayerId, h: u64, len: u64, layer: LayerId, host: u64) -> bool {
    l == layer && h + len == host
}

/// Inside-the-crate pieces of a mapping, before they become [`Extent`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Piece {
    Data {
        layer: LayerId,
        host: u64,
        len: u64,
    },
    Zero {
        len: u64,
    },
    Compressed {
        layer: LayerId,
        host: u64,
        clen: u64,
        skip: u64,
        len: u64,
    },
}

impl Piece {
    pub(super) fn len(&self) -> u64 {
        match *self {
            Piece::Data { len, .. } | Piece::Zero { len } | Piece::Compressed { len, .. } => len,
        }
    }
}

impl Run for Piece {
    fn absorb(&mut self, next: Piece) -> bool {
        match (self, next) {
            (
                Piece::Data { layer, host, len },
                Piece::Data {
                    layer: l2,
                    host: h2,
                    len: n2,
                },
            ) if continues(*layer, *host, *len, l2, h2) => *len += n2,
            (Piece::Zero { len }, Piece::Zero { len: n2 }) => *len += n2,
            _ => return false,
        }
        true
    }
}

impl Run for Extent {
    fn absorb(&mut self, next: Extent) -> bool {
        match (self, next) {
            (
                Extent::Data {
                    layer, host, len, ..
                },
                Extent::Data {
                    layer: l2,
                    host: h2,
                    len: n2,
                    ..
                },
            ) if continues(*layer, *host, *len, l2, h2) => *len += n2,
            (Extent::Zero { len }, Extent::Zero { len: n2 })
            | (Extent::Slow { len }, Extent::Slow { len: n2 }) => *len += n2,
            _ => return false,
        }
        true
    }
}

/// Receives the pieces of a mapping in order.
pub(super) trait Sink {
    fn put(&mut self, p: Piece);
}

impl Sink for Vec<Piece> {
    fn put(&mut self, p: Piece) {
        if p.len() > 0 {
            push_run(self, p);
        }
    }
}

/// Turns pieces straight into [`Extent`]s, merged, so that mapping allocates nothing beyond
/// the caller's vector.
struct Extents<'a> {
    out: &'a mut Vec<Extent>,
    files: &'a [LayerFile],
}

impl Sink for Extents<'_> {
    fn put(&mut self, p: Piece) {
        if p.len() == 0 {
            return;
        }
        let e = match p {
            Piece::Data { layer, host, len } => Extent::Data {
                layer,
                fd: self.files[layer].fd,
                host,
                len,
            },
            Piece::Zero { len } => Extent::Zero { len },
            Piece::Compressed { len, .. } => Extent::Slow { len },
        };
        push_run(self.out, e);
    }
}

impl Chain {
    /// Maps `[off, off + len)` of layer `k` (its virtual space) into pieces.
    pub(super) fn map_layer(
        &self,
        meta: &mut Meta,
        k: LayerId,
        off: u64,
        len: u64,
        out: &mut dyn Sink,
    ) -> Result<()> {
        let Some(file) = self.files.get(k) else {
            out.put(Piece::Zero { len });
            return Ok(());
        };
        let inside = len.min(file.size.saturating_sub(off));
        let past = len - inside;
        if inside > 0 {
            match meta.q[k].as_mut() {
                None => out.put(Piece::Data {
                    layer: k,
                    host: off,
                    len: inside,
                }),
                Some(_) => self.map_qcow2(meta, k, off, inside, out)?,
            }
        }
        if past > 0 {
            out.put(Piece::Zero { len: past });
        }
        Ok(())
    }

    fn map_qcow2(
        &self,
        meta: &mut Meta,
        k: LayerId,
        off: u64,
        len: u64,
        out: &mut dyn Sink,
    ) -> Result<()> {
        let st = self.files[k].st.as_ref();
        let end = off + len;
        let mut at = off;
        // A run of unallocated clusters goes to the layer below in one piece.
        let mut below: Option<(u64, u64)> = None;
        while at < end {
            let Some(q) = meta.q[k].as_mut() else { break };
            let cs = q.geo.cluster_size();
            let n = (q.geo.cluster_start(at) + cs).min(end) - at;
            let entry = q.entry(st, at).map_err(self.layer_err(k))?;
            let file_len = q.file_len;
            let in_c = q.geo.in_cluster(at);
            if !matches!(entry, L2Entry::Unallocated) {
                if let Some((b_off, b_len)) = below.take() {
                    self.map_layer(meta, k + 1, b_off, b_len, out)?;
                }
            }
            match entry {
                L2Entry::Unallocated => {
                    below = match below {
                        Some((b, l)) => Some((b, l + n)),
                        None => Some((at, n)),
                    };
                }
                L2Entry::Zero { .. } => out.put(Piece::Zero { len: n }),
                L2Entry::Normal { host, .. } => {
                    if host >= file_len {
                        return Err(self.layer_err(k)(LayerError::PastEnd {
                            what: "data cluster",
                            offset: host,
                            len: cs,
                            file_len,
                        }));
                    }
                    let h = host + in_c;
                    // Bytes past the end of the file read as zeroes, as in QEMU.
                    let data = n.min(file_len.saturating_sub(h));
                    out.put(Piece::Data {
                        layer: k,
                        host: h,
                        len: data,
                    });
                    out.put(Piece::Zero { len: n - data });
                }
                L2Entry::Compressed { host, len: clen } => out.put(Piece::Compressed {
                    layer: k,
                    host,
                    clen,
                    skip: in_c,
                    len: n,
                }),
            }
            at += n;
        }
        if let Some((b_off, b_len)) = below {
            self.map_layer(meta, k + 1, b_off, b_len, out)?;
        }
        Ok(())
    }

    pub(super) fn pieces(&self, k: LayerId, off: u64, len: u64) -> Result<Vec<Piece>> {
        let mut out = Vec::new();
        let mut meta = lock(&self.meta);
        self.map_layer(&mut meta, k, off, len, &mut out)?;
        Ok(out)
    }

    /// Maps a read of `len` bytes at virtual byte `off` into `out` (cleared first): extents in
    /// order, covering exactly the range. No data I/O; an L2 cache miss reads the table.
    pub fn map_read(&self, off: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        self.check_range(off, len)?;
        out.clear();
        let mut sink = Extents {
            out,
            files: &self.files,
        };
        let mut meta = lock(&self.meta);
        self.map_layer(&mut meta, 0, off, len, &mut sink)
    }

    /// Maps a write of `len` bytes at `off`: [`WritePath::Direct`] with `out` holding data
    /// extents of the top image when every cluster is allocated there and writable in place
    /// (contiguous clusters merged), else [`WritePath::Slow`] (and `out` empty).
    pub fn map_write(&self, off: u64, len: u64, out: &mut Vec<Extent>) -> Result<WritePath> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(off, len)?;
        out.clear();
        let fd = self.files[0].fd;
        let mut meta = lock(&self.meta);
        let Some(q) = meta.q[0].as_mut() else {
            out.push(Extent::Data {
                layer: 0,
                fd,
                host: off,
                len,
            });
            return Ok(WritePath::Direct);
        };
        let st = self.files[0].st.as_ref();
        let cs = q.geo.cluster_size();
        let end = off + len;
        let mut at = off;
        while at < end {
            let n = (q.geo.cluster_start(at) + cs).min(end) - at;
            let host = match q.entry(st, at).map_err(self.layer_err(0))? {
                L2Entry::Normal { host, copied: true }
                    if !q.is_metadata(host) && host + cs <= q.file_len =>
                {
                    host
                }
                _ => {
                    out.clear();
                    return Ok(WritePath::Slow);
                }
            };
            let h = host + q.geo.in_cluster(at);
            match out.last_mut() {
                Some(Extent::Data {
                    host: lh, len: ll, ..
                }) if *lh + *ll == h => *ll += n,
                _ => out.push(Extent::Data {
                    layer: 0,
                    fd,
                    host: h,
                    len: n,
                }),
            }
            at += n;
        }
        Ok(WritePath::Direct)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_merge_when_contiguous() {
        let mut v = Vec::new();
        v.put(Piece::Data {
            layer: 0,
            host: 100,
            len: 10,
        });
        v.put(Piece::Data {
            layer: 0,
            host: 110,
            len: 5,
        });
        v.put(Piece::Data {
            layer: 1,
            host: 115,
            len: 5,
        });
        v.put(Piece::Zero { len: 3 });
        v.put(Piece::Zero { len: 4 });
        v.put(Piece::Zero { len: 0 });
        assert_eq!(
            v,
            vec![
                Piece::Data {
                    layer: 0,
                    host: 100,
                    len: 15
                },
                Piece::Data {
                    layer: 1,
                    host: 115,
                    len: 5
                },
                Piece::Zero { len: 7 },
            ]
        );
    }
}
