//! An ext2 file system written from a [`Tree`], without root, loop devices or e2fsprogs.
//!
//! The layout is revision 1 ext2 as mke2fs makes it, minus `resize_inode`, `dir_index` and
//! `ext_attr`: features `filetype`, `sparse_super` and `large_file`; 128- or 256-byte
//! inodes; block maps with direct, indirect, double and triple indirect blocks; linear
//! directories; fast (in-inode) and slow symlinks; a lost+found directory with room to
//! spare, as e2fsck expects.
//!
//! Building is one pass in tree order: directory blocks are packed in memory, file content
//! is streamed from the source files into blocks allocated in increasing order (all-zero
//! blocks become holes), then inode tables, bitmaps, group descriptors and superblocks are
//! written. The image file is sparse: blocks nobody uses are never written. A file's
//! indirect blocks always cover its whole length, holes included, because some readers
//! (ext4-view 1.0) cannot follow a zero pointer in the upper levels of a block map.
//!
//! Nothing depends on the clock or on chance: the file system's times are the tree's
//! timestamp, inode times the nodes' mtimes, and the UUID, unless given, is a SHA-256 of
//! the options, the tree's metadata and every file's content (its non-zero blocks, so a
//! sparse and a dense copy of a file hash alike). No blocks are reserved for root.

mod layout;
mod write;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::info;

use self::layout::{
    dir_blocks, empty_dir_block, encode_inode, group_descriptors, has_super, mapped_blocks,
    superblock, Geometry, GeometryError, GroupCounts, InodeInfo, SuperInfo, FIRST_INO, FT_DIR,
    FT_REG, FT_SYMLINK, LINK_MAX, ROOT_INO, RO_COMPAT_LARGE_FILE, RO_COMPAT_SPARSE_SUPER, S_IFDIR,
    S_IFLNK, S_IFREG,
};
use self::write::{Alloc, BlockMap, Out};
use crate::create::Unfinished;
use crate::tree::{Node, NodeId, NodeKind, Tree, ROOT};

/// How to lay out the file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext2Options {
    /// Image size in bytes; `None`: the tree's size plus metadata plus headroom.
    pub size: Option<u64>,
    /// Block size: 1024, 2048 or 4096.
    pub block_size: u32,
    /// Volume label (at most 16 bytes).
    pub label: String,
    /// File system UUID; `None`: derived from the tree and the options (reproducible).
    pub uuid: Option<[u8; 16]>,
    /// Inode size: 128 or 256.
    pub inode_size: u16,
}

impl Default for Ext2Options {
    fn default() -> Self {
        Self {
            size: None,
            block_size: 4096,
            label: String::new(),
            uuid: None,
            inode_size: 256,
        }
    }
}

/// What [`build`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext2Summary {
    /// Image size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Blocks in the file system.
    pub blocks: u64,
    /// Blocks left free.
    pub free_blocks: u64,
    /// Inodes in the file system.
    pub inodes: u32,
    /// Inodes left free.
    pub free_inodes: u32,
    /// The file system UUID.
    pub uuid: [u8; 16],
}

/// Errors from building an ext2 image.
#[derive(Debug, Error)]
pub enum Ext2Error {
    /// The requested size cannot hold the tree.
    #[error(
        "image size {given} bytes is too small for this tree: it needs at least {needed} bytes \
         ({:.1} MiB); pass --size auto or --size {needed} or more",
        *needed as f64 / 1048576.0
    )]
    TooSmall {
        /// Bytes the tree needs.
        needed: u64,
        /// Bytes requested.
        given: u64,
    },
    /// Reading a source file or writing the image failed.
    #[error("{path}: {op} failed")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A source file changed size while the image was being written.
    #[error(
        "{path}: file changed while the image was being built (was {expected} bytes, now \
         {found}); build from a folder nobody writes to"
    )]
    FileChanged {
        /// The source file.
        path: PathBuf,
        /// Size when the tree was read.
        expected: u64,
        /// Size found while copying.
        found: u64,
    },
    /// An option has a value ext2 cannot use.
    #[error("{0}")]
    BadOption(String),
    /// The tree does not fit ext2's limits (too many inodes, too big a file...).
    #[error("{0}")]
    TooBig(String),
    /// The file system filled up while being written (a source file grew).
    #[error("the file system ran out of space while being written; pass a larger --size")]
    NoSpace,
}

