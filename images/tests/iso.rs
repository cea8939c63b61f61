//! ISO 9660 builder: images read back by the crate's own reader, by xorriso and by
//! isoinfo, compared with the source folder; reproducibility; random trees.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::Seek;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sha2::{Digest, Sha256};
use vloop_images::iso::read::{IsoReader, Kind, Namespace};
use vloop_images::iso::{self, IsoError, IsoOptions};
use vloop_images::tree::{self, NodeKind, Tree, TreeOptions};

/// Build timestamp for the tests: 2023-11-14 22:13:20 UTC.
const TS: i64 = 1_700_000_000;

/// Deterministic bytes (xorshift), so content mismatches cannot hide behind zeros.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
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

fn set_mtime(path: &Path, secs: i64) {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs as u64);
    File::open(path).unwrap().set_modified(t).unwrap();
}

const LONG_RR: &str = "a-name-that-is-much-longer-than-any-iso-9660-identifier-and-also-\
                       longer-than-joliet-allows-which-rock-ridge-keeps-whole.txt";
const JOLIET_A: &str = "joliet-truncation-test-0123456789-0123456789-0123456789-xx-first-one";
const JOLIET_B: &str = "joliet-truncation-test-0123456789-0123456789-0123456789-xx-second-one";

/// The tree the issue asks for: edge sizes, deep directories, long and non-ASCII names,
/// symlinks, hard links and a directory of 1000 entries.
fn sample(root: &Path) {
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

fn scan(dir: &Path) -> Tree {
    tree::scan(
        dir,
        &TreeOptions {
            keep_owners: false,
            timestamp: Some(TS),
        },
    )
    .unwrap()
}

fn sha256(path: &Path) -> String {
    let mut h = Sha256::new();
    std::io::copy(&mut File::open(path).unwrap(), &mut h).unwrap();
    hex::encode(h.finalize())
}

/// Relocation directory the builder adds for directories deeper than 8 levels.
const RR_MOVED: &[u8] = b".rr_moved";

/// Reads the image back through Rock Ridge and checks every entry against the tree:
/// names, kinds, modes, owners, link counts, mtimes, symlink targets and content.
fn check_rock_ridge(img: &Path, tree: &Tree) {
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
fn check_joliet(img: &Path, tree: &Tree) {
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

fn build_sample() -> (tempfile::TempDir, Tree, PathBuf) {
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

#[test]
fn sample_tree_reads_back_through_rock_ridge_and_joliet() {
    let (_d, tree, img) = build_sample();
    check_rock_ridge(&img, &tree);
    check_joliet(&img, &tree);
    let info = iso::probe(&mut File::open(&img).unwrap()).unwrap().unwrap();
    assert_eq!(
        info,
        iso::IsoInfo {
            volume_id: "CDROM".into(),
            volume_size: fs::metadata(&img).unwrap().len(),
            rock_ridge: true,
            joliet: true,
        }
    );
}

#[test]
fn summary_counts_nodes_and_the_temp_file_is_gone() {
    let (d, tree, img) = build_sample();
    let s = iso::build(&tree, &img, &IsoOptions::default()).unwrap();
    let dirs = tree.nodes.iter().filter(|n| n.is_dir()).count() as u64;
    let files = tree
        .nodes
        .iter()
        .filter(|n| matches!(n.kind, NodeKind::File { .. }))
        .count() as u64;
    assert_eq!((s.files, s.directories), (files, dirs));
    let leftovers: Vec<_> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.as_bytes().ends_with(b".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn plain_iso_without_extensions() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("readme.txt"), b"plain\n").unwrap();
    symlink("readme.txt", src.join("link")).unwrap();
    let img = d.path().join("plain.iso");
    let opts = IsoOptions {
        volume_id: "PLAIN_1".into(),
        joliet: false,
        rock_ridge: false,
    };
    iso::build(&scan(&src), &img, &opts).unwrap();
    let info = iso::probe(&mut File::open(&img).unwrap()).unwrap().unwrap();
    assert_eq!(
        (info.volume_id.as_str(), info.rock_ridge, info.joliet),
        ("PLAIN_1", false, false)
    );
    let mut r = IsoReader::open(File::open(&img).unwrap(), Namespace::Primary).unwrap();
    let names: Vec<_> = r.walk().unwrap().into_iter().map(|(p, _)| p).collect();
    // The symlink is left out; the ISO name is upper case.
    assert_eq!(names, [b"README.TXT".to_vec()]);
}

#[test]
fn bad_volume_ids_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let t = scan(d.path());
    for bad in ["", "lower", "WITH SPACE", "A-B", &"X".repeat(33)] {
        let opts = IsoOptions {
            volume_id: bad.into(),
            ..IsoOptions::default()
        };
        let err = iso::build(&t, &d.path().join("x.iso"), &opts).unwrap_err();
        assert!(matches!(err, IsoError::BadVolumeId(_)), "{bad}: {err}");
        assert!(err.to_string().contains("A-Z, 0-9 and _"), "{err}");
    }
    assert!(!d.path().join("x.iso").exists());
}

#[test]
fn a_file_that_changed_is_a_clear_error_and_leaves_no_image() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"12345").unwrap();
    let t = scan(&src);
    fs::write(src.join("f"), b"123").unwrap();
    let img = d.path().join("x.iso");
    let err = iso::build(&t, &img, &IsoOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            IsoError::FileChanged {
                expected: 5,
                found: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(!img.exists());
    assert_eq!(
        fs::read_dir(d.path()).unwrap().count(),
        1,
        "no temp file left"
    );
}

/// ECMA-119 9.3 order key of a file identifier (`units`: bytes, or UCS-2 code units):
/// the name, then the extension, each padded with spaces; higher versions first.
fn order_key(units: &[u16]) -> (Vec<u16>, Vec<u16>, std::cmp::Reverse<Vec<u16>>) {
    let (base, version) = match units.iter().rposition(|&u| u == u16::from(b';')) {
        Some(i) => (&units[..i], units[i + 1..].to_vec()),
        None => (units, Vec::new()),
    };
    let (name, ext) = match base.iter().position(|&u| u == u16::from(b'.')) {
        Some(i) => (&base[..i], &base[i + 1..]),
        None => (base, &[][..]),
    };
    let pad = |v: &[u16]| {
        let mut v = v.to_vec();
        v.resize(256, u16::from(b' '));
        v
    };
    (pad(name), pad(ext), std::cmp::Reverse(version))
}

fn ucs2(raw: &[u8]) -> Vec<u16> {
    raw.chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

/// Path tables (L and M, primary and Joliet) list every directory with its extent and
/// parent, in the standard's order; directory records are sorted as ECMA-119 9.3 says.
#[test]
fn path_tables_and_record_order_follow_the_standard() {
    let (_d, _tree, img) = build_sample();
    for ns in [Namespace::Primary, Namespace::Joliet] {
        let mut r = IsoReader::open(File::open(&img).unwrap(), ns).unwrap();
        let units = |raw: &[u8]| -> Vec<u16> {
            if ns == Namespace::Joliet {
                ucs2(raw)
            } else {
                raw.iter().map(|&b| u16::from(b)).collect()
            }
        };
        let l = r.path_table(false).unwrap();
        assert_eq!(
            l,
            r.path_table(true).unwrap(),
            "{ns:?}: L and M path tables"
        );
        // Paths and levels from the table.
        let mut paths: Vec<(Vec<u16>, usize)> = Vec::new();
        for (i, rec) in l.iter().enumerate() {
            let parent = usize::from(rec.parent);
            assert!(
                parent >= 1 && parent <= i.max(1),
                "{ns:?}: parent of record {i}"
            );
            if i == 0 {
                assert_eq!(rec.name, [0], "root record");
                paths.push((Vec::new(), 0));
                continue;
            }
            let (ppath, plevel) = paths[parent - 1].clone();
            let mut path = ppath;
            if !path.is_empty() {
                path.push(u16::from(b'/'));
            }
            path.extend(units(&rec.name));
            paths.push((path, plevel + 1));
            // Order: by level, then parent number, then identifier.
            let prev = &l[i - 1];
            let key = |r: &vloop_images::iso::read::PathRecord| {
                let mut n = units(&r.name);
                n.resize(256, u16::from(b' '));
                n
            };
            if i > 1 {
                let (lp, lc) = (paths[i - 1].1, plevel + 1);
                assert!(
                    (lp, prev.parent, key(prev)) < (lc, rec.parent, key(rec)),
                    "{ns:?}: path table order at record {i}"
                );
            }
        }
        // The same directories, at the same places, as the directory tree.
        let root = r.root().unwrap();
        let mut want: BTreeSet<(Vec<u16>, u32)> = BTreeSet::new();
        want.insert((Vec::new(), root.extents[0].0));
        for (path, e) in r.walk().unwrap() {
            if e.kind == Kind::Dir {
                let p: Vec<u16> = if ns == Namespace::Joliet {
                    String::from_utf8(path).unwrap().encode_utf16().collect()
                } else {
                    path.iter().map(|&b| u16::from(b)).collect()
                };
                want.insert((p, e.extents[0].0));
            }
        }
        let got: BTreeSet<(Vec<u16>, u32)> = paths
            .iter()
            .zip(&l)
            .map(|((p, _), rec)| (p.clone(), rec.extent))
            .collect();
        assert_eq!(got, want, "{ns:?}: path table against the directories");
        assert!(got.len() > 12, "{ns:?}: deep directories are in the table");

        // Directory records in order, names unique.
        let mut dirs = vec![root];
        dirs.extend(
            r.walk()
                .unwrap()
                .into_iter()
                .map(|(_, e)| e)
                .filter(|e| e.kind == Kind::Dir),
        );
        for dir in dirs {
            let names: Vec<Vec<u16>> = r
                .raw_names(&dir)
                .unwrap()
                .iter()
                .map(|n| units(n))
                .collect();
            for pair in names.windows(2) {
                assert!(
                    order_key(&pair[0]) < order_key(&pair[1]),
                    "{ns:?}: records out of order: {:?} then {:?}",
                    String::from_utf16_lossy(&pair[0]),
                    String::from_utf16_lossy(&pair[1])
                );
            }
            if ns == Namespace::Primary {
                for n in &names {
                    let s = String::from_utf16_lossy(n);
                    let base = s.split(';').next().unwrap();
                    assert!(base.len() <= 31, "level 2 name too long: {s}");
                    assert!(
                        base.bytes().all(|b| b.is_ascii_uppercase()
                            || b.is_ascii_digit()
                            || b == b'_'
                            || b == b'.'),
                        "not d-characters: {s}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_missing_output_folder_names_the_output() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("no-such-dir/x.iso");
    let err = iso::build(&scan(d.path()), &out, &IsoOptions::default()).unwrap_err();
    assert!(matches!(err, IsoError::Io { .. }), "{err}");
    assert!(err.to_string().contains("no-such-dir/x.iso"), "{err}");
}

/// Copies `from` to `to` creating entries in reverse name order, with the same modes.
fn copy_reversed(from: &Path, to: &Path, inodes: &mut HashMap<u64, PathBuf>) {
    fs::create_dir_all(to).unwrap();
    let mut entries: Vec<_> = fs::read_dir(from).unwrap().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
    for e in entries {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let meta = fs::symlink_metadata(&src).unwrap();
        if meta.is_dir() {
            copy_reversed(&src, &dst, inodes);
        } else if meta.file_type().is_symlink() {
            symlink(fs::read_link(&src).unwrap(), &dst).unwrap();
            continue;
        } else if let Some(first) = inodes.get(&meta.ino()).filter(|_| meta.nlink() > 1) {
            fs::hard_link(first, &dst).unwrap();
            continue;
        } else {
            fs::copy(&src, &dst).unwrap();
            inodes.insert(meta.ino(), dst.clone());
        }
        fs::set_permissions(&dst, fs::Permissions::from_mode(meta.mode() & 0o7777)).unwrap();
        let m = meta.mtime();
        if m < TS {
            set_mtime(&dst, m);
        }
    }
}

#[test]
fn same_tree_and_timestamp_give_the_same_bytes() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    fs::create_dir(&a).unwrap();
    sample(&a);
    copy_reversed(&a, &b, &mut HashMap::new());
    let hashes: Vec<String> = [(&a, "1.iso"), (&a, "2.iso"), (&b, "3.iso")]
        .iter()
        .map(|(src, name)| {
            let img = d.path().join(name);
            iso::build(&scan(src), &img, &IsoOptions::default()).unwrap();
            sha256(&img)
        })
        .collect();
    assert_eq!(hashes[0], hashes[1], "two builds of one tree");
    assert_eq!(hashes[0], hashes[2], "a copy made in another order");

    // A different timestamp changes the bytes (the dates are really from the tree).
    let other = d.path().join("4.iso");
    let mut t = scan(&a);
    t.timestamp += 1;
    iso::build(&t, &other, &IsoOptions::default()).unwrap();
    assert_ne!(sha256(&other), hashes[0]);
}

/// A small tree whose bytes are pinned: a change in the output (for example from a new
/// version of the writer) shows up here and must be deliberate.
#[test]
fn golden_hash_of_a_small_tree() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::write(src.join("dir/hello.txt"), b"hello, world\n").unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    symlink("dir/hello.txt", src.join("link")).unwrap();
    for (p, m) in [
        ("dir/hello.txt", 0o644),
        ("empty", 0o600),
        ("dir", 0o755),
        ("", 0o755),
    ] {
        fs::set_permissions(src.join(p), fs::Permissions::from_mode(m)).unwrap();
    }
    let img = d.path().join("g.iso");
    iso::build(&scan(&src), &img, &IsoOptions::default()).unwrap();
    assert_eq!(
        sha256(&img),
        "7ff408f282931c21f9d4dfa7224fdc336e9fc741dc912ccc0c2e74ca2910d7bc",
        "the bytes of the golden image changed"
    );
}

// ---------------------------------------------------------------------------------------
// External readers.

fn tool(name: &str, probe: &[&str]) -> bool {
    let ok = Command::new(name)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: {name} not installed (apt-get install xorriso genisoimage)");
    }
    ok
}

/// Runs `cmd` with a time-out; returns (success, stdout, stderr). The child is killed
/// when the time-out passes or the test panics.
fn run(cmd: &mut Command, dir: &Path) -> (bool, Vec<u8>, String) {
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = Kill(
        cmd.stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "{cmd:?} timed out");
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = String::from_utf8_lossy(&fs::read(&err).unwrap()).into_owned();
    (status.success(), fs::read(&out).unwrap(), stderr)
}

#[test]
fn xorriso_lists_every_path_with_its_long_name() {
    if !tool("xorriso", &["-version"]) {
        return;
    }
    let (d, tree, img) = build_sample();
    let (ok, out, err) = run(
        Command::new("xorriso")
            .arg("-indev")
            .arg(&img)
            .args(["-find", "/"]),
        d.path(),
    );
    assert!(ok, "xorriso failed: {err}");
    assert!(!err.contains("FAILURE") && !err.contains("SORRY"), "{err}");
    let listed: BTreeSet<Vec<u8>> = out
        .split(|&b| b == b'\n')
        .filter_map(|l| {
            l.strip_prefix(b"'/")?
                .strip_suffix(b"'")
                .map(<[u8]>::to_vec)
        })
        .filter(|p| !p.is_empty() && p.as_slice() != RR_MOVED)
        .collect();
    let want: BTreeSet<Vec<u8>> = tree.walk().into_iter().map(|(p, _)| p).collect();
    assert_eq!(listed, want);
    assert!(listed.contains(LONG_RR.as_bytes()));
}

#[test]
fn xorriso_extracts_the_same_tree() {
    if !tool("xorriso", &["-version"]) || !tool("diff", &["--version"]) {
        return;
    }
    let (d, _tree, img) = build_sample();
    let out = d.path().join("extracted");
    let (ok, _, err) = run(
        Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(&img)
            .args(["-extract", "/"])
            .arg(&out),
        d.path(),
    );
    assert!(ok, "xorriso extract failed: {err}");
    let rr = out.join(std::ffi::OsStr::from_bytes(RR_MOVED));
    if rr.exists() {
        fs::remove_dir(rr).unwrap();
    }
    let (same, diff, _) = run(
        Command::new("diff")
            .args(["-r", "--no-dereference"])
            .arg(d.path().join("src"))
            .arg(&out),
        d.path(),
    );
    assert!(
        same,
        "extracted tree differs:\n{}",
        String::from_utf8_lossy(&diff)
    );
    // Modes survive extraction too.
    for rel in ["one", "empty", "empty-dir"] {
        let a = fs::symlink_metadata(d.path().join("src").join(rel)).unwrap();
        let b = fs::symlink_metadata(out.join(rel)).unwrap();
        assert_eq!(a.mode() & 0o7777, b.mode() & 0o7777, "{rel}");
    }
}

#[test]
fn isoinfo_lists_rock_ridge_and_joliet() {
    if !tool("isoinfo", &["-version"]) {
        return;
    }
    let (d, _tree, img) = build_sample();
    for (flag, expect) in [("-R", LONG_RR), ("-J", &JOLIET_A[..64])] {
        let (ok, out, err) = run(
            Command::new("isoinfo").args([flag, "-l", "-i"]).arg(&img),
            d.path(),
        );
        assert!(ok, "isoinfo {flag} failed: {err}");
        assert!(err.trim().is_empty(), "isoinfo {flag}: {err}");
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains(expect), "isoinfo {flag} -l lacks {expect}");
        assert!(
            out.contains("entry-0999"),
            "isoinfo {flag} -l lacks the 1000th entry"
        );
    }
    if tool("isovfy", &["-version"]) {
        let (ok, out, err) = run(Command::new("isovfy").arg("-i").arg(&img), d.path());
        let out = String::from_utf8_lossy(&out);
        assert!(ok && out.contains("No errors found"), "isovfy: {out}{err}");
    }
}

/// Files of 4 GiB and more take several extents. Writes a 4.3 GiB image: run with
/// `cargo test -p vloop-images --test iso -- --ignored`.
#[test]
#[ignore = "writes 4.3 GiB"]
fn files_over_4_gib_take_several_extents() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    let size = (4u64 << 30) + 12345;
    let f = File::create(src.join("huge")).unwrap();
    f.set_len(size).unwrap();
    // Non-zero bytes at both ends and across the first extent boundary.
    use std::io::{SeekFrom, Write};
    let mut f = f;
    for at in [0, (4u64 << 30) - 2048 - 3, size - 5] {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(b"vloop").unwrap();
    }
    drop(f);
    let t = scan(&src);
    let img = d.path().join("big.iso");
    iso::build(&t, &img, &IsoOptions::default()).unwrap();
    let mut r = IsoReader::open(File::open(&img).unwrap(), Namespace::RockRidge).unwrap();
    let entries = r.walk().unwrap();
    let (_, e) = &entries[0];
    assert_eq!(e.size, size);
    assert!(e.extents.len() >= 2, "{:?}", e.extents);
    let mut h_iso = Sha256::new();
    r.read_file(e, &mut h_iso).unwrap();
    let mut h_src = Sha256::new();
    std::io::copy(&mut File::open(src.join("huge")).unwrap(), &mut h_src).unwrap();
    assert_eq!(h_iso.finalize(), h_src.finalize());
}

// ---------------------------------------------------------------------------------------
// Random trees.

#[derive(Debug, Clone)]
enum Gen {
    File(Vec<u8>),
    Link(String),
    Dir(Vec<(String, Gen)>),
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,8}(\\.[a-z]{1,3})?",
        "[A-Za-z0-9 _.-]{1,40}",
        "[a-zäöüß日本]{1,12}",
        "[a-z]{70,120}",
    ]
    .prop_filter("not . or ..", |n| n != "." && n != "..")
}

fn gen_tree() -> impl Strategy<Value = Gen> {
    let leaf = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..5000).prop_map(Gen::File),
        // No empty components: Rock Ridge SL stores "a//b" as "a/b".
        1 => "/?[a-z.]{1,20}(/[a-z.]{1,30}){0,12}".prop_map(Gen::Link),
    ];
    leaf.prop_recursive(4, 40, 8, |inner| {
        proptest::collection::btree_map(name(), inner, 0..8)
            .prop_map(|m| Gen::Dir(m.into_iter().collect()))
    })
}

fn materialise(g: &Gen, path: &Path) {
    match g {
        Gen::File(data) => fs::write(path, data).unwrap(),
        Gen::Link(target) => symlink(target, path).unwrap(),
        Gen::Dir(entries) => {
            fs::create_dir(path).unwrap();
            for (n, e) in entries {
                materialise(e, &path.join(n));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 12,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    #[test]
    fn random_trees_read_back(entries in proptest::collection::btree_map(name(), gen_tree(), 0..10)) {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        materialise(&Gen::Dir(entries.into_iter().collect()), &src);
        let t = scan(&src);
        let img = d.path().join("r.iso");
        iso::build(&t, &img, &IsoOptions::default()).unwrap();
        check_rock_ridge(&img, &t);
        let mut f = File::open(&img).unwrap();
        let info = iso::probe(&mut f).unwrap().unwrap();
        prop_assert_eq!(info.volume_size, f.seek(std::io::SeekFrom::End(0)).unwrap());
        let mut r = IsoReader::open(File::open(&img).unwrap(), Namespace::Joliet).unwrap();
        r.walk().unwrap();
    }
}

/// A small image built once, as bytes, for the corruption test.
fn small_image() -> &'static [u8] {
    static IMAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let deep = src.join("a/b/c/d/e/f/g/h/i/j");
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("f"), b"deep").unwrap();
        fs::write(src.join(LONG_RR), pattern(5000, 9)).unwrap();
        symlink("x".repeat(300), src.join("l")).unwrap();
        let img = d.path().join("s.iso");
        iso::build(&scan(&src), &img, &IsoOptions::default()).unwrap();
        fs::read(img).unwrap()
    })
}

