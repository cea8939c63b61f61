//! Block allocation, block maps and buffered positional output: the tools the ext2 writing
//! pass (`build`) places blocks with.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::layout::{block_path, Geometry};
use super::options::Ext2Error;

/// Hands out data blocks in increasing order, skipping each group's metadata.
///
/// Because allocation is strictly sequential, the used data blocks of the image are a
/// prefix of the data area: the bitmaps follow from [`Alloc::next_block`] alone.
pub struct Alloc<'g> {
    geo: &'g Geometry,
    group: u32,
    next: u32,
    end: u32,
    /// Data blocks handed out so far.
    pub used: u64,
}

impl<'g> Alloc<'g> {
    /// An allocator starting at group 0's first data block.
    pub fn new(geo: &'g Geometry) -> Self {
        Self {
            geo,
            group: 0,
            next: geo.data_start(0),
            end: geo.group_end(0),
            used: 0,
        }
    }

    /// The next free block.
    pub fn alloc(&mut self) -> Option<u32> {
        while self.next >= self.end {
            self.group += 1;
            if self.group >= self.geo.groups {
                return None;
            }
            self.next = self.geo.data_start(self.group);
            self.end = self.geo.group_end(self.group);
        }
        let b = self.next;
        self.next += 1;
        self.used += 1;
        Some(b)
    }

    /// The block [`Alloc::alloc`] would return next (or the end of the file system).
    pub fn next_block(&self) -> u32 {
        if self.next >= self.end {
            if self.group + 1 < self.geo.groups {
                self.geo.data_start(self.group + 1)
            } else {
                self.geo.blocks
            }
        } else {
            self.next
        }
    }
}

/// Writes blocks at their positions, gathering runs of consecutive blocks into large
/// writes. Blocks never written stay holes in the image file.
pub struct Out<'f> {
    file: &'f File,
    path: &'f Path,
    block_size: u64,
    buf: Vec<u8>,
    /// Block number of `buf[0]`.
    start: u64,
    cap: usize,
}

impl<'f> Out<'f> {
    /// Output to `file` (named `path` in messages), buffering up to `cap` bytes.
    pub fn new(file: &'f File, path: &'f Path, block_size: u32, cap: usize) -> Self {
        Self {
            file,
            path,
            block_size: u64::from(block_size),
            buf: Vec::with_capacity(cap),
            start: 0,
            cap,
        }
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> Ext2Error + '_ {
        Ext2Error::io(self.path, op)
    }

    fn buffered_blocks(&self) -> u64 {
        self.buf.len() as u64 / self.block_size
    }

