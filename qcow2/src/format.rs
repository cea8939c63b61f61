//! Image formats and format probing: pure functions over an image's first bytes.
//!
//! The chain ([`crate::chain`]) uses [`probe`] when a format is not given (the top image without
//! `--format`, a backing file without a backing-format header extension). Probing is what the
//! CVE-2008-2004 class of attacks abuses: a guest that owns a raw image writes a qcow2 header into
//! its first sector, and a later open that probes the image reads it as qcow2 whose "backing file"
//! is any host file. [`probed_raw_write`] is the defence QEMU uses: for an image that was *probed*
//! as raw, a write to the first sector must leave it probing as raw.

use std::fmt;

use thiserror::Error;

/// How many bytes [`probe`] looks at (one sector, as QEMU's probe of the first sector).
pub const PROBE_BYTES: usize = 512;

/// The image formats this crate reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// A plain file: virtual byte `n` is file byte `n`.
    Raw,
    /// QEMU's qcow2 format, version 2 or 3.
    Qcow2,
}

impl Format {
    /// The name QEMU uses for the format (`raw`, `qcow2`), as in a backing-format header
    /// extension or `qemu-img -f`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// The format QEMU names `name`, if this crate supports it.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why probing did not give a format this crate can open.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProbeError {
    /// The image starts like another image format that this crate does not read.
    #[error("the image looks like a {0} image, which is not supported (convert it with `qemu-img convert -O qcow2`, or name the format raw explicitly to serve its bytes as they are)")]
    Foreign(&'static str),
}

/// Why a write to an image probed as raw is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProbedRawWriteError {
    /// The write touches the first sector without covering it whole (offset not 0 or shorter
    /// than a sector), so the result cannot be checked from the write's data alone.
    #[error("a write to the first sector of an image probed as raw must cover the whole sector; name the format raw explicitly to lift this restriction")]
    PartialFirstSector,
    /// After the write, the image would probe as another format.
    #[error("the write would make the image, probed as raw, look like a {0} image; refused (name the format raw explicitly to allow it)")]
    WouldProbeAs(&'static str),
}

/// The qcow2 (and qcow) magic, "QFI\xfb".
pub const QCOW_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Format names and the magic strings they start with, for the formats QEMU probes by content.
const FOREIGN_PREFIXES: &[(&str, &[u8])] = &[
    ("QED", b"QED\0"),
    ("VMDK", b"KDMV"),
    ("VMDK", b"COWD"),
    ("VMDK", b"# Disk DescriptorFile"),
    ("VPC (VHD)", b"conectix"),
    ("VHDX", b"vhdxfile"),
    ("LUKS", b"LUKS\xba\xbe"),
    ("Parallels", b"WithoutFreeSpace"),
    ("Parallels", b"WithouFreSpacExt"),
    ("Bochs", b"Bochs Virtual HD Image"),
    ("cloop", b"#!/bin/sh\n#V2.0 Format\n"),
];

/// The VDI signature at byte 64, little-endian.
const VDI_SIGNATURE: u32 = 0xbeda_107f;

/// What `first` (the first [`PROBE_BYTES`] of an image, or all of a shorter one) looks like:
/// `Some(name)` for a format other than raw, `None` for raw.
fn probe_name(first: &[u8]) -> Option<&'static str> {
    if first.len() >= 8 && first[..4] == QCOW_MAGIC {
        let version = u32::from_be_bytes([first[4], first[5], first[6], first[7]]);
        return Some(if version >= 2 { "qcow2" } else { "qcow" });
    }
    for (name, prefix) in FOREIGN_PREFIXES {
        if first.starts_with(prefix) {
            return Some(name);
        }
    }
    if let Some(sig) = first.get(64..68) {
        if u32::from_le_bytes([sig[0], sig[1], sig[2], sig[3]]) == VDI_SIGNATURE {
            return Some("VDI");
        }
    }
    None
}

/// The format of an image whose first bytes are `first` (pass at least [`PROBE_BYTES`] bytes,
/// or the whole image if it is shorter). Anything that starts like no known format is raw.
pub fn probe(first: &[u8]) -> Result<Format, ProbeError> {
    let first = &first[..first.len().min(PROBE_BYTES)];
    match probe_name(first) {
        None => Ok(Format::Raw),
        Some("qcow2") => Ok(Format::Qcow2),
        Some(name) => Err(ProbeError::Foreign(name)),
    }
}

/// For an image whose format was *probed* as raw: whether a guest write at byte `offset`
/// whose data starts with `data` may go ahead (QEMU refuses such writes with EPERM).
///
/// Writes that start at or past [`PROBE_BYTES`] are always allowed. A write that touches the
/// first sector must start at 0 and carry at least a sector; its first sector must still
/// probe as raw. The caller must then write the very bytes it checked (copy the first sector
/// out of guest memory before calling, so the guest cannot change it in between).
pub fn probed_raw_write(offset: u64, data: &[u8]) -> Result<(), ProbedRawWriteError> {
    if offset >= PROBE_BYTES as u64 {
        return Ok(());
    }
    if offset != 0 || data.len() < PROBE_BYTES {
        return Err(ProbedRawWriteError::PartialFirstSector);
    }
    match probe_name(&data[..PROBE_BYTES]) {
        None => Ok(()),
        Some(name) => Err(ProbedRawWriteError::WouldProbeAs(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector_with(prefix: &[u8]) -> Vec<u8> {
        let mut s = vec![0u8; PROBE_BYTES];
        s[..prefix.len()].copy_from_slice(prefix);
        s
    }

    #[test]
    fn probes_qcow2_raw_and_foreign_formats() {
        assert_eq!(probe(&sector_with(b"QFI\xfb\0\0\0\x03")), Ok(Format::Qcow2));
        assert_eq!(probe(&sector_with(b"QFI\xfb\0\0\0\x02")), Ok(Format::Qcow2));
        assert_eq!(
            probe(&sector_with(b"QFI\xfb\0\0\0\x01")),
            Err(ProbeError::Foreign("qcow"))
        );
        assert_eq!(
            probe(&sector_with(b"conectix")),
            Err(ProbeError::Foreign("VPC (VHD)"))
        );
        assert_eq!(probe(&[0u8; 512]), Ok(Format::Raw));
        assert_eq!(probe(b"QF"), Ok(Format::Raw));
        assert_eq!(probe(&[]), Ok(Format::Raw));
        let mut vdi = vec![0u8; 512];
        vdi[64..68].copy_from_slice(&VDI_SIGNATURE.to_le_bytes());
        assert_eq!(probe(&vdi), Err(ProbeError::Foreign("VDI")));
    }

    #[test]
    fn probed_raw_guard_refuses_a_qcow2_header_in_sector_zero() {
        let header = sector_with(b"QFI\xfb\0\0\0\x03");
        assert_eq!(
            probed_raw_write(0, &header),
            Err(ProbedRawWriteError::WouldProbeAs("qcow2"))
        );
        assert_eq!(probed_raw_write(0, &[0u8; 4096]), Ok(()));
        assert_eq!(
            probed_raw_write(0, &[0u8; 100]),
            Err(ProbedRawWriteError::PartialFirstSector)
        );
        assert_eq!(
            probed_raw_write(8, &[0u8; 512]),
            Err(ProbedRawWriteError::PartialFirstSector)
        );
        assert_eq!(probed_raw_write(512, &header), Ok(()));
    }

    #[test]
    fn names_round_trip() {
        for f in [Format::Raw, Format::Qcow2] {
            assert_eq!(Format::from_name(f.name()), Some(f));
        }
        assert_eq!(Format::from_name("vmdk"), None);
    }
}
