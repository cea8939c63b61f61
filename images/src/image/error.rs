//! The error types of opening an image as a virtual disk.

use std::io;
use std::path::PathBuf;

use thiserror::Error;
use vloop_qcow2::ProbeError;

use crate::input::InputError;

/// Errors from opening an image as a virtual disk.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The file cannot be opened, or is not a file or block device.
    #[error(transparent)]
    Input(#[from] InputError),
    /// Reading the first sector to probe the format failed.
    #[error("cannot read {} to find its format", path.display())]
    ProbeRead {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Probing found a format that is neither raw nor qcow2.
    #[error("{}", path.display())]
    Foreign {
        /// The image.
        path: PathBuf,
        /// What it looks like.
        #[source]
        source: ProbeError,
    },
    /// Probing found a qcow2 header in a file whose name does not say qcow2.
    #[error(
        "{} looks like a qcow2 image but its name does not end in .qcow2; name its format \
         ({option} qcow2 to read it as qcow2, {option} raw to read its bytes as they are)",
        path.display()
    )]
    UnnamedQcow2 {
        /// The image.
        path: PathBuf,
        /// The command-line option that names the format.
        option: &'static str,
    },
    /// A qcow2 image on a block device.
    #[error("{}: qcow2 images on block devices are not supported (read it as raw, or copy it to a file first)", path.display())]
    Qcow2Device {
        /// The device.
        path: PathBuf,
    },
    /// The qcow2 image or a file of its backing chain is invalid or cannot be opened.
    #[error(transparent)]
    Chain(#[from] vloop_qcow2::Error),
}

/// Why a backing file that names no format and looks like qcow2 is refused (under
/// [`Probing::Guarded`](super::probe::Probing::Guarded)).
#[derive(Debug, Error)]
#[error(
    "it looks like a qcow2 image, but neither its name (not *.qcow2) nor the image naming it \
     (no backing format) says so; if it is one, record the format with \
     `qemu-img rebase -u -F qcow2 -b NAME IMAGE`"
)]
pub struct UnnamedBacking;
