//! `vloop-image info`: what an image file (or block device) holds.
//!
//! Recognised, in this order:
//! - ext2/3/4: the superblock at byte 1024 (magic `0xEF53` at offset 56). ext3 is ext2 with
//!   a journal (`has_journal`); ext4 has any of `extents`, `64bit`, `flex_bg`.
//! - ISO 9660: `CD001` in the volume descriptor at byte 32768, described by
//!   [`crate::iso::probe`] (reading the image zero-filled past its end, so that a truncated
//!   image is still described).
//! - A GUID partition table (protective MBR entry `0xEE`, `EFI PART` at LBA 1) or an MBR
//!   partition table (`0x55AA` at byte 510, sane entries).
//! - All zero: every byte is zero (holes are skipped with `SEEK_DATA`, so a sparse image is
//!   checked in no time).
//! - Anything else is unknown.
//!
//! The structures are decoded by `decode` (pure: bytes in, description out); this module
//! reads the bytes they need.

mod decode;

use std::fmt::Write as _;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde::Serialize;
use thiserror::Error;

pub use self::decode::{
    gpt_table, parse_ext, parse_gpt, parse_mbr, ExtInfo, GptInfo, GptPartition, MbrInfo,
    MbrPartition,
};
use crate::input::{
    allocated_bytes, is_zero, open_source, read_full_at, walk_data, InputError, ReadFailure,
    Source, KIND_FILE,
};
use crate::iso::IsoInfo;
use crate::size::Size;

/// Errors from examining an image.
#[derive(Debug, Error)]
pub enum InfoError {
    /// The file cannot be opened, or is not a file or block device.
    #[error(transparent)]
    Open(#[from] InputError),
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
    /// A block device ended before its announced size.
    #[error("{path} ended at byte {offset}, before its size of {size} bytes")]
    Short {
        /// The image.
        path: PathBuf,
        /// Where it ended.
        offset: u64,
        /// The size it announced.
        size: u64,
    },
}

impl ReadFailure for InfoError {
    fn read(path: &Path, offset: u64, source: io::Error) -> Self {
        InfoError::Read {
            path: path.to_path_buf(),
            offset,
            source,
        }
    }

    fn short(path: &Path, offset: u64, size: u64) -> Self {
        InfoError::Short {
            path: path.to_path_buf(),
            offset,
            size,
        }
    }
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
    Iso9660(IsoInfo),
    /// A GUID partition table.
    Gpt(GptInfo),
    /// An MBR partition table.
    Mbr(MbrInfo),
    /// Every byte is zero.
    Zero,
    /// Nothing recognised.
    Unknown,
}

/// Examines `path`.
pub fn info(path: &Path) -> Result<Info, InfoError> {
    let (source, size, kind) = open_source(path)?;
    let allocated = if kind == KIND_FILE {
        source.file().metadata().ok().map(|m| allocated_bytes(&m))
    } else {
        None
    };
    let reader = Reader {
        source: &source,
        path,
        size,
    };
    let content = detect(&reader)?;
    Ok(Info {
        path: path.to_path_buf(),
        size,
        allocated,
        content,
    })
}

struct Reader<'a> {
    source: &'a dyn Source,
    path: &'a Path,
    size: u64,
}

impl Reader<'_> {
    /// Reads `len` bytes at `offset`, zero-filled past the end.
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, InfoError> {
        let mut buf = vec![0u8; len];
        if offset >= self.size {
            return Ok(buf);
        }
        let want = (self.size - offset).min(len as u64) as usize;
        read_full_at(self.source, &mut buf[..want], offset)
            .map_err(|(at, e)| InfoError::read(self.path, at, e))?;
        Ok(buf)
    }
}

/// The image as an endless stream, zero-filled past its end, for readers that expect
/// `Read + Seek`; the first read error is kept with its offset.
struct ZeroFilled<'a> {
    reader: &'a Reader<'a>,
    pos: u64,
    failed: Option<InfoError>,
}

impl Read for ZeroFilled<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.reader.read(self.pos, buf.len()) {
            Ok(bytes) => {
                buf.copy_from_slice(&bytes);
                self.pos = self.pos.saturating_add(buf.len() as u64);
                Ok(buf.len())
            }
            Err(e) => {
                let msg = e.to_string();
                self.failed.get_or_insert(e);
                Err(io::Error::other(msg))
            }
        }
    }
}

impl Seek for ZeroFilled<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.reader.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

fn detect(r: &Reader<'_>) -> Result<Content, InfoError> {
    let sb = r.read(1024, 1024)?;
    if let Some(ext) = parse_ext(&sb) {
        return Ok(Content::Ext(ext));
    }
    let vd = r.read(32768, 2048)?;
    if &vd[1..6] == b"CD001" {
        return Ok(Content::Iso9660(iso_info(r)?));
    }
    let lba0 = r.read(0, 512)?;
    let lba1 = r.read(512, 512)?;
    if let Some(mbr) = parse_mbr(&lba0) {
        if mbr.partitions.iter().any(|p| p.type_id == "0xee") && &lba1[..8] == b"EFI PART" {
            let (at, len) = gpt_table(&lba1);
            let table = r.read(at, len)?;
            return Ok(Content::Gpt(parse_gpt(&lba1, &table)));
        }
        return Ok(Content::Mbr(mbr));
    }
    if all_zero(r)? {
        return Ok(Content::Zero);
    }
    Ok(Content::Unknown)
}

/// The ISO 9660 reader's description of the volume; an empty one when its descriptors name
/// no primary volume.
fn iso_info(r: &Reader<'_>) -> Result<IsoInfo, InfoError> {
    let mut view = ZeroFilled {
        reader: r,
        pos: 0,
        failed: None,
    };
    match crate::iso::probe(&mut view) {
        Ok(Some(info)) => Ok(info),
        Ok(None) => Ok(IsoInfo {
            volume_id: String::new(),
            volume_size: 0,
            rock_ridge: false,
            joliet: false,
        }),
        Err(e) => Err(view
            .failed
            .unwrap_or_else(|| InfoError::read(r.path, 32768, e))),
    }
}

fn all_zero(r: &Reader<'_>) -> Result<bool, InfoError> {
    let mut zero = true;
    walk_data(
        r.source,
        r.path,
        r.size,
        &ProgressBar::hidden(),
        |_, c, hole| {
            if !hole && !is_zero(c) {
                zero = false;
            }
            Ok::<_, InfoError>(zero)
        },
    )?;
    Ok(zero)
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
