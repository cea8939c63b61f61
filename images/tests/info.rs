//! `info` against the project's own builders, and on arbitrary bytes.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;

use proptest::prelude::*;
use vloop_images::info::{self, Content};
use vloop_images::tree::{self, TreeOptions};
use vloop_images::{ext2, iso};

fn folder(dir: &Path) {
    fs::create_dir_all(dir.join("a/b")).unwrap();
    fs::write(dir.join("a/b/file"), vec![3u8; 70_000]).unwrap();
    fs::write(dir.join("top"), b"x").unwrap();
}

#[test]
fn info_agrees_with_the_ext2_builder() {
    let d = tempfile::tempdir().unwrap();
    folder(&d.path().join("src"));
    let t = tree::scan(
        &d.path().join("src"),
        &TreeOptions {
            keep_owners: false,
            timestamp: Some(1_700_000_000),
        },
    )
    .unwrap();
    for block_size in [1024, 2048, 4096] {
        let img = d.path().join(format!("fs-{block_size}.img"));
        let opts = ext2::Ext2Options {
            block_size,
            label: "lbl".into(),
            uuid: Some([0xab; 16]),
            size: Some(4 << 20),
            ..Default::default()
        };
        let s = ext2::build(&t, &img, &opts).unwrap();
        let i = info::info(&img).unwrap();
        assert_eq!(i.size, s.size);
        let Content::Ext(e) = i.content else {
            panic!("not ext: {i:?}")
        };
        assert_eq!(e.version, "ext2");
        assert_eq!(e.label, "lbl");
        assert_eq!(e.uuid, "abababab-abab-abab-abab-abababababab");
        assert_eq!(e.block_size, u64::from(block_size));
        assert_eq!(e.blocks, s.blocks);
        assert_eq!(e.free_blocks, s.free_blocks);
        assert_eq!(e.inodes, s.inodes);
        assert_eq!(e.free_inodes, s.free_inodes);
    }
}

#[test]
fn info_agrees_with_the_iso_builder() {
    let d = tempfile::tempdir().unwrap();
    folder(&d.path().join("src"));
    let t = tree::scan(&d.path().join("src"), &TreeOptions::default()).unwrap();
    for (rock_ridge, joliet) in [(true, true), (false, false), (true, false)] {
        let img = d.path().join(format!("cd-{rock_ridge}-{joliet}.iso"));
        let s = iso::build(
            &t,
            &img,
            &iso::IsoOptions {
                volume_id: "INFO_TEST".into(),
                rock_ridge,
                joliet,
            },
        )
        .unwrap();
        let i = info::info(&img).unwrap();
        let Content::Iso9660(c) = i.content else {
            panic!("not ISO: {i:?}")
        };
        assert_eq!(c.volume_id, "INFO_TEST");
        assert_eq!(c.volume_size, s.size);
        assert_eq!((c.rock_ridge, c.joliet), (rock_ridge, joliet));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary bytes with the magic numbers planted: `info` answers, never panics.
    #[test]
    fn never_panics_on_garbage(
        bytes in proptest::collection::vec(any::<u8>(), 0..70_000),
        plant in 0u8..7,
    ) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        fs::write(&p, &bytes).unwrap();
        let f = File::options().write(true).open(&p).unwrap();
        match plant {
            0 => f.write_all_at(&0xEF53u16.to_le_bytes(), 1024 + 56).unwrap(),
            1 => f.write_all_at(b"\x01CD001", 32768).unwrap(),
            2 => f.write_all_at(&[0x55, 0xAA], 510).unwrap(),
            3 => {
                f.write_all_at(&[0x55, 0xAA], 510).unwrap();
                f.write_all_at(&[0, 0, 0, 0, 0xEE], 446).unwrap();
                f.write_all_at(b"EFI PART", 512).unwrap();
            }
            // A qcow2 magic: version 3 (a header to parse), or version 2 with the rest of
            // the header as it came.
            4 => f.write_all_at(b"QFI\xfb\0\0\0\x03", 0).unwrap(),
            5 => f.write_all_at(b"QFI\xfb\0\0\0\x02", 0).unwrap(),
            _ => {}
        }
        drop(f);
        // A qcow2 header that does not hold up is an error, never a panic.
        if let Ok(i) = info::info(&p) {
            let _ = info::describe(&i);
            let _ = serde_json::to_string(&i).unwrap();
        } else {
            prop_assert!(plant == 4 || plant == 5);
        }
    }
}

/// A small qcow2 image (512-byte clusters, some data) to damage.
fn small_qcow2(path: &Path) {
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    let mut o = vloop_qcow2::CreateOptions::new(1 << 20);
    o.cluster_size = 512;
    vloop_qcow2::create(&f, &o).unwrap();
    let opts = vloop_qcow2::OpenOptions {
        format: Some(vloop_qcow2::Format::Qcow2),
        backing: vloop_qcow2::Backing::None,
        ..Default::default()
    };
    let c = vloop_qcow2::Chain::open(f, path, &opts, &mut |_, _| {
        Err(std::io::Error::other("no backing file"))
    })
    .unwrap();
    c.write_at(&[0x5a; 3000], 700).unwrap();
    c.write_at(&[0xa5; 512], 600 << 10).unwrap();
    c.close().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A qcow2 image with bytes of its metadata and data changed: `info` and a conversion
    /// answer or fail, never panic.
    #[test]
    fn damaged_qcow2_never_panics(
        damage in proptest::collection::vec((0u64..16 * 512, any::<u8>()), 1..12),
    ) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img.qcow2");
        small_qcow2(&p);
        let f = File::options().write(true).open(&p).unwrap();
        for (at, b) in &damage {
            f.write_all_at(&[*b], *at).unwrap();
        }
        drop(f);
        if let Ok(i) = info::info(&p) {
            let _ = info::describe(&i);
            let _ = serde_json::to_string(&i).unwrap();
        }
        let _ = vloop_images::convert::convert(
            &p,
            &d.path().join("out.raw"),
            &Default::default(),
        );
    }
}
