//! The error type of `info`, and how the read walk reports its failures in it.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::image::ImageError;
use crate::input::{InputError, ReadFailure};

/// Errors from examining an image.
#[derive(Debug, Error)]
pub enum InfoError {
    /// The file cannot be opened, or is not a file or block device.
    #[error(transparent)]
    Open(#[from] InputError),
    /// The image cannot be opened as a disk (an invalid qcow2 image).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Reading the image failed.
    #[error("read error in {path} at byte {offset}")]
    Read {
        /// The image.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A block device ended before its announced size.
    #[error("{path} ended at byte {offset}, before its size of {size} bytes")]
    Short {
        /// The image.
        path: PathBuf,
        /// Where it ended.
        offset: u64,
        /// The size it announced.
        size: u64,
    },
}

impl ReadFailure for InfoError {
    fn read(path: &Path, offset: u64, source: io::Error) -> Self {
        InfoError::Read {
            path: path.to_path_buf(),
            offset,
            source,
        }
    }

    fn short(path: &Path, offset: u64, size: u64) -> Self {
        InfoError::Short {
            path: path.to_path_buf(),
            offset,
            size,
        }
    }
}