    /// Queues whole block(s) `data` at block `blk`.
    pub fn put(&mut self, blk: u32, data: &[u8]) -> Result<(), Ext2Error> {
        let blk = u64::from(blk);
        if self.buf.is_empty()
            || blk != self.start + self.buffered_blocks()
            || self.buf.len() + data.len() > self.cap
        {
            self.flush()?;
            self.start = blk;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Writes block `blk` again with `data`: in the buffer if it is still there, else
    /// straight to the file.
    pub fn patch(&mut self, blk: u32, data: &[u8]) -> Result<(), Ext2Error> {
        let blk = u64::from(blk);
        if blk >= self.start && blk < self.start + self.buffered_blocks() {
            let o = ((blk - self.start) * self.block_size) as usize;
            self.buf[o..o + data.len()].copy_from_slice(data);
            Ok(())
        } else {
            self.write_at(blk * self.block_size, data)
        }
    }

    /// Writes `data` at byte `offset`, unbuffered.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Ext2Error> {
        self.file
            .write_all_at(data, offset)
            .map_err(self.io_err("write"))
    }

    /// Writes out the buffer.
    pub fn flush(&mut self) -> Result<(), Ext2Error> {
        if !self.buf.is_empty() {
            self.write_at(self.start * self.block_size, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Flushes, sizes the file to `len` bytes and syncs it.
    pub fn finish(mut self, len: u64) -> Result<(), Ext2Error> {
        self.flush()?;
        self.file.set_len(len).map_err(self.io_err("resize"))?;
        self.file.sync_all().map_err(self.io_err("sync"))?;
        Ok(())
    }
}

/// An indirect block being filled.
struct Open {
    slot: usize,
    key: [u32; 3],
    depth: usize,
    phys: u32,
    ptrs: Vec<u32>,
}

/// Builds one inode's block map while its blocks are written in logical order. A hole
/// costs no data block, but the indirect blocks above it are still allocated (see
/// [`BlockMap::hole`]). Indirect blocks are placed just before the first block they
/// point to, as the kernel's ext2 allocator does.
pub struct BlockMap {
    block_size: u32,
    /// `i_block` pointers.
    pub i_block: [u32; 15],
    open: Vec<Open>,
    /// Data and indirect blocks allocated.
    pub blocks: u64,
}

impl BlockMap {
    /// An empty map.
    pub fn new(block_size: u32) -> Self {
        Self {
            block_size,
            i_block: [0; 15],
            open: Vec::with_capacity(3),
            blocks: 0,
        }
    }

    /// Makes sure the indirect blocks on the path to logical block `l` exist, allocating
    /// the missing ones, and returns the path. Logical blocks must come in increasing
    /// order.
    fn open_path(
        &mut self,
        l: u64,
        alloc: &mut Alloc,
        out: &mut Out,
    ) -> Result<(usize, [u32; 3], usize), Ext2Error> {
        let (slot, idx, depth) = block_path(l, self.block_size).ok_or(Ext2Error::NoSpace)?;
        // Keep the open indirect blocks that are on this block's path; close the others.
        let mut keep = 0;
        while keep < self.open.len()
            && keep < depth
            && self.open[keep].slot == slot
            && self.open[keep].key[..keep] == idx[..keep]
        {
            keep += 1;
        }
        while self.open.len() > keep {
            self.close_one(out)?;
        }
        for k in keep..depth {
            let phys = alloc.alloc().ok_or(Ext2Error::NoSpace)?;
            self.blocks += 1;
            if k == 0 {
                self.i_block[slot] = phys;
            } else {
                self.open[k - 1].ptrs[idx[k - 1] as usize] = phys;
            }
            // Reserve the block's place in the output; its pointers come when it closes.
            out.put(phys, &vec![0u8; self.block_size as usize])?;
            self.open.push(Open {
                slot,
                key: idx,
                depth: k,
                phys,
                ptrs: vec![0; (self.block_size / 4) as usize],
            });
        }
        Ok((slot, idx, depth))
    }

    /// Leaves logical block `l` a hole, but gives it the indirect blocks a block there
    /// would have: every file's block map is complete down to the last indirect level,
    /// so readers that expect no holes in the upper levels (ext4-view 1.0) still read it.
    pub fn hole(&mut self, l: u64, alloc: &mut Alloc, out: &mut Out) -> Result<(), Ext2Error> {
        self.open_path(l, alloc, out).map(|_| ())
    }

    /// Allocates the block for logical block `l` (and any indirect blocks on its path)
    /// and returns it. Logical blocks must come in increasing order.
    pub fn map(&mut self, l: u64, alloc: &mut Alloc, out: &mut Out) -> Result<u32, Ext2Error> {
        let (slot, idx, depth) = self.open_path(l, alloc, out)?;
        let phys = alloc.alloc().ok_or(Ext2Error::NoSpace)?;
        self.blocks += 1;
        if depth == 0 {
            self.i_block[slot] = phys;
        } else {
            let last = self.open.last_mut().ok_or(Ext2Error::NoSpace)?;
            debug_assert_eq!(last.depth, depth - 1);
            last.ptrs[idx[depth - 1] as usize] = phys;
        }
        Ok(phys)
    }

    fn close_one(&mut self, out: &mut Out) -> Result<(), Ext2Error> {
        if let Some(o) = self.open.pop() {
            let bytes: Vec<u8> = o.ptrs.iter().flat_map(|p| p.to_le_bytes()).collect();
            out.patch(o.phys, &bytes)?;
        }
        Ok(())
    }

    /// Writes the remaining indirect blocks and returns `i_block` as bytes.
    pub fn finish(mut self, out: &mut Out) -> Result<([u8; 60], u64), Ext2Error> {
        while !self.open.is_empty() {
            self.close_one(out)?;
        }
        let mut b = [0u8; 60];
        for (i, p) in self.i_block.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&p.to_le_bytes());
        }
        Ok((b, self.blocks))
    }
}