/// Bytes of image per inode when the size leaves room (as mke2fs's default ratio).
const BYTES_PER_INODE: u64 = 16384;
/// Free space `--size auto` leaves at least, on top of 25 % of the tree.
const MIN_HEADROOM: u64 = 2 << 20;
/// Output buffer for runs of consecutive blocks.
const OUT_BUF: usize = 4 << 20;
/// Bytes of file content between progress log lines.
const LOG_EVERY: u64 = 1 << 30;
/// Read buffer for source files (a multiple of every block size).
const READ_BUF: usize = 1 << 20;

/// What the tree needs, worked out before anything is written.
struct Plan {
    /// Packed directory blocks per node (directories only).
    dirs: Vec<Option<Vec<u8>>>,
    /// True if lost+found is created here (the tree has none).
    lpf_ours: bool,
    /// Blocks the lost+found directory gets.
    lpf_blocks: u64,
    /// Data and indirect blocks needed, holes not counted as saved.
    data_blocks: u64,
    /// Highest inode number used (= inodes in use counting the reserved ones).
    inodes_used: u32,
}

/// The inode of tree node `id`.
fn ino_of(id: NodeId) -> u32 {
    if id == ROOT {
        ROOT_INO
    } else {
        FIRST_INO + id as u32
    }
}

fn file_type(node: &Node) -> u8 {
    match node.kind {
        NodeKind::File { .. } => FT_REG,
        NodeKind::Dir { .. } => FT_DIR,
        NodeKind::Symlink { .. } => FT_SYMLINK,
    }
}

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

