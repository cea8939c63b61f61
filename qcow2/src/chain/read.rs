//! The read slow path: any range of the virtual disk read with data I/O, compressed clusters
//! decompressed.

use std::io::IoSliceMut;

use super::error::{Error, Result};
use super::iov::{fill_iov, sub_iov_mut};
use super::map::Piece;
use super::options::LayerId;
use super::state::{lock, Chain};
use crate::compress;
use crate::header::Compression;

impl Chain {
    /// Reads compressed cluster data of layer `k` and decompresses the whole cluster.
    pub(super) fn decompress(
        &self,
        k: LayerId,
        host: u64,
        clen: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let (compression, file_len) = {
            let meta = lock(&self.meta);
            match meta.q[k].as_ref() {
                Some(q) => (q.header.compression, q.file_len),
                None => (Compression::Deflate, 0),
            }
        };
        let path = || self.files[k].path.clone();
        if host >= file_len {
            return Err(Error::CompressedPastEnd { path: path(), host });
        }
        // The last compressed cluster of a file may end inside its last sector.
        let n = clen.min(file_len - host);
        let mut buf = vec![0u8; n as usize];
        let got = self.files[k]
            .st
            .read_at(&mut buf, host)
            .map_err(self.io_err(k, "reading compressed data", host))?;
        buf.truncate(got);
        compress::decompress(compression, &buf, out).map_err(|source| Error::Compressed {
            path: path(),
            host,
            source,
        })
    }

    pub(super) fn cluster_size_of(&self, k: LayerId) -> u64 {
        lock(&self.meta).q[k]
            .as_ref()
            .map_or(65536, |q| q.geo.cluster_size())
    }

    /// Reads `pieces` (covering `[0, total)` of `bufs`) with data I/O.
    fn read_pieces(&self, pieces: &[Piece], bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let mut pos = 0u64;
        for p in pieces {
            match *p {
                Piece::Data { layer, host, len } => {
                    let mut iov = sub_iov_mut(bufs, pos, len);
                    let n = self.files[layer]
                        .st
                        .read_vectored_at(&mut iov, host)
                        .map_err(self.io_err(layer, "reading data", host))?
                        as u64;
                    drop(iov);
                    if n < len {
                        // Past the end of the file: zeroes, as QEMU reads them.
                        fill_iov(bufs, pos + n, None, len - n);
                    }
                }
                Piece::Zero { len } => fill_iov(bufs, pos, None, len),
                Piece::Compressed {
                    layer,
                    host,
                    clen,
                    skip,
                    len,
                } => {
                    let cs = self.cluster_size_of(layer);
                    let mut cluster = vec![0u8; cs as usize];
                    self.decompress(layer, host, clen, &mut cluster)?;
                    fill_iov(
                        bufs,
                        pos,
                        Some(&cluster[skip as usize..(skip + len) as usize]),
                        len,
                    );
                }
            }
            pos += p.len();
        }
        Ok(())
    }

    /// Reads at virtual byte `off` into `bufs`: any range, including compressed clusters.
    pub fn read_slow(&self, off: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(off, len)?;
        let pieces = self.pieces(0, off, len)?;
        self.read_pieces(&pieces, bufs)
    }

    /// Reads `buf.len()` bytes at `off` of layer `k`'s virtual disk.
    pub(super) fn read_layer(&self, k: LayerId, off: u64, buf: &mut [u8]) -> Result<()> {
        let pieces = self.pieces(k, off, buf.len() as u64)?;
        self.read_pieces(&pieces, &mut [IoSliceMut::new(buf)])
    }
}
