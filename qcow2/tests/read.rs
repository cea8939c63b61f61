//! Images made by qemu-img and written by qemu-io read back exactly as
//! `qemu-img convert -O raw` reads them: through the mapping (as the daemon reads) and through
//! the buffered slow path.

mod common;

use common::*;
use vloop_qcow2::{Extent, Format};

/// Writes a mix of shapes with qemu-io: aligned and unaligned data, zero clusters, discards.
fn scribble(img: &std::path::Path, cluster: u64) {
    let c = cluster;
    let cmds = [
        format!("write -P 0xa1 0 {}", 3 * c),
        format!("write -P 0xb2 {} 1536", 5 * c + 512),
        format!("write -P 0xc3 {} {}", 8 * c - 512, 1024 + c),
        format!("write -z {} {}", c, c),
        format!("write -P 0xd4 {} 4096", 1 << 20),
        format!("discard {} {}", 2 * c, c),
        format!("write -P 0xe5 {} 512", (3 << 20) + 512),
    ];
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io(img, "qcow2", &cmds);
}

fn assert_reads_like_qemu(img: &std::path::Path) {
    let want = qemu_raw(img);
    let chain = open_chain(img, true);
    assert_eq!(chain.size(), want.len() as u64);
    for chunk in [4096u64, 65536 + 512, 1 << 20] {
        let got = read_all(&chain, chunk);
        assert!(
            got == want,
            "{} chunk {chunk}: first difference at {:?}",
            img.display(),
            first_diff(&got, &want)
        );
    }
    let mut buf = vec![0u8; want.len()];
    chain.read_at(&mut buf, 0).unwrap();
    assert!(
        buf == want,
        "{} read_at: first difference at {:?}",
        img.display(),
        first_diff(&buf, &want)
    );
}

#[test]
fn cluster_sizes_and_versions() {
    if !have_qemu("cluster_sizes_and_versions") {
        return;
    }
    let dir = tempdir();
    for cluster in [512u64, 4096, 65536, 2 << 20] {
        for compat in ["0.10", "1.1"] {
            let img = path_in(&dir, &format!("c{cluster}-{compat}.qcow2"));
            let size = if cluster == 2 << 20 {
                32 << 20
            } else {
                8 << 20
            };
            qemu_create(
                &img,
                &size.to_string(),
                &format!("cluster_size={cluster},compat={compat}"),
                None,
            );
            scribble(&img, cluster.max(4096));
            assert_reads_like_qemu(&img);
            let info = open_chain(&img, true).info().unwrap();
            assert_eq!(info.cluster_size, Some(cluster));
            assert_eq!(info.version, Some(if compat == "0.10" { 2 } else { 3 }));
        }
    }
}

#[test]
fn allocated_clusters_map_to_one_extent_per_contiguous_run() {
    if !have_qemu("allocated_clusters_map_to_one_extent_per_contiguous_run") {
        return;
    }
    let dir = tempdir();
    let img = path_in(&dir, "seq.qcow2");
    qemu_create(&img, "16M", "", None);
    qemu_io(&img, "qcow2", &["write -P 0x5a 0 2M"]);
    let chain = open_chain(&img, true);
    let mut ext = Vec::new();
    chain.map_read(0, 1 << 20, &mut ext).unwrap();
    assert_eq!(ext.len(), 1, "{ext:?}");
    assert!(matches!(ext[0], Extent::Data { layer: 0, len, .. } if len == 1 << 20));
    chain.map_read(1 << 20, 2 << 20, &mut ext).unwrap();
    assert_eq!(ext.len(), 2, "{ext:?}");
    assert!(matches!(ext[1], Extent::Zero { len } if len == 1 << 20));
}

#[test]
fn compressed_images_deflate_and_zstd() {
    if !have_qemu("compressed_images_deflate_and_zstd") {
        return;
    }
    let dir = tempdir();
    let raw = path_in(&dir, "src.raw");
    let mut data = vec![0u8; 6 << 20];
    // Compressible text, incompressible noise, and zeroes.
    for (i, b) in data[..2 << 20].iter_mut().enumerate() {
        *b = b"the quick brown fox "[i % 20];
    }
    data[(2 << 20)..(3 << 20)].copy_from_slice(&pattern(7, 1 << 20));
    data[(5 << 20) + 100..(5 << 20) + 9000].copy_from_slice(&pattern(8, 8900));
    std::fs::write(&raw, &data).unwrap();
    for ctype in ["zlib", "zstd"] {
        for cluster in [4096u64, 65536] {
            let img = path_in(&dir, &format!("{ctype}-{cluster}.qcow2"));
            qemu_compress(
                &raw,
                &img,
                &format!("compression_type={ctype},cluster_size={cluster}"),
            );
            let chain = open_chain(&img, true);
            let mut ext = Vec::new();
            chain.map_read(0, 1 << 20, &mut ext).unwrap();
            assert!(
                ext.iter().any(|e| matches!(e, Extent::Slow { .. })),
                "{ext:?}"
            );
            assert_eq!(chain.info().unwrap().compression, Some(ctype));
            drop(chain);
            let got = read_all(&open_chain(&img, true), 1 << 20);
            assert!(
                got == data,
                "{ctype} {cluster}: first difference at {:?}",
                first_diff(&got, &data)
            );
            assert_reads_like_qemu(&img);
        }
    }
}

