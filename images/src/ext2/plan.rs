//! The plan of an ext2 image (pure: no I/O): what the tree needs (directory blocks, data and
//! indirect blocks, inodes, lost+found) and the geometry and image size that hold it.
//!
//! The size search, for `--size auto` and for the least size an explicit `--size` must
//! have, is in [`choose`] and [`min_blocks`].

use super::layout::{
    dir_blocks, mapped_blocks, Geometry, GeometryError, FIRST_INO, FT_DIR, FT_REG, FT_SYMLINK,
    LINK_MAX, ROOT_INO,
};
use super::options::{Ext2Error, Ext2Options};
use crate::size::SECTOR;
use crate::tree::{Node, NodeId, NodeKind, Tree, ROOT};

/// Bytes of image per inode when the size leaves room (as mke2fs's default ratio).
const BYTES_PER_INODE: u64 = 16384;
/// Free space `--size auto` leaves at least, on top of 25 % of the tree.
const MIN_HEADROOM: u64 = 2 << 20;

/// What the tree needs, worked out before anything is written.
pub(super) struct Plan {
    /// Packed directory blocks per node (directories only).
    pub(super) dirs: Vec<Option<Vec<u8>>>,
    /// True if lost+found is created here (the tree has none).
    pub(super) lpf_ours: bool,
    /// Blocks the lost+found directory gets.
    pub(super) lpf_blocks: u64,
    /// Data and indirect blocks needed, holes not counted as saved.
    pub(super) data_blocks: u64,
    /// Highest inode number used (= inodes in use counting the reserved ones).
    pub(super) inodes_used: u32,
}

/// The inode of tree node `id`.
pub(super) fn ino_of(id: NodeId) -> u32 {
    if id == ROOT {
        ROOT_INO
    } else {
        FIRST_INO + id as u32
    }
}

/// The directory entry file type of `node`.
fn file_type(node: &Node) -> u8 {
    match node.kind {
        NodeKind::File { .. } => FT_REG,
        NodeKind::Dir { .. } => FT_DIR,
        NodeKind::Symlink { .. } => FT_SYMLINK,
    }
}

/// Data and indirect blocks for `data` blocks of content, refusing files ext2 cannot map
/// (`what` names the file in the message).
fn mapped(data: u64, block_size: u32, what: impl Fn() -> String) -> Result<u64, Ext2Error> {
    let too_big = || {
        Ext2Error::TooBig(format!(
            "{} is too large for ext2 with {block_size}-byte blocks (try --block-size 4096)",
            what()
        ))
    };
    let n = mapped_blocks(data, block_size).ok_or_else(&too_big)?;
    // i_blocks counts 512-byte sectors in 32 bits.
    if n * u64::from(block_size / 512) > u64::from(u32::MAX) {
        return Err(too_big());
    }
    Ok(n)
}

