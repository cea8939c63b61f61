//! Table entries: the L1, L2 and refcount formats, decoded and encoded without I/O.
//!
//! [`Geometry`] holds the numbers derived from a header (cluster size, entries per table,
//! refcount width); [`L2Entry`] is a decoded L2 entry with its host offsets checked; the
//! refcount functions read and write entries of any width from 1 to 64 bits in a refcount
//! block. `crate::layer` uses these on the tables it caches.

use thiserror::Error;

use crate::header::Header;

/// Bits 9-55 of an L1 or L2 entry: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 9-63 of a refcount table entry.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// L1/L2 bit 63: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// L2 bit 62: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 bit 0: the cluster reads as zeroes (version 3).
pub const ZERO: u64 = 1;
/// Compressed data is counted in 512-byte sectors.
pub const SECTOR: u64 = 512;

/// Errors in table entries.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TableError {
    /// An L1 entry whose L2 table offset is not cluster aligned.
    #[error("L1 entry {index} points to an unaligned L2 table offset {offset:#x}; the image is corrupt (`qemu-img check -r all`)")]
    UnalignedL2 {
        /// L1 index.
        index: u64,
        /// The offset.
        offset: u64,
    },
    /// An L2 entry whose data cluster offset is not cluster aligned.
    #[error("an L2 entry points to an unaligned data cluster offset {0:#x}; the image is corrupt (`qemu-img check -r all`)")]
    UnalignedData(u64),
    /// A zero cluster in a version 2 image, which has none (bit 0 is reserved there).
    #[error("an L2 entry ({0:#x}) of a version 2 image is a zero cluster, which version 2 does not have; the image is corrupt (`qemu-img check -r all`)")]
    ZeroInVersion2(u64),
    /// A refcount table entry whose block offset is not cluster aligned.
    #[error("refcount table entry {index} points to an unaligned refcount block {offset:#x}; the image is corrupt (`qemu-img check -r all`)")]
    UnalignedRefblock {
        /// Table index.
        index: u64,
        /// The offset.
        offset: u64,
    },
}

/// Numbers derived from a header that every table lookup needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// log2 of entries per L2 table.
    pub l2_bits: u32,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// log2 of entries per refcount block.
    pub rb_bits: u32,
    /// Bit where a compressed descriptor's sector count starts.
    pub csize_shift: u32,
    /// Mask of the sector count (after shifting).
    pub csize_mask: u64,
    /// Mask of a compressed descriptor's host offset.
    pub coffset_mask: u64,
    /// Virtual size in bytes.
    pub size: u64,
    /// qcow2 version.
    pub version: u32,
}

impl Geometry {
    /// The geometry of a validated header.
    pub fn of(h: &Header) -> Geometry {
        let cb = h.cluster_bits;
        let csize_shift = 62 - (cb - 8);
        Geometry {
            cluster_bits: cb,
            l2_bits: cb - 3,
            refcount_order: h.refcount_order,
            rb_bits: cb + 3 - h.refcount_order,
            csize_shift,
            csize_mask: (1u64 << (cb - 8)) - 1,
            coffset_mask: (1u64 << csize_shift) - 1,
            size: h.size,
            version: h.version,
        }
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Entries per refcount block.
    pub fn rb_entries(&self) -> u64 {
        1 << self.rb_bits
    }

    /// Largest refcount the width can hold.
    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.refcount_order)) - 1
        }
    }

    /// The L1 index and the L2 index of virtual byte `off`.
    pub fn split(&self, off: u64) -> (u64, usize) {
        let cluster = off >> self.cluster_bits;
        (
            cluster >> self.l2_bits,
            (cluster & (self.l2_entries() - 1)) as usize,
        )
    }

    /// Offset of `off` within its cluster.
    pub fn in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }

    /// Start of the cluster holding `off`.
    pub fn cluster_start(&self, off: u64) -> u64 {
        off & !(self.cluster_size() - 1)
    }

    /// The L2 table offset of an L1 entry (0: none).
    pub fn l1_offset(&self, index: u64, raw: u64) -> Result<u64, TableError> {
        let offset = raw & OFFSET_MASK;
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(TableError::UnalignedL2 { index, offset });
        }
        Ok(offset)
    }

    /// The refcount block offset of a refcount table entry (0: none).
    pub fn reft_offset(&self, index: u64, raw: u64) -> Result<u64, TableError> {
        let offset = raw & REFT_OFFSET_MASK;
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(TableError::UnalignedRefblock { index, offset });
        }
        Ok(offset)
    }

    /// Decodes an L2 entry (classified as QEMU's `qcow2_get_cluster_type` does).
    pub fn decode(&self, raw: u64) -> Result<L2Entry, TableError> {
        if raw & COMPRESSED != 0 {
            let host = raw & self.coffset_mask;
            let sectors = ((raw >> self.csize_shift) & self.csize_mask) + 1;
            let len = sectors * SECTOR - (host & (SECTOR - 1));
            return Ok(L2Entry::Compressed { host, len });
        }
        let copied = raw & COPIED != 0;
        let host = raw & OFFSET_MASK;
        if host & (self.cluster_size() - 1) != 0 {
            return Err(TableError::UnalignedData(host));
        }
        if raw & ZERO != 0 && self.version < 3 {
            return Err(TableError::ZeroInVersion2(raw));
        }
        Ok(if raw & ZERO != 0 {
            L2Entry::Zero {
                host: (host != 0).then_some(host),
                copied,
            }
        } else if host != 0 {
            L2Entry::Normal { host, copied }
        } else {
            L2Entry::Unallocated
        })
    }
}

