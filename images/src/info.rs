//! `vloop-image info`: what an image file (or block device) holds.
//!
//! Recognised, in this order:
//! - ext2/3/4: the superblock at byte 1024 (magic `0xEF53` at offset 56). ext3 is ext2 with
//!   a journal (`has_journal`); ext4 has any of `extents`, `64bit`, `flex_bg`.
//! - ISO 9660: `CD001` in the volume descriptor at byte 32768 ([`crate::iso::probe`], with a
//!   reader here for images it does not describe).
//! - A GUID partition table (protective MBR entry `0xEE`, `EFI PART` at LBA 1) or an MBR
//!   partition table (`0x55AA` at byte 510, sane entries).
//! - All zero: every byte is zero (holes are skipped with `SEEK_DATA`, so a sparse image is
//!   checked in no time).
//! - Anything else is unknown.

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde::Serialize;
use thiserror::Error;
use tracing::debug;

use crate::copy::{open_source, CopyError, Source};
use crate::size::Size;

/// Errors from examining an image.
#[derive(Debug, Error)]
pub enum InfoError {
    /// The file cannot be opened, or is not a file or block device.
    #[error(transparent)]
    Open(CopyError),
    /// Reading the image failed.
    #[error("read error in {path} at byte {offset}")]
    Read {
        /// The image.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What `info` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Info {
    /// The file examined.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes allocated on disk (`st_blocks * 512`); `None` for a block device.
    pub allocated: Option<u64>,
    /// What it holds.
    pub content: Content,
}

/// What an image holds. Serialised with a `"type"` field naming the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Content {
    /// An ext2, ext3 or ext4 file system.
    Ext(ExtInfo),
    /// An ISO 9660 file system.
    Iso9660(IsoDetails),
    /// A GUID partition table.
    Gpt(GptInfo),
    /// An MBR partition table.
    Mbr(MbrInfo),
    /// Every byte is zero.
    Zero,
    /// Nothing recognised.
    Unknown,
}

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

/// An ISO 9660 volume, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IsoDetails {
    /// Volume identifier.
    pub volume_id: String,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Rock Ridge extensions present.
    pub rock_ridge: bool,
    /// Joliet supplementary volume descriptor present.
    pub joliet: bool,
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

/// Examines `path`.
pub fn info(path: &Path) -> Result<Info, InfoError> {
    let (source, size, kind) = open_source(path).map_err(InfoError::Open)?;
    let file = File::open(path).map_err(|e| {
        InfoError::Open(CopyError::Open {
            path: path.to_path_buf(),
            source: e,
        })
    })?;
    let allocated = if kind == "file" {
        file.metadata()
            .ok()
            .map(|m| crate::create::allocated_bytes(&m))
    } else {
        None
    };
    let reader = Reader {
        file: &file,
        path,
        size,
    };
    let content = detect(&reader, &source)?;
    Ok(Info {
        path: path.to_path_buf(),
        size,
        allocated,
        content,
    })
}

struct Reader<'a> {
    file: &'a File,
    path: &'a Path,
    size: u64,
}

impl Reader<'_> {
    /// Reads up to `len` bytes at `offset`; fewer (zero-filled) past the end.
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, InfoError> {
        let mut buf = vec![0u8; len];
        if offset >= self.size {
            return Ok(buf);
        }
        let want = (self.size - offset).min(len as u64) as usize;
        let mut got = 0;
        while got < want {
            match self.file.read_at(&mut buf[got..want], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(InfoError::Read {
                        path: self.path.to_path_buf(),
                        offset: offset + got as u64,
                        source,
                    })
                }
            }
        }
        Ok(buf)
    }
}

fn detect(r: &Reader<'_>, source: &dyn Source) -> Result<Content, InfoError> {
    let sb = r.read(1024, 1024)?;
    if let Some(ext) = parse_ext(&sb) {
        return Ok(Content::Ext(ext));
    }
    let vd = r.read(32768, 2048)?;
    if &vd[1..6] == b"CD001" {
        return Ok(Content::Iso9660(iso_details(r)?));
    }
    let lba0 = r.read(0, 512)?;
    let lba1 = r.read(512, 512)?;
    if let Some(mbr) = parse_mbr(&lba0) {
        if mbr.partitions.iter().any(|p| p.type_id == "0xee") && &lba1[..8] == b"EFI PART" {
            let lba = u64_le(&lba1, 72);
            let entries = u32_le(&lba1, 80);
            let entry_size = u32_le(&lba1, 84) as usize;
            let table_len = (entries as usize).saturating_mul(entry_size).min(1 << 20);
            let table = r.read(lba.saturating_mul(512), table_len)?;
            return Ok(Content::Gpt(parse_gpt(&lba1, &table)));
        }
        return Ok(Content::Mbr(mbr));
    }
    if all_zero(r, source)? {
        return Ok(Content::Zero);
    }
    Ok(Content::Unknown)
}

fn u16_le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
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

