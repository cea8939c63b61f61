//! Rock Ridge (RRIP 1.12) over the System Use Sharing Protocol: the entries of one
//! record's system use areas (`NM`, `SL`, `PX`, `TF`, `CL`, `RE`, `CE` continuations)
//! collected into the fields the reader shows.

use super::record::{date17, date7, u32_le};

/// Rock Ridge fields collected from one record's system use entries.
#[derive(Default)]
pub(super) struct Susp {
    /// `NM`: the POSIX name.
    pub(super) name: Option<Vec<u8>>,
    /// `SL`: the symlink's target.
    pub(super) symlink: Option<Vec<u8>>,
    /// The symlink's last component continues in the next `SL` entry.
    sl_continues: bool,
    /// A separator is due before the next symlink component.
    sl_separator: bool,
    /// `PX`: mode, links, uid, gid.
    pub(super) px: Option<[u32; 4]>,
    /// `PX`: the file serial number.
    pub(super) ino: Option<u32>,
    /// `TF`: the modification time.
    pub(super) mtime: Option<i64>,
    /// `CL`: where a relocated directory lives.
    pub(super) child_link: Option<u32>,
    /// `RE`: this record is a relocated directory.
    pub(super) relocated: bool,
}

impl Susp {
    /// Reads one system use area; returns the continuation area `(block, offset, len)`.
    pub(super) fn area(&mut self, mut a: &[u8]) -> Option<(u32, u32, u32)> {
        let mut next = None;
        while a.len() >= 4 {
            let len = usize::from(a[2]);
            if len < 4 || len > a.len() {
                break;
            }
            let (sig, data) = (&a[0..2], &a[4..len]);
            match sig {
                b"CE" if data.len() >= 24 => {
                    let f = |at| u32_le(data, at).unwrap_or(0);
                    next = Some((f(0), f(8), f(16)));
                }
                b"NM" if !data.is_empty() => {
                    let name = self.name.get_or_insert_with(Vec::new);
                    match data[0] {
                        f if f & 0x02 != 0 => name.push(b'.'),
                        f if f & 0x04 != 0 => name.extend_from_slice(b".."),
                        _ => name.extend_from_slice(&data[1..]),
                    }
                }
                b"SL" if !data.is_empty() => self.symlink_entry(&data[1..]),
                b"PX" if data.len() >= 32 => {
                    let f = |at| u32_le(data, at).unwrap_or(0);
                    self.px = Some([f(0), f(8), f(16), f(24)]);
                    if data.len() >= 40 {
                        self.ino = Some(f(32));
                    }
                }
                b"TF" if !data.is_empty() => self.timestamps(data),
                b"CL" if data.len() >= 8 => self.child_link = u32_le(data, 0).ok(),
                b"RE" => self.relocated = true,
                b"ST" => break,
                _ => {}
            }
            a = &a[len..];
        }
        next
    }

    fn symlink_entry(&mut self, mut comps: &[u8]) {
        let target = self.symlink.get_or_insert_with(Vec::new);
        while comps.len() >= 2 {
            let (flags, len) = (comps[0], usize::from(comps[1]));
            let Some(content) = comps.get(2..2 + len) else {
                break;
            };
            if self.sl_separator && !self.sl_continues {
                target.push(b'/');
            }
            match flags {
                f if f & 0x02 != 0 => target.push(b'.'),
                f if f & 0x04 != 0 => target.extend_from_slice(b".."),
                f if f & 0x08 != 0 => target.push(b'/'),
                _ => target.extend_from_slice(content),
            }
            self.sl_continues = flags & 0x01 != 0;
            self.sl_separator = flags & 0x08 == 0;
            comps = &comps[2 + len..];
        }
    }

    fn timestamps(&mut self, data: &[u8]) {
        let flags = data[0];
        let size = if flags & 0x80 != 0 { 17 } else { 7 };
        let mut at = 1;
        // Order: creation, modify, access, attributes, backup, expiration, effective.
        for bit in 0..7 {
            if flags & (1 << bit) == 0 {
                continue;
            }
            let Some(stamp) = data.get(at..at + size) else {
                return;
            };
            if bit == 1 {
                self.mtime = if size == 7 {
                    date7(stamp)
                } else {
                    date17(stamp)
                };
            }
            at += size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_components_join() {
        let mut s = Susp::default();
        // Root, "usr", "li" continued by "b" in a second entry, "..".
        s.symlink_entry(&[0x08, 0, 0, 3, b'u', b's', b'r', 0x01, 2, b'l', b'i']);
        s.symlink_entry(&[0, 1, b'b', 0x04, 0]);
        assert_eq!(s.symlink.as_deref(), Some(&b"/usr/lib/.."[..]));
    }
}
