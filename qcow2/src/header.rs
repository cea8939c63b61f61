//! The qcow2 header and its extensions: pure parsing, validation and encoding (no I/O).
//!
//! [`Header::parse`] turns the first cluster of an image into a [`Header`] and checks every field
//! a malicious image could use against the reader (sizes, offsets, alignment, lengths inside the
//! cluster); [`Header::check_open`] then decides whether the image may be opened read-only or
//! read-write given its feature bits. The on-disk layout is QEMU's `docs/interop/qcow2.txt`.
//! [`crate::layer`] builds on this; [`crate::create`] uses [`encode`] to write new images.

use thiserror::Error;

use crate::format::QCOW_MAGIC;

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

/// The compression algorithm of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (QEMU's "zlib"), window 4 KiB.
    Deflate,
    /// Zstandard frames.
    Zstd,
}

/// A feature name table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name.
    pub name: String,
}

/// A parsed and validated qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// The backing file name as stored (bytes; not NUL terminated).
    pub backing_file: Option<Vec<u8>>,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes (72 for version 2).
    pub header_length: u32,
    /// Compression of compressed clusters.
    pub compression: Compression,
    /// Backing format header extension.
    pub backing_format: Option<String>,
    /// Feature name table.
    pub feature_names: Vec<FeatureName>,
    /// A bitmaps extension is present.
    pub has_bitmaps: bool,
    /// A full-disk-encryption extension is present.
    pub has_crypto: bool,
    /// An external data file name extension is present.
    pub has_data_file: bool,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Whether `offset` is a valid table offset: cluster aligned, past the header cluster, and
/// `offset + bytes` does not overflow 2^63.
fn table_offset_ok(offset: u64, bytes: u64, cluster_size: u64) -> bool {
    offset.is_multiple_of(cluster_size)
        && offset >= cluster_size
        && offset
            .checked_add(bytes)
            .is_some_and(|end| end <= i64::MAX as u64)
}

