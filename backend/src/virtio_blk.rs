//! The virtio-blk device vloop-blk offers, as the virtio 1.2 specification (section 5.2) and
//! the vhost-user protocol describe it: the feature bits, the limits advertised in the config
//! space, and the config space itself as `struct virtio_blk_config` (the `virtio-bindings`
//! definition, little endian on the wire).
//!
//! Nothing here does I/O: it turns the served image's limits into what the driver reads.

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;

use crate::request::{Limits, SECTOR_SHIFT};

/// Largest length of one data descriptor (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest sectors in one discard / write-zeroes segment (2 GiB, a multiple of every block
/// size).
pub const MAX_DWZ_SECTORS: u32 = 1 << 22;
/// Discard / write-zeroes segments per request: one, as QEMU's virtio-blk and
/// qemu-storage-daemon advertise; a request with more gets VIRTIO_BLK_S_UNSUPP.
pub const MAX_DWZ_SEG: u32 = 1;

/// Bytes of the config space vloop-blk defines: `struct virtio_blk_config` up to and including
/// `write_zeroes_may_unmap` and its padding (the secure-erase and zoned fields are not offered).
pub const CONFIG_LEN: usize = std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors);
/// Offset of the `wce` (writeback) byte, the one field a driver may write.
pub const CONFIG_WCE_OFFSET: usize = std::mem::offset_of!(virtio_blk_config, wce);
/// The vhost-user config window: GET_CONFIG and SET_CONFIG ranges must end inside it.
pub const VHOST_USER_CONFIG_SIZE: u32 = 0x1000;

/// A GET_CONFIG or SET_CONFIG range outside the vhost-user config window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("config space range {offset}+{len} is outside the {VHOST_USER_CONFIG_SIZE}-byte window")]
pub struct ConfigRangeError {
    /// First byte asked for.
    pub offset: u32,
    /// Bytes asked for.
    pub len: usize,
}

/// `struct virtio_blk_config` as plain bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct ConfigSpace(pub virtio_blk_config);

// SAFETY: `virtio_blk_config` is a `#[repr(C)]` struct of integers and integer arrays whose
// layout virtio-bindings checks at compile time to have no padding, so every byte pattern is a
// valid value.
unsafe impl ByteValued for ConfigSpace {}

impl ConfigSpace {
    /// The bytes the driver reads, [`CONFIG_LEN`] of them.
    pub fn bytes(&self) -> &[u8] {
        &self.as_slice()[..CONFIG_LEN]
    }
}

/// What the device offers beyond the image's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Number of queues.
    pub num_queues: u16,
    /// Write cache mode shown to the driver (true: writeback).
    pub writeback: bool,
    /// WRITE_ZEROES with UNMAP may deallocate (`write_zeroes_may_unmap`).
    pub may_unmap: bool,
}

/// The virtio and vhost-user feature bits offered for an export with `limits`.
pub fn features(limits: &Limits) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_TOPOLOGY
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_CONFIG_WCE
        | 1 << VIRTIO_BLK_F_MQ
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if limits.read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    f
}

/// The config space for an export with `limits` and `offer`.
pub fn config_space(limits: &Limits, offer: &Offer) -> ConfigSpace {
    let mut c = virtio_blk_config {
        capacity: limits.capacity.to_le(),
        size_max: limits.size_max.to_le(),
        seg_max: limits.seg_max.to_le(),
        blk_size: limits.logical_block_size.to_le(),
        // One logical block per physical block, no alignment offset, min_io_size one block,
        // no optimal size.
        min_io_size: 1u16.to_le(),
        wce: u8::from(offer.writeback),
        num_queues: offer.num_queues.to_le(),
        ..Default::default()
    };
    if !limits.read_only {
        let align = (limits.logical_block_size >> SECTOR_SHIFT).max(1);
        c.max_discard_sectors = limits.max_discard_sectors.to_le();
        c.max_discard_seg = MAX_DWZ_SEG.to_le();
        c.discard_sector_alignment = align.to_le();
        c.max_write_zeroes_sectors = limits.max_write_zeroes_sectors.to_le();
        c.max_write_zeroes_seg = MAX_DWZ_SEG.to_le();
        c.write_zeroes_may_unmap = u8::from(offer.may_unmap);
    }
    ConfigSpace(c)
}

