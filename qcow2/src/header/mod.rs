//! The qcow2 header and its extensions: pure parsing, validation and encoding (no I/O).
//!
//! [`Header::parse`] turns the first cluster of an image into a [`Header`] and checks every field
//! a malicious image could use against the reader (sizes, offsets, alignment, lengths inside the
//! cluster); [`Header::check_open`] then decides whether the image may be opened read-only or
//! read-write given its feature bits. The on-disk layout is QEMU's `docs/interop/qcow2.txt`.
//! `crate::layer` builds on this; [`crate::create`](mod@crate::create) uses [`encode`] to write new images.
//!
//! # Parts, bottom up
//! Each part uses only those listed before it.
//! - `layout`: limits, field offsets, feature bits, extension types;
//! - `error`: the error type;
//! - `parse`: [`Header::parse`] and the checks on every field;
//! - `open`: [`Header::check_open`], the feature bits against the open mode;
//! - `encode`: [`encode`], the header of a new image.

mod encode;
mod error;
mod layout;
mod open;
mod parse;

pub use self::encode::{encode, NewHeader};
pub use self::error::HeaderError;
pub use self::layout::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_OFFSET, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_BITMAPS,
    EXT_CRYPTO, EXT_DATA_FILE, EXT_END, EXT_FEATURE_NAMES, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2, L1_SIZE_FIELD, MAX_BACKING_NAME,
    MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MIN_CLUSTER_BITS, REFTABLE_OFFSET_FIELD,
    V2_HEADER_LEN, V3_HEADER_LEN,
};
pub use self::parse::{Compression, FeatureName, Header};
