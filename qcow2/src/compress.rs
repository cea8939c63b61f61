//! Decompression of compressed clusters (pure: bytes in, one cluster out).
//!
//! QEMU writes a compressed cluster as raw deflate (window 4 KiB, no zlib header) or as one or
//! more zstd frames, and stores the sectors that hold it; the data may end anywhere in the last
//! sector, followed by the next cluster's data. Decompression must produce exactly one cluster:
//! the output buffer is the cluster, so a decompression bomb cannot allocate more, and a stream
//! that would produce more than a cluster is an error, as in QEMU's `qcow2_*_decompress`.
//! [`crate::chain`] calls [`decompress`] on its slow read path.

use flate2::{Decompress, FlushDecompress, Status};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use thiserror::Error;

use crate::header::Compression;

/// Largest zstd window accepted: more than any cluster QEMU writes (2 MiB) and the windows of
/// every zstd level, while bounding what a crafted frame header makes the decoder reserve.
pub const MAX_ZSTD_WINDOW: u64 = 8 << 20;

/// Errors decompressing a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CompressError {
    /// The deflate stream is invalid or ends before a whole cluster.
    #[error(
        "compressed cluster: invalid deflate data or fewer than {0} bytes; the image is corrupt"
    )]
    Deflate(usize),
    /// The zstd frames are invalid, end early or produce more than a cluster.
    #[error("compressed cluster: invalid zstd data ({0}); the image is corrupt")]
    Zstd(String),
    /// A zstd frame asks for a window beyond [`MAX_ZSTD_WINDOW`].
    #[error("compressed cluster: zstd window of {0} bytes exceeds the 8 MiB limit; the image is corrupt")]
    ZstdWindow(u64),
}

