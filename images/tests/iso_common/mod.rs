//! Shared helpers for the ISO 9660 builder tests: the sample tree, and read-backs through
//! the crate's own reader that compare an image with the tree it was built from.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use vloop_images::iso::read::{IsoReader, Kind, Namespace};
use vloop_images::iso::{self, IsoOptions};
use vloop_images::tree::{self, NodeKind, Tree, TreeOptions};

/// Build timestamp for the tests: 2023-11-14 22:13:20 UTC.
pub const TS: i64 = 1_700_000_000;

/// Deterministic bytes (xorshift), so content mismatches cannot hide behind zeros.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn set_mtime(path: &Path, secs: i64) {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs as u64);
    File::open(path).unwrap().set_modified(t).unwrap();
}

pub const LONG_RR: &str = "a-name-that-is-much-longer-than-any-iso-9660-identifier-and-also-\
                       longer-than-joliet-allows-which-rock-ridge-keeps-whole.txt";
pub const JOLIET_A: &str = "joliet-truncation-test-0123456789-0123456789-0123456789-xx-first-one";
pub const JOLIET_B: &str = "joliet-truncation-test-0123456789-0123456789-0123456789-xx-second-one";

/// The tree the issue asks for: edge sizes, deep directories, long and non-ASCII names,
/// symlinks, hard links and a directory of 1000 entries.
pub fn sample(root: &Path) {
    let w = |p: &str, data: &[u8]| {
        let path = root.join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, data).unwrap();
    };
    w("empty", b"");
    w("one", b"1");
    w("sizes/4095", &pattern(4095, 1));
    w("sizes/4096", &pattern(4096, 2));
    w("sizes/4097", &pattern(4097, 3));
    w("sizes/2048", &pattern(2048, 4));
    w("big/three-mib.bin", &pattern(3 << 20, 5));
    w(LONG_RR, b"long name\n");
    w(JOLIET_A, b"A\n");
    w(JOLIET_B, b"B\n");
    w("Grüße/日本語の名前.txt", "non-ASCII\n".as_bytes());
    w("Same.TXT", b"upper\n");
    w("same.txt", b"lower\n");
    w("dots.in.the.name.tar.gz", b"dots\n");
    let deep = "d1/d2/d3/d4/d5/d6/d7/d8/d9/d10/d11/d12";
    w(&format!("{deep}/bottom.txt"), b"deep\n");
    w("d1/d2/d3/d4/d5/d6/d7/d8/at-eight.txt", b"eight\n");
    for i in 0..1000 {
        w(
            &format!("many/entry-{i:04}.dat"),
            format!("{i}\n").as_bytes(),
        );
    }
    fs::write(root.join("big/hard-a"), pattern(10_000, 6)).unwrap();
    fs::hard_link(root.join("big/hard-a"), root.join("hard-b")).unwrap();
    symlink("sizes/4096", root.join("link-rel")).unwrap();
    symlink("/usr/lib/../share/./doc", root.join("link-abs")).unwrap();
    symlink(format!("{deep}/bottom.txt"), root.join("link-deep")).unwrap();
    symlink(
        "x".repeat(250) + "/" + &"y".repeat(200),
        root.join("link-long-target"),
    )
    .unwrap();
    // Latin-1, not UTF-8: Rock Ridge keeps the bytes, Joliet gets replacement characters.
    fs::write(
        root.join(std::ffi::OsStr::from_bytes(b"latin1-\xe9t\xe9.txt")),
        b"latin1\n",
    )
    .unwrap();
    fs::create_dir(root.join("empty-dir")).unwrap();
    fs::set_permissions(root.join("one"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("empty-dir"), fs::Permissions::from_mode(0o1777)).unwrap();
    // Mtimes before the build timestamp are kept, the rest are clamped to it.
    set_mtime(&root.join("one"), 1_000_000_000);
    set_mtime(&root.join("sizes"), 1_200_000_000);
}

pub fn scan(dir: &Path) -> Tree {
    tree::scan(
        dir,
        &TreeOptions {
            keep_owners: false,
            timestamp: Some(TS),
        },
    )
    .unwrap()
}

pub fn sha256(path: &Path) -> String {
    let mut h = Sha256::new();
    std::io::copy(&mut File::open(path).unwrap(), &mut h).unwrap();
    hex::encode(h.finalize())
}

/// Relocation directory the builder adds for directories deeper than 8 levels.
pub const RR_MOVED: &[u8] = b".rr_moved";