/// Everything the reader offers, on `bytes`; errors are fine, panics are not.
fn read_everything(bytes: &[u8]) {
    use std::io::Cursor;
    let _ = iso::probe(&mut Cursor::new(bytes));
    for ns in [Namespace::RockRidge, Namespace::Joliet, Namespace::Primary] {
        let Ok(mut r) = IsoReader::open(Cursor::new(bytes), ns) else {
            continue;
        };
        let _ = r.path_table(false);
        let _ = r.path_table(true);
        if let Ok(entries) = r.walk() {
            for (_, e) in entries {
                let _ = r.read_file(&e, &mut std::io::sink());
                if e.kind == Kind::Dir {
                    let _ = r.raw_names(&e);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 500,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    /// Corrupted images (bytes changed in the descriptors, path tables, directories and
    /// continuation areas) never make the reader or `probe` panic.
    #[test]
    fn corrupted_images_never_panic(
        edits in proptest::collection::vec((16 * 2048..60 * 2048usize, any::<u8>()), 1..40)
    ) {
        let mut bytes = small_image().to_vec();
        for (at, value) in edits {
            if let Some(b) = bytes.get_mut(at) {
                *b = value;
            }
        }
        read_everything(&bytes);
    }
}

#[test]
fn truncated_images_never_panic() {
    let img = small_image();
    for len in (0..img.len()).step_by(1021) {
        read_everything(&img[..len]);
    }
}
