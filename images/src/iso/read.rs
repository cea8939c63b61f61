//! A small ISO 9660 reader: volume descriptors, directories, Rock Ridge and Joliet.
//!
//! It shares no code with the writer, so tests can check written images against it, and
//! `vloop-image info` uses it to recognise images. Every field read from the image is
//! bounds-checked: malformed input gives an [`io::ErrorKind::InvalidData`] error, never a
//! panic. It understands what Linux isofs reads: Rock Ridge `SP`/`CE`/`NM`/`SL`/`PX`/`TF`
//! and relocated directories (`CL`/`RE`), multi-extent files, and Joliet names.

use std::collections::HashSet;
use std::io::{self, Read, Seek, SeekFrom, Write};

/// ISO 9660 logical block size (the only one in use).
pub const BLOCK: u64 = 2048;

/// The first volume descriptor's block.
const FIRST_DESCRIPTOR: u64 = 16;

/// Most descriptors read before giving up on finding the terminator.
const MAX_DESCRIPTORS: u64 = 64;

/// Largest directory read (a directory of 1000 long-named entries takes well under 1 MiB).
const MAX_DIR_BYTES: u64 = 64 << 20;

/// Most continuation areas followed for one record.
const MAX_CONTINUATIONS: usize = 32;

/// Deepest directory [`IsoReader::walk`] descends into.
const MAX_DEPTH: usize = 1024;

/// Which directory tree to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// The primary tree with Rock Ridge names and attributes (plain names when absent).
    RockRidge,
    /// The Joliet tree.
    Joliet,
    /// The primary tree, ignoring Rock Ridge.
    Primary,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (Rock Ridge `SL`) and its target.
    Symlink(Vec<u8>),
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Name: Rock Ridge `NM`, Joliet UCS-2 (as UTF-8), or the ISO name without `;1`.
    pub name: Vec<u8>,
    /// File, directory or symlink.
    pub kind: Kind,
    /// `(block, length)` of each extent, in file order.
    pub extents: Vec<(u32, u32)>,
    /// Total length in bytes.
    pub size: u64,
    /// Rock Ridge `PX`: `st_mode` (type and permission bits).
    pub mode: Option<u32>,
    /// Rock Ridge `PX`: link count.
    pub nlink: Option<u32>,
    /// Rock Ridge `PX`: owner.
    pub uid: Option<u32>,
    /// Rock Ridge `PX`: group.
    pub gid: Option<u32>,
    /// Rock Ridge `PX`: file serial number (RRIP 1.12).
    pub ino: Option<u32>,
    /// Modification time: Rock Ridge `TF` if present, else the record's date.
    pub mtime: Option<i64>,
}

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
    root: (u32, u32),
    /// Root directory `(block, length)` of the Joliet tree.
    joliet_root: Option<(u32, u32)>,
    /// Primary path tables: `(L block, M block, size)`.
    path_tables: (u32, u32, u32),
    /// Joliet path tables: `(L block, M block, size)`.
    joliet_path_tables: Option<(u32, u32, u32)>,
}

/// One path table record (ECMA-119 9.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRecord {
    /// Directory identifier as stored (`[0]` for the root; UCS-2BE in Joliet).
    pub name: Vec<u8>,
    /// First block of the directory.
    pub extent: u32,
    /// Number (1-based) of the parent directory's record.
    pub parent: u16,
}

impl Volume {
    /// Whether a Joliet supplementary volume descriptor is present.
    pub fn joliet(&self) -> bool {
        self.joliet_root.is_some()
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("ISO 9660: {msg}"))
}

fn u32_le(b: &[u8], at: usize) -> io::Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| bad("field past the end of its structure"))
}

fn u32_be(b: &[u8], at: usize) -> io::Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| bad("field past the end of its structure"))
}

/// Path table locations of a volume descriptor: `(L block, M block, size)`.
fn path_tables(d: &[u8]) -> io::Result<(u32, u32, u32)> {
    Ok((u32_le(d, 140)?, u32_be(d, 148)?, u32_le(d, 132)?))
}

