//! Decoders for the structures `info` recognises (pure: bytes in, description out): the
//! ext2/3/4 superblock, an MBR partition table, a GPT header and its entries.
//!
//! Each takes the bytes `info` read from the image (zero-filled past its end: a superblock's
//! 1024 bytes, a sector's 512) and never panics on their content.

use serde::Serialize;

/// An ext2/3/4 superblock, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtInfo {
    /// `ext2`, `ext3` or `ext4`.
    pub version: String,
    /// Volume label (may be empty).
    pub label: String,
    /// File system UUID, `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub uuid: String,
    /// Block size in bytes.
    pub block_size: u64,
    /// Blocks in the file system.
    pub blocks: u64,
    /// Free blocks.
    pub free_blocks: u64,
    /// Inodes in the file system.
    pub inodes: u32,
    /// Free inodes.
    pub free_inodes: u32,
    /// Names of the feature flags that decide the version.
    pub features: Vec<String>,
}

/// An MBR partition entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MbrPartition {
    /// 1 to 4.
    pub number: u8,
    /// The boot flag (0x80) is set.
    pub bootable: bool,
    /// Partition type byte, e.g. `0x83`.
    pub type_id: String,
    /// What the type byte usually means.
    pub type_name: String,
    /// First sector (512 bytes).
    pub start_sector: u64,
    /// Length in sectors.
    pub sectors: u64,
}

/// An MBR partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MbrInfo {
    /// The used entries.
    pub partitions: Vec<MbrPartition>,
}

/// A GPT partition entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GptPartition {
    /// 1-based entry number.
    pub number: u32,
    /// Partition type GUID.
    pub type_guid: String,
    /// First LBA (512-byte sectors).
    pub first_lba: u64,
    /// Last LBA, inclusive.
    pub last_lba: u64,
    /// Partition name.
    pub name: String,
}

/// A GUID partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GptInfo {
    /// Disk GUID.
    pub disk_guid: String,
    /// Entries in the table (used or not).
    pub entries: u32,
    /// The used entries.
    pub partitions: Vec<GptPartition>,
}

/// The little-endian field of `N` bytes at `at`; zero where `b` is too short.
fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    at.checked_add(N)
        .and_then(|end| b.get(at..end))
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; N])
}

fn u16_le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(le(b, at))
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(le(b, at))
}

fn u64_le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(le(b, at))
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Decodes an ext2/3/4 superblock (the 1024 bytes at offset 1024).
pub fn parse_ext(sb: &[u8]) -> Option<ExtInfo> {
    if sb.len() < 1024 || u16_le(sb, 56) != 0xEF53 {
        return None;
    }
    let log = u32_le(sb, 24);
    if log > 6 {
        return None; // blocks of 1 KiB to 64 KiB only
    }
    let compat = u32_le(sb, 92);
    let incompat = u32_le(sb, 96);
    let is_64bit = incompat & 0x80 != 0;
    let hi = |at| {
        if is_64bit {
            u64::from(u32_le(sb, at)) << 32
        } else {
            0
        }
    };
    let mut features = Vec::new();
    if compat & 0x4 != 0 {
        features.push("has_journal".to_string());
    }
    for (bit, name) in [(0x40, "extents"), (0x80, "64bit"), (0x200, "flex_bg")] {
        if incompat & bit != 0 {
            features.push(name.to_string());
        }
    }
    let version = if incompat & (0x40 | 0x80 | 0x200) != 0 {
        "ext4"
    } else if compat & 0x4 != 0 {
        "ext3"
    } else {
        "ext2"
    };
    Some(ExtInfo {
        version: version.to_string(),
        label: text(&sb[120..136]),
        uuid: uuid_be(&sb[104..120]),
        block_size: 1024u64 << log,
        blocks: u64::from(u32_le(sb, 4)) | hi(0x150),
        free_blocks: u64::from(u32_le(sb, 12)) | hi(0x158),
        inodes: u32_le(sb, 0),
        free_inodes: u32_le(sb, 16),
        features,
    })
}

/// A UUID stored as 16 bytes in order.
fn uuid_be(b: &[u8]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A GUID stored mixed-endian, as GPT and UEFI do.
fn guid_mixed(b: &[u8]) -> String {
    let mut v = b[..16].to_vec();
    v[0..4].reverse();
    v[4..6].reverse();
    v[6..8].reverse();
    uuid_be(&v).to_ascii_uppercase()
}

fn mbr_type_name(t: u8) -> &'static str {
    match t {
        0x01 | 0x04 | 0x06 | 0x0b | 0x0c | 0x0e => "FAT",
        0x05 | 0x0f | 0x85 => "extended",
        0x07 => "NTFS/exFAT",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8e => "Linux LVM",
        0xee => "GPT protective",
        0xef => "EFI system",
        0xfd => "Linux RAID",
        _ => "other",
    }
}

