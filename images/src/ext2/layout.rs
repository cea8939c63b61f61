//! ext2 on-disk geometry and structure encoders (pure: no I/O).
//!
//! Block groups follow the classic ext2 layout without `resize_inode` or `flex_bg`: a group
//! that carries a superblock copy (group 0, 1 and powers of 3, 5 and 7 with `sparse_super`)
//! starts with the superblock and the group descriptor table, then every group has its
//! block bitmap, inode bitmap and inode table, then data blocks.

/// Superblock magic.
pub const EXT2_MAGIC: u16 = 0xEF53;
/// First non-reserved inode (lost+found).
pub const FIRST_INO: u32 = 11;
/// Root directory inode.
pub const ROOT_INO: u32 = 2;
/// `INCOMPAT_FILETYPE`: directory entries carry the file type.
pub const INCOMPAT_FILETYPE: u32 = 0x2;
/// `RO_COMPAT_SPARSE_SUPER`: superblock copies only in groups 0, 1 and powers of 3, 5, 7.
pub const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
/// `RO_COMPAT_LARGE_FILE`: files may be 2 GiB or larger.
pub const RO_COMPAT_LARGE_FILE: u32 = 0x2;
/// Size of one group descriptor.
pub const GROUP_DESC_SIZE: u32 = 32;
/// Pointers in `i_block` that address data directly.
pub const NDIR_BLOCKS: u64 = 12;
/// The most links an ext2 inode may have.
pub const LINK_MAX: u32 = 32000;
/// `i_extra_isize` used in 256-byte inodes (room for the extra time fields).
pub const EXTRA_ISIZE: u16 = 32;

/// File type codes in directory entries.
pub const FT_REG: u8 = 1;
/// Directory.
pub const FT_DIR: u8 = 2;
/// Symbolic link.
pub const FT_SYMLINK: u8 = 7;

/// Mode type bits.
pub const S_IFREG: u16 = 0o100000;
/// Directory.
pub const S_IFDIR: u16 = 0o040000;
/// Symbolic link.
pub const S_IFLNK: u16 = 0o120000;

/// Where everything is, for a given block count, block size and inode count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Block size in bytes.
    pub block_size: u32,
    /// Blocks in the file system (`s_blocks_count`).
    pub blocks: u32,
    /// 1 for 1024-byte blocks, else 0.
    pub first_data_block: u32,
    /// Blocks per group (8 × block size).
    pub blocks_per_group: u32,
    /// Number of block groups.
    pub groups: u32,
    /// Inodes per group.
    pub inodes_per_group: u32,
    /// Inode size in bytes.
    pub inode_size: u32,
    /// Inode table blocks per group.
    pub inode_table_blocks: u32,
    /// Blocks taken by one copy of the group descriptor table.
    pub gdt_blocks: u32,
}

/// Why a geometry cannot be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GeometryError {
    /// Too few blocks for even one group's metadata.
    FewBlocks,
    /// More inodes than the groups can hold.
    ManyInodes,
    /// The group descriptor table would not fit in a group (file system too large for
    /// this block size).
    ManyGroups,
}

/// True if group `g` holds a superblock copy under `sparse_super`.
pub fn has_super(g: u32) -> bool {
    fn power_of(mut n: u32, b: u32) -> bool {
        while n.is_multiple_of(b) {
            n /= b;
        }
        n == 1
    }
    g <= 1 || power_of(g, 3) || power_of(g, 5) || power_of(g, 7)
}

