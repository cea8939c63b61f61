//! Images as the virtual disks guests see: a raw file or block device, or a qcow2 image read
//! through its backing chain ([`vloop_qcow2::Chain`]), opened read-only.
//!
//! The layer between [`crate::input`] (files and devices as bytes) and the commands that read
//! a disk through its format: `convert`, `info` and `create --backing`. [`open`] returns a
//! [`Disk`], which is an input [`Source`](crate::input::Source), so [`crate::input::walk_data`] walks a qcow2
//! image's virtual disk as it walks a file: the unallocated and zero clusters are holes and
//! are never read, and so are the holes of the files under allocated clusters (a sparse raw
//! base, found with `SEEK_DATA`).
//!
//! # Probing
//! A file whose format is not named is probed ([`vloop_qcow2::probe`]). Probing is what the
//! CVE-2008-2004 class of attacks abuses: a guest that owns a raw image writes a qcow2 header
//! into it, naming any host file as its backing file, and whoever later reads the image as
//! qcow2 reads that host file. So the commands that read data out of an image
//! ([`Probing::Guarded`]) trust a qcow2 header found by probing only in a file whose name ends
//! in `.qcow2`; any other file that looks like qcow2 is refused with an error that asks for
//! the format to be named. The same rule holds for the backing files of a chain that names no
//! backing format. Inspecting ([`Probing::Content`]) trusts the content and says what it saw.
//!
//! # Parts, bottom up
//! Each part uses only those listed before it.
//! - `error`: the error types;
//! - `probe`: the format of a file, and when a probed qcow2 header is trusted;
//! - `disk`: [`Disk`], opened raw or as a qcow2 chain;
//! - `source`: a [`Disk`] read as an input source, holes found through the mapping;
//! - `testing` (tests only): images made through `vloop_qcow2` for the tests of these parts.

mod disk;
mod error;
mod probe;
mod source;
#[cfg(test)]
mod testing;

pub use vloop_qcow2::Format;

pub use self::disk::{open, open_without_backing, Disk, Layer};
pub use self::error::{ImageError, UnnamedBacking};
pub use self::probe::{
    has_qcow2_name, probe_file, serialize_format, Probed, Probing, QCOW2_EXTENSION,
};
