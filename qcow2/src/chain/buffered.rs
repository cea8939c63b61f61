//! Buffered reads and writes for tools: whole buffers instead of mapped extents, and runs of
//! zero clusters written as holes.

use std::io::{IoSlice, IoSliceMut};

use super::error::{Error, Result};
use super::map::{Extent, WritePath};
use super::state::{lock, Chain};

impl Chain {
    /// Reads `buf.len()` bytes at `off` (buffered; for tools).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.read_slow(off, &mut [IoSliceMut::new(buf)])
    }

    /// Writes `buf` at `off` (buffered; for tools): whole clusters of zeroes become holes
    /// (unallocated or zero clusters) instead of allocated clusters.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let len = buf.len() as u64;
        self.check_range(off, len)?;
        let Some(cs) = lock(&self.meta).q[0].as_ref().map(|q| q.geo.cluster_size()) else {
            return self.write_slow(off, &[IoSlice::new(buf)]);
        };
        let size = self.size();
        let end = off + len;
        let mut at = off;
        // Runs of data and runs of whole zero clusters.
        while at < end {
            let c = at / cs * cs;
            let cend = (c + cs).min(end);
            let whole = at == c && (cend == c + cs || cend == size);
            let chunk = &buf[(at - off) as usize..(cend - off) as usize];
            if whole && chunk.iter().all(|&b| b == 0) {
                let mut zend = cend;
                while zend < end {
                    let nend = (zend + cs).min(end);
                    let w = nend == zend + cs || nend == size;
                    let ch = &buf[(zend - off) as usize..(nend - off) as usize];
                    if !w || ch.iter().any(|&b| b != 0) {
                        break;
                    }
                    zend = nend;
                }
                self.write_zeroes(at, zend - at, true)?;
                at = zend;
                continue;
            }
            let mut dend = cend;
            while dend < end {
                let nend = (dend + cs).min(end);
                let ch = &buf[(dend - off) as usize..(nend - off) as usize];
                if ch.iter().all(|&b| b == 0) {
                    break;
                }
                dend = nend;
            }
            let data = &buf[(at - off) as usize..(dend - off) as usize];
            let mut ext = Vec::new();
            match self.map_write(at, dend - at, &mut ext)? {
                WritePath::Direct => {
                    let mut pos = 0usize;
                    for e in ext {
                        if let Extent::Data { host, len, .. } = e {
                            let n = len as usize;
                            self.files[0]
                                .st
                                .write_at(&data[pos..pos + n], host)
                                .map_err(self.io_err(0, "writing data", host))?;
                            pos += n;
                        }
                    }
                }
                WritePath::Slow => self.write_slow(at, &[IoSlice::new(data)])?,
            }
            at = dend;
        }
        Ok(())
    }
}