impl Geometry {
    /// Lays out `blocks` blocks of `block_size` bytes with room for at least `inodes`
    /// inodes. The last group is dropped if it is too small to be useful (as mke2fs does),
    /// so [`Geometry::blocks`] may come out smaller than asked.
    pub fn new(
        blocks: u32,
        block_size: u32,
        inode_size: u32,
        inodes: u32,
    ) -> Result<Self, GeometryError> {
        let first_data_block = u32::from(block_size == 1024);
        let blocks_per_group = 8 * block_size;
        let mut blocks = blocks;
        loop {
            if blocks <= first_data_block {
                return Err(GeometryError::FewBlocks);
            }
            let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
            let gdt_blocks = (u64::from(groups) * u64::from(GROUP_DESC_SIZE))
                .div_ceil(u64::from(block_size)) as u32;
            let per_block = block_size / inode_size;
            let align = per_block.max(8);
            let ipg = inodes.div_ceil(groups).max(1).div_ceil(align) * align;
            if ipg > 8 * block_size {
                return Err(GeometryError::ManyInodes);
            }
            if u64::from(ipg) * u64::from(groups) > u64::from(u32::MAX) {
                return Err(GeometryError::ManyInodes);
            }
            let geo = Geometry {
                block_size,
                blocks,
                first_data_block,
                blocks_per_group,
                groups,
                inodes_per_group: ipg,
                inode_size,
                inode_table_blocks: ipg * inode_size / block_size,
                gdt_blocks,
            };
            if geo.meta_blocks(0) >= blocks_per_group {
                return Err(GeometryError::ManyGroups);
            }
            let last = groups - 1;
            let rem = geo.group_blocks(last);
            let overhead = geo.meta_blocks(last);
            if rem < overhead + 50 {
                if groups == 1 {
                    if rem <= overhead {
                        return Err(GeometryError::FewBlocks);
                    }
                    return Ok(geo);
                }
                // Drop the runt group and lay out again.
                blocks -= rem;
                continue;
            }
            return Ok(geo);
        }
    }

    /// Total inodes.
    pub fn inodes(&self) -> u32 {
        self.inodes_per_group * self.groups
    }

    /// First block of group `g`.
    pub fn group_start(&self, g: u32) -> u32 {
        self.first_data_block + g * self.blocks_per_group
    }

    /// Blocks in group `g` (the last one may be short).
    pub fn group_blocks(&self, g: u32) -> u32 {
        if g + 1 == self.groups {
            self.blocks - self.group_start(g)
        } else {
            self.blocks_per_group
        }
    }

    /// Metadata blocks at the start of group `g`.
    pub fn meta_blocks(&self, g: u32) -> u32 {
        let sb = if has_super(g) { 1 + self.gdt_blocks } else { 0 };
        sb + 2 + self.inode_table_blocks
    }

    /// Block bitmap of group `g`.
    pub fn block_bitmap(&self, g: u32) -> u32 {
        self.group_start(g) + self.meta_blocks(g) - 2 - self.inode_table_blocks
    }

    /// Inode bitmap of group `g`.
    pub fn inode_bitmap(&self, g: u32) -> u32 {
        self.block_bitmap(g) + 1
    }

    /// First inode table block of group `g`.
    pub fn inode_table(&self, g: u32) -> u32 {
        self.block_bitmap(g) + 2
    }

    /// First data block of group `g`.
    pub fn data_start(&self, g: u32) -> u32 {
        self.group_start(g) + self.meta_blocks(g)
    }

    /// One past the last block of group `g`.
    pub fn group_end(&self, g: u32) -> u32 {
        self.group_start(g) + self.group_blocks(g)
    }

    /// Blocks available for data in the whole file system.
    pub fn data_capacity(&self) -> u64 {
        (0..self.groups)
            .map(|g| u64::from(self.group_blocks(g) - self.meta_blocks(g)))
            .sum()
    }
}

/// Data plus indirect blocks needed to map `data` blocks in an inode's `i_block`.
/// `None` if the file is beyond what triple indirection can address.
pub fn mapped_blocks(data: u64, block_size: u32) -> Option<u64> {
    let p = u64::from(block_size / 4);
    let mut n = data.saturating_sub(NDIR_BLOCKS);
    let mut meta = 0;
    if n > 0 {
        meta += 1;
        n = n.saturating_sub(p);
    }
    if n > 0 {
        let here = n.min(p * p);
        meta += 1 + here.div_ceil(p);
        n -= here;
    }
    if n > 0 {
        if n > p * p * p {
            return None;
        }
        meta += 1 + n.div_ceil(p * p) + n.div_ceil(p);
    }
    Some(data + meta)
}

