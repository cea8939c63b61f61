//! ext2 builder: images pass `e2fsck -fn`, read back equal to the source folder through
//! ext4-view, and come out byte-for-byte the same for the same tree and timestamp.

mod ext2_common;

use std::fs;
use std::path::Path;

use ext2_common::*;
use vloop_images::ext2::{build, Ext2Error, Ext2Options, Ext2Summary};
use vloop_images::tree::{scan, Tree, TreeOptions};

fn tree_of(dir: &Path) -> Tree {
    scan(
        dir,
        &TreeOptions {
            keep_owners: false,
            timestamp: Some(TS),
        },
    )
    .unwrap()
}

fn build_checked(src: &Path, img: &Path, opts: &Ext2Options) -> Ext2Summary {
    let tree = tree_of(src);
    let s = build(&tree, img, opts).unwrap();
    assert_eq!(fs::metadata(img).unwrap().len(), s.size);
    assert_fsck_clean(img);
    assert_same_as_source(img, src, TS);
    assert_hard_links(img, src);
    s
}

fn check_layout(block_size: u32, inode_size: u16) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    populate(&src, true);
    let img = dir.path().join("fs.img");
    let opts = Ext2Options {
        block_size,
        inode_size,
        label: "vloop-test".into(),
        ..Ext2Options::default()
    };
    let s = build_checked(&src, &img, &opts);
    assert_eq!(s.block_size, block_size);
    assert!(s.free_blocks > 0 && s.free_inodes > 0);
    let fs4 = open_image(&img);
    assert_eq!(fs4.label().to_str().unwrap(), "vloop-test");
    assert_eq!(fs4.uuid().as_bytes(), &s.uuid);
    if let Some(stat) = debugfs_stat(&img, "/modes/setuid") {
        assert!(stat.contains("Mode:  04755"), "{stat}");
    }
    // Zero blocks are holes: "all-zero" owns no data block, "holey" one; both keep
    // the indirect block their length calls for.
    let sectors = u64::from(block_size / 512);
    let indirect = |len: u64| u64::from(len.div_ceil(u64::from(block_size)) > 12);
    if let Some(stat) = debugfs_stat(&img, "/all-zero") {
        assert_eq!(
            debugfs_field(&stat, "Blockcount:"),
            Some(indirect(3 * 4096 + 5) * sectors),
            "{stat}"
        );
    }
    if let Some(stat) = debugfs_stat(&img, "/holey") {
        assert_eq!(
            debugfs_field(&stat, "Blockcount:"),
            Some((1 + indirect(5 * 4096)) * sectors),
            "{stat}"
        );
    }
}

#[test]
fn blocks_1024_inodes_128() {
    check_layout(1024, 128);
}

#[test]
fn blocks_1024_inodes_256() {
    check_layout(1024, 256);
}

#[test]
fn blocks_2048_inodes_256() {
    check_layout(2048, 256);
}

#[test]
fn blocks_4096_inodes_256() {
    check_layout(4096, 256);
}

#[test]
fn blocks_4096_inodes_128() {
    check_layout(4096, 128);
}

/// A sparse 70 MiB file needs triple indirect blocks with 1024-byte blocks.
#[test]
fn triple_indirect_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    let f = fs::File::create(src.join("sparse")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(&pattern(5000, 3), 70 << 20).unwrap();
    drop(f);
    fs::write(src.join("small"), b"s").unwrap();
    let img = dir.path().join("fs.img");
    let opts = Ext2Options {
        block_size: 1024,
        ..Ext2Options::default()
    };
    // Progress counts the holes too and ends at the total.
    let mut last = (0, 0);
    vloop_images::ext2::build_with_progress(&tree_of(&src), &img, &opts, &mut |d, t| {
        assert!(d >= last.0 && d <= t);
        last = (d, t);
    })
    .unwrap();
    assert_eq!(last, (70 * 1048576 + 5001, 70 * 1048576 + 5001));
    build_checked(&src, &img, &opts);
    if let Some(stat) = debugfs_stat(&img, "/sparse") {
        assert!(stat.contains("(TIND)"), "no triple indirect block:\n{stat}");
    }
}

/// Files of 2 GiB and more set and need LARGE_FILE; content is checked at its ends.
#[test]
fn large_sparse_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    let size = (5u64 << 30) + 4097;
    let tail = pattern(4097, 9);
    let f = fs::File::create(src.join("huge")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"start", 0).unwrap();
    f.write_all_at(&tail, size - tail.len() as u64).unwrap();
    drop(f);
    let img = dir.path().join("fs.img");
    let tree = tree_of(&src);
    build(&tree, &img, &Ext2Options::default()).unwrap();
    assert_fsck_clean(&img);
    let fs4 = open_image(&img);
    let mut file = fs4.open(ext4_view::Path::new("/huge")).unwrap();
    assert_eq!(file.metadata().len(), size);
    let mut head = [0u8; 5];
    file.read_bytes(&mut head).unwrap();
    assert_eq!(&head, b"start");
    file.seek_to(size - tail.len() as u64 - 10).unwrap();
    let mut end = vec![0u8; tail.len() + 10];
    let mut got = 0;
    while got < end.len() {
        got += file.read_bytes(&mut end[got..]).unwrap();
    }
    assert_eq!(&end[..10], &[0u8; 10]);
    assert_eq!(&end[10..], tail.as_slice());
    if let Some(stat) = debugfs_stat(&img, "/huge") {
        assert!(stat.contains("(TIND)"), "{stat}");
    }
}