impl Header {
    /// The cluster size an image declares, from its first 24 bytes, so the caller knows how
    /// much to read for [`Header::parse`].
    pub fn peek_cluster_bits(first: &[u8]) -> Result<u32, HeaderError> {
        if first.len() < 24 {
            return Err(HeaderError::Truncated(first.len()));
        }
        if first[..4] != QCOW_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(HeaderError::ClusterBits(bits));
        }
        Ok(bits)
    }

    /// Parses and validates the header in `buf`: the first cluster of the image, or the whole
    /// image when it is shorter than a cluster.
    pub fn parse(buf: &[u8]) -> Result<Header, HeaderError> {
        if buf.len() < V2_HEADER_LEN {
            return Err(HeaderError::Truncated(buf.len()));
        }
        if buf[..4] != QCOW_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Version(version));
        }
        let cluster_bits = Self::peek_cluster_bits(buf)?;
        let cluster_size = 1u64 << cluster_bits;
        // Everything this parser reads lies in the first cluster.
        let area = &buf[..buf.len().min(cluster_size as usize)];
        let mut h = Header {
            version,
            backing_file: None,
            cluster_bits,
            size: be64(area, 24),
            crypt_method: be32(area, 32),
            l1_size: be32(area, 36),
            l1_table_offset: be64(area, 40),
            refcount_table_offset: be64(area, 48),
            refcount_table_clusters: be32(area, 56),
            nb_snapshots: be32(area, 60),
            snapshots_offset: be64(area, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression: Compression::Deflate,
            backing_format: None,
            feature_names: Vec::new(),
            has_bitmaps: false,
            has_crypto: false,
            has_data_file: false,
        };
        if version == 3 {
            if area.len() < V3_HEADER_LEN {
                return Err(HeaderError::Truncated(area.len()));
            }
            h.incompatible = be64(area, 72);
            h.compatible = be64(area, 80);
            h.autoclear = be64(area, 88);
            h.refcount_order = be32(area, 96);
            h.header_length = be32(area, 100);
            let len = h.header_length as usize;
            if len < V3_HEADER_LEN || !len.is_multiple_of(8) || len as u64 > cluster_size {
                return Err(HeaderError::HeaderLength(h.header_length));
            }
            if area.len() < len {
                return Err(HeaderError::Truncated(area.len()));
            }
            let ctype = if len > 104 { area[104] } else { 0 };
            let bit = h.incompatible & INCOMPAT_COMPRESSION != 0;
            h.compression = match (ctype, bit) {
                (0, false) => Compression::Deflate,
                (1, true) => Compression::Zstd,
                (t, _) => return Err(HeaderError::CompressionType(t)),
            };
            if h.refcount_order > 6 {
                return Err(HeaderError::RefcountOrder(h.refcount_order));
            }
        }
        h.validate_geometry()?;
        h.parse_backing_name(area)?;
        h.parse_extensions(area)?;
        Ok(h)
    }

    fn validate_geometry(&self) -> Result<(), HeaderError> {
        let cs = self.cluster_size();
        let l2_entries = cs / 8;
        let per_l1 = cs * l2_entries;
        let needed = self.size.div_ceil(per_l1);
        if self.size > i64::MAX as u64
            || needed > u64::from(self.l1_size)
            || u64::from(self.l1_size) * 8 > MAX_L1_BYTES
        {
            return Err(HeaderError::L1Size {
                size: self.size,
                needed,
                l1_size: self.l1_size,
            });
        }
        if self.l1_size > 0
            && !table_offset_ok(self.l1_table_offset, u64::from(self.l1_size) * 8, cs)
        {
            return Err(HeaderError::TableOffset {
                what: "L1 table",
                offset: self.l1_table_offset,
            });
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if self.refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES.max(cs) {
            return Err(HeaderError::RefcountTableSize(self.refcount_table_clusters));
        }
        if !table_offset_ok(self.refcount_table_offset, rt_bytes, cs) {
            return Err(HeaderError::TableOffset {
                what: "refcount table",
                offset: self.refcount_table_offset,
            });
        }
        if self.nb_snapshots > 0 && !table_offset_ok(self.snapshots_offset, 0, cs) {
            return Err(HeaderError::TableOffset {
                what: "snapshot table",
                offset: self.snapshots_offset,
            });
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, area: &[u8]) -> Result<(), HeaderError> {
        let offset = be64(area, 8);
        if offset == 0 {
            return Ok(());
        }
        let len = be32(area, 16);
        let bad = HeaderError::BackingName { offset, len };
        let start = usize::try_from(offset).map_err(|_| bad.clone())?;
        let end = start.checked_add(len as usize).ok_or(bad.clone())?;
        if len as usize > MAX_BACKING_NAME
            || len == 0
            || start < self.header_length as usize
            || end as u64 > self.cluster_size()
            || end > area.len()
        {
            return Err(bad);
        }
        self.backing_file = Some(area[start..end].to_vec());
        Ok(())
    }

    fn parse_extensions(&mut self, area: &[u8]) -> Result<(), HeaderError> {
        let mut at = self.header_length as usize;
        // Extensions end where the backing file name starts, or at the end of the cluster.
        let end = match be64(area, 8) {
            0 => area.len(),
            off => (off as usize).min(area.len()),
        };
        while at + 8 <= end {
            let kind = be32(area, at);
            let len = be32(area, at + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let body_start = at + 8;
            let body_end = body_start
                .checked_add(len)
                .filter(|&e| e <= end)
                .ok_or(HeaderError::Extension { kind, at })?;
            let body = &area[body_start..body_end];
            match kind {
                EXT_BACKING_FORMAT => {
                    let name =
                        std::str::from_utf8(body).map_err(|_| HeaderError::ExtensionBody {
                            kind,
                            why: "backing format is not UTF-8",
                        })?;
                    self.backing_format = Some(name.to_owned());
                }
                EXT_FEATURE_NAMES => {
                    for e in body.chunks_exact(48) {
                        let name = &e[2..];
                        let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&name[..n]).into_owned(),
                        });
                    }
                }
                EXT_BITMAPS => self.has_bitmaps = true,
                EXT_CRYPTO => self.has_crypto = true,
                EXT_DATA_FILE => self.has_data_file = true,
                _ => {}
            }
            // Bodies are padded to a multiple of 8.
            at = body_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The name of a feature bit from the image's feature name table.
    pub fn feature_name(&self, kind: u8, bit: u32) -> Option<String> {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && u32::from(f.bit) == bit)
            .map(|f| f.name.clone())
    }

    /// Whether the image may be opened (`writable`: read-write), given its feature bits and
    /// extensions. Unknown autoclear bits are not an obstacle: a read-write open clears them
    /// ([`Header::autoclear_after_open`]).
    pub fn check_open(&self, writable: bool) -> Result<(), HeaderError> {
        if self.crypt_method != 0 || self.has_crypto {
            return Err(HeaderError::Encrypted(self.crypt_method));
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        let unknown = self.incompatible & !known;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            return Err(HeaderError::UnknownIncompatible {
                bit,
                name: self.feature_name(0, bit),
            });
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(HeaderError::Corrupt);
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(HeaderError::ExternalDataFile);
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(HeaderError::ExtendedL2);
        }
        if writable {
            if self.incompatible & INCOMPAT_DIRTY != 0 {
                return Err(HeaderError::Dirty);
            }
            if self.autoclear & AUTOCLEAR_BITMAPS != 0 {
                return Err(HeaderError::Bitmaps);
            }
            if self.nb_snapshots > 0 {
                return Err(HeaderError::Snapshots(self.nb_snapshots));
            }
        }
        Ok(())
    }

    /// The autoclear bits a read-write open leaves set: none, since this writer keeps none of
    /// the structures they vouch for (QEMU clears the bits it does not support the same way).
    pub fn autoclear_after_open(&self) -> u64 {
        0
    }
}

