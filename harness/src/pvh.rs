//! Direct (PVH) boot: the uncompressed kernel, extracted once on the host from the
//! distribution's bzImage, so that a guest under TCG does not spend seconds in the
//! real-mode set-up code and the decompressor. QEMU boots an ELF `vmlinux` through its PVH
//! entry point when the kernel carries the Xen PHYS32_ENTRY note (`CONFIG_PVH=y`); for any
//! kernel without it, or with a payload format we cannot unpack, the bzImage is used as is.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Errors of extracting a vmlinux.
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// The file is not a bzImage with a payload.
    #[error("not a bzImage: {0}")]
    NotBzImage(&'static str),
    /// The payload's compression is unknown or corrupt.
    #[error("cannot decompress the kernel payload: {0}")]
    Decompress(String),
    /// The decompressed kernel has no PVH entry note.
    #[error("the kernel has no PVH entry point (CONFIG_PVH is off)")]
    NoPvh,
    /// Reading or writing a file failed.
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
}

fn u32_at(d: &[u8], o: usize) -> Option<u32> {
    d.get(o..o + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The compressed payload of a bzImage (boot protocol 2.08+).
pub fn payload(bz: &[u8]) -> Result<&[u8], PvhError> {
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        return Err(PvhError::NotBzImage("no HdrS signature"));
    }
    let setup_sects = match bz.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => usize::from(n),
        None => return Err(PvhError::NotBzImage("truncated")),
    };
    let pm_start = (setup_sects + 1) * 512;
    let off = u32_at(bz, 0x248).ok_or(PvhError::NotBzImage("truncated"))? as usize;
    let len = u32_at(bz, 0x24c).ok_or(PvhError::NotBzImage("truncated"))? as usize;
    bz.get(pm_start + off..pm_start + off + len)
        .filter(|p| !p.is_empty())
        .ok_or(PvhError::NotBzImage("payload outside the file"))
}

/// The Linux "legacy" LZ4 format the kernel's decompressor reads: a magic number, then
/// blocks each preceded by its compressed length, each at most 8 MiB uncompressed.
pub fn unlz4_legacy(mut data: &[u8]) -> Result<Vec<u8>, PvhError> {
    const MAGIC: u32 = 0x184C_2102;
    const BLOCK: usize = 8 << 20;
    let bad = |s: &str| PvhError::Decompress(format!("lz4: {s}"));
    if u32_at(data, 0) != Some(MAGIC) {
        return Err(bad("no legacy magic"));
    }
    data = &data[4..];
    let mut out = Vec::new();
    while data.len() >= 4 {
        let n = u32_at(data, 0).unwrap_or(0) as usize;
        if n == MAGIC as usize {
            data = &data[4..];
            continue;
        }
        if n == 0 || n > data.len() - 4 {
            // The trailing 4 bytes are the kernel's appended uncompressed size.
            break;
        }
        let block =
            lz4_flex::block::decompress(&data[4..4 + n], BLOCK).map_err(|e| bad(&e.to_string()))?;
        out.extend_from_slice(&block);
        data = &data[4 + n..];
    }
    if out.is_empty() {
        return Err(bad("no blocks"));
    }
    Ok(out)
}

/// Decompresses a payload by its magic number (LZ4 legacy, zstd, xz, gzip) or returns it
/// when it is already an ELF file.
pub fn decompress(p: &[u8]) -> Result<Vec<u8>, PvhError> {
    let err = |e: String| PvhError::Decompress(e);
    if p.starts_with(b"\x7fELF") {
        return Ok(p.to_vec());
    }
    if p.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
        return unlz4_legacy(p);
    }
    let mut out = Vec::new();
    if p.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut d = ruzstd::decoding::StreamingDecoder::new(p).map_err(|e| err(e.to_string()))?;
        // The kernel appends its size after the frame; read what the frame holds.
        let _ = d.read_to_end(&mut out);
    } else if p.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        lzma_rs::xz_decompress(&mut &p[..], &mut out).map_err(|e| err(e.to_string()))?;
    } else if p.starts_with(&[0x1f, 0x8b]) {
        let _ = flate2::read::GzDecoder::new(p).read_to_end(&mut out);
    } else {
        return Err(err(format!(
            "unknown payload format {:02x?}",
            &p[..p.len().min(4)]
        )));
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(err("the payload did not decompress to an ELF file".into()));
    }
    Ok(out)
}

/// Whether an ELF64 file has a `Xen` note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY).
pub fn has_pvh_note(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8).map_or(0, |b| {
            u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize
        })
    };
    if !elf.starts_with(b"\x7fELF") || elf.get(4) != Some(&2) {
        return false;
    }
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(elf, ph) != Some(4) {
            continue;
        }
        let (off, size) = (u64_at(ph + 8), u64_at(ph + 32));
        let Some(mut notes) = elf.get(off..off + size) else {
            continue;
        };
        while notes.len() >= 12 {
            let namesz = u32_at(notes, 0).unwrap_or(0) as usize;
            let descsz = u32_at(notes, 4).unwrap_or(0) as usize;
            let kind = u32_at(notes, 8).unwrap_or(0);
            let name = notes.get(12..12 + namesz).unwrap_or(&[]);
            if kind == 18 && name.starts_with(b"Xen") {
                return true;
            }
            let next = 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
            if next > notes.len() {
                break;
            }
            notes = &notes[next..];
        }
    }
    false
}

/// Extracts the PVH-bootable vmlinux of `bzimage` into `out` (once; later calls reuse it).
pub fn extract(bzimage: &Path, out: &Path) -> Result<(), PvhError> {
    if out.is_file() {
        return Ok(());
    }
    let bz = std::fs::read(bzimage).map_err(|e| PvhError::Io(bzimage.to_path_buf(), e))?;
    let elf = decompress(payload(&bz)?)?;
    if !has_pvh_note(&elf) {
        return Err(PvhError::NoPvh);
    }
    crate::kernel::publish(out, &elf).map_err(|e| PvhError::Io(out.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_legacy_round_trip() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let block = lz4_flex::block::compress(&data);
        let mut f = 0x184C_2102u32.to_le_bytes().to_vec();
        f.extend_from_slice(&(block.len() as u32).to_le_bytes());
        f.extend_from_slice(&block);
        f.extend_from_slice(&(data.len() as u32).to_le_bytes());
        assert_eq!(unlz4_legacy(&f).unwrap(), data);
    }

    #[test]
    fn rejects_non_kernels() {
        assert!(payload(b"not a kernel").is_err());
        assert!(decompress(b"zzzz").is_err());
        assert!(!has_pvh_note(b"\x7fELF"));
    }

    #[test]
    fn finds_the_pvh_note_in_a_built_elf() {
        // An ELF64 header with one PT_NOTE segment holding a Xen note of type 18.
        let mut e = vec![0u8; 0x40 + 0x38];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let note_off = e.len();
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&18u32.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x100_0000u32.to_le_bytes());
        e[0x40..0x44].copy_from_slice(&4u32.to_le_bytes());
        e[0x48..0x50].copy_from_slice(&(note_off as u64).to_le_bytes());
        e[0x60..0x68].copy_from_slice(&(note.len() as u64).to_le_bytes());
        e.extend_from_slice(&note);
        assert!(has_pvh_note(&e));
        e[note_off + 8] = 17;
        assert!(!has_pvh_note(&e));
    }
}