/// Works out what `tree` needs with `block_size`-byte blocks, refusing what ext2 cannot
/// hold (too many files or links, names or symlink targets too long, files too large).
pub(super) fn plan(tree: &Tree, block_size: u32) -> Result<Plan, Ext2Error> {
    let n = tree.nodes.len();
    if n as u64 + u64::from(FIRST_INO) >= u64::from(u32::MAX) {
        return Err(Ext2Error::TooBig(format!(
            "{n} files are too many for ext2"
        )));
    }
    let mut parent = vec![ROOT; n];
    for (id, node) in tree.nodes.iter().enumerate() {
        if let NodeKind::Dir { entries } = &node.kind {
            for &(_, c) in entries {
                parent[c] = id;
            }
        }
    }
    let NodeKind::Dir {
        entries: root_entries,
    } = &tree.root().kind
    else {
        return Err(Ext2Error::BadOption(
            "the tree's root is not a directory".into(),
        ));
    };
    let lpf_ours = match root_entries.iter().find(|(name, _)| name == b"lost+found") {
        None => true,
        Some(&(_, id)) if tree.nodes[id].is_dir() => false,
        Some(_) => {
            return Err(Ext2Error::BadOption(
                "the source folder has a lost+found that is not a directory; ext2 needs that \
                 name for its lost+found directory (rename or remove it)"
                    .into(),
            ))
        }
    };
    let paths = || -> Vec<Vec<u8>> {
        let mut p = vec![b"/".to_vec(); n];
        for (path, id) in tree.walk() {
            p[id] = [b"/".as_slice(), &path].concat();
        }
        p
    };
    let name_of = |id: NodeId| String::from_utf8_lossy(&paths()[id]).into_owned();
    let bs = u64::from(block_size);
    let mut data_blocks = 0u64;
    let mut dirs = vec![None; n];
    for (id, node) in tree.nodes.iter().enumerate() {
        let links = node.nlink + u32::from(id == ROOT && lpf_ours);
        if links > LINK_MAX {
            return Err(Ext2Error::TooBig(format!(
                "{} has {links} links; ext2 allows at most {LINK_MAX}",
                name_of(id)
            )));
        }
        match &node.kind {
            NodeKind::Dir { entries } => {
                let mut list: Vec<(u32, u8, &[u8])> = Vec::with_capacity(entries.len() + 3);
                list.push((ino_of(id), FT_DIR, b"."));
                list.push((ino_of(parent[id]), FT_DIR, b".."));
                if id == ROOT && lpf_ours {
                    list.push((FIRST_INO, FT_DIR, b"lost+found"));
                }
                for (name, c) in entries {
                    if name.is_empty() || name.len() > 255 {
                        return Err(Ext2Error::TooBig(format!(
                            "a name in {} is longer than ext2's 255 bytes",
                            name_of(id)
                        )));
                    }
                    list.push((ino_of(*c), file_type(&tree.nodes[*c]), name));
                }
                let bytes = dir_blocks(&list, block_size);
                data_blocks += mapped(bytes.len() as u64 / bs, block_size, || name_of(id))?;
                dirs[id] = Some(bytes);
            }
            NodeKind::File { size, .. } => {
                data_blocks += mapped(size.div_ceil(bs), block_size, || name_of(id))?;
            }
            NodeKind::Symlink { target } => {
                if target.len() >= block_size as usize {
                    return Err(Ext2Error::TooBig(format!(
                        "the target of symlink {} is longer than a {block_size}-byte block \
                         (try --block-size 4096)",
                        name_of(id)
                    )));
                }
                if target.len() >= 60 {
                    data_blocks += 1;
                }
            }
        }
    }
    // As mke2fs: lost+found gets 16 KiB (at least two blocks, at most 12).
    let lpf_blocks = (16384 / bs).clamp(2, 12);
    if lpf_ours {
        data_blocks += lpf_blocks;
    }
    Ok(Plan {
        dirs,
        lpf_ours,
        lpf_blocks,
        data_blocks,
        inodes_used: FIRST_INO + (n as u32 - 1),
    })
}

/// Auto sizes are whole MiB when that still fits the geometry found.
const AUTO_ROUND: u64 = 1 << 20;
/// Inodes `--size auto` adds on top of 25 % more than the tree uses.
const SPARE_INODES: u64 = 16;

/// Data blocks wanted: what the tree needs, plus headroom if asked.
fn wanted_blocks(plan: &Plan, block_size: u32, headroom: bool) -> u64 {
    let d = plan.data_blocks;
    if headroom {
        d + (d / 4).max(MIN_HEADROOM / u64::from(block_size))
    } else {
        d
    }
}

/// The geometry of `blocks` blocks for `plan`: as many inodes as mke2fs's ratio gives, and
/// at least the tree's (plus headroom if asked); when the ratio asks for more than the
/// groups can hold, only what the tree needs.
fn geometry_for(
    blocks: u64,
    opts: &Ext2Options,
    plan: &Plan,
    headroom: bool,
) -> Result<Geometry, GeometryError> {
    let blocks = u32::try_from(blocks).map_err(|_| GeometryError::ManyGroups)?;
    let used = u64::from(plan.inodes_used);
    let want = if headroom {
        used + used / 4 + SPARE_INODES
    } else {
        used
    };
    let by_ratio = u64::from(blocks) * u64::from(opts.block_size) / BYTES_PER_INODE;
    let inodes = want.max(by_ratio).min(u64::from(u32::MAX)) as u32;
    match Geometry::new(blocks, opts.block_size, u32::from(opts.inode_size), inodes) {
        Err(GeometryError::ManyInodes) if inodes as u64 > used => {
            // The ratio asked for more than fits: settle for what the tree needs.
            Geometry::new(
                blocks,
                opts.block_size,
                u32::from(opts.inode_size),
                plan.inodes_used + u32::from(headroom) * (plan.inodes_used / 4),
            )
        }
        r => r,
    }
}

/// True when `geo` holds `data` blocks and the tree's inodes.
fn fits(geo: &Geometry, plan: &Plan, data: u64) -> bool {
    geo.data_capacity() >= data && geo.inodes() >= plan.inodes_used
}

/// The error for a tree ext2 cannot address with the chosen block size.
fn too_big_fs(opts: &Ext2Options) -> Ext2Error {
    Ext2Error::TooBig(format!(
        "the tree needs more than ext2 can address with {}-byte blocks (try --block-size 4096)",
        opts.block_size
    ))
}