#[test]
fn same_tree_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    populate(&a, false);
    let b = dir.path().join("elsewhere/b");
    copy_tree_reversed(&a, &b);
    let opts = Ext2Options::default();
    let imgs: Vec<_> = [(&a, "1.img"), (&a, "2.img"), (&b, "3.img")]
        .into_iter()
        .map(|(src, name)| {
            let img = dir.path().join(name);
            build(&tree_of(src), &img, &opts).unwrap();
            sha256_file(&img)
        })
        .collect();
    assert_eq!(imgs[0], imgs[1], "two builds of one tree differ");
    assert_eq!(imgs[0], imgs[2], "a copy of the tree gives another image");

    // One changed byte changes the image and its UUID.
    fs::write(b.join("one"), b"y").unwrap();
    let img = dir.path().join("4.img");
    let s4 = build(&tree_of(&b), &img, &opts).unwrap();
    let s1 = build(&tree_of(&a), &dir.path().join("1.img"), &opts).unwrap();
    assert_ne!(sha256_file(&img), imgs[0]);
    assert_ne!(s4.uuid, s1.uuid);
    // A given UUID is used as is.
    let uuid = *b"0123456789abcdef";
    let s = build(
        &tree_of(&a),
        &img,
        &Ext2Options {
            uuid: Some(uuid),
            ..opts
        },
    )
    .unwrap();
    assert_eq!(s.uuid, uuid);
    assert_eq!(open_image(&img).uuid().as_bytes(), &uuid);
}

#[test]
fn too_small_names_the_size_needed() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), pattern(3 << 20, 1)).unwrap();
    let img = dir.path().join("fs.img");
    let tree = tree_of(&src);
    let err = build(
        &tree,
        &img,
        &Ext2Options {
            size: Some(2 << 20),
            ..Ext2Options::default()
        },
    )
    .unwrap_err();
    let Ext2Error::TooSmall { needed, given } = err else {
        panic!("expected TooSmall, got {err}");
    };
    assert_eq!(given, 2 << 20);
    assert!(needed > 3 << 20, "{needed}");
    let msg = err_msg(needed, given);
    assert!(msg.contains("--size auto"), "{msg}");
    assert!(!img.exists(), "a failed build left {}", img.display());
    // The size it names is enough.
    let s = build(
        &tree,
        &img,
        &Ext2Options {
            size: Some(needed),
            ..Ext2Options::default()
        },
    )
    .unwrap();
    assert_eq!(s.size, needed);
    assert_fsck_clean(&img);
    assert_same_as_source(&img, &src, TS);
    // And it is the least: one block fewer is refused, naming the same size.
    let err = build(
        &tree,
        &img,
        &Ext2Options {
            size: Some(needed - 4096),
            ..Ext2Options::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, Ext2Error::TooSmall { needed: n, .. } if n == needed),
        "{err}"
    );
    // Sizes that are not whole sectors are rounded up to them.
    let s = build(
        &tree,
        &img,
        &Ext2Options {
            size: Some(needed + 4096 + 100),
            ..Ext2Options::default()
        },
    )
    .unwrap();
    assert_eq!(s.size, needed + 4096 + 512);
    assert_eq!(fs::metadata(&img).unwrap().len(), needed + 4096 + 512);
}

fn err_msg(needed: u64, given: u64) -> String {
    Ext2Error::TooSmall { needed, given }.to_string()
}

#[test]
fn auto_size_leaves_headroom() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..20 {
        fs::write(src.join(format!("f{i}")), pattern(1 << 20, i)).unwrap();
    }
    let img = dir.path().join("fs.img");
    let s = build(&tree_of(&src), &img, &Ext2Options::default()).unwrap();
    let used = s.blocks - s.free_blocks;
    assert!(s.free_blocks * 4 >= (20 << 20) / 4096, "{s:?}");
    assert!(
        s.size < 2 * (20 << 20) + (8 << 20),
        "{s:?}: too much headroom"
    );
    assert!(used * 4096 >= 20 << 20);
    assert_eq!(s.size % (1 << 20), 0);
    // Written sparse: the image's free space takes no room on disk.
    use std::os::unix::fs::MetadataExt;
    let allocated = fs::metadata(&img).unwrap().blocks() * 512;
    assert!(allocated < s.size, "{allocated} >= {}", s.size);
}