/// The `len` bytes of the config space at `offset`, as a GET_CONFIG reply: bytes past the
/// fields defined read as zero, like reserved fields; a range that overflows or ends past the
/// vhost-user config window is refused.
pub fn read_config(
    space: &ConfigSpace,
    offset: u32,
    len: u32,
) -> Result<Vec<u8>, ConfigRangeError> {
    let refused = ConfigRangeError {
        offset,
        len: len as usize,
    };
    match offset.checked_add(len) {
        Some(end) if end <= VHOST_USER_CONFIG_SIZE => {}
        _ => return Err(refused),
    }
    let bytes = space.bytes();
    let mut out = vec![0u8; len as usize];
    let start = offset as usize;
    if start < bytes.len() {
        let n = (bytes.len() - start).min(out.len());
        out[..n].copy_from_slice(&bytes[start..start + n]);
    }
    Ok(out)
}

/// The new value of the `wce` byte if a SET_CONFIG of `buf` at `offset` writes it (`None` when
/// it does not); an overflowing range or one past the config window is an error.
pub fn written_wce(offset: u32, buf: &[u8]) -> Result<Option<bool>, ConfigRangeError> {
    let start = offset as usize;
    let end = start
        .checked_add(buf.len())
        .filter(|e| *e <= VHOST_USER_CONFIG_SIZE as usize)
        .ok_or(ConfigRangeError {
            offset,
            len: buf.len(),
        })?;
    Ok((start..end)
        .contains(&CONFIG_WCE_OFFSET)
        .then(|| buf[CONFIG_WCE_OFFSET - start] != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::tests::limits_for;

    #[test]
    fn layout_matches_the_specification() {
        assert_eq!(CONFIG_LEN, 60);
        assert_eq!(CONFIG_WCE_OFFSET, 32);
        let mut l = limits_for(2048);
        l.seg_max = 126;
        l.logical_block_size = 4096;
        let offer = Offer {
            num_queues: 2,
            writeback: true,
            may_unmap: true,
        };
        let c = config_space(&l, &offer);
        let b = c.bytes();
        assert_eq!(b.len(), 60);
        assert_eq!(&b[0..8], &2048u64.to_le_bytes());
        assert_eq!(&b[8..12], &l.size_max.to_le_bytes());
        assert_eq!(&b[12..16], &126u32.to_le_bytes());
        assert_eq!(&b[20..24], &4096u32.to_le_bytes());
        assert_eq!(&b[26..28], &1u16.to_le_bytes());
        assert_eq!(b[32], 1);
        assert_eq!(&b[34..36], &2u16.to_le_bytes());
        assert_eq!(&b[40..44], &1u32.to_le_bytes());
        assert_eq!(&b[44..48], &8u32.to_le_bytes());
        assert_eq!(&b[52..56], &1u32.to_le_bytes());
        assert_eq!(b[56], 1);
        // Read-only: no discard fields.
        l.read_only = true;
        let c = config_space(&l, &offer);
        assert!(c.bytes()[36..60].iter().all(|&x| x == 0));
        assert_ne!(features(&l) & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(features(&l) & 1 << VIRTIO_BLK_F_DISCARD, 0);
    }

    #[test]
    fn config_reads_and_writes_are_bounds_checked() {
        let c = config_space(
            &limits_for(8),
            &Offer {
                num_queues: 1,
                writeback: false,
                may_unmap: false,
            },
        );
        assert_eq!(read_config(&c, 0, 8).unwrap(), 8u64.to_le_bytes());
        // Past the defined fields: zeroes; past the window or overflowing: refused.
        assert_eq!(read_config(&c, 100, 4).unwrap(), [0; 4]);
        assert!(read_config(&c, 0xffc, 8).is_err());
        assert!(read_config(&c, u32::MAX, 2).is_err());
        assert_eq!(written_wce(32, &[1]), Ok(Some(true)));
        assert_eq!(written_wce(30, &[9, 9, 0, 9]), Ok(Some(false)));
        assert_eq!(written_wce(0, &[1; 8]), Ok(None));
        assert!(written_wce(0xfff, &[1, 1]).is_err());
        assert!(written_wce(u32::MAX, &[1]).is_err());
    }
}