fn plan(tree: &Tree, block_size: u32) -> Result<Plan, Ext2Error> {
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

/// Data blocks wanted: what the tree needs, plus headroom if asked.
fn wanted_blocks(plan: &Plan, block_size: u32, headroom: bool) -> u64 {
    let d = plan.data_blocks;
    if headroom {
        d + (d / 4).max(MIN_HEADROOM / u64::from(block_size))
    } else {
        d
    }
}

fn geometry_for(
    blocks: u64,
    opts: &Ext2Options,
    plan: &Plan,
    headroom: bool,
) -> Result<Geometry, GeometryError> {
    let blocks = u32::try_from(blocks).map_err(|_| GeometryError::ManyGroups)?;
    let used = u64::from(plan.inodes_used);
    let want = if headroom { used + used / 4 + 16 } else { used };
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

fn fits(geo: &Geometry, plan: &Plan, data: u64) -> bool {
    geo.data_capacity() >= data && geo.inodes() >= plan.inodes_used
}

fn too_big_fs(opts: &Ext2Options) -> Ext2Error {
    Ext2Error::TooBig(format!(
        "the tree needs more than ext2 can address with {}-byte blocks (try --block-size 4096)",
        opts.block_size
    ))
}

/// The fewest blocks that hold the tree (with headroom if asked).
fn min_blocks(opts: &Ext2Options, plan: &Plan, headroom: bool) -> Result<u64, Ext2Error> {
    let target = wanted_blocks(plan, opts.block_size, headroom);
    let fits_in =
        |n: u64| geometry_for(n, opts, plan, headroom).is_ok_and(|g| fits(&g, plan, target));
    // Steps up in strides until the tree fits, then narrows down to the fewest blocks
    // between the last size that did not fit and the first that did.
    let mut below = target;
    let mut n = target + 16;
    for _ in 0..100_000 {
        if n > u64::from(u32::MAX) {
            return Err(too_big_fs(opts));
        }
        match geometry_for(n, opts, plan, headroom) {
            // `--size auto` keeps the stride's answer (the image sizes it picks stay as
            // they were); the smallest size, for the too-small message, is exact.
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
                n += target.saturating_sub(g.data_capacity()).max(1) + 64;
            }
            Err(GeometryError::FewBlocks) => {
                below = n;
                n += 64;
            }
            Err(GeometryError::ManyInodes) => {
                below = n;
                n += u64::from(8 * opts.block_size);
            }
            Err(GeometryError::ManyGroups) => return Err(too_big_fs(opts)),
        }
    }
    Err(too_big_fs(opts))
}

/// Picks the geometry and the image file's size.
fn choose(opts: &Ext2Options, plan: &Plan) -> Result<(Geometry, u64), Ext2Error> {
    let bs = u64::from(opts.block_size);
    match opts.size {
        None => {
            let n = min_blocks(opts, plan, true)?;
            let target = wanted_blocks(plan, opts.block_size, true);
            let size = (n * bs).next_multiple_of(1 << 20);
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
            let size = size.next_multiple_of(crate::size::SECTOR);
            let n = size / bs;
            if n > u64::from(u32::MAX) {
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

fn check_options(opts: &Ext2Options) -> Result<(), Ext2Error> {
    if ![1024, 2048, 4096].contains(&opts.block_size) {
        return Err(Ext2Error::BadOption(format!(
            "block size {} is not supported (use 1024, 2048 or 4096)",
            opts.block_size
        )));
    }
    if ![128, 256].contains(&opts.inode_size) {
        return Err(Ext2Error::BadOption(format!(
            "inode size {} is not supported (use 128 or 256)",
            opts.inode_size
        )));
    }
    if opts.label.len() > 16 {
        return Err(Ext2Error::BadOption(format!(
            "label {:?} is {} bytes long; ext2 labels hold at most 16",
            opts.label,
            opts.label.len()
        )));
    }
    Ok(())
}

/// Removes the temporary image unless the build completed.
struct TempImage {
    path: PathBuf,
    done: bool,
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Ext2Error + 'a {
    move |source| Ext2Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn is_zero(block: &[u8]) -> bool {
    let chunks = block.chunks_exact(16);
    let rest = chunks.remainder();
    chunks
        .map(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])))
        .all(|c| c == 0)
        && rest.iter().all(|&b| b == 0)
}

/// Feeds integers to the UUID hash.
fn feed(h: &mut Sha256, v: i64) {
    h.update(v.to_le_bytes());
}

/// Everything the writing pass shares.
struct Writer<'a> {
    bs: u32,
    out: Out,
    alloc: Alloc<'a>,
    hash: Sha256,
    buf: Vec<u8>,
    done: u64,
    total: u64,
    next_log: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl Writer<'_> {
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
        let f = File::open(source).map_err(io(source, "open"))?;
        let len = f.metadata().map_err(io(source, "stat"))?.len();
        if len != size {
            return Err(changed(len));
        }
        let bs = u64::from(self.bs);
        let nblocks = size.div_ceil(bs);
        let per_read = READ_BUF as u64 / bs;
        let mut map = BlockMap::new(self.bs);
        let mut buf = std::mem::take(&mut self.buf);
        let mut l = 0u64;
        while l < nblocks {
            // Skip what the source says is a hole.
            let data = seek(&f, l * bs, Whence::SeekData).unwrap_or(size);
            let first_data = (data / bs).clamp(l, nblocks);
            self.done += (first_data * bs).min(size) - (l * bs).min(size);
            while l < first_data {
                map.hole(l, &mut self.alloc, &mut self.out)?;
                l += 1;
            }
            if l >= nblocks {
                break;
            }
            let hole = seek(&f, l * bs, Whence::SeekHole).unwrap_or(size);
            let end = hole.div_ceil(bs).clamp(l + 1, nblocks);
            while l < end {
                let n = per_read.min(end - l);
                let off = l * bs;
                let want = (n * bs).min(size - off) as usize;
                let mut got = 0;
                while got < want {
                    match f.read_at(&mut buf[got..want], off + got as u64) {
                        Ok(0) => return Err(changed(off + got as u64)),
                        Ok(k) => got += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(io(source, "read")(e)),
                    }
                }
                let padded = (n * bs) as usize;
                buf[want..padded].fill(0);
                for block in buf[..padded].chunks(bs as usize) {
                    if is_zero(block) {
                        map.hole(l, &mut self.alloc, &mut self.out)?;
                    } else {
                        self.hash.update(l.to_le_bytes());
                        self.hash.update(block);
                        let phys = map.map(l, &mut self.alloc, &mut self.out)?;
                        self.out.put(phys, block)?;
                    }
                    l += 1;
                }
                self.done += want as u64;
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
        self.buf = buf;
        let len = f.metadata().map_err(io(source, "stat"))?.len();
        if len != size {
            return Err(changed(len));
        }
        map.finish(&mut self.out)
    }
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`; `None` past the last data or where the file
/// system cannot tell (then everything counts as data).
fn seek(f: &File, pos: u64, whence: Whence) -> Option<u64> {
    let off = i64::try_from(pos).ok()?;
    match lseek(f.as_raw_fd(), off, whence) {
        Ok(o) => u64::try_from(o).ok(),
        Err(Errno::ENXIO) => None,
        // No hole support: everything from `pos` on is data.
        Err(_) if matches!(whence, Whence::SeekData) => Some(pos),
        Err(_) => None,
    }
}

/// Writes an ext2 file system holding `tree` to `out`.
///
/// The image is written to a temporary file next to `out` and renamed over it once
/// complete. The same tree and options give the same bytes.
pub fn build(tree: &Tree, out: &Path, opts: &Ext2Options) -> Result<Ext2Summary, Ext2Error> {
    build_with_progress(tree, out, opts, &mut |_, _| {})
}

/// [`build`], calling `progress(bytes_copied, bytes_total)` as file content is copied.
pub fn build_with_progress(
    tree: &Tree,
    out: &Path,
    opts: &Ext2Options,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Ext2Summary, Ext2Error> {
    check_options(opts)?;
    let plan = plan(tree, opts.block_size)?;
    let (geo, size) = choose(opts, &plan)?;
    info!(
        size,
        block_size = geo.block_size,
        blocks = geo.blocks,
        groups = geo.groups,
        inodes = geo.inodes(),
        "writing ext2 image"
    );
    if let Ok(m) = fs::symlink_metadata(out) {
        if !m.is_file() {
            return Err(Ext2Error::BadOption(format!(
                "{} exists and is not a regular file; give the path of an image file",
                out.display()
            )));
        }
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = out
        .file_name()
        .ok_or_else(|| Ext2Error::BadOption(format!("{} is not a file name", out.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.partial", std::process::id()));
    let tmp_path = dir.join(tmp_name);
    let _ = fs::remove_file(&tmp_path);
    let listed = Unfinished::register(&tmp_path);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp_path)
        .map_err(io(out, "create"))?;
    let mut tmp = TempImage {
        path: tmp_path.clone(),
        done: false,
    };

    let bs = opts.block_size;
    let isz = usize::from(opts.inode_size);
    let mut hash = Sha256::new();
    hash.update(b"vloop ext2 v1");
    for v in [
        i64::from(bs),
        i64::from(opts.inode_size),
        i64::from(geo.blocks),
        size as i64,
        tree.timestamp,
        tree.nodes.len() as i64,
    ] {
        feed(&mut hash, v);
    }
    hash.update(opts.label.as_bytes());
    let mut w = Writer {
        bs,
        out: Out::new(file, out.to_path_buf(), bs, OUT_BUF),
        alloc: Alloc::new(&geo),
        hash,
        buf: vec![0u8; READ_BUF],
        done: 0,
        total: tree.file_bytes(),
        next_log: LOG_EVERY,
        progress,
    };
    let mut inodes = vec![0u8; plan.inodes_used as usize * isz];
    let mut dirs_per_group = vec![0u32; geo.groups as usize];
    let ipg = geo.inodes_per_group;
    for (id, node) in tree.nodes.iter().enumerate() {
        let ino = ino_of(id);
        let h = &mut w.hash;
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
                let (i_block, blocks) = w.write_blocks(content)?;
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
                let (i_block, blocks) = w.copy_file(source, *size)?;
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
                if target.len() < 60 {
                    info.i_block[..target.len()].copy_from_slice(target);
                } else {
                    let mut block = target.clone();
                    block.resize(bs as usize, 0);
                    let (i_block, blocks) = w.write_blocks(&block)?;
                    info.i_block = i_block;
                    info.blocks = blocks;
                }
            }
        }
        let o = (ino as usize - 1) * isz;
        encode_inode(&info, bs, &mut inodes[o..o + isz]);
        if id == ROOT && plan.lpf_ours {
            let mut content =
                dir_blocks(&[(FIRST_INO, FT_DIR, b"."), (ROOT_INO, FT_DIR, b"..")], bs);
            for _ in 1..plan.lpf_blocks {
                content.extend_from_slice(&empty_dir_block(bs));
            }
            let (i_block, blocks) = w.write_blocks(&content)?;
            let lpf = InodeInfo {
                mode: S_IFDIR | 0o700,
                uid: 0,
                gid: 0,
                size: content.len() as u64,
                time: tree.timestamp,
                links: 2,
                blocks,
                i_block,
            };
            let o = (FIRST_INO as usize - 1) * isz;
            encode_inode(&lpf, bs, &mut inodes[o..o + isz]);
            dirs_per_group[((FIRST_INO - 1) / ipg) as usize] += 1;
        }
    }
    let Writer {
        out: mut img,
        alloc,
        hash,
        ..
    } = w;
    img.flush()?;

    // Inode tables: only the part holding used inodes is written; the rest stays a hole.
    for g in 0..geo.groups {
        let first = (g * ipg) as usize * isz;
        if first >= inodes.len() {
            break;
        }
        let last = (((g + 1) * ipg) as usize * isz).min(inodes.len());
        img.write_at(
            u64::from(geo.inode_table(g)) * u64::from(bs),
            &inodes[first..last],
        )?;
    }

    // Bitmaps and counters.
    let next = alloc.next_block();
    let mut counts = Vec::with_capacity(geo.groups as usize);
    let bsz = bs as usize;
    for g in 0..geo.groups {
        let mut bitmap = vec![0u8; bsz];
        let data_start = geo.data_start(g);
        let end = geo.group_end(g);
        let used_end = next.clamp(data_start, end);
        let used = used_end - geo.group_start(g);
        set_bits(&mut bitmap, 0, used as usize);
        set_bits(&mut bitmap, geo.group_blocks(g) as usize, 8 * bsz);
        let free_blocks = end - used_end;
        img.write_at(u64::from(geo.block_bitmap(g)) * u64::from(bs), &bitmap)?;

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
        img.write_at(u64::from(geo.inode_bitmap(g)) * u64::from(bs), &bitmap)?;
        counts.push(GroupCounts {
            free_blocks,
            free_inodes,
            dirs: dirs_per_group[g as usize],
        });
    }
    let free_blocks: u64 = counts.iter().map(|c| u64::from(c.free_blocks)).sum();
    let free_inodes: u32 = counts.iter().map(|c| c.free_inodes).sum();

    let uuid = opts.uuid.unwrap_or_else(|| {
        let d = hash.finalize();
        let mut u = [0u8; 16];
        u.copy_from_slice(&d[..16]);
        u[6] = (u[6] & 0x0f) | 0x40;
        u[8] = (u[8] & 0x3f) | 0x80;
        u
    });
    let mut seed = Sha256::new();
    seed.update(b"vloop ext2 hash seed");
    seed.update(uuid);
    let mut hash_seed = [0u8; 16];
    hash_seed.copy_from_slice(&seed.finalize()[..16]);
    let info = SuperInfo {
        free_blocks: free_blocks as u32,
        free_inodes,
        timestamp: tree.timestamp,
        uuid,
        hash_seed,
        label: opts.label.as_bytes().to_vec(),
        ro_compat: RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE,
    };
    let gdt = group_descriptors(&geo, &counts);
    for g in (0..geo.groups).filter(|&g| has_super(g)) {
        let sb = superblock(&geo, &info, g);
        let start = u64::from(geo.group_start(g)) * u64::from(bs);
        let sb_off = if g == 0 { 1024 } else { start };
        img.write_at(sb_off, &sb)?;
        img.write_at(start + u64::from(bs), &gdt)?;
    }
    let file = img.finish(size)?;
    drop(file);
    listed.commit(|| fs::rename(&tmp_path, out).map_err(io(out, "rename")))?;
    tmp.done = true;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    let summary = Ext2Summary {
        size,
        block_size: bs,
        blocks: u64::from(geo.blocks),
        free_blocks,
        inodes: geo.inodes(),
        free_inodes,
        uuid,
    };
    info!(?summary, "ext2 image written");
    Ok(summary)
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

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 4096];
        assert!(is_zero(&b));
        b[4095] = 1;
        assert!(!is_zero(&b));
        b[4095] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
        assert!(!is_zero(&[0, 0, 3]));
    }
}
