//! The copy library: summaries, holes, block devices.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};
use vloop_images::copy::{self, CopyError, CopyOptions};

fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(path).unwrap()))
}

#[test]
fn summary_counts_data_and_holes() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    let f = File::create(&src).unwrap();
    f.set_len(16 << 20).unwrap();
    // 3 blocks of data: one at 0, two straddling a 1 MiB boundary.
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    f.write_all_at(&[2u8; 8192], (1 << 20) - 4096).unwrap();
    drop(f);
    let dst = d.path().join("dst");
    let s = copy::copy(&src, &dst, &CopyOptions::default()).unwrap();
    assert_eq!(s.bytes, 16 << 20);
    assert_eq!(s.data_bytes, 3 * 4096);
    assert_eq!(s.holes_bytes, (16 << 20) - 3 * 4096);
    assert_eq!(s.sha256, sha256(&src));
    assert_eq!(s.source_kind, "file");
    assert!(!s.verified);
    assert!(fs::metadata(&dst).unwrap().blocks() * 512 <= 64 << 10);
    assert_eq!(
        copy::sha256_file(&dst).unwrap(),
        (16 << 20, s.sha256.clone())
    );

    let again = copy::copy(
        &dst,
        &d.path().join("dst2"),
        &CopyOptions {
            verify: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(again.verified);
    assert_eq!(again.sha256, s.sha256);
    assert_eq!(again.data_bytes, s.data_bytes);
}

#[test]
fn empty_and_odd_sized_sources() {
    let d = tempfile::tempdir().unwrap();
    for len in [0usize, 1, 511, 4097, (1 << 20) + 3] {
        let src = d.path().join(format!("s{len}"));
        let bytes: Vec<u8> = (0..len).map(|i| (i % 7) as u8).collect();
        fs::write(&src, &bytes).unwrap();
        let dst = d.path().join(format!("d{len}"));
        let s = copy::copy(&src, &dst, &CopyOptions::default()).unwrap();
        assert_eq!(s.bytes, len as u64);
        assert_eq!(fs::read(&dst).unwrap(), bytes, "{len}");
        assert_eq!(s.sha256, sha256(&src));
    }
}

#[test]
fn refusing_to_overwrite_leaves_no_temporary() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("src"), [5u8; 10000]).unwrap();
    fs::write(d.path().join("dst"), b"keep").unwrap();
    let err = copy::copy(
        &d.path().join("src"),
        &d.path().join("dst"),
        &CopyOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, CopyError::Output(_)), "{err:?}");
    assert_eq!(fs::read(d.path().join("dst")).unwrap(), b"keep");
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2);
}

#[test]
fn copies_a_block_device() {
    let d = tempfile::tempdir().unwrap();
    let backing = d.path().join("backing");
    let mut bytes = vec![0u8; 3 << 20];
    bytes[100..200].fill(9);
    bytes[(2 << 20)..(2 << 20) + 4096].fill(3);
    fs::write(&backing, &bytes).unwrap();
    let Some(dev) = vloop_frontend::loopdev::Loop::attach(&backing, true) else {
        return;
    };
    let dst = d.path().join("copy");
    let s = copy::copy(
        Path::new(dev.path()),
        &dst,
        &CopyOptions {
            verify: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.source_kind, "block device");
    assert_eq!(s.bytes, 3 << 20);
    assert_eq!(fs::read(&dst).unwrap(), bytes);
    assert_eq!(s.sha256, sha256(&backing));
    assert_eq!(s.data_bytes, 2 * 4096);
}
