//! Encoding: the header of a new image, with a backing format extension and, for version 3,
//! QEMU's feature name table.

use super::error::HeaderError;
use super::layout::{EXT_BACKING_FORMAT, EXT_FEATURE_NAMES, MAX_BACKING_NAME, V2_HEADER_LEN};
use crate::format::QCOW_MAGIC;

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

/// A valid header of a 1 GiB image with 64 KiB clusters, for tests.
#[cfg(test)]
pub(super) fn sample(version: u32, backing: Option<(&[u8], &str)>) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::Header;

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
}