fn iso_details(r: &Reader<'_>) -> Result<IsoDetails, InfoError> {
    let mut file = r.file;
    // A damaged image can make the full reader give up: fall back to the descriptors.
    let probed = crate::iso::probe(&mut file).unwrap_or_else(|e| {
        debug!("ISO 9660 probe failed, decoding the volume descriptors only: {e}");
        None
    });
    if let Some(p) = probed {
        return Ok(IsoDetails {
            volume_id: p.volume_id,
            volume_size: p.volume_size,
            rock_ridge: p.rock_ridge,
            joliet: p.joliet,
        });
    }
    // The reader's own decoding, for images `iso::probe` does not describe.
    let mut details = IsoDetails {
        volume_id: String::new(),
        volume_size: 0,
        rock_ridge: false,
        joliet: false,
    };
    for n in 16..64u64 {
        let vd = r.read(n * 2048, 2048)?;
        if &vd[1..6] != b"CD001" || vd[0] == 255 {
            break;
        }
        match vd[0] {
            1 => {
                details.volume_id = String::from_utf8_lossy(&vd[40..72]).trim_end().to_string();
                let block = u64::from(u16_le(&vd, 128));
                details.volume_size = u64::from(u32_le(&vd, 80)) * block;
                // Rock Ridge: the root's "." record starts its system use area with "SP".
                let root = &vd[156..190];
                let extent = u64::from(u32_le(root, 2));
                let dot = r.read(extent * block, 256)?;
                let len = usize::from(dot[0]);
                let name_len = usize::from(dot[32]);
                let su = 33 + name_len + usize::from(name_len % 2 == 0);
                if len >= su + 7 && len <= dot.len() {
                    let area = &dot[su..len];
                    details.rock_ridge = &area[..2] == b"SP" && area[4] == 0xBE && area[5] == 0xEF;
                }
            }
            2 => {
                let esc = &vd[88..91];
                details.joliet |= matches!(esc, b"%/@" | b"%/C" | b"%/E");
            }
            _ => {}
        }
    }
    Ok(details)
}

fn all_zero(r: &Reader<'_>, source: &dyn Source) -> Result<bool, InfoError> {
    let mut zero = true;
    let result = crate::copy::walk_data(
        source,
        r.path,
        r.size,
        &ProgressBar::hidden(),
        |_, c, hole| {
            if !hole && !crate::copy::is_zero(c) {
                zero = false;
            }
            Ok(zero)
        },
    );
    match result {
        Ok(()) => Ok(zero),
        Err(CopyError::Read {
            path,
            offset,
            source,
        }) => Err(InfoError::Read {
            path,
            offset,
            source,
        }),
        Err(e) => Err(InfoError::Open(e)),
    }
}

/// The human form: a few aligned `key  value` lines.
pub fn describe(info: &Info) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(out, "{:<13}{v}", format!("{k}:"));
    };
    line("file", info.path.display().to_string());
    line(
        "size",
        format!("{} ({} bytes)", Size(info.size).human(), info.size),
    );
    if let Some(a) = info.allocated {
        line("allocated", format!("{} ({a} bytes)", Size(a).human()));
    }
    match &info.content {
        Content::Ext(e) => {
            line("holds", format!("{} file system", e.version));
            line(
                "label",
                if e.label.is_empty() {
                    "(none)".to_string()
                } else {
                    e.label.clone()
                },
            );
            line("uuid", e.uuid.clone());
            line("block size", e.block_size.to_string());
            line(
                "blocks",
                format!(
                    "{} ({} used, {} free)",
                    e.blocks,
                    e.blocks.saturating_sub(e.free_blocks),
                    e.free_blocks
                ),
            );
            line(
                "inodes",
                format!(
                    "{} ({} used, {} free)",
                    e.inodes,
                    e.inodes.saturating_sub(e.free_inodes),
                    e.free_inodes
                ),
            );
            if !e.features.is_empty() {
                line("features", e.features.join(" "));
            }
        }
        Content::Iso9660(i) => {
            line("holds", "ISO 9660 file system".to_string());
            line("volume id", i.volume_id.clone());
            line(
                "volume size",
                format!("{} ({} bytes)", Size(i.volume_size).human(), i.volume_size),
            );
            let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
            line("rock ridge", yes(i.rock_ridge));
            line("joliet", yes(i.joliet));
        }
        Content::Gpt(g) => {
            line("holds", "GPT partition table".to_string());
            line("disk guid", g.disk_guid.clone());
            line(
                "partitions",
                format!("{} of {} entries used", g.partitions.len(), g.entries),
            );
            for p in &g.partitions {
                line(
                    &format!("  {}", p.number),
                    format!(
                        "sectors {}..={} type {} {:?}",
                        p.first_lba, p.last_lba, p.type_guid, p.name
                    ),
                );
            }
        }
        Content::Mbr(m) => {
            line("holds", "MBR partition table".to_string());
            line("partitions", m.partitions.len().to_string());
            for p in &m.partitions {
                line(
                    &format!("  {}", p.number),
                    format!(
                        "start {} sectors {} type {} ({}){}",
                        p.start_sector,
                        p.sectors,
                        p.type_id,
                        p.type_name,
                        if p.bootable { " bootable" } else { "" }
                    ),
                );
            }
        }
        Content::Zero => line("holds", "nothing: every byte is zero".to_string()),
        Content::Unknown => line("holds", "unknown content".to_string()),
    }
    out
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