/// Where logical block `l` of a file sits in the block map: the `i_block` slot and the
/// index in each indirect block on the way down (top first). `None` beyond triple
/// indirection.
pub fn block_path(l: u64, block_size: u32) -> Option<(usize, [u32; 3], usize)> {
    let p = u64::from(block_size / 4);
    if l < NDIR_BLOCKS {
        return Some((l as usize, [0; 3], 0));
    }
    let mut o = l - NDIR_BLOCKS;
    if o < p {
        return Some((12, [o as u32, 0, 0], 1));
    }
    o -= p;
    if o < p * p {
        return Some((13, [(o / p) as u32, (o % p) as u32, 0], 2));
    }
    o -= p * p;
    if o < p * p * p {
        return Some((
            14,
            [(o / (p * p)) as u32, ((o / p) % p) as u32, (o % p) as u32],
            3,
        ));
    }
    None
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// A time for a 32-bit superblock field (seconds since 1970, clamped).
pub fn sb_time(t: i64) -> u32 {
    t.clamp(0, i64::from(u32::MAX)) as u32
}

/// Superblock fields that vary between images.
#[derive(Debug, Clone)]
pub struct SuperInfo {
    /// Free blocks.
    pub free_blocks: u32,
    /// Free inodes.
    pub free_inodes: u32,
    /// Build timestamp.
    pub timestamp: i64,
    /// UUID.
    pub uuid: [u8; 16],
    /// Hash seed.
    pub hash_seed: [u8; 16],
    /// Volume label (at most 16 bytes).
    pub label: Vec<u8>,
    /// `s_feature_ro_compat`.
    pub ro_compat: u32,
}

/// The 1024-byte superblock as stored in group `group`.
pub fn superblock(geo: &Geometry, info: &SuperInfo, group: u32) -> [u8; 1024] {
    let mut b = [0u8; 1024];
    let t = sb_time(info.timestamp);
    put32(&mut b, 0x00, geo.inodes());
    put32(&mut b, 0x04, geo.blocks);
    put32(&mut b, 0x08, 0); // reserved blocks
    put32(&mut b, 0x0C, info.free_blocks);
    put32(&mut b, 0x10, info.free_inodes);
    put32(&mut b, 0x14, geo.first_data_block);
    let log = geo.block_size.trailing_zeros() - 10;
    put32(&mut b, 0x18, log);
    put32(&mut b, 0x1C, log);
    put32(&mut b, 0x20, geo.blocks_per_group);
    put32(&mut b, 0x24, geo.blocks_per_group);
    put32(&mut b, 0x28, geo.inodes_per_group);
    put32(&mut b, 0x2C, 0); // last mount time
    put32(&mut b, 0x30, t); // last write time
    put16(&mut b, 0x34, 0); // mount count
    put16(&mut b, 0x36, 0xFFFF); // max mount count: no forced checks
    put16(&mut b, 0x38, EXT2_MAGIC);
    put16(&mut b, 0x3A, 1); // clean
    put16(&mut b, 0x3C, 1); // errors: continue
    put32(&mut b, 0x40, t); // last check
    put32(&mut b, 0x48, 0); // creator OS: Linux
    put32(&mut b, 0x4C, 1); // dynamic revision
    put32(&mut b, 0x54, FIRST_INO);
    put16(&mut b, 0x58, geo.inode_size as u16);
    put16(&mut b, 0x5A, group as u16);
    put32(&mut b, 0x5C, 0);
    put32(&mut b, 0x60, INCOMPAT_FILETYPE);
    put32(&mut b, 0x64, info.ro_compat);
    b[0x68..0x78].copy_from_slice(&info.uuid);
    let n = info.label.len().min(16);
    b[0x78..0x78 + n].copy_from_slice(&info.label[..n]);
    b[0xEC..0xFC].copy_from_slice(&info.hash_seed);
    b[0xFC] = 1; // default hash: half_md4
    put32(&mut b, 0x108, t); // mkfs time
    if geo.inode_size > 128 {
        put16(&mut b, 0x15C, EXTRA_ISIZE);
        put16(&mut b, 0x15E, EXTRA_ISIZE);
    }
    put32(&mut b, 0x160, 0x1); // signed directory hash
    b
}

/// Per-group counters for a group descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCounts {
    /// Free blocks in the group.
    pub free_blocks: u32,
    /// Free inodes in the group.
    pub free_inodes: u32,
    /// Directories in the group.
    pub dirs: u32,
}

