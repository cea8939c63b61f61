//! An ext2 file system written from a [`Tree`], without root, loop devices or e2fsprogs.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::tree::Tree;

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
         (pass --size auto or a size of at least {needed})"
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
}

/// Writes an ext2 file system holding `tree` to `out`.
pub fn build(tree: &Tree, out: &Path, opts: &Ext2Options) -> Result<Ext2Summary, Ext2Error> {
    let _ = (tree, out, opts);
    Err(Ext2Error::BadOption(
        "ext2 builder not implemented yet".into(),
    ))
}
