//! A reproducible newc ("070701") cpio writer, the format the Linux kernel unpacks as an
//! initramfs.
//!
//! Entries are kept in a sorted map and written in byte order of their paths, parents
//! created implicitly before children, with mtime 0, uid/gid 0, nlink 1 and inode numbers
//! counted from 1, so the same content always gives the same bytes. Several archives may be
//! concatenated: the kernel unpacks them in order.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// Errors of the cpio writer.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// A path was empty, absolute after normalisation, or contained `..` or a NUL byte.
    #[error("invalid path in archive: {0:?}")]
    BadPath(String),
    /// Writing the archive failed.
    #[error("writing the archive: {0}")]
    Io(#[from] io::Error),
}

/// The kind and content of one archive entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// An in-memory archive, written sorted by path.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

fn normalise(path: &str) -> Result<String, CpioError> {
    let p = path.trim_start_matches('/').trim_end_matches('/');
    if p.is_empty()
        || p.contains('\0')
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(CpioError::BadPath(path.to_string()));
    }
    Ok(p.to_string())
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn add_parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            self.entries
                .entry(path[..end].to_string())
                .or_insert(Node::Dir { mode: 0o755 });
            end += 1;
        }
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<(), CpioError> {
        let p = normalise(path)?;
        self.add_parents(&p);
        self.entries.insert(p, node);
        Ok(())
    }

    /// Adds a directory (permission bits `mode`).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        self.insert(
            path,
            Node::Dir {
                mode: mode & 0o7777,
            },
        )
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<(), CpioError> {
        self.insert(
            path,
            Node::File {
                mode: mode & 0o7777,
                data,
            },
        )
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.insert(
            path,
            Node::CharDev {
                mode: mode & 0o7777,
                major,
                minor,
            },
        )
    }

    /// Number of entries, implicit parent directories included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the archive has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the archive, trailer included.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<(), CpioError> {
        let mut ino = 0u32;
        for (path, node) in &self.entries {
            ino += 1;
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (S_IFDIR | mode, &[], (0, 0)),
                Node::File { mode, data } => (S_IFREG | mode, data, (0, 0)),
                Node::Symlink { target } => (S_IFLNK | 0o777, target.as_bytes(), (0, 0)),
                Node::CharDev { mode, major, minor } => (S_IFCHR | mode, &[], (*major, *minor)),
            };
            let nlink = if matches!(node, Node::Dir { .. }) {
                2
            } else {
                1
            };
            write_entry(&mut w, path, ino, mode, nlink, data, rdev)?;
        }
        write_entry(&mut w, "TRAILER!!!", 0, 0, 1, &[], (0, 0))?;
        Ok(())
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CpioError> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }
}

fn pad4<W: Write>(w: &mut W, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..pad])
}

fn write_entry<W: Write>(
    w: &mut W,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    data: &[u8],
    rdev: (u32, u32),
) -> Result<(), CpioError> {
    let size = u32::try_from(data.len())
        .map_err(|_| CpioError::BadPath(format!("{name}: file larger than 4 GiB")))?;
    let namesize =
        u32::try_from(name.len() + 1).map_err(|_| CpioError::BadPath(name.to_string()))?;
    let header = format!(
        "070701{ino:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{size:08X}{:08X}{:08X}{:08X}{:08X}{namesize:08X}{:08X}",
        0, 0, 0, 0, 0, rdev.0, rdev.1, 0
    );
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, header.len() + name.len() + 1)?;
    w.write_all(data)?;
    pad4(w, data.len())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal newc reader, enough to check what the writer produced.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, u32, Vec<u8>, u32)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&b[..6], b"070701", "magic at offset {off}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (ino, mode, mtime, size, rdevmaj, namesize) =
                (field(0), field(1), field(5), field(6), field(9), field(11));
            assert_eq!(mtime, 0);
            assert_eq!(field(2), 0, "uid");
            assert_eq!(field(3), 0, "gid");
            let name = String::from_utf8(b[110..110 + namesize as usize - 1].to_vec()).unwrap();
            let hdr = (110 + namesize as usize).div_ceil(4) * 4;
            let data = b[hdr..hdr + size as usize].to_vec();
            let total = hdr + (size as usize).div_ceil(4) * 4;
            off += total;
            assert_eq!(off % 4, 0);
            b = &b[total..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, ino, data, rdevmaj));
        }
    }

    #[test]
    fn writes_sorted_entries_with_parents_and_alignment() {
        let mut a = Archive::new();
        a.file("/bin/busybox", 0o755, b"abcde".to_vec()).unwrap();
        a.file("init", 0o755, vec![1, 2, 3]).unwrap();
        a.symlink("bin/sh", "busybox").unwrap();
        a.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let entries = parse(&a.to_bytes().unwrap());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "init"]
        );
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(entries[1].3, b"abcde");
        assert_eq!(entries[2].1, S_IFLNK | 0o777);
        assert_eq!(entries[2].3, b"busybox");
        assert_eq!(entries[4].1, S_IFCHR | 0o600);
        assert_eq!(entries[4].4, 5);
        let inos: Vec<u32> = entries.iter().map(|e| e.2).collect();
        assert_eq!(inos, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn is_reproducible_whatever_the_insertion_order() {
        let mut a = Archive::new();
        a.file("x/y", 0o644, vec![9; 7]).unwrap();
        a.file("a", 0o644, vec![]).unwrap();
        let mut b = Archive::new();
        b.file("a", 0o644, vec![]).unwrap();
        b.file("x/y", 0o644, vec![9; 7]).unwrap();
        assert_eq!(a.to_bytes().unwrap(), b.to_bytes().unwrap());
    }

    #[test]
    fn rejects_bad_paths() {
        let mut a = Archive::new();
        assert!(a.file("", 0o644, vec![]).is_err());
        assert!(a.file("a/../b", 0o644, vec![]).is_err());
        assert!(a.file("a//b", 0o644, vec![]).is_err());
    }

    #[test]
    fn unpacks_with_the_system_cpio_when_present() {
        let Ok(out) = std::process::Command::new("busybox").arg("true").output() else {
            vloop_frontend::skip::skip("busybox not installed");
            return;
        };
        if !out.status.success() {
            vloop_frontend::skip::skip("busybox not usable");
            return;
        }
        let mut a = Archive::new();
        a.file("d/e/f.txt", 0o640, b"hello\n".to_vec()).unwrap();
        a.symlink("d/l", "e/f.txt").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let arc = dir.path().join("a.cpio");
        std::fs::write(&arc, a.to_bytes().unwrap()).unwrap();
        let st = std::process::Command::new("busybox")
            .args(["cpio", "-i", "-d", "-F"])
            .arg(&arc)
            .current_dir(dir.path())
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(std::fs::read(dir.path().join("d/l")).unwrap(), b"hello\n");
    }
}
