//! What a guest sees in the virtual disk, recognised from the bytes `decode` understands:
//! ext2/3/4, ISO 9660, a GUID or MBR partition table, all zero, or unknown.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use indicatif::ProgressBar;
use serde::Serialize;

use super::decode::{gpt_table, parse_ext, parse_gpt, parse_mbr, ExtInfo, GptInfo, MbrInfo};
use super::error::InfoError;
use crate::input::{is_zero, read_full_at, walk_data, ReadFailure, Source};
use crate::iso::IsoInfo;

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

/// What the `size` bytes of `source` (named `path` in errors) hold.
pub(super) fn content_of(
    source: &dyn Source,
    path: &Path,
    size: u64,
) -> Result<Content, InfoError> {
    detect(&Reader { source, path, size })
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
