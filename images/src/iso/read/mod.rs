//! A small ISO 9660 reader: volume descriptors, directories, Rock Ridge and Joliet.
//!
//! It shares no code with the writer, so tests can check written images against it, and
//! `vloop-image info` uses it to recognise images. Every field read from the image is
//! bounds-checked: malformed input gives an [`io::ErrorKind::InvalidData`] error, never a
//! panic. It understands what Linux isofs reads: Rock Ridge `SP`/`CE`/`NM`/`SL`/`PX`/`TF`
//! and relocated directories (`CL`/`RE`), multi-extent files, and Joliet names.
//!
//! Layers, bottom up: `record` (fields, directory records, dates), `susp` (Rock Ridge
//! entries), `volume` (volume descriptors, [`probe`]), then [`IsoReader`] here.

mod record;
mod susp;
mod volume;

use std::collections::HashSet;
use std::io::{self, Read, Seek, SeekFrom, Write};

pub use self::record::BLOCK;
use self::record::{bad, date7, records, strip_version, Record};
use self::susp::Susp;
use self::volume::rock_ridge_skip;
pub use self::volume::{probe, volume, IsoInfo, Volume};

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

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

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
}