#[test]
fn explicit_size_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    populate(&src, false);
    let img = dir.path().join("fs.img");
    let size = 64 << 20;
    let opts = Ext2Options {
        size: Some(size),
        block_size: 1024,
        ..Ext2Options::default()
    };
    let s = build_checked(&src, &img, &opts);
    assert_eq!(s.size, size);
    assert_eq!(s.blocks, size / 1024);
    assert_eq!(s.inodes as u64, size / 16384);
}

#[test]
fn changed_source_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), pattern(10_000, 1)).unwrap();
    let tree = tree_of(&src);
    fs::write(src.join("f"), b"shorter now").unwrap();
    let img = dir.path().join("fs.img");
    let err = build(&tree, &img, &Ext2Options::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Ext2Error::FileChanged {
                expected: 10_000,
                found: 11,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("changed"), "{err}");
    assert!(!img.exists());
    let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary file left behind: {leftovers:?}"
    );
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree_of(dir.path());
    let img = dir.path().join("x.img");
    for opts in [
        Ext2Options {
            block_size: 8192,
            ..Ext2Options::default()
        },
        Ext2Options {
            inode_size: 512,
            ..Ext2Options::default()
        },
        Ext2Options {
            label: "a label that is far too long".into(),
            ..Ext2Options::default()
        },
    ] {
        let err = build(&tree, &img, &opts).unwrap_err();
        assert!(matches!(err, Ext2Error::BadOption(_)), "{err}");
    }
    // An empty tree still makes a valid file system.
    build(&tree, &img, &Ext2Options::default()).unwrap();
    assert_fsck_clean(&img);
}

#[test]
fn existing_lost_and_found_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("lost+found")).unwrap();
    fs::write(src.join("lost+found/kept"), b"k").unwrap();
    fs::write(src.join("a"), b"a").unwrap();
    build_checked(&src, &dir.path().join("fs.img"), &Ext2Options::default());

    let bad = dir.path().join("bad");
    fs::create_dir(&bad).unwrap();
    fs::write(bad.join("lost+found"), b"file").unwrap();
    let err = build(
        &tree_of(&bad),
        &dir.path().join("b.img"),
        &Ext2Options::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("lost+found"), "{err}");
}

#[test]
fn owners_kept_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), b"f").unwrap();
    fs::write(src.join("low"), b"l").unwrap();
    std::os::unix::fs::symlink("d/f", src.join("s")).unwrap();
    // Owners above 65535 need the high 16 bits stored apart.
    let chown = |p: &Path, uid: u32, gid: u32| std::os::unix::fs::lchown(p, Some(uid), Some(gid));
    if chown(&src.join("d/f"), 100_000, 200_001).is_err() {
        vloop_frontend::skip::skip("cannot chown (not root): owners not checked");
        return;
    }
    chown(&src.join("low"), 1000, 1001).unwrap();
    chown(&src.join("s"), 70_000, 5).unwrap();
    chown(&src.join("d"), 3, 65_536).unwrap();
    let tree = scan(
        &src,
        &TreeOptions {
            keep_owners: true,
            timestamp: Some(TS),
        },
    )
    .unwrap();
    let img = dir.path().join("fs.img");
    build(&tree, &img, &Ext2Options::default()).unwrap();
    assert_fsck_clean(&img);
    assert_same_as_source_owners(&img, &src, TS, true);
}

#[test]
fn timestamp_beyond_2038() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"future").unwrap();
    let ts = 4_000_000_000; // 2096
    set_mtime(&src.join("f"), ts - 10);
    let tree = scan(
        &src,
        &TreeOptions {
            keep_owners: false,
            timestamp: Some(ts),
        },
    )
    .unwrap();
    let img = dir.path().join("fs.img");
    build(&tree, &img, &Ext2Options::default()).unwrap();
    assert_fsck_clean(&img);
    // ext4-view 1.0 rejects times past 2038 (it reads the low 32 bits as unsigned), so
    // debugfs reads them: " mtime: 0xee6b27f6:00000001 -- Thu Oct  2 07:06:20 2096".
    let Some(stat) = debugfs_stat(&img, "/f") else {
        vloop_frontend::skip::skip("debugfs not found (e2fsprogs): times past 2038 not checked");
        return;
    };
    let line = stat
        .lines()
        .find(|l| l.trim_start().starts_with("mtime:"))
        .unwrap();
    let hex: Vec<&str> = line.split_whitespace().nth(1).unwrap().split(':').collect();
    let lo = u32::from_str_radix(hex[0].trim_start_matches("0x"), 16).unwrap();
    let extra = u32::from_str_radix(hex[1], 16).unwrap();
    let secs = i64::from(lo as i32) + (i64::from(extra & 3) << 32);
    assert_eq!(secs, ts - 10, "{line}");
    assert!(line.contains("2096"), "{line}");
}

