//! Volume descriptors (ECMA-119 8): the primary one, a Joliet supplementary one, the
//! terminator; and [`probe`], which says what an image is from them alone.

use std::io::{self, Read, Seek, SeekFrom};

use serde::Serialize;

use super::record::{bad, u16_le, u32_be, u32_le, Record, BLOCK};

/// The first volume descriptor's block.
const FIRST_DESCRIPTOR: u64 = 16;

/// Most descriptors read before giving up on finding the terminator.
const MAX_DESCRIPTORS: u64 = 64;

/// What the volume descriptors say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Primary volume identifier, trailing spaces removed.
    pub volume_id: String,
    /// Volume space size in logical blocks.
    pub blocks: u32,
    /// Logical block size.
    pub block_size: u16,
    /// Root directory `(block, length)` of the primary tree.
    pub(super) root: (u32, u32),
    /// Root directory `(block, length)` of the Joliet tree.
    pub(super) joliet_root: Option<(u32, u32)>,
    /// Primary path tables: `(L block, M block, size)`.
    pub(super) path_tables: (u32, u32, u32),
    /// Joliet path tables: `(L block, M block, size)`.
    pub(super) joliet_path_tables: Option<(u32, u32, u32)>,
}

impl Volume {
    /// Whether a Joliet supplementary volume descriptor is present.
    pub fn joliet(&self) -> bool {
        self.joliet_root.is_some()
    }
}

/// Path table locations of a volume descriptor: `(L block, M block, size)`.
fn path_tables(d: &[u8]) -> io::Result<(u32, u32, u32)> {
    Ok((u32_le(d, 140)?, u32_be(d, 148)?, u32_le(d, 132)?))
}

/// Reads the volume descriptors; `Ok(None)` when block 16 is not an ISO 9660 descriptor.
pub fn volume(r: &mut (impl Read + Seek)) -> io::Result<Option<Volume>> {
    let mut primary = None;
    let mut joliet_root = None;
    let mut joliet_path_tables = None;
    let mut sector = [0u8; BLOCK as usize];
    for n in 0..MAX_DESCRIPTORS {
        r.seek(SeekFrom::Start((FIRST_DESCRIPTOR + n) * BLOCK))?;
        if let Err(e) = r.read_exact(&mut sector) {
            if e.kind() == io::ErrorKind::UnexpectedEof && n == 0 {
                return Ok(None);
            }
            if e.kind() == io::ErrorKind::UnexpectedEof {
                break;
            }
            return Err(e);
        }
        if &sector[1..6] != b"CD001" {
            if n == 0 {
                return Ok(None);
            }
            break;
        }
        match sector[0] {
            1 if primary.is_none() => {
                let volume_id = String::from_utf8_lossy(&sector[40..72])
                    .trim_end_matches([' ', '\0'])
                    .to_owned();
                let blocks = u32_le(&sector, 80)?;
                let block_size = u16_le(&sector, 128)?;
                let root = (u32_le(&sector, 156 + 2)?, u32_le(&sector, 156 + 10)?);
                primary = Some(Volume {
                    volume_id,
                    blocks,
                    block_size,
                    root,
                    joliet_root: None,
                    path_tables: path_tables(&sector)?,
                    joliet_path_tables: None,
                });
            }
            2 if joliet_root.is_none() => {
                let esc = &sector[88..91];
                if esc == b"%/@" || esc == b"%/C" || esc == b"%/E" {
                    joliet_root = Some((u32_le(&sector, 156 + 2)?, u32_le(&sector, 156 + 10)?));
                    joliet_path_tables = Some(path_tables(&sector)?);
                }
            }
            255 => break,
            _ => {}
        }
    }
    Ok(primary.map(|v| Volume {
        joliet_root,
        joliet_path_tables,
        ..v
    }))
}

/// What `vloop-image info` shows about an ISO 9660 image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IsoInfo {
    /// Volume identifier from the primary volume descriptor.
    pub volume_id: String,
    /// Volume size in bytes (logical blocks × block size).
    pub volume_size: u64,
    /// Rock Ridge extensions are present.
    pub rock_ridge: bool,
    /// A Joliet supplementary volume descriptor is present.
    pub joliet: bool,
}

/// Looks for an ISO 9660 file system in `r`; `Ok(None)` when there is none.
///
/// Never panics on malformed input; a truncated or inconsistent image that still has a
/// primary volume descriptor is reported with what could be read.
pub fn probe(r: &mut (impl Read + Seek)) -> io::Result<Option<IsoInfo>> {
    let Some(vol) = volume(r)? else {
        return Ok(None);
    };
    // A damaged root directory still leaves a recognisable image.
    let rock_ridge = rock_ridge_skip(r, vol.root).unwrap_or(None).is_some();
    Ok(Some(IsoInfo {
        volume_id: vol.volume_id.clone(),
        volume_size: u64::from(vol.blocks) * u64::from(vol.block_size),
        rock_ridge,
        joliet: vol.joliet(),
    }))
}

/// The SUSP `SP` entry's skip count if the root's `.` record starts with one.
pub(super) fn rock_ridge_skip(
    r: &mut (impl Read + Seek),
    root: (u32, u32),
) -> io::Result<Option<u8>> {
    let mut sector = [0u8; BLOCK as usize];
    r.seek(SeekFrom::Start(u64::from(root.0) * BLOCK))?;
    r.read_exact(&mut sector)?;
    let rec = Record::parse(&sector)?.ok_or_else(|| bad("empty root directory"))?;
    let su = rec.system_use;
    // SUSP 5.3: "SP" at the start of the root's "." system use area.
    if su.len() >= 7 && &su[0..2] == b"SP" && su[2] == 7 && su[4] == 0xBE && su[5] == 0xEF {
        Ok(Some(su[6]))
    } else {
        Ok(None)
    }
}
