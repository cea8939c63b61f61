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
//!
//! The pieces, bottom up: `layout` encodes the on-disk structures (pure); `options`
//! holds what a caller gives and gets back; `plan` works out what the tree needs and the
//! geometry and size that hold it (pure); `blocks` allocates blocks, builds block maps
//! and buffers the output; `build` is the writing pass. This module runs them in order and
//! writes through [`crate::output`], like every output.

mod blocks;
mod build;
mod layout;
mod options;
mod plan;

use std::path::Path;

use tracing::info;

use self::build::{write_image, Image};
use self::options::check_options;
pub use self::options::{parse_uuid, Ext2Error, Ext2Options, Ext2Summary};
use crate::output::{Output, OutputFile};
use crate::tree::Tree;

/// Writes an ext2 file system holding `tree` to `out`, replacing a regular file there.
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
    write(tree, &Output::replace(out), opts, progress)
}

/// [`build_with_progress`] to `out`, which says whether an existing file may be replaced
/// and where the temporary file is listed.
pub fn write(
    tree: &Tree,
    out: &Output<'_>,
    opts: &Ext2Options,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Ext2Summary, Ext2Error> {
    check_options(opts)?;
    let plan = plan::plan(tree, opts.block_size)?;
    let (geo, size) = plan::choose(opts, &plan)?;
    info!(
        size,
        block_size = geo.block_size,
        blocks = geo.blocks,
        groups = geo.groups,
        inodes = geo.inodes(),
        "writing ext2 image"
    );
    let file = OutputFile::create(out)?;
    let image = Image {
        opts,
        plan: &plan,
        geo: &geo,
        size,
    };
    let summary = write_image(tree, &image, file.file(), out.path, progress)?;
    file.commit()?;
    info!(?summary, "ext2 image written");
    Ok(summary)
}