/// What [`encode`] writes: the fields of a new image's header.
#[derive(Clone, Debug)]
pub struct NewHeader<'a> {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size.
    pub size: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// L1 table offset.
    pub l1_table_offset: u64,
    /// Refcount table offset.
    pub refcount_table_offset: u64,
    /// Refcount table clusters.
    pub refcount_table_clusters: u32,
    /// Backing file name and format name.
    pub backing: Option<(&'a [u8], &'a str)>,
}

/// Feature names QEMU writes into new version 3 images.
const FEATURE_TABLE: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Encodes a new header (with a backing format extension and, for version 3, the feature name
/// table) into a buffer of one cluster. Fails when the backing name does not fit.
pub fn encode(h: &NewHeader<'_>) -> Result<Vec<u8>, HeaderError> {
    let cs = 1usize << h.cluster_bits;
    let mut b = vec![0u8; cs];
    b[..4].copy_from_slice(&QCOW_MAGIC);
    b[4..8].copy_from_slice(&h.version.to_be_bytes());
    b[20..24].copy_from_slice(&h.cluster_bits.to_be_bytes());
    b[24..32].copy_from_slice(&h.size.to_be_bytes());
    b[36..40].copy_from_slice(&h.l1_size.to_be_bytes());
    b[40..48].copy_from_slice(&h.l1_table_offset.to_be_bytes());
    b[48..56].copy_from_slice(&h.refcount_table_offset.to_be_bytes());
    b[56..60].copy_from_slice(&h.refcount_table_clusters.to_be_bytes());
    let mut at = V2_HEADER_LEN;
    if h.version == 3 {
        // Header length 112: the compression type byte (0, deflate) and padding.
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        at = 112;
    }
    let push_ext = |b: &mut Vec<u8>, at: &mut usize, kind: u32, body: &[u8]| -> bool {
        let padded = body.len().div_ceil(8) * 8;
        if *at + 8 + padded > b.len() {
            return false;
        }
        b[*at..*at + 4].copy_from_slice(&kind.to_be_bytes());
        b[*at + 4..*at + 8].copy_from_slice(&(body.len() as u32).to_be_bytes());
        b[*at + 8..*at + 8 + body.len()].copy_from_slice(body);
        *at += 8 + padded;
        true
    };
    let too_long = |len: usize| HeaderError::BackingName {
        offset: 0,
        len: len as u32,
    };
    if let Some((_, fmt)) = h.backing {
        if !push_ext(&mut b, &mut at, EXT_BACKING_FORMAT, fmt.as_bytes()) {
            return Err(too_long(fmt.len()));
        }
    }
    if h.version == 3 {
        let mut table = Vec::with_capacity(FEATURE_TABLE.len() * 48);
        for (kind, bit, name) in FEATURE_TABLE {
            let mut e = [0u8; 48];
            e[0] = *kind;
            e[1] = *bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            table.extend_from_slice(&e);
        }
        // The table is optional: leave it out when a small cluster has no room for it.
        let room = at + 8 + table.len() + 8 + h.backing.map_or(0, |(n, _)| n.len()) <= cs;
        if room {
            push_ext(&mut b, &mut at, EXT_FEATURE_NAMES, &table);
        }
    }
    // End-of-extensions marker.
    at += 8;
    if let Some((name, _)) = h.backing {
        if name.is_empty() || name.len() > MAX_BACKING_NAME || at + name.len() > cs {
            return Err(too_long(name.len()));
        }
        b[8..16].copy_from_slice(&(at as u64).to_be_bytes());
        b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        b[at..at + name.len()].copy_from_slice(name);
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(version: u32, backing: Option<(&[u8], &str)>) -> Vec<u8> {
        encode(&NewHeader {
            version,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            backing,
        })
        .unwrap()
    }

    #[test]
    fn encode_parse_round_trip() {
        for v in [2, 3] {
            let b = sample(v, Some((b"base.raw", "raw")));
            let h = Header::parse(&b).unwrap();
            assert_eq!(h.version, v);
            assert_eq!(h.cluster_size(), 65536);
            assert_eq!(h.size, 1 << 30);
            assert_eq!(h.backing_file.as_deref(), Some(&b"base.raw"[..]));
            assert_eq!(h.backing_format.as_deref(), Some("raw"));
            assert_eq!(h.refcount_order, 4);
            h.check_open(true).unwrap();
        }
        let h = Header::parse(&sample(3, None)).unwrap();
        assert_eq!(h.feature_name(0, 4).as_deref(), Some("extended L2 entries"));
        assert_eq!(h.backing_file, None);
    }

    #[test]
    fn rejects_bad_fields() {
        let base = sample(3, None);
        let patch = |at: usize, bytes: &[u8]| {
            let mut b = base.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            Header::parse(&b)
        };
        assert_eq!(patch(0, b"QFI\0"), Err(HeaderError::BadMagic));
        assert_eq!(patch(4, &4u32.to_be_bytes()), Err(HeaderError::Version(4)));
        assert_eq!(
            patch(20, &8u32.to_be_bytes()),
            Err(HeaderError::ClusterBits(8))
        );
        assert_eq!(
            patch(20, &22u32.to_be_bytes()),
            Err(HeaderError::ClusterBits(22))
        );
        assert!(matches!(
            patch(24, &(1u64 << 62).to_be_bytes()),
            Err(HeaderError::L1Size { .. })
        ));
        assert!(matches!(
            patch(40, &12345u64.to_be_bytes()),
            Err(HeaderError::TableOffset {
                what: "L1 table",
                ..
            })
        ));
        assert!(matches!(
            patch(48, &0u64.to_be_bytes()),
            Err(HeaderError::TableOffset { .. })
        ));
        assert_eq!(
            patch(56, &0u32.to_be_bytes()),
            Err(HeaderError::RefcountTableSize(0))
        );
        assert_eq!(
            patch(96, &7u32.to_be_bytes()),
            Err(HeaderError::RefcountOrder(7))
        );
        assert_eq!(
            patch(100, &100u32.to_be_bytes()),
            Err(HeaderError::HeaderLength(100))
        );
        assert_eq!(patch(104, &[1]), Err(HeaderError::CompressionType(1)));
        assert!(matches!(
            Header::parse(&base[..50]),
            Err(HeaderError::Truncated(50))
        ));
    }

    #[test]
    fn backing_name_must_fit_in_the_cluster() {
        let mut b = sample(3, Some((b"x", "raw")));
        b[8..16].copy_from_slice(&65530u64.to_be_bytes());
        b[16..20].copy_from_slice(&10u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b),
            Err(HeaderError::BackingName { .. })
        ));
    }

    #[test]
    fn extension_past_the_area_is_refused() {
        let mut b = sample(3, None);
        // The feature table extension claims a length running off the cluster.
        b[116..120].copy_from_slice(&0x10_0000u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b),
            Err(HeaderError::Extension { .. })
        ));
    }

    #[test]
    fn feature_bits_decide_the_open_mode() {
        let with = |incompat: u64, autoclear: u64| {
            let mut b = sample(3, None);
            b[72..80].copy_from_slice(&incompat.to_be_bytes());
            b[88..96].copy_from_slice(&autoclear.to_be_bytes());
            Header::parse(&b).unwrap()
        };
        assert_eq!(
            with(INCOMPAT_DIRTY, 0).check_open(true),
            Err(HeaderError::Dirty)
        );
        assert_eq!(with(INCOMPAT_DIRTY, 0).check_open(false), Ok(()));
        assert_eq!(
            with(INCOMPAT_CORRUPT, 0).check_open(false),
            Err(HeaderError::Corrupt)
        );
        assert_eq!(
            with(INCOMPAT_DATA_FILE, 0).check_open(false),
            Err(HeaderError::ExternalDataFile)
        );
        assert_eq!(
            with(INCOMPAT_EXTL2, 0).check_open(false),
            Err(HeaderError::ExtendedL2)
        );
        assert_eq!(
            with(1 << 9, 0).check_open(false),
            Err(HeaderError::UnknownIncompatible { bit: 9, name: None })
        );
        assert_eq!(
            with(0, AUTOCLEAR_BITMAPS).check_open(true),
            Err(HeaderError::Bitmaps)
        );
        assert_eq!(with(0, AUTOCLEAR_BITMAPS).check_open(false), Ok(()));
        assert_eq!(with(0, 1 << 40).check_open(true), Ok(()));
        let mut enc = sample(3, None);
        enc[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            Header::parse(&enc).unwrap().check_open(false),
            Err(HeaderError::Encrypted(2))
        );
    }

    #[test]
    fn unknown_bit_is_named_from_the_feature_table() {
        let mut b = sample(3, None);
        // Rename the table's entry for incompatible bit 4 to a bit 7 feature.
        let entry = b
            .windows(19)
            .position(|w| w == b"extended L2 entries")
            .unwrap()
            - 2;
        b[entry + 1] = 7;
        b[72..80].copy_from_slice(&(1u64 << 7).to_be_bytes());
        let h = Header::parse(&b).unwrap();
        let err = h.check_open(false).unwrap_err();
        assert_eq!(
            err,
            HeaderError::UnknownIncompatible {
                bit: 7,
                name: Some("extended L2 entries".into())
            }
        );
        assert!(err.to_string().contains("bit 7 (extended L2 entries)"));
    }
}