/// Data, inodes and directories spread over many block groups, with and without
/// superblock backups (1024-byte blocks: 8 MiB groups).
#[test]
fn many_groups() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for i in 0..1500u32 {
        let p = src.join(format!("d{}", i % 7)).join(format!("f{i}"));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, pattern((i as usize * 37) % 3000, i)).unwrap();
    }
    fs::write(src.join("d3/big"), pattern(30 << 20, 5)).unwrap();
    fs::write(src.join("d6/big2"), pattern(9 << 20, 6)).unwrap();
    let img = dir.path().join("fs.img");
    let opts = Ext2Options {
        block_size: 1024,
        ..Ext2Options::default()
    };
    let s = build_checked(&src, &img, &opts);
    let groups = (s.blocks - 1).div_ceil(8192);
    assert!(groups >= 7, "{s:?}");
    if let Some(stat) = debugfs_stat(&img, "/d6/f1497") {
        let ino = debugfs_field(&stat, "Inode:").unwrap();
        assert!(ino > u64::from(s.inodes) / groups, "inode {ino} in group 0");
    }
}

/// Explicit sizes: many empty groups, and a last group too small to keep.
#[test]
fn explicit_sizes_and_runt_group() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), pattern(100_000, 1)).unwrap();
    let img = dir.path().join("fs.img");
    for (block_size, size) in [
        (4096, 1u64 << 30),
        (1024, 3 * (8 << 20) + 20 * 1024),
        (2048, (16 << 20) + 4096 + 512),
    ] {
        let opts = Ext2Options {
            block_size,
            size: Some(size),
            ..Ext2Options::default()
        };
        let s = build(&tree_of(&src), &img, &opts).unwrap();
        assert_eq!(s.size, size);
        assert_eq!(fs::metadata(&img).unwrap().len(), size);
        assert!(s.blocks * u64::from(block_size) <= size);
        if block_size == 1024 {
            assert_eq!(s.blocks, 1 + 3 * 8192, "the 19-block runt group is dropped");
        }
        assert_fsck_clean(&img);
        assert_same_as_source(&img, &src, TS);
    }
}

/// A fixed tree gives a fixed image. If the on-disk format changes on purpose, update
/// the hashes (the test prints the new ones); if not, this caught a reproducibility bug.
#[test]
fn golden_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    fs::write(src.join("sub/deeper/file"), pattern(70_000, 1)).unwrap();
    fs::write(src.join("a"), b"alpha\n").unwrap();
    fs::hard_link(src.join("a"), src.join("sub/a-link")).unwrap();
    std::os::unix::fs::symlink("sub/deeper/file", src.join("s")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (p, mode, mtime) in [
        ("sub/deeper/file", 0o640, 1_600_000_000),
        ("a", 0o4755, 1_500_000_000),
        ("sub/deeper", 0o750, 1_650_000_000),
        ("sub", 0o755, 1_650_000_001),
        ("", 0o755, 1_650_000_002),
    ] {
        fs::set_permissions(src.join(p), fs::Permissions::from_mode(mode)).unwrap();
        set_mtime(&src.join(p), mtime);
    }
    set_mtime(&src.join("s"), 1_400_000_000);
    let tree = tree_of(&src);
    let mut got = Vec::new();
    for (block_size, inode_size) in [(1024, 128), (4096, 256)] {
        let img = dir.path().join(format!("{block_size}.img"));
        let opts = Ext2Options {
            block_size,
            inode_size,
            label: "golden".into(),
            ..Ext2Options::default()
        };
        build(&tree, &img, &opts).unwrap();
        assert_fsck_clean(&img);
        got.push(hex::encode(sha256_file(&img)));
    }
    eprintln!("golden hashes: {got:?}");
    assert_eq!(got, GOLDEN);
}

const GOLDEN: [&str; 2] = [
    "8bbd7850eb9f0537283bac58a895f7253f644691101342c15da4c8447346b32d",
    "98de2155036c60845d94dd6a6e02ba774b871c437516e2408e55f8b0543b3b5c",
];

/// The Linux kernel mounts the image and sees the source tree (root only; skipped
/// visibly elsewhere).
#[test]
fn kernel_mounts_image() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    populate(&src, true);
    for block_size in [1024, 4096] {
        let img = dir.path().join(format!("{block_size}.img"));
        let opts = Ext2Options {
            block_size,
            ..Ext2Options::default()
        };
        build(&tree_of(&src), &img, &opts).unwrap();
        let Some(m) = Mount::new(&img, &dir.path().join(format!("mnt{block_size}"))) else {
            return;
        };
        assert_mount_matches(&m.dir, &src, TS);
    }
}
