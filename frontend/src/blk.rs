//! virtio-blk wire formats the frontend needs: the config space, the request header, the
//! discard/write-zeroes segment, request types and status codes (virtio 1.2, section 5.2).

use std::mem::offset_of;

use virtio_bindings::virtio_blk as vb;

/// Bytes per sector on the wire (always 512, whatever the logical block size).
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID reply (the serial number).
pub const ID_LEN: u32 = 20;
/// Bytes of the config space read by the frontend: `struct virtio_blk_config` up to and
/// including `write_zeroes_may_unmap` and its padding.
pub const CONFIG_LEN: u32 = offset_of!(vb::virtio_blk_config, max_secure_erase_sectors) as u32;
/// Size of the request header (`type`, `reserved`, `sector`).
pub const HEADER_LEN: u32 = 16;
/// Size of one discard / write-zeroes segment.
pub const SEGMENT_LEN: u32 = 16;

/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// Request types the frontend sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read.
    In,
    /// `VIRTIO_BLK_T_OUT`: write.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
    /// Any other type value, to test how a backend answers unknown requests.
    Other(u32),
}

impl RequestType {
    /// The type value on the wire.
    pub fn raw(self) -> u32 {
        match self {
            Self::In => vb::VIRTIO_BLK_T_IN,
            Self::Out => vb::VIRTIO_BLK_T_OUT,
            Self::Flush => vb::VIRTIO_BLK_T_FLUSH,
            Self::GetId => vb::VIRTIO_BLK_T_GET_ID,
            Self::Discard => vb::VIRTIO_BLK_T_DISCARD,
            Self::WriteZeroes => vb::VIRTIO_BLK_T_WRITE_ZEROES,
            Self::Other(v) => v,
        }
    }

    /// Whether the device writes the data buffer (reads and GET_ID).
    pub fn device_writes(self) -> bool {
        matches!(self, Self::In | Self::GetId)
    }
}

/// Encodes a request header.
pub fn header(kind: RequestType, sector: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..4].copy_from_slice(&kind.raw().to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Encodes one discard / write-zeroes segment (`flags` bit 0 is UNMAP).
pub fn segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; SEGMENT_LEN as usize] {
    let mut s = [0u8; SEGMENT_LEN as usize];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// The fields of `struct virtio_blk_config` the frontend uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment size (SIZE_MAX).
    pub size_max: u32,
    /// Largest number of segments per request (SEG_MAX).
    pub seg_max: u32,
    /// Logical block size (BLK_SIZE).
    pub blk_size: u32,
    /// log2 of logical blocks per physical block (TOPOLOGY).
    pub physical_block_exp: u8,
    /// Minimum I/O size in logical blocks (TOPOLOGY).
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks (TOPOLOGY).
    pub opt_io_size: u32,
    /// Write-back cache mode (CONFIG_WCE).
    pub writeback: u8,
    /// Number of queues (MQ).
    pub num_queues: u16,
    /// Largest discard in sectors (DISCARD).
    pub max_discard_sectors: u32,
    /// Largest number of discard segments (DISCARD).
    pub max_discard_seg: u32,
    /// Discard alignment in sectors (DISCARD).
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes in sectors (WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Largest number of write-zeroes segments (WRITE_ZEROES).
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes may unmap (WRITE_ZEROES).
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// Parses the little-endian config space; missing trailing bytes read as zero.
    pub fn parse(raw: &[u8]) -> Self {
        let mut b = [0u8; CONFIG_LEN as usize];
        let n = raw.len().min(b.len());
        b[..n].copy_from_slice(&raw[..n]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        type C = vb::virtio_blk_config;
        Self {
            capacity: u64_at(offset_of!(C, capacity)),
            size_max: u32_at(offset_of!(C, size_max)),
            seg_max: u32_at(offset_of!(C, seg_max)),
            blk_size: u32_at(offset_of!(C, blk_size)),
            physical_block_exp: b[offset_of!(C, physical_block_exp)],
            min_io_size: u16_at(offset_of!(C, min_io_size)),
            opt_io_size: u32_at(offset_of!(C, opt_io_size)),
            writeback: b[offset_of!(C, wce)],
            num_queues: u16_at(offset_of!(C, num_queues)),
            max_discard_sectors: u32_at(offset_of!(C, max_discard_sectors)),
            max_discard_seg: u32_at(offset_of!(C, max_discard_seg)),
            discard_sector_alignment: u32_at(offset_of!(C, discard_sector_alignment)),
            max_write_zeroes_sectors: u32_at(offset_of!(C, max_write_zeroes_sectors)),
            max_write_zeroes_seg: u32_at(offset_of!(C, max_write_zeroes_seg)),
            write_zeroes_may_unmap: b[offset_of!(C, write_zeroes_may_unmap)],
        }
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(SECTOR_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_segment_encoding() {
        let h = header(RequestType::Out, 0x0102_0304_0506_0708);
        assert_eq!(&h[0..4], &1u32.to_le_bytes());
        assert_eq!(&h[4..8], &[0; 4]);
        assert_eq!(&h[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(header(RequestType::GetId, 0)[0], 8);
        assert_eq!(header(RequestType::Other(99), 0)[0], 99);
        let s = segment(5, 6, 1);
        assert_eq!(&s[0..8], &5u64.to_le_bytes());
        assert_eq!(&s[8..12], &6u32.to_le_bytes());
        assert_eq!(&s[12..16], &1u32.to_le_bytes());
    }

    #[test]
    fn config_parse_reads_the_spec_offsets() {
        let mut raw = vec![0u8; CONFIG_LEN as usize];
        assert_eq!(CONFIG_LEN, 60);
        raw[0..8].copy_from_slice(&2048u64.to_le_bytes());
        raw[12..16].copy_from_slice(&126u32.to_le_bytes());
        raw[20..24].copy_from_slice(&4096u32.to_le_bytes());
        raw[34..36].copy_from_slice(&2u16.to_le_bytes());
        raw[36..40].copy_from_slice(&(1u32 << 20).to_le_bytes());
        raw[56] = 1;
        let c = BlkConfig::parse(&raw);
        assert_eq!(c.capacity, 2048);
        assert_eq!(c.capacity_bytes(), 1 << 20);
        assert_eq!(c.seg_max, 126);
        assert_eq!(c.blk_size, 4096);
        assert_eq!(c.num_queues, 2);
        assert_eq!(c.max_discard_sectors, 1 << 20);
        assert_eq!(c.write_zeroes_may_unmap, 1);
        // A short config space parses, with the missing fields zero.
        assert_eq!(BlkConfig::parse(&raw[..8]).num_queues, 0);
    }
}