#[test]
fn backing_chain_of_three_with_a_raw_base_and_relative_paths() {
    if !have_qemu("backing_chain_of_three_with_a_raw_base_and_relative_paths") {
        return;
    }
    let dir = tempdir();
    let base = path_in(&dir, "base.raw");
    std::fs::write(&base, pattern(1, 4 << 20)).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let mid = dir.path().join("sub/mid.qcow2");
    let top = path_in(&dir, "top.qcow2");
    // mid names its backing file relative to its own directory (sub/), not the cwd.
    qemu_create(
        &mid,
        "6M",
        "cluster_size=4096",
        Some(("../base.raw", "raw")),
    );
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x11 4096 8192",
            "write -P 0x12 1M 100000",
            "write -z 2M 64k",
        ],
    );
    qemu_create(&top, "8M", "", Some(("sub/mid.qcow2", "qcow2")));
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x21 0 512",
            "write -P 0x22 1M 65536",
            "write -P 0x23 5M 4096",
            "write -z 3M 1M",
        ],
    );
    let chain = open_chain(&top, true);
    assert_eq!(chain.layers(), 3);
    let info = chain.info().unwrap();
    assert_eq!(
        info.chain.iter().map(|l| l.format).collect::<Vec<_>>(),
        vec![Format::Qcow2, Format::Qcow2, Format::Raw]
    );
    assert_eq!(info.chain[2].path, dir.path().join("sub/../base.raw"));
    // Past mid's 6 MiB (and the base's 4 MiB) the disk reads zeroes.
    let mut ext = Vec::new();
    chain.map_read(7 << 20, 4096, &mut ext).unwrap();
    assert_eq!(ext, vec![Extent::Zero { len: 4096 }]);
    chain.map_read((1 << 20) + 102_400, 4096, &mut ext).unwrap();
    assert!(
        matches!(
            ext[..],
            [Extent::Data {
                layer: 2,
                host: 1_150_976,
                ..
            }]
        ),
        "{ext:?}"
    );
    drop(chain);
    assert_reads_like_qemu(&top);
    assert_reads_like_qemu(&mid);
}

#[test]
fn a_larger_backing_file_is_cut_and_a_smaller_one_ends_in_zeroes() {
    if !have_qemu("a_larger_backing_file_is_cut_and_a_smaller_one_ends_in_zeroes") {
        return;
    }
    let dir = tempdir();
    let big = path_in(&dir, "big.raw");
    std::fs::write(&big, pattern(3, 3 << 20)).unwrap();
    let small = path_in(&dir, "small.qcow2");
    qemu_create(&small, "1M", "", Some((p(&big), "raw")));
    let top = path_in(&dir, "top.qcow2");
    qemu_create(&top, "2M", "", Some((p(&small), "qcow2")));
    let chain = open_chain(&top, true);
    let got = read_all(&chain, 300_000);
    let want = qemu_raw(&top);
    assert_eq!(got.len(), 2 << 20);
    assert!(
        got == want,
        "first difference at {:?}",
        first_diff(&got, &want)
    );
    assert!(got[1 << 20..].iter().all(|&b| b == 0));
}

#[test]
fn a_backing_file_without_a_format_is_probed() {
    if !have_qemu("a_backing_file_without_a_format_is_probed") {
        return;
    }
    let dir = tempdir();
    let base = path_in(&dir, "base.qcow2");
    qemu_create(&base, "1M", "", None);
    qemu_io(&base, "qcow2", &["write -P 0x77 0 64k"]);
    let top = path_in(&dir, "top.qcow2");
    qemu_create(&top, "1M", "", Some((p(&base), "qcow2")));
    // Turn the backing format extension into an unknown one: the base is then probed.
    let mut bytes = std::fs::read(&top).unwrap();
    assert_eq!(bytes[112..116], 0xe279_2acau32.to_be_bytes());
    bytes[112..116].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    std::fs::write(&top, bytes).unwrap();
    let chain = open_chain(&top, true);
    assert_eq!(chain.info().unwrap().chain[1].format, Format::Qcow2);
    assert_eq!(read_mapped(&chain, 0, 4096), vec![0x77; 4096]);
}

#[test]
fn a_raw_backing_file_on_a_block_device_is_as_long_as_the_device() {
    // A block device's st_size is 0: taken as its length, every cluster the overlay does not
    // hold read as zeroes, and a partial write copied those zeroes into the overlay.
    let dir = tempdir();
    let base = path_in(&dir, "base.raw");
    let data = pattern(7, 3 << 20);
    std::fs::write(&base, &data).unwrap();
    let Some(dev) = vloop_frontend::loopdev::Loop::attach(&base, true) else {
        return;
    };
    let top = path_in(&dir, "top.qcow2");
    let f = std::fs::File::create(&top).unwrap();
    let mut opts = vloop_qcow2::CreateOptions::new(3 << 20);
    opts.backing = Some((dev.path().to_owned(), Format::Raw));
    vloop_qcow2::create(&f, &opts).unwrap();
    drop(f);
    let chain = open_chain(&top, false);
    let got = read_mapped(&chain, 0, 3 << 20);
    assert!(
        got == data,
        "first difference at {:?}",
        first_diff(&got, &data)
    );
    // Copy-on-write of a partly written cluster takes the rest from the device.
    chain.write_at(&[0xee; 512], (1 << 20) + 512).unwrap();
    let mut want = data.clone();
    want[(1 << 20) + 512..(1 << 20) + 1024].fill(0xee);
    let got = read_all(&chain, 100_000);
    assert!(
        got == want,
        "first difference at {:?}",
        first_diff(&got, &want)
    );
}