/// A decoded L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated: reads through to the backing file, or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster, if any.
    Zero {
        /// Preallocated host cluster.
        host: Option<u64>,
        /// The preallocated cluster's refcount is one.
        copied: bool,
    },
    /// Data in host cluster `host`.
    Normal {
        /// Host cluster offset.
        host: u64,
        /// Refcount is one: writable in place.
        copied: bool,
    },
    /// Compressed data: `len` bytes at host byte offset `host`.
    Compressed {
        /// Host byte offset (not aligned).
        host: u64,
        /// Bytes the descriptor spans (whole sectors from `host`'s sector on).
        len: u64,
    },
}

impl L2Entry {
    /// The raw entry: clusters this writer creates always have refcount one.
    pub fn encode(self) -> u64 {
        match self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host: None, .. } => ZERO,
            L2Entry::Zero {
                host: Some(h),
                copied,
            } => h | ZERO | if copied { COPIED } else { 0 },
            L2Entry::Normal { host, copied } => host | if copied { COPIED } else { 0 },
            L2Entry::Compressed { .. } => unreachable_compressed(),
        }
    }

    /// The host clusters the entry holds a reference to, as a byte range (start, end).
    pub fn host_range(self, cluster_size: u64) -> Option<(u64, u64)> {
        match self {
            L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => None,
            L2Entry::Zero { host: Some(h), .. } | L2Entry::Normal { host: h, .. } => {
                Some((h, h + cluster_size))
            }
            L2Entry::Compressed { host, len } => Some((host, host + len)),
        }
    }
}

/// Host clusters the L2 tables of an image reference, counted as `qemu-img check` counts
/// them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterCounts {
    /// Entries that hold a host cluster: data, compressed, and zero clusters that keep a
    /// preallocated one (`qemu-img check`'s "allocated clusters").
    pub allocated: u64,
    /// Of those, compressed clusters.
    pub compressed: u64,
    /// Of those, zero clusters with a preallocated host cluster.
    pub zero_preallocated: u64,
}

impl ClusterCounts {
    /// Counts one decoded L2 entry.
    pub fn add(&mut self, entry: L2Entry) {
        match entry {
            L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => {}
            L2Entry::Normal { .. } => self.allocated += 1,
            L2Entry::Compressed { .. } => {
                self.allocated += 1;
                self.compressed += 1;
            }
            L2Entry::Zero { host: Some(_), .. } => {
                self.allocated += 1;
                self.zero_preallocated += 1;
            }
        }
    }

    /// Data clusters: standard and compressed (the allocated ones less the preallocated
    /// zero clusters).
    pub fn data(&self) -> u64 {
        self.allocated - self.zero_preallocated
    }
}

/// This writer never writes compressed entries (it keeps their raw values instead), so
/// encoding one is a bug in the caller.
#[cold]
fn unreachable_compressed() -> u64 {
    debug_assert!(false, "compressed L2 entries are never re-encoded");
    0
}

/// The refcount of entry `index` in refcount block `block` of width `1 << order` bits.
pub fn get_refcount(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[index / per_byte];
            let shift = (index % per_byte) * bits;
            u64::from(byte >> shift) & ((1 << bits) - 1)
        }
        3 => u64::from(block[index]),
        4 => u64::from(u16::from_be_bytes([block[2 * index], block[2 * index + 1]])),
        5 => {
            let at = 4 * index;
            u64::from(u32::from_be_bytes([
                block[at],
                block[at + 1],
                block[at + 2],
                block[at + 3],
            ]))
        }
        _ => {
            let at = 8 * index;
            let mut b = [0u8; 8];
            b.copy_from_slice(&block[at..at + 8]);
            u64::from_be_bytes(b)
        }
    }
}

/// Sets entry `index` of refcount block `block` (the caller checked `value` fits the width).
/// Returns the byte range of the block that changed.
pub fn set_refcount(block: &mut [u8], order: u32, index: usize, value: u64) -> (usize, usize) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let at = index / per_byte;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            block[at] = (block[at] & !mask) | (((value as u8) << shift) & mask);
            (at, at + 1)
        }
        3 => {
            block[index] = value as u8;
            (index, index + 1)
        }
        4 => {
            let at = 2 * index;
            block[at..at + 2].copy_from_slice(&(value as u16).to_be_bytes());
            (at, at + 2)
        }
        5 => {
            let at = 4 * index;
            block[at..at + 4].copy_from_slice(&(value as u32).to_be_bytes());
            (at, at + 4)
        }
        _ => {
            let at = 8 * index;
            block[at..at + 8].copy_from_slice(&value.to_be_bytes());
            (at, at + 8)
        }
    }
}

