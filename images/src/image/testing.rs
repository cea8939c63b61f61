//! Images made for the tests of this module, written through `vloop_qcow2`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vloop_qcow2::{Backing, Chain, Format, OpenOptions};

/// A new file at `path`, open for reading and writing.
pub(super) fn create_new(path: &Path) -> File {
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap()
}

/// Writes a new qcow2 image of `size` bytes into `f`, over the raw file named `backing`.
pub(super) fn write_overlay(f: &File, size: u64, backing: &str) {
    let mut o = vloop_qcow2::CreateOptions::new(size);
    o.backing = Some((backing.into(), Format::Raw));
    vloop_qcow2::create(f, &o).unwrap();
}

/// A qcow2 image at `path` of `size` bytes with 64 KiB clusters holding `data`, written
/// through the chain.
pub(super) fn qcow2_with(path: &Path, size: u64, data: &[(u64, &[u8])]) {
    let f = create_new(path);
    vloop_qcow2::create(&f, &vloop_qcow2::CreateOptions::new(size)).unwrap();
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        backing: Backing::None,
        ..OpenOptions::default()
    };
    let c = Chain::open(f, path, &opts, &mut |_, _| unreachable!()).unwrap();
    for (off, bytes) in data {
        c.write_at(bytes, *off).unwrap();
    }
    c.close().unwrap();
}

/// Turns the backing format header extension of a fresh image made by
/// `vloop_qcow2::create` (the first extension) into an unknown one, which readers skip:
/// the image then names no backing format.
pub(super) fn strip_backing_format(path: &Path) {
    let f = File::options().read(true).write(true).open(path).unwrap();
    let mut h = [0u8; 108];
    f.read_exact_at(&mut h, 0).unwrap();
    let hl = u32::from_be_bytes(h[100..104].try_into().unwrap()) as u64;
    let mut ty = [0u8; 4];
    f.read_exact_at(&mut ty, hl).unwrap();
    assert_eq!(
        u32::from_be_bytes(ty),
        0xe279_2aca,
        "backing format extension first"
    );
    f.write_all_at(&0x7f00_0001u32.to_be_bytes(), hl).unwrap();
}
