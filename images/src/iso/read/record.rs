//! Directory records and the byte-level fields of ISO 9660 (ECMA-119 7 and 9): bounds-checked
//! little- and big-endian numbers, the records of a directory, dates, file identifiers.
//!
//! The bottom of the reader: pure functions over bytes that never panic on malformed input.

use std::io;

/// ISO 9660 logical block size (the only one in use).
pub const BLOCK: u64 = 2048;

pub(super) fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("ISO 9660: {msg}"))
}

pub(super) fn u32_le(b: &[u8], at: usize) -> io::Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| bad("field past the end of its structure"))
}

pub(super) fn u32_be(b: &[u8], at: usize) -> io::Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| bad("field past the end of its structure"))
}

pub(super) fn u16_le(b: &[u8], at: usize) -> io::Result<u16> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| bad("field past the end of its structure"))
}

/// The records of a directory's bytes in on-disk order, without `.` and `..`; zero padding
/// up to the end of a block is skipped. Ends after the first record that does not parse.
pub(super) fn records(bytes: &[u8]) -> impl Iterator<Item = io::Result<Record<'_>>> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        while pos < bytes.len() {
            match Record::parse(&bytes[pos..]) {
                Err(e) => {
                    pos = bytes.len();
                    return Some(Err(e));
                }
                // Padding up to the next block.
                Ok(None) => pos = (pos / BLOCK as usize + 1) * BLOCK as usize,
                Ok(Some(rec)) => {
                    pos += rec.len;
                    if !rec.is_dot_or_dotdot() {
                        return Some(Ok(rec));
                    }
                }
            }
        }
        None
    })
}

/// One directory record, borrowed from its directory's bytes.
pub(super) struct Record<'a> {
    /// Length of the record in bytes.
    pub(super) len: usize,
    /// First block of the extent.
    pub(super) extent: u32,
    /// Length of the extent in bytes.
    pub(super) size: u32,
    /// The 7-byte recording date.
    pub(super) date: &'a [u8],
    /// File flags (directory, multi-extent...).
    pub(super) flags: u8,
    /// File identifier as stored.
    pub(super) name: &'a [u8],
    /// The system use area (SUSP entries), after the identifier and its padding.
    pub(super) system_use: &'a [u8],
}

impl<'a> Record<'a> {
    /// The record at the start of `b`; `None` for a zero length byte (padding to the
    /// end of a block).
    pub(super) fn parse(b: &'a [u8]) -> io::Result<Option<Self>> {
        let Some(&len) = b.first() else {
            return Ok(None);
        };
        let len = usize::from(len);
        if len == 0 {
            return Ok(None);
        }
        if len < 34 || len > b.len() {
            return Err(bad("directory record length out of range"));
        }
        let b = &b[..len];
        let name_len = usize::from(b[32]);
        let name_end = 33 + name_len;
        if name_end > len {
            return Err(bad("directory record name past its end"));
        }
        let su_start = (name_end + usize::from(name_len % 2 == 0)).min(len);
        Ok(Some(Self {
            len,
            extent: u32_le(b, 2)?,
            size: u32_le(b, 10)?,
            date: &b[18..25],
            flags: b[25],
            name: &b[33..name_end],
            system_use: &b[su_start..],
        }))
    }

    pub(super) fn is_dir(&self) -> bool {
        self.flags & 0x02 != 0
    }

    pub(super) fn more_extents(&self) -> bool {
        self.flags & 0x80 != 0
    }

    pub(super) fn is_dot_or_dotdot(&self) -> bool {
        self.name == [0] || self.name == [1]
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A 7-byte directory record date (ECMA-119 9.1.5) as Unix seconds.
pub(super) fn date7(b: &[u8]) -> Option<i64> {
    let [y, mo, d, h, mi, s, off] = *b else {
        return None;
    };
    if mo == 0 {
        return None;
    }
    let days = days_from_civil(1900 + i64::from(y), i64::from(mo), i64::from(d));
    let local = days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(s);
    Some(local - i64::from(off as i8) * 15 * 60)
}

/// A 17-byte volume descriptor date (ECMA-119 8.4.26.1) as Unix seconds.
pub(super) fn date17(b: &[u8]) -> Option<i64> {
    if b.len() != 17 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        std::str::from_utf8(&b[r]).ok()?.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    if y == 0 || mo == 0 {
        return None;
    }
    let (h, mi, s) = (num(8..10)?, num(10..12)?, num(12..14)?);
    let local = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s;
    Some(local - i64::from(b[16] as i8) * 15 * 60)
}
/// `name` without its `;version` suffix.
pub(super) fn strip_version(name: &[u8]) -> &[u8] {
    match name.iter().rposition(|&b| b == b';') {
        Some(i) => &name[..i],
        None => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_decode() {
        // 2023-11-14 22:13:20 UTC = 1_700_000_000.
        assert_eq!(date7(&[123, 11, 14, 22, 13, 20, 0]), Some(1_700_000_000));
        // The same instant written at UTC+1 (offset 4 × 15 min).
        assert_eq!(date7(&[123, 11, 14, 23, 13, 20, 4]), Some(1_700_000_000));
        assert_eq!(date17(b"2023111422132000\0"), Some(1_700_000_000));
        assert_eq!(date7(&[0; 7]), None);
    }

    #[test]
    fn records_out_of_bounds_are_errors() {
        let mut rec = [0u8; 40];
        rec[0] = 80; // longer than the buffer
        assert!(Record::parse(&rec).is_err());
        rec[0] = 34;
        rec[32] = 10; // name past the end
        assert!(Record::parse(&rec).is_err());
        rec[32] = 1;
        let r = Record::parse(&rec).unwrap().unwrap();
        assert_eq!(r.system_use.len(), 0);
    }
}