/// Decompresses `input` (the sectors holding one compressed cluster) into `out`, which must
/// be filled exactly.
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), CompressError> {
    match kind {
        Compression::Deflate => inflate(input, out),
        Compression::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), CompressError> {
    let mut d = Decompress::new(false);
    let status = d.decompress(input, out, FlushDecompress::Finish);
    let full = d.total_out() == out.len() as u64;
    match status {
        // BufError: the output filled before the input ended (the tail of the last sector).
        Ok(Status::StreamEnd | Status::BufError | Status::Ok) if full => Ok(()),
        _ => Err(CompressError::Deflate(out.len())),
    }
}

/// The window a zstd frame header at the start of `src` asks for (RFC 8878 section 3.1.1.1).
fn zstd_window(src: &[u8]) -> Result<u64, CompressError> {
    let bad = || CompressError::Zstd("truncated frame header".into());
    if src.len() < 5 {
        return Err(bad());
    }
    let descriptor = src[4];
    let single_segment = descriptor & 0x20 != 0;
    if !single_segment {
        let wd = src[5..].first().copied().ok_or_else(bad)?;
        let exp = u64::from(wd >> 3);
        let log = 10 + exp;
        let base = 1u64 << log;
        return Ok(base + (base / 8) * u64::from(wd & 7));
    }
    // Single segment: the window is the frame content size.
    let dict_bytes = [0usize, 1, 2, 4][usize::from(descriptor & 3)];
    let fcs_bytes = [1usize, 2, 4, 8][usize::from(descriptor >> 6)];
    let at = 5 + dict_bytes;
    let f = src.get(at..at + fcs_bytes).ok_or_else(bad)?;
    let mut v = [0u8; 8];
    v[..fcs_bytes].copy_from_slice(f);
    let size = u64::from_le_bytes(v);
    Ok(if fcs_bytes == 2 { size + 256 } else { size })
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), CompressError> {
    let err = |e: &dyn std::fmt::Display| CompressError::Zstd(e.to_string());
    let mut src = input;
    let mut pos = 0;
    let mut dec = FrameDecoder::new();
    while pos < out.len() {
        let window = zstd_window(src)?;
        if window > MAX_ZSTD_WINDOW {
            return Err(CompressError::ZstdWindow(window));
        }
        dec.reset(&mut src).map_err(|e| err(&e))?;
        loop {
            let left = out.len() - pos;
            let finished = dec
                .decode_blocks(&mut src, BlockDecodingStrategy::UptoBytes(left))
                .map_err(|e| err(&e))?;
            if !finished {
                // Only a finished frame drains all it decoded; one that is still going while
                // holding a cluster's worth is too long.
                if dec.can_collect() > left {
                    return Err(CompressError::Zstd("more than one cluster".into()));
                }
                continue;
            }
            if dec.can_collect() > left {
                return Err(CompressError::Zstd("more than one cluster".into()));
            }
            while pos < out.len() {
                let n = std::io::Read::read(&mut dec, &mut out[pos..]).map_err(|e| err(&e))?;
                if n == 0 {
                    break;
                }
                pos += n;
            }
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::write::DeflateEncoder;

    use super::*;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut e = DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn inflates_exactly_one_cluster_ignoring_trailing_bytes() {
        let data = pattern(65536);
        let mut c = deflate(&data);
        c.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 65536];
        decompress(Compression::Deflate, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_or_garbage_deflate_is_an_error() {
        let c = deflate(&pattern(1000));
        let mut out = vec![0u8; 4096];
        assert!(decompress(Compression::Deflate, &c, &mut out).is_err());
        assert!(decompress(Compression::Deflate, &[0xff; 64], &mut out).is_err());
        assert!(decompress(Compression::Deflate, &[], &mut out).is_err());
    }

    #[test]
    fn a_deflate_bomb_fills_one_cluster_only() {
        let c = deflate(&vec![0u8; 64 << 20]);
        let mut out = vec![1u8; 4096];
        decompress(Compression::Deflate, &c, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }

    /// A zstd frame of raw blocks: magic, descriptor (single segment, 4-byte content size).
    fn zstd_raw_frame(data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0xa0];
        f.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let chunks: Vec<&[u8]> = data.chunks(100_000).collect();
        for (i, c) in chunks.iter().enumerate() {
            let last = u32::from(i + 1 == chunks.len());
            let header = last | ((c.len() as u32) << 3);
            f.extend_from_slice(&header.to_le_bytes()[..3]);
            f.extend_from_slice(c);
        }
        f
    }

    /// A frame of RLE blocks, each `block` bytes of `byte`, `count` blocks, with a window.
    fn zstd_rle_frame(byte: u8, block: u32, count: usize, window_desc: u8) -> Vec<u8> {
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, window_desc];
        for i in 0..count {
            let last = u32::from(i + 1 == count);
            let header = last | (1 << 1) | (block << 3);
            f.extend_from_slice(&header.to_le_bytes()[..3]);
            f.push(byte);
        }
        f
    }

    #[test]
    fn unzstd_one_or_two_frames() {
        let data = pattern(65536);
        let mut c = zstd_raw_frame(&data);
        c.extend_from_slice(&[0u8; 100]);
        let mut out = vec![0u8; 65536];
        decompress(Compression::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
        let mut two = zstd_raw_frame(&data[..30000]);
        two.extend(zstd_raw_frame(&data[30000..]));
        let mut out = vec![0u8; 65536];
        decompress(Compression::Zstd, &two, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_bombs_and_huge_windows_are_refused() {
        // 1000 RLE blocks of 128 KiB each: 125 MiB from 4 KiB of input.
        let bomb = zstd_rle_frame(7, 128 << 10, 1000, 0x58);
        let mut out = vec![0u8; 65536];
        assert!(decompress(Compression::Zstd, &bomb, &mut out).is_err());
        // A window descriptor asking for 2 GiB.
        let huge = zstd_rle_frame(7, 1024, 64, 0xa8);
        assert_eq!(
            decompress(Compression::Zstd, &huge, &mut out),
            Err(CompressError::ZstdWindow(1 << 31))
        );
        // Too short.
        let short = zstd_raw_frame(&pattern(1000));
        assert!(decompress(Compression::Zstd, &short, &mut out).is_err());
        assert!(decompress(Compression::Zstd, &[1, 2], &mut out).is_err());
    }
}
