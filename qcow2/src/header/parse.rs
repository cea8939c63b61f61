//! Parsing: the first cluster of an image turned into a [`Header`], every field a malicious
//! image could use against the reader checked (sizes, offsets, alignment, lengths inside the
//! cluster), header extensions read.

use super::error::HeaderError;
use super::layout::{
    EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_END, EXT_FEATURE_NAMES,
    INCOMPAT_COMPRESSION, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
    MIN_CLUSTER_BITS, V2_HEADER_LEN, V3_HEADER_LEN,
};
use crate::format::QCOW_MAGIC;

/// The compression algorithm of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (QEMU's "zlib"), window 4 KiB.
    Deflate,
    /// Zstandard frames.
    Zstd,
}

impl Compression {
    /// QEMU's name of the compression type: `zlib` or `zstd`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Deflate => "zlib",
            Compression::Zstd => "zstd",
        }
    }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::encode::sample;

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
}
