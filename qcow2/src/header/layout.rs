//! The on-disk layout of the header (QEMU's `docs/interop/qcow2.txt`): limits, field
//! offsets, feature bits and header extension types.

/// Smallest cluster_bits QEMU allows (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits QEMU can open (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's cap on the L1 table: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's cap on the refcount table: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name the format allows.
pub const MAX_BACKING_NAME: usize = 1023;
/// Version 2 header length.
pub const V2_HEADER_LEN: usize = 72;
/// Smallest version 3 header length.
pub const V3_HEADER_LEN: usize = 104;
/// Offset of the autoclear features field (version 3).
pub const AUTOCLEAR_OFFSET: u64 = 88;
/// Offset of the refcount table offset field; the 4-byte cluster count follows at 56.
pub const REFTABLE_OFFSET_FIELD: u64 = 48;
/// Offset of the L1 table size field; the L1 table offset follows at 40.
pub const L1_SIZE_FIELD: u64 = 36;

/// Incompatible feature bit 0: refcounts may be inconsistent.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image may be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: a compression type other than deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Header extension types.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