/// The group descriptor table (one copy), padded to whole blocks.
pub fn group_descriptors(geo: &Geometry, counts: &[GroupCounts]) -> Vec<u8> {
    let mut b = vec![0u8; (geo.gdt_blocks * geo.block_size) as usize];
    for (g, c) in counts.iter().enumerate() {
        let o = g * GROUP_DESC_SIZE as usize;
        let g = g as u32;
        put32(&mut b, o, geo.block_bitmap(g));
        put32(&mut b, o + 4, geo.inode_bitmap(g));
        put32(&mut b, o + 8, geo.inode_table(g));
        put16(&mut b, o + 12, c.free_blocks as u16);
        put16(&mut b, o + 14, c.free_inodes as u16);
        put16(&mut b, o + 16, c.dirs as u16);
    }
    b
}

/// Metadata of one inode, ready to encode.
#[derive(Debug, Clone)]
pub struct InodeInfo {
    /// Type and permission bits.
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Time for atime, ctime, mtime and crtime.
    pub time: i64,
    /// Link count.
    pub links: u16,
    /// Blocks used (data and indirect), in file system blocks.
    pub blocks: u64,
    /// `i_block`: block pointers, or a fast symlink's target.
    pub i_block: [u8; 60],
}

impl Default for InodeInfo {
    fn default() -> Self {
        Self {
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            time: 0,
            links: 0,
            blocks: 0,
            i_block: [0; 60],
        }
    }
}

/// Splits a time into the 32-bit field and the `_extra` epoch bits.
fn split_time(t: i64, extra: bool) -> (u32, u32) {
    if !extra {
        return (
            t.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32 as u32,
            0,
        );
    }
    // 34-bit signed range: [-2^31, 2^34 - 2^31).
    let t = t.clamp(-(1 << 31), (1 << 34) - (1 << 31) - 1);
    let lo = t as i32;
    let epoch = ((t - i64::from(lo)) >> 32) as u32 & 3;
    (lo as u32, epoch)
}

/// Encodes an inode into `out` (`inode_size` bytes).
pub fn encode_inode(info: &InodeInfo, block_size: u32, out: &mut [u8]) {
    out.fill(0);
    let big = out.len() > 128;
    let (t, epoch) = split_time(info.time, big);
    put16(out, 0x00, info.mode);
    put16(out, 0x02, info.uid as u16);
    put32(out, 0x04, info.size as u32);
    put32(out, 0x08, t);
    put32(out, 0x0C, t);
    put32(out, 0x10, t);
    put16(out, 0x18, info.gid as u16);
    put16(out, 0x1A, info.links);
    put32(
        out,
        0x1C,
        (info.blocks * u64::from(block_size / 512)) as u32,
    );
    out[0x28..0x28 + 60].copy_from_slice(&info.i_block);
    put32(out, 0x6C, (info.size >> 32) as u32);
    put16(out, 0x78, (info.uid >> 16) as u16);
    put16(out, 0x7A, (info.gid >> 16) as u16);
    if big {
        put16(out, 0x80, EXTRA_ISIZE);
        put32(out, 0x84, epoch);
        put32(out, 0x88, epoch);
        put32(out, 0x8C, epoch);
        put32(out, 0x90, t);
        put32(out, 0x94, epoch);
    }
}

/// Packs directory entries `(inode, file type, name)` into whole blocks.
pub fn dir_blocks(entries: &[(u32, u8, &[u8])], block_size: u32) -> Vec<u8> {
    let bs = block_size as usize;
    let mut out: Vec<u8> = Vec::new();
    // Offset of the last entry written, to stretch its rec_len to the block's end.
    let mut last: Option<usize> = None;
    let mut pos = 0usize; // bytes used in the current block
    for &(ino, ft, name) in entries {
        let len = (8 + name.len()).div_ceil(4) * 4;
        if last.is_none() || pos + len > bs {
            if let Some(l) = last {
                let rec = (out.len() - l) as u16;
                put16(&mut out, l + 4, rec);
            }
            out.resize(out.len().div_ceil(bs) * bs + bs, 0);
            pos = 0;
        }
        let o = out.len() - bs + pos;
        put32(&mut out, o, ino);
        put16(&mut out, o + 4, len as u16);
        out[o + 6] = name.len() as u8;
        out[o + 7] = ft;
        out[o + 8..o + 8 + name.len()].copy_from_slice(name);
        last = Some(o);
        pos += len;
    }
    if let Some(l) = last {
        let rec = (out.len() - l) as u16;
        put16(&mut out, l + 4, rec);
    }
    out
}

