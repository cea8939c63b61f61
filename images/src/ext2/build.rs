//! The ext2 writing pass: puts a [`Plan`] into an image file laid out as a [`Geometry`].
//!
//! In order: every node's data (directory blocks, file content streamed from the source
//! files, slow symlink targets) and its inode, lost+found after the root; then the inode
//! tables, the bitmaps and group counters, and the superblocks with the group descriptor
//! table. Blocks are allocated in increasing order, so the bitmaps follow from where the
//! allocator stopped. The UUID, unless given, is a SHA-256 of everything that decides the
//! image, fed in the same order as it is written.

use std::fs::File;
use std::path::Path;

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};
use tracing::info;

use super::blocks::{Alloc, BlockMap, Out};
use super::layout::{
    dir_blocks, empty_dir_block, encode_inode, group_descriptors, has_super, superblock, Geometry,
    GroupCounts, InodeInfo, SuperInfo, FIRST_INO, FT_DIR, ROOT_INO, RO_COMPAT_LARGE_FILE,
    RO_COMPAT_SPARSE_SUPER, S_IFDIR, S_IFLNK, S_IFREG,
};
use super::options::{Ext2Error, Ext2Options, Ext2Summary};
use super::plan::{ino_of, Plan};
use crate::input::{is_zero, walk_data, FileSource};
use crate::tree::{NodeKind, Tree, ROOT};

/// Output buffer for runs of consecutive blocks.
const OUT_BUF: usize = 4 << 20;
/// Bytes of file content between progress log lines.
const LOG_EVERY: u64 = 1 << 30;
/// A symlink target shorter than this is stored in the inode itself (a fast symlink).
const FAST_SYMLINK_MAX: usize = 60;

/// What the image is, besides the tree: everything [`write_image`] needs.
pub(super) struct Image<'a> {
    /// The options asked for.
    pub opts: &'a Ext2Options,
    /// What the tree needs.
    pub plan: &'a Plan,
    /// Where everything goes.
    pub geo: &'a Geometry,
    /// Image file size in bytes.
    pub size: u64,
}

