//! The error type of header parsing, checking and encoding.

use thiserror::Error;

/// Errors in a qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    /// The image is shorter than its header.
    #[error("the image is too short for a qcow2 header ({0} bytes): the file is truncated")]
    Truncated(usize),
    /// The magic is not "QFI\xfb".
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    /// The version is neither 2 nor 3.
    #[error("qcow2 version {0} is not supported (only 2 and 3); convert the image with `qemu-img convert -O qcow2`")]
    Version(u32),
    /// cluster_bits out of range.
    #[error("cluster_bits {0} is out of range (9..=21: 512 B to 2 MiB clusters); the image is corrupt or made by a tool QEMU cannot read either")]
    ClusterBits(u32),
    /// A version 3 header length that is too short, unaligned, or longer than a cluster.
    #[error("header length {0} is invalid (at least 104, a multiple of 8, at most one cluster); the image is corrupt")]
    HeaderLength(u32),
    /// refcount_order above 6.
    #[error("refcount_order {0} is invalid (at most 6, 64-bit refcounts); the image is corrupt")]
    RefcountOrder(u32),
    /// A virtual size beyond what the L1 table can map or beyond 2^63.
    #[error("virtual size {size} needs {needed} L1 entries but the header has {l1_size} (or exceeds the 32 MiB L1 cap); the image is corrupt")]
    L1Size {
        /// Virtual size in bytes.
        size: u64,
        /// L1 entries the size needs.
        needed: u64,
        /// L1 entries in the header.
        l1_size: u32,
    },
    /// A table offset that is unaligned, inside the header cluster or overflowing.
    #[error("the {what} offset {offset:#x} is invalid (must be cluster aligned, past the header cluster, and its table must fit in 2^63); the image is corrupt")]
    TableOffset {
        /// Which table.
        what: &'static str,
        /// The offset.
        offset: u64,
    },
    /// A refcount table with zero clusters or beyond QEMU's 8 MiB cap.
    #[error("refcount table of {0} clusters is invalid (at least 1, at most 8 MiB); the image is corrupt")]
    RefcountTableSize(u32),
    /// The backing file name does not fit in the first cluster or is too long.
    #[error("the backing file name (offset {offset}, {len} bytes) does not fit in the header cluster or exceeds 1023 bytes; the image is corrupt")]
    BackingName {
        /// Offset of the name.
        offset: u64,
        /// Its length.
        len: u32,
    },
    /// A header extension runs past its area.
    #[error("header extension {kind:#010x} at byte {at} runs past the header area; the image is corrupt")]
    Extension {
        /// Extension type.
        kind: u32,
        /// Byte offset of the extension.
        at: usize,
    },
    /// A malformed extension body.
    #[error("header extension {kind:#010x} is malformed: {why}; the image is corrupt")]
    ExtensionBody {
        /// Extension type.
        kind: u32,
        /// What is wrong.
        why: &'static str,
    },
    /// The compression type byte is inconsistent with the feature bit or unknown.
    #[error("compression type {0} is not supported (0 deflate, 1 zstd) or does not match the compression feature bit; the image is corrupt or newer than this reader")]
    CompressionType(u8),
    /// The image is encrypted.
    #[error("the image is encrypted (crypt_method {0}); encrypted qcow2 images are not supported: decrypt it with `qemu-img convert --object secret,... --image-opts ... -O qcow2`")]
    Encrypted(u32),
    /// The image uses an external data file.
    #[error("the image keeps its data in an external data file, which is not supported: merge it with `qemu-img convert -O qcow2`")]
    ExternalDataFile,
    /// The image uses extended L2 entries.
    #[error("the image uses extended L2 entries (subclusters), which are not supported: convert it with `qemu-img convert -O qcow2 -o extended_l2=off`")]
    ExtendedL2,
    /// The image is marked corrupt.
    #[error("the image is marked corrupt; repair it with `qemu-img check -r all` first")]
    Corrupt,
    /// The image is dirty (lazy refcounts not written back) and was to be opened read-write.
    #[error("the image is dirty (its refcounts were not written back after a crash with lazy refcounts); repair it with `qemu-img check -r all`, or open it read-only")]
    Dirty,
    /// An incompatible feature bit this reader does not know.
    #[error("unknown incompatible feature bit {bit}{}; this image needs a newer reader", name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default())]
    UnknownIncompatible {
        /// The bit number.
        bit: u32,
        /// Its name from the feature name table, if the image has one.
        name: Option<String>,
    },
    /// Persistent bitmaps that writing would have to keep up to date.
    #[error("the image has persistent dirty bitmaps, which writing would invalidate; open it read-only, or remove them with `qemu-img bitmap --remove`")]
    Bitmaps,
    /// Internal snapshots on an image to be written.
    #[error("the image has {0} internal snapshots, which are not supported for writing; open it read-only, or delete them with `qemu-img snapshot -d`")]
    Snapshots(u32),
}