fn u16_le(b: &[u8], at: usize) -> io::Result<u16> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| bad("field past the end of its structure"))
}

/// The records of a directory's bytes in on-disk order, without `.` and `..`; zero padding
/// up to the end of a block is skipped. Ends after the first record that does not parse.
fn records(bytes: &[u8]) -> impl Iterator<Item = io::Result<Record<'_>>> {
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

/// What [`super::probe`] returns.
pub fn probe(r: &mut (impl Read + Seek)) -> io::Result<Option<super::IsoInfo>> {
    let Some(vol) = volume(r)? else {
        return Ok(None);
    };
    // A damaged root directory still leaves a recognisable image.
    let rock_ridge = rock_ridge_skip(r, vol.root).unwrap_or(None).is_some();
    Ok(Some(super::IsoInfo {
        volume_id: vol.volume_id.clone(),
        volume_size: u64::from(vol.blocks) * u64::from(vol.block_size),
        rock_ridge,
        joliet: vol.joliet(),
    }))
}

/// The SUSP `SP` entry's skip count if the root's `.` record starts with one.
fn rock_ridge_skip(r: &mut (impl Read + Seek), root: (u32, u32)) -> io::Result<Option<u8>> {
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

/// One directory record, borrowed from its directory's bytes.
struct Record<'a> {
    len: usize,
    extent: u32,
    size: u32,
    date: &'a [u8],
    flags: u8,
    name: &'a [u8],
    system_use: &'a [u8],
}