/// Writes the file system for `tree` into `file` (empty; named `path` in messages), calling
/// `progress(bytes_copied, bytes_total)` as file content is copied.
pub(super) fn write_image(
    tree: &Tree,
    image: &Image<'_>,
    file: &File,
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Ext2Summary, Ext2Error> {
    let Image {
        opts,
        plan,
        geo,
        size,
    } = *image;
    let mut w = Writer {
        bs: opts.block_size,
        out: Out::new(file, path, opts.block_size, OUT_BUF),
        alloc: Alloc::new(geo),
        hash: uuid_hash(tree, image),
        done: 0,
        total: tree.file_bytes(),
        next_log: LOG_EVERY,
        progress,
    };
    let nodes = w.write_nodes(tree, image)?;
    let Writer {
        mut out,
        alloc,
        hash,
        ..
    } = w;
    out.flush()?;
    write_inode_tables(&out, geo, usize::from(opts.inode_size), &nodes.inodes)?;
    let counts = write_bitmaps(&out, geo, plan, alloc.next_block(), &nodes.dirs_per_group)?;
    let free_blocks: u64 = counts.iter().map(|c| u64::from(c.free_blocks)).sum();
    let free_inodes: u32 = counts.iter().map(|c| c.free_inodes).sum();
    let uuid = opts.uuid.unwrap_or_else(|| uuid_from(hash));
    let info = SuperInfo {
        free_blocks: free_blocks as u32,
        free_inodes,
        timestamp: tree.timestamp,
        uuid,
        hash_seed: hash_seed(uuid),
        label: opts.label.as_bytes().to_vec(),
        ro_compat: RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE,
    };
    write_superblocks(&out, geo, &info, &counts)?;
    out.finish(size)?;
    Ok(Ext2Summary {
        size,
        block_size: opts.block_size,
        blocks: u64::from(geo.blocks),
        free_blocks,
        inodes: geo.inodes(),
        free_inodes,
        uuid,
    })
}

/// Feeds an integer to the UUID hash.
fn feed(h: &mut Sha256, v: i64) {
    h.update(v.to_le_bytes());
}

/// The UUID hash with the image's options and shape fed in.
fn uuid_hash(tree: &Tree, image: &Image<'_>) -> Sha256 {
    let mut hash = Sha256::new();
    hash.update(b"vloop ext2 v1");
    for v in [
        i64::from(image.opts.block_size),
        i64::from(image.opts.inode_size),
        i64::from(image.geo.blocks),
        image.size as i64,
        tree.timestamp,
        tree.nodes.len() as i64,
    ] {
        feed(&mut hash, v);
    }
    hash.update(image.opts.label.as_bytes());
    hash
}

/// A version 4 (random) UUID made of the hash's first bytes.
fn uuid_from(hash: Sha256) -> [u8; 16] {
    let d = hash.finalize();
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// The directory hash seed, derived from the UUID.
fn hash_seed(uuid: [u8; 16]) -> [u8; 16] {
    let mut seed = Sha256::new();
    seed.update(b"vloop ext2 hash seed");
    seed.update(uuid);
    let mut hash_seed = [0u8; 16];
    hash_seed.copy_from_slice(&seed.finalize()[..16]);
    hash_seed
}

/// What writing the nodes leaves for the metadata.
struct Nodes {
    /// The inode table, inode 1 first, up to the last inode used.
    inodes: Vec<u8>,
    /// Directories per block group.
    dirs_per_group: Vec<u32>,
}

/// Everything the writing pass shares.
struct Writer<'a> {
    bs: u32,
    out: Out<'a>,
    alloc: Alloc<'a>,
    hash: Sha256,
    done: u64,
    total: u64,
    next_log: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl Writer<'_> {
    /// Writes every node's data and encodes its inode, lost+found right after the root.
    fn write_nodes(&mut self, tree: &Tree, image: &Image<'_>) -> Result<Nodes, Ext2Error> {
        let Image {
            opts, plan, geo, ..
        } = *image;
        let bs = opts.block_size;
        let isz = usize::from(opts.inode_size);
        let ipg = geo.inodes_per_group;
        let mut inodes = vec![0u8; plan.inodes_used as usize * isz];
        let mut dirs_per_group = vec![0u32; geo.groups as usize];
        for (id, node) in tree.nodes.iter().enumerate() {
            let ino = ino_of(id);
            let h = &mut self.hash;
            for v in [
                id as i64,
                i64::from(node.mode),
                i64::from(node.uid),
                i64::from(node.gid),
                node.mtime,
                i64::from(node.nlink),
            ] {
                feed(h, v);
            }
            let perm = (node.mode & 0o7777) as u16;
            let mut info = InodeInfo {
                uid: node.uid,
                gid: node.gid,
                time: node.mtime,
                links: node.nlink as u16,
                ..InodeInfo::default()
            };
            match &node.kind {
                NodeKind::Dir { entries } => {
                    feed(h, 1);
                    for (name, c) in entries {
                        feed(h, name.len() as i64);
                        h.update(name);
                        feed(h, *c as i64);
                    }
                    let content = plan.dirs[id].as_deref().unwrap_or_default();
                    let (i_block, blocks) = self.write_blocks(content)?;
                    info.mode = S_IFDIR | perm;
                    info.size = content.len() as u64;
                    info.i_block = i_block;
                    info.blocks = blocks;
                    if id == ROOT && plan.lpf_ours {
                        info.links += 1;
                    }
                    dirs_per_group[((ino - 1) / ipg) as usize] += 1;
                }
                NodeKind::File { source, size } => {
                    feed(h, 2);
                    feed(h, *size as i64);
                    let (i_block, blocks) = self.copy_file(source, *size)?;
                    info.mode = S_IFREG | perm;
                    info.size = *size;
                    info.i_block = i_block;
                    info.blocks = blocks;
                }
                NodeKind::Symlink { target } => {
                    feed(h, 3);
                    feed(h, target.len() as i64);
                    h.update(target);
                    info.mode = S_IFLNK | perm;
                    info.size = target.len() as u64;
                    if target.len() < FAST_SYMLINK_MAX {
                        info.i_block[..target.len()].copy_from_slice(target);
                    } else {
                        let mut block = target.clone();
                        block.resize(bs as usize, 0);
                        let (i_block, blocks) = self.write_blocks(&block)?;
                        info.i_block = i_block;
                        info.blocks = blocks;
                    }
                }
            }
            let o = (ino as usize - 1) * isz;
            encode_inode(&info, bs, &mut inodes[o..o + isz]);
            if id == ROOT && plan.lpf_ours {
                let lpf = self.write_lost_found(tree, plan, bs)?;
                let o = (FIRST_INO as usize - 1) * isz;
                encode_inode(&lpf, bs, &mut inodes[o..o + isz]);
                dirs_per_group[((FIRST_INO - 1) / ipg) as usize] += 1;
            }
        }
        Ok(Nodes {
            inodes,
            dirs_per_group,
        })
    }

    /// Writes the lost+found directory the tree lacks: `.`, `..` and empty blocks for
    /// e2fsck to fill; returns its inode.
    fn write_lost_found(
        &mut self,
        tree: &Tree,
        plan: &Plan,
        bs: u32,
    ) -> Result<InodeInfo, Ext2Error> {
        let mut content = dir_blocks(&[(FIRST_INO, FT_DIR, b"."), (ROOT_INO, FT_DIR, b"..")], bs);
        for _ in 1..plan.lpf_blocks {
            content.extend_from_slice(&empty_dir_block(bs));
        }
        let (i_block, blocks) = self.write_blocks(&content)?;
        Ok(InodeInfo {
            mode: S_IFDIR | 0o700,
            uid: 0,
            gid: 0,
            size: content.len() as u64,
            time: tree.timestamp,
            links: 2,
            blocks,
            i_block,
        })
    }

    /// Writes `content` (whole blocks) as an inode's data and returns its block map.
    fn write_blocks(&mut self, content: &[u8]) -> Result<([u8; 60], u64), Ext2Error> {
        let mut map = BlockMap::new(self.bs);
        for (l, block) in content.chunks(self.bs as usize).enumerate() {
            let phys = map.map(l as u64, &mut self.alloc, &mut self.out)?;
            self.out.put(phys, block)?;
        }
        map.finish(&mut self.out)
    }

    /// Streams a source file into the image; all-zero blocks and the source's holes
    /// become holes.
    fn copy_file(&mut self, source: &Path, size: u64) -> Result<([u8; 60], u64), Ext2Error> {
        let changed = |found| Ext2Error::FileChanged {
            path: source.to_path_buf(),
            expected: size,
            found,
        };
        let f = File::open(source).map_err(Ext2Error::io(source, "open"))?;
        let len = f.metadata().map_err(Ext2Error::io(source, "stat"))?.len();
        if len != size {
            return Err(changed(len));
        }
        let src = FileSource::regular(f);
        let mut map = BlockMap::new(self.bs);
        let mut blocks = Blocks::new(self.bs as usize);
        let hidden = ProgressBar::hidden();
        walk_data::<Ext2Error>(&src, source, size, &hidden, |_, bytes, hole| {
            blocks.feed(bytes, hole, |l, b| self.place_file_block(&mut map, l, b))?;
            self.advance(bytes.len() as u64);
            Ok(true)
        })?;
        blocks.finish(|l, b| self.place_file_block(&mut map, l, b))?;
        let len = src
            .file()
            .metadata()
            .map_err(Ext2Error::io(source, "stat"))?
            .len();
        if len != size {
            return Err(changed(len));
        }
        map.finish(&mut self.out)
    }

    /// Places logical block `l` of a file: a hole when it is one (`None`) or all zero, else
    /// hashed and written.
    fn place_file_block(
        &mut self,
        map: &mut BlockMap,
        l: u64,
        block: Option<&[u8]>,
    ) -> Result<(), Ext2Error> {
        match block {
            Some(block) if !is_zero(block) => {
                self.hash.update(l.to_le_bytes());
                self.hash.update(block);
                let phys = map.map(l, &mut self.alloc, &mut self.out)?;
                self.out.put(phys, block)
            }
            _ => map.hole(l, &mut self.alloc, &mut self.out),
        }
    }

    /// Counts `n` more bytes of file content copied: reports progress, and logs every
    /// [`LOG_EVERY`] bytes.
    fn advance(&mut self, n: u64) {
        self.done += n;
        (self.progress)(self.done, self.total);
        if self.done >= self.next_log {
            info!(
                copied = self.done,
                total = self.total,
                "copying file content"
            );
            self.next_log = self.done + LOG_EVERY;
        }
    }
}

/// Cuts a file's content, read chunk by chunk, into whole blocks numbered from 0.
struct Blocks {
    size: usize,
    next: u64,
    /// The start of a block split between two chunks.
    pending: Vec<u8>,
}

impl Blocks {
    fn new(size: usize) -> Self {
        Self {
            size,
            next: 0,
            pending: Vec::with_capacity(size),
        }
    }

    /// Takes the next chunk (`hole`: known to be zeros) and calls `place(l, block)` for every
    /// block it completes, `None` for one that lies in a hole.
    fn feed<E>(
        &mut self,
        mut bytes: &[u8],
        hole: bool,
        mut place: impl FnMut(u64, Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E> {
        if !self.pending.is_empty() {
            let n = (self.size - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.pending.len() == self.size {
                place(self.next, Some(&self.pending))?;
                self.pending.clear();
                self.next += 1;
            }
        }
        let whole = bytes.len() / self.size * self.size;
        for block in bytes[..whole].chunks_exact(self.size) {
            place(self.next, (!hole).then_some(block))?;
            self.next += 1;
        }
        self.pending.extend_from_slice(&bytes[whole..]);
        Ok(())
    }

    /// Places the last, partial block, padded with zeros.
    fn finish<E>(
        mut self,
        mut place: impl FnMut(u64, Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.pending.resize(self.size, 0);
        place(self.next, Some(&self.pending))
    }
}

/// Writes the inode tables: only the part holding used inodes; the rest stays a hole.
fn write_inode_tables(
    out: &Out<'_>,
    geo: &Geometry,
    inode_size: usize,
    inodes: &[u8],
) -> Result<(), Ext2Error> {
    let ipg = geo.inodes_per_group;
    for g in 0..geo.groups {
        let first = (g * ipg) as usize * inode_size;
        if first >= inodes.len() {
            break;
        }
        let last = (((g + 1) * ipg) as usize * inode_size).min(inodes.len());
        out.write_at(
            u64::from(geo.inode_table(g)) * u64::from(geo.block_size),
            &inodes[first..last],
        )?;
    }
    Ok(())
}

/// Writes every group's block and inode bitmaps; returns the groups' counters. Blocks
/// before `next_block` (where the allocator stopped) are used, and inodes up to the plan's
/// last, except an unused lost+found inode when the tree brought its own directory.
fn write_bitmaps(
    out: &Out<'_>,
    geo: &Geometry,
    plan: &Plan,
    next_block: u32,
    dirs_per_group: &[u32],
) -> Result<Vec<GroupCounts>, Ext2Error> {
    let bs = u64::from(geo.block_size);
    let bsz = geo.block_size as usize;
    let ipg = geo.inodes_per_group;
    let mut counts = Vec::with_capacity(geo.groups as usize);
    for g in 0..geo.groups {
        let mut bitmap = vec![0u8; bsz];
        let data_start = geo.data_start(g);
        let end = geo.group_end(g);
        let used_end = next_block.clamp(data_start, end);
        let used = used_end - geo.group_start(g);
        set_bits(&mut bitmap, 0, used as usize);
        set_bits(&mut bitmap, geo.group_blocks(g) as usize, 8 * bsz);
        let free_blocks = end - used_end;
        out.write_at(u64::from(geo.block_bitmap(g)) * bs, &bitmap)?;

        bitmap.fill(0);
        let first_ino = g * ipg + 1;
        let used_inodes = (plan.inodes_used + 1).clamp(first_ino, first_ino + ipg) - first_ino;
        set_bits(&mut bitmap, 0, used_inodes as usize);
        let mut free_inodes = ipg - used_inodes;
        if !plan.lpf_ours && (first_ino..first_ino + used_inodes).contains(&FIRST_INO) {
            let i = (FIRST_INO - first_ino) as usize;
            bitmap[i / 8] &= !(1 << (i % 8));
            free_inodes += 1;
        }
        set_bits(&mut bitmap, ipg as usize, 8 * bsz);
        out.write_at(u64::from(geo.inode_bitmap(g)) * bs, &bitmap)?;
        counts.push(GroupCounts {
            free_blocks,
            free_inodes,
            dirs: dirs_per_group[g as usize],
        });
    }
    Ok(counts)
}

/// Writes the superblock and the group descriptor table in every group that carries them.
fn write_superblocks(
    out: &Out<'_>,
    geo: &Geometry,
    info: &SuperInfo,
    counts: &[GroupCounts],
) -> Result<(), Ext2Error> {
    let bs = u64::from(geo.block_size);
    let gdt = group_descriptors(geo, counts);
    for g in (0..geo.groups).filter(|&g| has_super(g)) {
        let sb = superblock(geo, info, g);
        let start = u64::from(geo.group_start(g)) * bs;
        // Group 0's superblock sits at byte 1024 whatever the block size.
        let sb_off = if g == 0 { 1024 } else { start };
        out.write_at(sb_off, &sb)?;
        out.write_at(start + bs, &gdt)?;
    }
    Ok(())
}

/// Sets bits `from..to` of a bitmap.
fn set_bits(bitmap: &mut [u8], from: usize, to: usize) {
    let mut i = from;
    while i < to && !i.is_multiple_of(8) {
        bitmap[i / 8] |= 1 << (i % 8);
        i += 1;
    }
    let whole = (to - i.min(to)) / 8;
    bitmap[i / 8..i / 8 + whole].fill(0xFF);
    i += whole * 8;
    while i < to {
        bitmap[i / 8] |= 1 << (i % 8);
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_of_any_length_give_the_same_blocks() {
        // 10.5 blocks of 1024 bytes: data, a zero block, data, a partial last block.
        let mut content: Vec<u8> = (0..10 * 1024 + 512).map(|i| (i % 251) as u8 + 1).collect();
        content[2048..3072].fill(0);
        let mut want: Vec<(u64, Vec<u8>)> = content
            .chunks(1024)
            .enumerate()
            .map(|(l, b)| (l as u64, b.to_vec()))
            .collect();
        want.last_mut().unwrap().1.resize(1024, 0);
        for cut in [1, 7, 512, 1000, 1024, 1500, 4096, 20_000] {
            let mut blocks = Blocks::new(1024);
            let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut place = |l: u64, b: Option<&[u8]>| {
                got.push((l, b.map_or(vec![0; 1024], <[u8]>::to_vec)));
                Ok::<_, ()>(())
            };
            for piece in content.chunks(cut) {
                let hole = piece.iter().all(|&b| b == 0);
                blocks.feed(piece, hole, &mut place).unwrap();
            }
            blocks.finish(&mut place).unwrap();
            assert_eq!(got, want, "chunks of {cut} bytes");
        }
    }

    #[test]
    fn set_bits_matches_bit_by_bit() {
        for from in 0..20 {
            for to in from..40 {
                let mut fast = [0u8; 5];
                set_bits(&mut fast, from, to);
                let mut slow = [0u8; 5];
                for i in from..to {
                    slow[i / 8] |= 1 << (i % 8);
                }
                assert_eq!(fast, slow, "{from}..{to}");
            }
        }
    }
}
