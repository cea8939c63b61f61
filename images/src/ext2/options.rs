//! What a caller of the ext2 builder gives and gets back: [`Ext2Options`], [`Ext2Summary`]
//! and [`Ext2Error`], which every step of the build reports in.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::input::ReadFailure;
use crate::output::OutputError;

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

/// What [`super::build()`] wrote.
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
        source: io::Error,
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
    /// Preparing or committing the image file failed.
    #[error(transparent)]
    Output(#[from] OutputError),
}

impl Ext2Error {
    /// The error for `op` on `path` failing with an I/O error.
    pub(super) fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Ext2Error::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// Reading a source file: a read error, or a file that ends before the size the tree
/// recorded (it changed while the image was written).
impl ReadFailure for Ext2Error {
    fn read(path: &Path, _offset: u64, source: io::Error) -> Self {
        Ext2Error::io(path, "read")(source)
    }

    fn short(path: &Path, offset: u64, size: u64) -> Self {
        Ext2Error::FileChanged {
            path: path.to_path_buf(),
            expected: size,
            found: offset,
        }
    }
}

/// A file system UUID as users type it: 32 hex digits, dashes anywhere
/// (`0b2c6c3e-4bd1-4d8e-9f43-5a2f8f8a3c1e`).
pub fn parse_uuid(text: &str) -> Result<[u8; 16], Ext2Error> {
    let hexdigits: String = text.chars().filter(|&c| c != '-').collect();
    let mut out = [0u8; 16];
    hex::decode_to_slice(&hexdigits, &mut out).map_err(|_| {
        Ext2Error::BadOption(format!(
            "{text:?} is not a UUID: give 32 hex digits, e.g. 0b2c6c3e-4bd1-4d8e-9f43-5a2f8f8a3c1e"
        ))
    })?;
    Ok(out)
}

/// Refuses options ext2 cannot use.
pub(super) fn check_options(opts: &Ext2Options) -> Result<(), Ext2Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_parse_with_or_without_dashes() {
        let want = [
            0x0b, 0x2c, 0x6c, 0x3e, 0x4b, 0xd1, 0x4d, 0x8e, 0x9f, 0x43, 0x5a, 0x2f, 0x8f, 0x8a,
            0x3c, 0x1e,
        ];
        assert_eq!(
            parse_uuid("0b2c6c3e-4bd1-4d8e-9f43-5a2f8f8a3c1e").unwrap(),
            want
        );
        assert_eq!(
            parse_uuid("0b2c6c3e4bd14d8e9f435a2f8f8a3c1e").unwrap(),
            want
        );
        for bad in ["", "0b2c6c3e", "zz2c6c3e-4bd1-4d8e-9f43-5a2f8f8a3c1e"] {
            let err = parse_uuid(bad).unwrap_err();
            assert!(err.to_string().contains("is not a UUID"), "{err}");
        }
    }
}