/// The size search's first guess: the data blocks wanted plus this many, a small allowance
/// for group 0's superblock, descriptors and bitmaps (the search corrects it upwards).
const FIRST_GUESS_EXTRA: u64 = 16;
/// Blocks added, on top of what the data still lacks, after a size fell short: the blocks
/// added can start a new group, which brings bitmaps, an inode table and perhaps a
/// superblock copy of its own.
const STRIDE_EXTRA: u64 = 64;
/// Most sizes the search tries before it gives up.
const MAX_TRIES: u32 = 100_000;

/// The fewest blocks that hold the tree (with headroom if asked).
///
/// The search steps up from a first guess until a geometry holds the data and the inodes:
/// - the geometry exists but holds too little: add what the data lacks plus
///   [`STRIDE_EXTRA`] (at least one block: the inodes may be what is short);
/// - too few blocks for even one group's metadata: add [`STRIDE_EXTRA`];
/// - too many inodes for the groups: add one group's worth of blocks (8 × the block size),
///   whose inode table takes the rest.
///
/// With headroom (`--size auto`) the first size that fits is the answer: that is how auto
/// sizes have always been chosen, so images stay byte for byte what they were. Without
/// (the least size an explicit `--size` must have), the answer is exact: a bisection between
/// the last size that fell short and the first that fit.
fn min_blocks(opts: &Ext2Options, plan: &Plan, headroom: bool) -> Result<u64, Ext2Error> {
    let target = wanted_blocks(plan, opts.block_size, headroom);
    let fits_in =
        |n: u64| geometry_for(n, opts, plan, headroom).is_ok_and(|g| fits(&g, plan, target));
    let group = u64::from(8 * opts.block_size);
    let mut below = target;
    let mut n = target + FIRST_GUESS_EXTRA;
    for _ in 0..MAX_TRIES {
        if n > u64::from(u32::MAX) {
            return Err(too_big_fs(opts));
        }
        match geometry_for(n, opts, plan, headroom) {
            Ok(g) if fits(&g, plan, target) && headroom => return Ok(n),
            Ok(g) if fits(&g, plan, target) => {
                let mut fit = n;
                while fit - below > 1 {
                    let mid = below + (fit - below) / 2;
                    if fits_in(mid) {
                        fit = mid;
                    } else {
                        below = mid;
                    }
                }
                return Ok(fit);
            }
            Ok(g) => {
                below = n;
                n += target.saturating_sub(g.data_capacity()).max(1) + STRIDE_EXTRA;
            }
            Err(GeometryError::FewBlocks) => {
                below = n;
                n += STRIDE_EXTRA;
            }
            Err(GeometryError::ManyInodes) => {
                below = n;
                n += group;
            }
            Err(GeometryError::ManyGroups) => return Err(too_big_fs(opts)),
        }
    }
    Err(too_big_fs(opts))
}

/// Picks the geometry and the image file's size.
pub(super) fn choose(opts: &Ext2Options, plan: &Plan) -> Result<(Geometry, u64), Ext2Error> {
    let bs = u64::from(opts.block_size);
    match opts.size {
        None => {
            let n = min_blocks(opts, plan, true)?;
            let target = wanted_blocks(plan, opts.block_size, true);
            let size = (n * bs).next_multiple_of(AUTO_ROUND);
            if let Ok(g) = geometry_for(size / bs, opts, plan, true) {
                if fits(&g, plan, target) {
                    return Ok((g, size));
                }
            }
            let g = geometry_for(n, opts, plan, true).map_err(|_| too_big_fs(opts))?;
            Ok((g, n * bs))
        }
        Some(size) => {
            // A disk image is a whole number of 512-byte sectors, as `create` makes them.
            let rounded = size.checked_next_multiple_of(SECTOR);
            let size = rounded.unwrap_or(u64::MAX);
            let n = size / bs;
            if rounded.is_none() || n > u64::from(u32::MAX) {
                return Err(Ext2Error::TooBig(format!(
                    "{size} bytes is more than ext2 can address with {bs}-byte blocks \
                     (at most {} bytes)",
                    u64::from(u32::MAX) * bs
                )));
            }
            for headroom in [true, false] {
                if let Ok(g) = geometry_for(n, opts, plan, headroom) {
                    if fits(&g, plan, plan.data_blocks) {
                        return Ok((g, size));
                    }
                }
            }
            let needed = min_blocks(opts, plan, false)? * bs;
            Err(Ext2Error::TooSmall {
                needed,
                given: size,
            })
        }
    }
}