/// Decodes an MBR partition table from the first sector.
pub fn parse_mbr(lba0: &[u8]) -> Option<MbrInfo> {
    if lba0.len() < 512 || lba0[510] != 0x55 || lba0[511] != 0xAA {
        return None;
    }
    let mut partitions = Vec::new();
    for i in 0..4u8 {
        let e = &lba0[446 + 16 * usize::from(i)..][..16];
        if e[0] != 0 && e[0] != 0x80 {
            return None; // a boot sector, not a partition table
        }
        let type_id = e[4];
        let start = u64::from(u32_le(e, 8));
        let sectors = u64::from(u32_le(e, 12));
        if type_id == 0 {
            continue;
        }
        partitions.push(MbrPartition {
            number: i + 1,
            bootable: e[0] == 0x80,
            type_id: format!("{type_id:#04x}"),
            type_name: mbr_type_name(type_id).to_string(),
            start_sector: start,
            sectors,
        });
    }
    Some(MbrInfo { partitions })
}

/// Where a GPT header (LBA 1) says its entries are: `(byte offset, bytes)`, at most 1 MiB.
pub fn gpt_table(header: &[u8]) -> (u64, usize) {
    let lba = u64_le(header, 72);
    let entries = u32_le(header, 80);
    let entry_size = u32_le(header, 84) as usize;
    let len = (entries as usize).saturating_mul(entry_size).min(1 << 20);
    (lba.saturating_mul(512), len)
}

/// Decodes a GPT header (LBA 1) and its partition entries.
pub fn parse_gpt(header: &[u8], table: &[u8]) -> GptInfo {
    let entries = u32_le(header, 80);
    let size = u32_le(header, 84) as usize;
    let mut partitions = Vec::new();
    if size >= 128 {
        for (i, e) in table.chunks_exact(size).enumerate() {
            if e[..16].iter().all(|&b| b == 0) {
                continue;
            }
            let name: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&c| c != 0)
                .collect();
            partitions.push(GptPartition {
                number: i as u32 + 1,
                type_guid: guid_mixed(&e[..16]),
                first_lba: u64_le(e, 32),
                last_lba: u64_le(e, 40),
                name: String::from_utf16_lossy(&name),
            });
        }
    }
    GptInfo {
        disk_guid: guid_mixed(&header[56..72]),
        entries,
        partitions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext_versions_from_features() {
        let mut sb = vec![0u8; 1024];
        sb[56..58].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[24..28].copy_from_slice(&2u32.to_le_bytes());
        sb[4..8].copy_from_slice(&1000u32.to_le_bytes());
        sb[12..16].copy_from_slice(&400u32.to_le_bytes());
        sb[120..124].copy_from_slice(b"data");
        sb[104..120].copy_from_slice(&[0x11; 16]);
        let e = parse_ext(&sb).unwrap();
        assert_eq!(e.version, "ext2");
        assert_eq!(e.block_size, 4096);
        assert_eq!((e.blocks, e.free_blocks), (1000, 400));
        assert_eq!(e.label, "data");
        assert_eq!(e.uuid, "11111111-1111-1111-1111-111111111111");
        sb[92] = 0x4;
        assert_eq!(parse_ext(&sb).unwrap().version, "ext3");
        sb[96] = 0x80; // 64bit: the high halves count
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        let e = parse_ext(&sb).unwrap();
        assert_eq!(e.version, "ext4");
        assert_eq!(e.blocks, (1 << 32) + 1000);
        sb[56] = 0;
        assert!(parse_ext(&sb).is_none());
    }

    #[test]
    fn mbr_and_boot_sectors() {
        let mut s = vec![0u8; 512];
        assert!(parse_mbr(&s).is_none());
        s[510] = 0x55;
        s[511] = 0xAA;
        s[446] = 0x80;
        s[446 + 4] = 0x83;
        s[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        s[446 + 12..446 + 16].copy_from_slice(&4096u32.to_le_bytes());
        let m = parse_mbr(&s).unwrap();
        assert_eq!(m.partitions.len(), 1);
        assert_eq!(m.partitions[0].type_id, "0x83");
        assert_eq!(
            (m.partitions[0].start_sector, m.partitions[0].sectors),
            (2048, 4096)
        );
        assert!(m.partitions[0].bootable);
        s[446 + 16] = 0x12; // not a status byte: a boot sector's code
        assert!(parse_mbr(&s).is_none());
    }

    #[test]
    fn gpt_guid_is_mixed_endian() {
        // EFI system partition type GUID as stored on disk.
        let stored = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(guid_mixed(&stored), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    }
}
