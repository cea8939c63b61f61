//! Format probing and raw images: a raw image that holds a qcow2 header is served as raw when
//! its format is named; a probed raw image reports it, and the guard refuses the write that
//! would make it probe as qcow2 (the CVE-2008-2004 class).

mod common;

use std::fs::File;
use std::io::IoSlice;

use common::*;
use vloop_qcow2::{
    create, probed_raw_write, Backing, Chain, CreateOptions, Extent, Format, OpenOptions,
    ProbedRawWriteError, WritePath,
};

/// Opens with an opener that refuses every backing file.
fn open(path: &std::path::Path, format: Option<Format>) -> vloop_qcow2::chain::Result<Chain> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let opts = OpenOptions {
        format,
        backing: Backing::FromImage,
        ..OpenOptions::default()
    };
    Chain::open(f, path, &opts, &mut |_, _| {
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    })
}

#[test]
fn a_qcow2_header_inside_a_named_raw_image_stays_data() {
    let dir = tempdir();
    // What a guest could write into its raw disk: a qcow2 header naming a host file.
    let evil = path_in(&dir, "evil.qcow2");
    let f = File::create(&evil).unwrap();
    let mut o = CreateOptions::new(1 << 20);
    o.backing = Some(("/etc/passwd".into(), Format::Raw));
    create(&f, &o).unwrap();
    drop(f);
    let image = std::fs::read(&evil).unwrap();
    let header = image[..4096].to_vec();
    let raw = path_in(&dir, "disk.raw");
    let mut disk = vec![0u8; 1 << 20];
    disk[..image.len()].copy_from_slice(&image);
    std::fs::write(&raw, &disk).unwrap();
    let chain = open(&raw, Some(Format::Raw)).unwrap();
    assert_eq!(
        (chain.format(), chain.layers(), chain.probed_raw()),
        (Format::Raw, 1, false)
    );
    assert_eq!(read_mapped(&chain, 0, 4096), header);
    // Probing takes it for qcow2 and asks the opener for the host file it names.
    match open(&raw, None) {
        Err(vloop_qcow2::Error::OpenBacking { path, .. }) => {
            assert_eq!(path, std::path::Path::new("/etc/passwd"))
        }
        other => panic!(
            "probing did not see the qcow2 header: {:?}",
            other.map(|c| c.layers())
        ),
    }
}

#[test]
fn a_probed_raw_image_is_flagged_and_guarded() {
    let dir = tempdir();
    let raw = path_in(&dir, "plain.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let chain = open(&raw, None).unwrap();
    assert!(chain.probed_raw());
    let evil = path_in(&dir, "e.qcow2");
    let f = File::create(&evil).unwrap();
    create(&f, &CreateOptions::new(1 << 20)).unwrap();
    let header = std::fs::read(&evil).unwrap()[..512].to_vec();
    assert_eq!(
        probed_raw_write(0, &header),
        Err(ProbedRawWriteError::WouldProbeAs("qcow2"))
    );
    assert_eq!(probed_raw_write(0, &[0u8; 512]), Ok(()));
    assert_eq!(probed_raw_write(4096, &header), Ok(()));
}

#[test]
fn raw_images_map_to_themselves() {
    let dir = tempdir();
    let raw = path_in(&dir, "r.raw");
    std::fs::write(&raw, pattern(4, 1 << 20)).unwrap();
    let chain = open(&raw, Some(Format::Raw)).unwrap();
    let mut ext = Vec::new();
    chain.map_read(4096, 8192, &mut ext).unwrap();
    assert!(matches!(
        ext[..],
        [Extent::Data {
            layer: 0,
            host: 4096,
            len: 8192,
            ..
        }]
    ));
    assert_eq!(
        chain.map_write(0, 512, &mut ext).unwrap(),
        WritePath::Direct
    );
    chain.write_slow(512, &[IoSlice::new(&[9u8; 512])]).unwrap();
    chain.write_zeroes(65536, 65536, true).unwrap();
    chain.discard(0, 0).unwrap();
    chain.flush().unwrap();
    let mut want = pattern(4, 1 << 20);
    want[512..1024].fill(9);
    want[65536..131072].fill(0);
    assert_eq!(read_mapped(&chain, 0, 1 << 20), want);
    assert!(chain.map_read(1 << 20, 1, &mut ext).is_err());
    let info = chain.info().unwrap();
    assert_eq!((info.format, info.virtual_size), (Format::Raw, 1 << 20));
}