/// An empty directory block (one unused entry spanning it).
pub fn empty_dir_block(block_size: u32) -> Vec<u8> {
    let mut b = vec![0u8; block_size as usize];
    put16(&mut b, 4, block_size as u16);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        let with: Vec<u32> = (0..100).filter(|&g| has_super(g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49, 81]);
    }

    #[test]
    fn mapped_blocks_counts_indirect_blocks() {
        // 1024-byte blocks: 256 pointers per indirect block.
        assert_eq!(mapped_blocks(0, 1024), Some(0));
        assert_eq!(mapped_blocks(12, 1024), Some(12));
        assert_eq!(mapped_blocks(13, 1024), Some(14));
        assert_eq!(mapped_blocks(12 + 256, 1024), Some(12 + 256 + 1));
        assert_eq!(
            mapped_blocks(12 + 256 + 1, 1024),
            Some(12 + 256 + 1 + 1 + 2)
        );
        let dind_full = 12 + 256 + 256 * 256;
        assert_eq!(
            mapped_blocks(dind_full, 1024),
            Some(dind_full + 1 + 1 + 256)
        );
        assert_eq!(
            mapped_blocks(dind_full + 1, 1024),
            Some(dind_full + 1 + 1 + 1 + 256 + 1 + 1 + 1)
        );
        assert_eq!(mapped_blocks(12 + 256 + 65536 + (1 << 24) + 1, 1024), None);
    }

    #[test]
    fn block_paths() {
        assert_eq!(block_path(3, 1024), Some((3, [0; 3], 0)));
        assert_eq!(block_path(12, 1024), Some((12, [0, 0, 0], 1)));
        assert_eq!(block_path(12 + 255, 1024), Some((12, [255, 0, 0], 1)));
        assert_eq!(block_path(12 + 256, 1024), Some((13, [0, 0, 0], 2)));
        assert_eq!(block_path(12 + 256 + 257, 1024), Some((13, [1, 1, 0], 2)));
        assert_eq!(
            block_path(12 + 256 + 65536 + 65536 + 257, 1024),
            Some((14, [1, 1, 1], 3))
        );
    }

    #[test]
    fn geometry_drops_runt_group_and_fits_inodes() {
        let g = Geometry::new(8193 + 20, 1024, 256, 100).unwrap();
        assert_eq!(g.groups, 1);
        assert_eq!(g.blocks, 8193);
        assert!(g.inodes() >= 100);
        assert_eq!(g.inodes_per_group % 8, 0);
        let g = Geometry::new(100_000, 4096, 128, 5000).unwrap();
        assert_eq!(g.groups, 4);
        assert!(g.inodes() >= 5000);
        assert_eq!(g.block_bitmap(0), 2);
        assert_eq!(g.block_bitmap(2), 2 * 32768);
        assert!(Geometry::new(10, 4096, 256, 10_000).is_err());
    }

    #[test]
    fn dir_entries_never_cross_blocks() {
        let names: Vec<Vec<u8>> = (0..50).map(|i| vec![b'a' + (i % 26) as u8; 90]).collect();
        let entries: Vec<(u32, u8, &[u8])> =
            names.iter().map(|n| (12, FT_REG, n.as_slice())).collect();
        let b = dir_blocks(&entries, 1024);
        assert_eq!(b.len() % 1024, 0);
        let mut seen = 0;
        for block in b.chunks(1024) {
            let mut o = 0;
            while o < 1024 {
                let rec = u16::from_le_bytes([block[o + 4], block[o + 5]]) as usize;
                assert!(rec >= 8 && o + rec <= 1024);
                seen += 1;
                o += rec;
            }
            assert_eq!(o, 1024);
        }
        assert_eq!(seen, 50);
    }
}