/// Reads the image back through Rock Ridge and checks every entry against the tree:
/// names, kinds, modes, owners, link counts, mtimes, symlink targets and content.
pub fn check_rock_ridge(img: &Path, tree: &Tree) {
    let mut r = IsoReader::open(File::open(img).unwrap(), Namespace::RockRidge).unwrap();
    assert!(r.rock_ridge(), "Rock Ridge present");
    let got: BTreeMap<Vec<u8>, _> = r
        .walk()
        .unwrap()
        .into_iter()
        .filter(|(p, _)| p.as_slice() != RR_MOVED)
        .collect();
    let want: BTreeMap<Vec<u8>, usize> = tree.walk().into_iter().collect();
    fn names<V>(m: &BTreeMap<Vec<u8>, V>) -> Vec<String> {
        m.keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }
    assert_eq!(names(&got), names(&want), "paths in the image");

    // Hard links: same extent and same serial for every name of a node.
    /// Where a file's data is, and its serial number.
    type Place = (Vec<(u32, u32)>, Option<u32>);
    let mut extent_of: HashMap<usize, Place> = HashMap::new();
    let mut serials: HashMap<u32, usize> = HashMap::new();
    for (path, &id) in &want {
        let e = &got[path];
        let node = &tree.nodes[id];
        let p = String::from_utf8_lossy(path);
        let type_bits = match &node.kind {
            NodeKind::Dir { .. } => 0o040000,
            NodeKind::File { .. } => 0o100000,
            NodeKind::Symlink { .. } => 0o120000,
        };
        assert_eq!(e.mode, Some(type_bits | node.mode), "{p}: mode");
        assert_eq!(
            (e.uid, e.gid),
            (Some(node.uid), Some(node.gid)),
            "{p}: owner"
        );
        assert_eq!(e.nlink, Some(node.nlink), "{p}: links");
        assert_eq!(e.mtime, Some(node.mtime), "{p}: mtime");
        let ino = e
            .ino
            .unwrap_or_else(|| panic!("{p}: PX without serial number"));
        let owner = *serials.entry(ino).or_insert(id);
        assert_eq!(owner, id, "{p}: serial {ino} shared by different files");
        match &node.kind {
            NodeKind::Dir { .. } => assert_eq!(e.kind, Kind::Dir, "{p}"),
            NodeKind::Symlink { target } => {
                assert_eq!(e.kind, Kind::Symlink(target.clone()), "{p}")
            }
            NodeKind::File { source, size } => {
                assert_eq!(e.kind, Kind::File, "{p}");
                assert_eq!(e.size, *size, "{p}: size");
                let mut content = Vec::new();
                r.read_file(e, &mut content).unwrap();
                assert!(content == fs::read(source).unwrap(), "{p}: content differs");
                let here = (e.extents.clone(), e.ino);
                let first = extent_of.entry(id).or_insert_with(|| here.clone());
                if *size > 0 {
                    assert_eq!(*first, here, "{p}: hard links share the extent");
                }
            }
        }
    }
}

/// Reads the Joliet tree: the same paths with names cut to 64 UTF-16 units, unique per
/// directory, and the same content.
pub fn check_joliet(img: &Path, tree: &Tree) {
    let mut r = IsoReader::open(File::open(img).unwrap(), Namespace::Joliet).unwrap();
    let entries = r.walk().unwrap();
    let files = tree
        .walk()
        .into_iter()
        .filter(|(_, id)| !matches!(tree.nodes[*id].kind, NodeKind::Symlink { .. }))
        .count();
    let relocation = usize::from(entries.iter().any(|(p, _)| p.as_slice() == RR_MOVED));
    assert_eq!(entries.len(), files + relocation, "Joliet entry count");
    let mut seen = BTreeSet::new();
    for (path, e) in &entries {
        let name = std::str::from_utf8(&e.name).unwrap();
        assert!(
            name.encode_utf16().count() <= 64,
            "Joliet name too long: {name}"
        );
        assert!(seen.insert(path.clone()), "duplicate Joliet path {name}");
    }
    // UTF-8 names that fit are kept whole, and their content is the source's.
    for (path, id) in tree.walk() {
        let NodeKind::File { source, .. } = &tree.nodes[id].kind else {
            continue;
        };
        let fits = path
            .split(|&b| b == b'/')
            .all(|c| std::str::from_utf8(c).is_ok_and(|c| c.encode_utf16().count() <= 64));
        if !fits {
            continue;
        }
        let (_, e) = entries
            .iter()
            .find(|(p, _)| *p == path)
            .unwrap_or_else(|| panic!("{} missing from Joliet", String::from_utf8_lossy(&path)));
        let mut content = Vec::new();
        r.read_file(e, &mut content).unwrap();
        assert!(content == fs::read(source).unwrap());
    }
    for long in [JOLIET_A, JOLIET_B] {
        if tree
            .walk()
            .iter()
            .any(|(p, _)| p.as_slice() == long.as_bytes())
        {
            assert!(
                !seen.contains(long.as_bytes()),
                "a name over 64 characters is truncated in Joliet"
            );
        }
    }
}

pub fn build_sample() -> (tempfile::TempDir, Tree, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    sample(&src);
    let tree = scan(&src);
    let img = d.path().join("out.iso");
    let summary = iso::build(&tree, &img, &IsoOptions::default()).unwrap();
    assert_eq!(summary.size, fs::metadata(&img).unwrap().len());
    assert_eq!(summary.size % 2048, 0);
    (d, tree, img)
}
