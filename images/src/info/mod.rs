//! `vloop-image info`: what an image file (or block device) is and what it holds.
//!
//! First the format: the first sector is probed ([`crate::image::probe_file`]; inspecting
//! trusts the content, and says so when a qcow2 image is not named `*.qcow2` or a `*.qcow2`
//! file is not qcow2). A qcow2 image is described from its header and its backing chain,
//! opened read-only ([`crate::image::open`]): version, cluster size, compression type,
//! allocated clusters, the backing file as stored and every layer of the chain. When the
//! chain cannot be opened (a missing backing file), the image alone is described and a note
//! says why.
//!
//! Then the content of the virtual disk (for qcow2: what the guest sees, read through the
//! chain), recognised in this order:
//! - ext2/3/4: the superblock at byte 1024 (magic `0xEF53` at offset 56). ext3 is ext2 with
//!   a journal (`has_journal`); ext4 has any of `extents`, `64bit`, `flex_bg`.
//! - ISO 9660: `CD001` in the volume descriptor at byte 32768, described by
//!   [`crate::iso::probe`] (reading the image zero-filled past its end, so that a truncated
//!   image is still described).
//! - A GUID partition table (protective MBR entry `0xEE`, `EFI PART` at LBA 1) or an MBR
//!   partition table (`0x55AA` at byte 510, sane entries).
//! - All zero: every byte is zero (holes, and unallocated qcow2 clusters, are skipped
//!   without reading, so a sparse image is checked in no time).
//! - Anything else is unknown.
//!
//! # Parts, bottom up
//! Each part uses only those listed before it.
//! - `error`: the error type;
//! - `decode`: the structures recognised, decoded from bytes (pure);
//! - `content`: what the virtual disk holds, read and recognised;
//! - `qcow2`: a qcow2 image's header, allocation and chain;
//! - `examine`: the whole examination, [`info()`];
//! - `text`: the human form, [`describe`].

mod content;
mod decode;
mod error;
mod examine;
mod qcow2;
mod text;

pub use vloop_qcow2::table::ClusterCounts;

pub use self::content::Content;
pub use self::decode::{
    gpt_table, parse_ext, parse_gpt, parse_mbr, ExtInfo, GptInfo, GptPartition, MbrInfo,
    MbrPartition,
};
pub use self::error::InfoError;

pub use self::examine::{error_line, info, Info};
pub use self::qcow2::{LayerInfo, Qcow2Info};
pub use self::text::describe;