impl<'a> Record<'a> {
    /// The record at the start of `b`; `None` for a zero length byte (padding to the
    /// end of a block).
    fn parse(b: &'a [u8]) -> io::Result<Option<Self>> {
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

    fn is_dir(&self) -> bool {
        self.flags & 0x02 != 0
    }

    fn more_extents(&self) -> bool {
        self.flags & 0x80 != 0
    }

    fn is_dot_or_dotdot(&self) -> bool {
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
fn date7(b: &[u8]) -> Option<i64> {
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
fn date17(b: &[u8]) -> Option<i64> {
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

/// Rock Ridge fields collected from one record's system use entries.
#[derive(Default)]
struct Susp {
    name: Option<Vec<u8>>,
    symlink: Option<Vec<u8>>,
    /// The symlink's last component continues in the next `SL` entry.
    sl_continues: bool,
    /// A separator is due before the next symlink component.
    sl_separator: bool,
    px: Option<[u32; 4]>,
    ino: Option<u32>,
    mtime: Option<i64>,
    child_link: Option<u32>,
    relocated: bool,
}

impl Susp {
    /// Reads one system use area; returns the continuation area `(block, offset, len)`.
    fn area(&mut self, mut a: &[u8]) -> Option<(u32, u32, u32)> {
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

/// A reader over an image.
pub struct IsoReader<R> {
    r: R,
    volume: Volume,
    namespace: Namespace,
    /// SUSP skip count when Rock Ridge is read.
    skip: Option<u8>,
    /// Image length in bytes: nothing is read past it.
    len: u64,
}

impl<R: Read + Seek> IsoReader<R> {
    /// Opens `r`, reading `namespace` (falling back to plain names when Rock Ridge is
    /// absent; failing when Joliet is asked for and absent).
    pub fn open(mut r: R, namespace: Namespace) -> io::Result<Self> {
        let volume = volume(&mut r)?.ok_or_else(|| bad("no primary volume descriptor"))?;
        if volume.block_size as u64 != BLOCK {
            return Err(bad("logical block size other than 2048"));
        }
        if namespace == Namespace::Joliet && volume.joliet_root.is_none() {
            return Err(bad("no Joliet volume descriptor"));
        }
        let skip = match namespace {
            Namespace::RockRidge => rock_ridge_skip(&mut r, volume.root)?,
            _ => None,
        };
        let len = r.seek(SeekFrom::End(0))?;
        Ok(Self {
            r,
            volume,
            namespace,
            skip,
            len,
        })
    }

    /// Reads `len` bytes at block `block` (plus `offset`), refusing ranges past the
    /// image's end before allocating.
    fn read_at(&mut self, block: u32, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let start = u64::from(block) * BLOCK + offset;
        if start.saturating_add(len) > self.len {
            return Err(bad("extent past the end of the image"));
        }
        let mut bytes = vec![0u8; len as usize];
        self.r.seek(SeekFrom::Start(start))?;
        self.r.read_exact(&mut bytes)?;
        Ok(bytes)
    }

    /// The volume descriptors' contents.
    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// Whether Rock Ridge is being read.
    pub fn rock_ridge(&self) -> bool {
        self.skip.is_some()
    }

    /// The root directory.
    pub fn root(&mut self) -> io::Result<Entry> {
        let root = match self.namespace {
            Namespace::Joliet => self.volume.joliet_root.unwrap_or(self.volume.root),
            _ => self.volume.root,
        };
        self.dir_self(root.0, root.1, Vec::new())
    }

    /// A directory's own entry, from its `.` record.
    fn dir_self(&mut self, block: u32, len: u32, name: Vec<u8>) -> io::Result<Entry> {
        let mut sector = [0u8; BLOCK as usize];
        self.r.seek(SeekFrom::Start(u64::from(block) * BLOCK))?;
        self.r.read_exact(&mut sector)?;
        let rec = Record::parse(&sector)?.ok_or_else(|| bad("empty directory"))?;
        let (mut e, _) = self.entry(&rec, true)?;
        e.name = name;
        e.kind = Kind::Dir;
        e.extents = vec![(block, len.max(rec.size))];
        e.size = u64::from(len.max(rec.size));
        Ok(e)
    }

    fn susp(&mut self, rec: &Record<'_>, root_dot: bool) -> io::Result<Susp> {
        let mut s = Susp::default();
        let Some(skip) = self.skip else {
            return Ok(s);
        };
        let skip = if root_dot { 0 } else { usize::from(skip) };
        let mut next = s.area(rec.system_use.get(skip..).unwrap_or(&[]));
        let mut hops = 0;
        while let Some((block, offset, len)) = next {
            hops += 1;
            if hops > MAX_CONTINUATIONS || u64::from(offset) + u64::from(len) > BLOCK {
                return Err(bad("Rock Ridge continuation area out of range"));
            }
            let area = self.read_at(block, u64::from(offset), u64::from(len))?;
            next = s.area(&area);
        }
        Ok(s)
    }

    /// The entry for `rec`, and whether Rock Ridge marks it relocated (`RE`).
    fn entry(&mut self, rec: &Record<'_>, root_dot: bool) -> io::Result<(Entry, bool)> {
        let s = self.susp(rec, root_dot)?;
        let relocated = s.relocated;
        let name = match (self.namespace, s.name) {
            (_, Some(nm)) => nm,
            (Namespace::Joliet, None) => {
                let units: Vec<u16> = rec
                    .name
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                let name = String::from_utf16_lossy(&units);
                strip_version(name.as_bytes()).to_vec()
            }
            _ => {
                let n = strip_version(rec.name);
                n.strip_suffix(b".").unwrap_or(n).to_vec()
            }
        };
        let kind = match (&s.symlink, rec.is_dir() || s.child_link.is_some()) {
            (_, true) => Kind::Dir,
            (Some(t), false) => Kind::Symlink(t.clone()),
            (None, false) => Kind::File,
        };
        let [mode, nlink, uid, gid] = match s.px {
            Some(px) => px.map(Some),
            None => [None; 4],
        };
        let mut e = Entry {
            name,
            kind,
            extents: vec![(rec.extent, rec.size)],
            size: u64::from(rec.size),
            mode,
            nlink,
            uid,
            gid,
            ino: s.ino,
            mtime: s.mtime.or_else(|| date7(rec.date)),
        };
        if let Some(block) = s.child_link {
            // RRIP 4.1.5.1: the directory lives at the CL block; its "." record has the
            // length and the attributes.
            let mut sector = [0u8; BLOCK as usize];
            self.r.seek(SeekFrom::Start(u64::from(block) * BLOCK))?;
            self.r.read_exact(&mut sector)?;
            let dot = Record::parse(&sector)?.ok_or_else(|| bad("empty relocated directory"))?;
            let ds = self.susp(&dot, false)?;
            e.extents = vec![(block, dot.size)];
            e.size = u64::from(dot.size);
            if let Some([mode, nlink, uid, gid]) = ds.px {
                (e.mode, e.nlink, e.uid, e.gid) = (Some(mode), Some(nlink), Some(uid), Some(gid));
                e.ino = ds.ino;
            }
            e.mtime = ds.mtime.or(e.mtime);
        }
        Ok((e, relocated))
    }

    /// The entries of directory `dir` (without `.` and `..`; relocated directories
    /// appear where Rock Ridge says they belong).
    pub fn read_dir(&mut self, dir: &Entry) -> io::Result<Vec<Entry>> {
        if dir.kind != Kind::Dir {
            return Err(bad("not a directory"));
        }
        let bytes = self.dir_bytes(dir)?;
        let mut out: Vec<Entry> = Vec::new();
        // The entry whose last record said more extents follow.
        let mut open: Option<Entry> = None;
        for rec in records(&bytes) {
            let rec = rec?;
            if let Some(mut e) = open.take() {
                e.extents.push((rec.extent, rec.size));
                e.size += u64::from(rec.size);
                if rec.more_extents() {
                    open = Some(e);
                } else {
                    out.push(e);
                }
                continue;
            }
            let (e, relocated) = self.entry(&rec, false)?;
            // RE marks a relocated directory in rr_moved: it is listed where CL points.
            if relocated {
                continue;
            }
            if rec.more_extents() {
                open = Some(e);
            } else {
                out.push(e);
            }
        }
        if let Some(e) = open {
            out.push(e);
        }
        Ok(out)
    }

    /// The namespace's path table: the L (little-endian) copy, or the M (big-endian) one.
    pub fn path_table(&mut self, big_endian: bool) -> io::Result<Vec<PathRecord>> {
        let (l, m, size) = match self.namespace {
            Namespace::Joliet => self
                .volume
                .joliet_path_tables
                .ok_or_else(|| bad("no Joliet path table"))?,
            _ => self.volume.path_tables,
        };
        if u64::from(size) > MAX_DIR_BYTES {
            return Err(bad("path table too large"));
        }
        let block = if big_endian { m } else { l };
        let bytes = self.read_at(block, 0, u64::from(size))?;
        let mut out = Vec::new();
        let mut pos = 0;
        while pos + 8 <= bytes.len() {
            let name_len = usize::from(bytes[pos]);
            let end = pos + 8 + name_len;
            let Some(name) = bytes.get(pos + 8..end) else {
                return Err(bad("path table record past the end of the table"));
            };
            let f = &bytes[pos + 2..pos + 8];
            let (extent, parent) = if big_endian {
                (
                    u32::from_be_bytes([f[0], f[1], f[2], f[3]]),
                    u16::from_be_bytes([f[4], f[5]]),
                )
            } else {
                (
                    u32::from_le_bytes([f[0], f[1], f[2], f[3]]),
                    u16::from_le_bytes([f[4], f[5]]),
                )
            };
            out.push(PathRecord {
                name: name.to_vec(),
                extent,
                parent,
            });
            pos = end + name_len % 2;
        }
        Ok(out)
    }

    /// Raw identifiers of the records of directory `dir`, in on-disk order (without
    /// `.` and `..`), for checking the standard's sort order.
    pub fn raw_names(&mut self, dir: &Entry) -> io::Result<Vec<Vec<u8>>> {
        let bytes = self.dir_bytes(dir)?;
        records(&bytes)
            .map(|rec| rec.map(|rec| rec.name.to_vec()))
            .collect()
    }

    /// The bytes of directory `dir`'s first extent.
    fn dir_bytes(&mut self, dir: &Entry) -> io::Result<Vec<u8>> {
        let &(block, len) = dir
            .extents
            .first()
            .ok_or_else(|| bad("directory without extent"))?;
        if u64::from(len) > MAX_DIR_BYTES {
            return Err(bad("directory too large"));
        }
        self.read_at(block, 0, u64::from(len))
    }

    /// Copies a file's content to `out`; returns the bytes copied.
    pub fn read_file(&mut self, file: &Entry, out: &mut impl Write) -> io::Result<u64> {
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        for &(block, len) in &file.extents {
            let start = u64::from(block) * BLOCK;
            if start + u64::from(len) > self.len {
                return Err(bad("file extent past the end of the image"));
            }
            self.r.seek(SeekFrom::Start(start))?;
            let mut left = u64::from(len);
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                self.r.read_exact(&mut buf[..n])?;
                out.write_all(&buf[..n])?;
                left -= n as u64;
                total += n as u64;
            }
        }
        Ok(total)
    }

    /// Every entry below the root in depth-first pre-order, with `/`-separated paths
    /// relative to the root (entries in directory order).
    pub fn walk(&mut self) -> io::Result<Vec<(Vec<u8>, Entry)>> {
        let root = self.root()?;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        seen.insert(root.extents[0].0);
        self.walk_into(&root, &mut Vec::new(), 0, &mut seen, &mut out)?;
        Ok(out)
    }

    fn walk_into(
        &mut self,
        dir: &Entry,
        prefix: &mut Vec<u8>,
        depth: usize,
        seen: &mut HashSet<u32>,
        out: &mut Vec<(Vec<u8>, Entry)>,
    ) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(bad("directories nested too deep"));
        }
        for e in self.read_dir(dir)? {
            let len = prefix.len();
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(&e.name);
            let is_dir = e.kind == Kind::Dir;
            if is_dir && !seen.insert(e.extents[0].0) {
                return Err(bad("directory loop"));
            }
            out.push((prefix.clone(), e.clone()));
            if is_dir {
                self.walk_into(&e, prefix, depth + 1, seen, out)?;
            }
            prefix.truncate(len);
        }
        Ok(())
    }
}

/// `name` without its `;version` suffix.
fn strip_version(name: &[u8]) -> &[u8] {
    match name.iter().rposition(|&b| b == b';') {
        Some(i) => &name[..i],
        None => name,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

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
    fn symlink_components_join() {
        let mut s = Susp::default();
        // Root, "usr", "li" continued by "b" in a second entry, "..".
        s.symlink_entry(&[0x08, 0, 0, 3, b'u', b's', b'r', 0x01, 2, b'l', b'i']);
        s.symlink_entry(&[0, 1, b'b', 0x04, 0]);
        assert_eq!(s.symlink.as_deref(), Some(&b"/usr/lib/.."[..]));
    }

    #[test]
    fn garbage_is_not_an_image_and_never_panics() {
        assert_eq!(probe(&mut Cursor::new(vec![0u8; 100])).unwrap(), None);
        assert_eq!(probe(&mut Cursor::new(vec![0u8; 40_000])).unwrap(), None);
        // A descriptor that claims CD001 but points its root past the end.
        let mut img = vec![0u8; 17 * 2048];
        img[16 * 2048] = 1;
        img[16 * 2048 + 1..16 * 2048 + 6].copy_from_slice(b"CD001");
        img[16 * 2048 + 158..16 * 2048 + 162].copy_from_slice(&u32::MAX.to_le_bytes());
        let info = probe(&mut Cursor::new(img.clone())).unwrap().unwrap();
        assert!(!info.rock_ridge);
        assert!(IsoReader::open(Cursor::new(img), Namespace::RockRidge).is_err());
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