/// The runs of `sorted` (ascending values) that go up by `step`: (first value, length).
pub(crate) fn runs(sorted: &[u64], step: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &v in sorted {
        match out.last_mut() {
            Some((first, n)) if *first + *n * step == v => *n += 1,
            _ => out.push((v, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(cluster_bits: u32, refcount_order: u32) -> Geometry {
        let csize_shift = 62 - (cluster_bits - 8);
        Geometry {
            cluster_bits,
            l2_bits: cluster_bits - 3,
            refcount_order,
            rb_bits: cluster_bits + 3 - refcount_order,
            csize_shift,
            csize_mask: (1 << (cluster_bits - 8)) - 1,
            coffset_mask: (1 << csize_shift) - 1,
            size: 1 << 30,
            version: 3,
        }
    }

    #[test]
    fn decodes_every_entry_kind() {
        let g = geo(16, 4);
        assert_eq!(g.decode(0), Ok(L2Entry::Unallocated));
        assert_eq!(
            g.decode(ZERO),
            Ok(L2Entry::Zero {
                host: None,
                copied: false
            })
        );
        assert_eq!(
            g.decode(0x5_0000 | ZERO | COPIED),
            Ok(L2Entry::Zero {
                host: Some(0x5_0000),
                copied: true
            })
        );
        assert_eq!(
            g.decode(0x5_0000 | COPIED),
            Ok(L2Entry::Normal {
                host: 0x5_0000,
                copied: true
            })
        );
        assert_eq!(g.decode(0x5_0200), Err(TableError::UnalignedData(0x5_0200)));
        // Compressed: offset 0x12345, 3 additional sectors.
        let raw = COMPRESSED | (3u64 << g.csize_shift) | 0x12345;
        assert_eq!(
            g.decode(raw),
            Ok(L2Entry::Compressed {
                host: 0x12345,
                len: 4 * 512 - 0x145
            })
        );
        for e in [
            L2Entry::Unallocated,
            L2Entry::Zero {
                host: None,
                copied: false,
            },
            L2Entry::Zero {
                host: Some(0x10000),
                copied: true,
            },
            L2Entry::Normal {
                host: 0x30000,
                copied: true,
            },
        ] {
            assert_eq!(g.decode(e.encode()), Ok(e));
        }
    }

    #[test]
    fn clusters_count_as_qemu_img_check_counts_them() {
        let g = geo(16, 4);
        let entries: [u64; 6] = [
            0,
            (5 << 16) | (1 << 63),
            1,
            (6 << 16) | 1,
            (1 << 62) | 0x12345,
            7 << 16,
        ];
        let mut c = ClusterCounts::default();
        for raw in entries {
            c.add(g.decode(raw).unwrap());
        }
        assert_eq!(
            c,
            ClusterCounts {
                allocated: 4,
                compressed: 1,
                zero_preallocated: 1
            }
        );
        assert_eq!(c.data(), 3);
        assert!(g.decode((5u64 << 16) + 512).is_err());
    }

    #[test]
    fn splits_virtual_offsets() {
        let g = geo(16, 4);
        assert_eq!(g.split(0), (0, 0));
        assert_eq!(g.split(65536 * 8191 + 5), (0, 8191));
        assert_eq!(g.split(65536 * 8192), (1, 0));
        let g = geo(9, 4);
        assert_eq!(g.split(512 * 64), (1, 0));
        assert_eq!(g.rb_entries(), 256);
    }

    #[test]
    fn refcounts_of_every_width() {
        for order in 0..=6u32 {
            let g = geo(9, order);
            let mut block = vec![0u8; 512];
            let max = g.max_refcount();
            let n = g.rb_entries() as usize;
            for i in 0..n {
                let v = (i as u64 * 7 + 1) & max;
                set_refcount(&mut block, order, i, v);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&block, order, i),
                    (i as u64 * 7 + 1) & max,
                    "order {order} entry {i}"
                );
            }
            set_refcount(&mut block, order, 3, max);
            assert_eq!(get_refcount(&block, order, 3), max);
            assert_eq!(get_refcount(&block, order, 2), (2 * 7 + 1) & max);
        }
        // Bit 0 is the least significant bit for sub-byte widths.
        let mut b = [0u8; 1];
        set_refcount(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        set_refcount(&mut b, 1, 1, 3);
        assert_eq!(b[0], 0b1101);
    }

    #[test]
    fn runs_split_where_values_stop_going_up_by_the_step() {
        assert_eq!(runs(&[], 1), vec![]);
        assert_eq!(runs(&[3, 4, 5, 7, 9, 10], 1), vec![(3, 3), (7, 1), (9, 2)]);
        assert_eq!(runs(&[0, 512, 2048], 512), vec![(0, 2), (2048, 1)]);
    }
}
