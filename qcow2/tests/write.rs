//! Writes of every shape give an image that `qemu-img check` finds clean and
//! `qemu-img compare` finds equal to a raw copy that received the same writes.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use vloop_qcow2::{Chain, Extent, WritePath};

/// A qcow2 image `name` of `size` bytes, made by this crate, over `base.raw` holding `base`.
fn overlay_on_raw(dir: &tempfile::TempDir, name: &str, base: &[u8], size: u64) -> PathBuf {
    std::fs::write(path_in(dir, "base.raw"), base).unwrap();
    let img = path_in(dir, name);
    let f = std::fs::File::create(&img).unwrap();
    let mut o = vloop_qcow2::CreateOptions::new(size);
    o.backing = Some(("base.raw".into(), vloop_qcow2::Format::Raw));
    vloop_qcow2::create(&f, &o).unwrap();
    img
}

/// The raw copy and the rules by which discard changes it.
struct Model {
    data: Vec<u8>,
    cluster: u64,
    /// Discard keeps the data (version 2 with a backing file).
    discard_keeps: bool,
}

impl Model {
    fn write(&mut self, chain: &Chain, off: u64, data: &[u8]) {
        write_mapped(chain, off, data);
        self.data[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    fn discard(&mut self, chain: &Chain, off: u64, len: u64) {
        chain.discard(off, len).unwrap();
        if self.discard_keeps {
            return;
        }
        let size = self.data.len() as u64;
        let cs = self.cluster;
        let end = off + len;
        let mut c = off.div_ceil(cs) * cs;
        while c < end {
            let ce = (c + cs).min(size);
            if ce <= end {
                self.data[c as usize..ce as usize].fill(0);
            }
            c += cs;
        }
    }

    fn zeroes(&mut self, chain: &Chain, off: u64, len: u64, unmap: bool) {
        chain.write_zeroes(off, len, unmap).unwrap();
        self.data[off as usize..(off + len) as usize].fill(0);
    }

    fn verify(&self, chain: &Chain, what: &str) {
        let got = read_all(chain, 1 << 20);
        assert!(
            got == self.data,
            "{what}: first difference at {:?}",
            first_diff(&got, &self.data)
        );
    }

    fn verify_with_qemu(&self, img: &Path, what: &str) {
        assert_clean(img);
        let raw = img.with_extension("model.raw");
        std::fs::write(&raw, &self.data).unwrap();
        assert_same_as_raw(img, &raw);
        std::fs::remove_file(&raw).unwrap();
        let chain = open_chain(img, true);
        self.verify(&chain, what);
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Empty,
    Backed,
    Compressed,
}

/// Makes an image of `kind` whose size ends in a partial cluster, with zero clusters at
/// clusters 20..22 (version 3; version 2 gets real zeroes there).
fn make_image(dir: &tempfile::TempDir, kind: Kind, compat: &str, cs: u64) -> (PathBuf, u64) {
    let size = cs * 64 + 1536;
    let img = path_in(dir, &format!("{kind:?}-{compat}-{cs}.qcow2"));
    let opts = format!("cluster_size={cs},compat={compat}");
    match kind {
        Kind::Empty => qemu_create(&img, &size.to_string(), &opts, None),
        Kind::Backed => {
            let base = path_in(dir, &format!("base-{compat}-{cs}.raw"));
            std::fs::write(&base, pattern(cs, size as usize - 4096)).unwrap();
            qemu_create(&img, &size.to_string(), &opts, Some((p(&base), "raw")));
        }
        Kind::Compressed => {
            let src = path_in(dir, &format!("src-{compat}-{cs}.raw"));
            let mut d = pattern(cs + 1, size as usize);
            for (i, b) in d.iter_mut().enumerate() {
                if (i / 3000) % 2 == 0 {
                    *b = (i % 7) as u8;
                }
            }
            std::fs::write(&src, d).unwrap();
            qemu_compress(&src, &img, &opts);
        }
    }
    qemu_io(
        &img,
        "qcow2",
        &[&format!("write -z {} {}", 20 * cs, 2 * cs)],
    );
    (img, size)
}

fn shapes(kind: Kind, compat: &str, cs: u64) {
    let dir = tempdir();
    let (img, size) = make_image(&dir, kind, compat, cs);
    let what = format!("{kind:?} compat={compat} cluster={cs}");
    let mut m = Model {
        data: qemu_raw(&img),
        cluster: cs,
        discard_keeps: compat == "0.10" && matches!(kind, Kind::Backed),
    };
    let chain = open_chain(&img, false);
    m.verify(&chain, &what);
    let mut ext = Vec::new();
    chain.map_read(14 * cs, cs, &mut ext).unwrap();
    let compressed = matches!(ext[..], [Extent::Slow { .. }]);
    assert_eq!(
        compressed,
        matches!(kind, Kind::Compressed),
        "{what}: {ext:?}"
    );
    // Inside one cluster, then the same bytes again in place.
    m.write(&chain, 3 * cs + 512, &pattern(1, 1024));
    let again = pattern(2, 1024);
    assert_eq!(
        write_mapped(&chain, 3 * cs + 512, &again),
        WritePath::Direct,
        "{what}"
    );
    m.data[(3 * cs + 512) as usize..(3 * cs + 1536) as usize].copy_from_slice(&again);
    // Unaligned, inside one cluster.
    m.write(&chain, 4 * cs + 7, &pattern(3, 100));
    // Across clusters, partial head and tail.
    m.write(&chain, 5 * cs - 1024, &pattern(4, (2 * cs + 2048) as usize));
    // Partial clusters over the backing file (or compressed data).
    m.write(&chain, 10 * cs + 512, &pattern(5, 1024));
    m.write(&chain, 12 * cs - 512, &pattern(6, 1024));
    // Into compressed clusters: a whole one and part of one.
    m.write(&chain, cs, &pattern(7, cs as usize));
    m.write(&chain, 14 * cs + 4096.min(cs / 2), &pattern(8, 512));
    // Into a zero cluster: part of it, then all of the next.
    m.write(&chain, 20 * cs + 512, &pattern(9, 512));
    m.write(&chain, 21 * cs, &pattern(10, cs as usize));
    m.verify(&chain, &what);
    chain.flush().unwrap();
    // Discard with partial head and tail; write-zeroes with and without unmap.
    m.discard(&chain, 30 * cs - 512, 3 * cs + 1024);
    m.zeroes(&chain, 40 * cs + 512, 3 * cs, true);
    m.zeroes(&chain, 50 * cs, 2 * cs + 1000, false);
    m.zeroes(&chain, 3 * cs, cs, false);
    m.zeroes(&chain, 4 * cs, cs, true);
    m.verify(&chain, &what);
    // Discarded and zeroed clusters are written again.
    m.write(&chain, 31 * cs + 512, &pattern(11, 512));
    m.write(&chain, 3 * cs, &pattern(12, 512));
    // The last, partial cluster of the disk.
    m.write(&chain, size - 1024, &pattern(13, 1024));
    m.discard(&chain, size - 1536, 1536);
    m.write(&chain, size - 512, &pattern(14, 512));
    // A long write: allocated by the slow path, then one direct extent when contiguous.
    let long = pattern(15, (8 * cs) as usize);
    m.write(&chain, 56 * cs, &long);
    let mut ext = Vec::new();
    assert_eq!(
        chain.map_write(56 * cs, 8 * cs, &mut ext).unwrap(),
        WritePath::Direct
    );
    assert_eq!(ext.len(), 1, "{what}: {ext:?}");
    assert!(matches!(ext[0], Extent::Data { len, .. } if len == 8 * cs));
    m.verify(&chain, &what);
    chain.close().unwrap();
    drop(chain);
    m.verify_with_qemu(&img, &what);
}

/// The versions (as qemu-img's compat levels) and cluster sizes the shapes run on.
const GEOMETRIES: [(&str, u64); 4] = [
    ("0.10", 4096),
    ("0.10", 65536),
    ("1.1", 4096),
    ("1.1", 65536),
];

#[test]
fn every_shape_on_empty_images() {
    if !have_qemu("every_shape_on_empty_images") {
        return;
    }
    for (compat, cs) in GEOMETRIES {
        shapes(Kind::Empty, compat, cs);
    }
}

#[test]
fn every_shape_over_a_backing_file() {
    if !have_qemu("every_shape_over_a_backing_file") {
        return;
    }
    for (compat, cs) in GEOMETRIES {
        shapes(Kind::Backed, compat, cs);
    }
}

#[test]
fn every_shape_on_compressed_images() {
    if !have_qemu("every_shape_on_compressed_images") {
        return;
    }
    for (compat, cs) in [("0.10", 65536), ("1.1", 65536), ("1.1", 4096)] {
        shapes(Kind::Compressed, compat, cs);
    }
}

#[test]
fn discard_over_a_backing_file_never_shows_backing_data() {
    if !have_qemu("discard_over_a_backing_file_never_shows_backing_data") {
        return;
    }
    let dir = tempdir();
    let (img, _) = make_image(&dir, Kind::Backed, "1.1", 65536);
    let chain = open_chain(&img, false);
    write_mapped(&chain, 0, &vec![0x42; 4 << 16]);
    chain.discard(0, 4 << 16).unwrap();
    assert!(read_mapped(&chain, 0, 4 << 16).iter().all(|&b| b == 0));
    let mut ext = Vec::new();
    chain.map_read(0, 4 << 16, &mut ext).unwrap();
    assert_eq!(ext, vec![Extent::Zero { len: 4 << 16 }]);
    chain.close().unwrap();
    assert_clean(&img);
    assert!(qemu_raw(&img)[..4 << 16].iter().all(|&b| b == 0));
}

#[test]
fn small_clusters_grow_the_refcount_table() {
    if !have_qemu("small_clusters_grow_the_refcount_table") {
        return;
    }
    // 512-byte clusters: one refcount table cluster covers 8 MiB of file.
    let dir = tempdir();
    let img = path_in(&dir, "small.qcow2");
    qemu_create(&img, "24M", "cluster_size=512", None);
    // A cache of four L2 tables: constant eviction, and flushes forced by dirty tables.
    let opts = vloop_qcow2::OpenOptions {
        cache_bytes: 2048,
        ..vloop_qcow2::OpenOptions::default()
    };
    let chain = try_open_opts(&img, &opts).unwrap();
    let mut model = vec![0u8; 24 << 20];
    for i in 0..20u64 {
        let d = pattern(i, 1 << 20);
        write_mapped(&chain, i << 20, &d);
        model[(i << 20) as usize..((i + 1) << 20) as usize].copy_from_slice(&d);
        if i % 7 == 0 {
            chain.flush().unwrap();
        }
    }
    assert!(read_all(&chain, 100_000) == model);
    chain.close().unwrap();
    drop(chain);
    assert_clean(&img);
    let header = std::fs::read(&img).unwrap();
    let table = u64::from_be_bytes(header[48..56].try_into().unwrap());
    let clusters = u32::from_be_bytes(header[56..60].try_into().unwrap());
    assert!(
        table != 512 && clusters > 1,
        "the refcount table did not move: {table} {clusters}"
    );
    let raw = path_in(&dir, "small.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_same_as_raw(&img, &raw);
}

#[test]
fn created_images_are_clean_and_writable() {
    if !have_qemu("created_images_are_clean_and_writable") {
        return;
    }
    let dir = tempdir();
    for (cs, version, size) in [
        (65536u64, 3u32, 1u64 << 30),
        (512, 2, 64 << 20),
        (2 << 20, 3, 100 << 20),
        (4096, 3, 200 << 30),
    ] {
        let img = path_in(&dir, &format!("new-{cs}-{version}.qcow2"));
        let f = std::fs::File::create(&img).unwrap();
        let mut o = vloop_qcow2::CreateOptions::new(size);
        o.cluster_size = cs;
        o.version = version;
        vloop_qcow2::create(&f, &o).unwrap();
        drop(f);
        assert_clean(&img);
        let info = run("qemu-img", &["info", "--output=json", p(&img)]);
        assert!(
            info.contains(&format!("\"virtual-size\": {size}")),
            "{info}"
        );
        assert!(info.contains(&format!("\"cluster-size\": {cs}")), "{info}");
        let chain = open_chain(&img, false);
        write_mapped(&chain, size / 2, &pattern(1, 8192));
        chain.close().unwrap();
        drop(chain);
        assert_clean(&img);
        let got = read_mapped(&open_chain(&img, true), size / 2, 8192);
        assert_eq!(got, pattern(1, 8192));
    }
}

#[test]
fn created_overlay_over_a_relative_backing_file() {
    if !have_qemu("created_overlay_over_a_relative_backing_file") {
        return;
    }
    let dir = tempdir();
    let img = overlay_on_raw(&dir, "top.qcow2", &pattern(9, 1 << 20), 2 << 20);
    assert_clean(&img);
    let chain = open_chain(&img, false);
    assert_eq!(chain.layers(), 2);
    write_mapped(&chain, 4096, &[0xee; 512]);
    chain.close().unwrap();
    drop(chain);
    let mut want = pattern(9, 1 << 20);
    want.resize(2 << 20, 0);
    want[4096..4608].fill(0xee);
    assert_eq!(qemu_raw(&img), want);
    assert_clean(&img);
}

#[test]
fn freed_clusters_wait_for_reclaim_before_reuse() {
    if !have_qemu("freed_clusters_wait_for_reclaim_before_reuse") {
        return;
    }
    let dir = tempdir();
    let img = path_in(&dir, "q.qcow2");
    let cs = 65536u64;
    qemu_create(&img, "16M", "", None);
    let chain = try_open_with(&img, false, vloop_qcow2::Backing::None, 8 * cs).unwrap();
    write_mapped(&chain, 0, &pattern(1, (8 * cs) as usize));
    let mut before = Vec::new();
    chain.map_write(0, 8 * cs, &mut before).unwrap();
    let Extent::Data { host: old_host, .. } = before[0] else {
        panic!("{before:?}")
    };
    // A mark taken before the discard does not release its clusters.
    let early = chain.free_mark();
    chain.discard(0, 8 * cs).unwrap();
    assert_eq!(chain.quarantined(), 0, "frees wait for the flush");
    chain.flush().unwrap();
    assert_eq!(chain.quarantined(), 8);
    chain.reclaim_freed(early).unwrap();
    assert_eq!(chain.quarantined(), 8);
    // Not reused while quarantined: new data goes elsewhere.
    write_mapped(&chain, 4 << 20, &pattern(2, (8 * cs) as usize));
    let mut ext = Vec::new();
    chain.map_write(4 << 20, 8 * cs, &mut ext).unwrap();
    let Extent::Data { host, .. } = ext[0] else {
        panic!("{ext:?}")
    };
    assert!(
        host >= old_host + 8 * cs || host + 8 * cs <= old_host,
        "reused a quarantined cluster"
    );
    // After the reclaim they are reused.
    chain.reclaim_freed(chain.free_mark()).unwrap();
    assert_eq!(chain.quarantined(), 0);
    write_mapped(&chain, 8 << 20, &pattern(3, (24 * cs) as usize));
    let mut hosts = Vec::new();
    chain.map_read(8 << 20, 24 * cs, &mut ext).unwrap();
    for e in &ext {
        if let Extent::Data { host, len, .. } = *e {
            hosts.push((host, len));
        }
    }
    assert!(
        hosts
            .iter()
            .any(|&(h, l)| h <= old_host && old_host < h + l),
        "{hosts:?} does not reuse {old_host:#x}"
    );
    chain.close().unwrap();
    drop(chain);
    assert_clean(&img);
    let got = qemu_raw(&img);
    assert!(got[..(8 * cs) as usize].iter().all(|&b| b == 0));
    assert!(got[4 << 20..(4 << 20) + (8 * cs) as usize] == pattern(2, (8 * cs) as usize)[..]);
    assert!(got[8 << 20..(8 << 20) + (24 * cs) as usize] == pattern(3, (24 * cs) as usize)[..]);
}

#[test]
fn buffered_writes_keep_zero_clusters_as_holes() {
    if !have_qemu("buffered_writes_keep_zero_clusters_as_holes") {
        return;
    }
    let dir = tempdir();
    for compat in ["0.10", "1.1"] {
        let img = path_in(&dir, &format!("holes-{compat}.qcow2"));
        qemu_create(&img, "1M", &format!("compat={compat}"), None);
        let chain = open_chain(&img, false);
        let mut data = vec![0u8; 1 << 20];
        data[100..200].fill(1);
        data[(5 << 16) + 7] = 2;
        data[(15 << 16)..].fill(3);
        chain.write_at(&data, 0).unwrap();
        assert_eq!(chain.info().unwrap().allocated_clusters, Some(3));
        chain.close().unwrap();
        drop(chain);
        assert_clean(&img);
        assert_eq!(qemu_raw(&img), data);
        let map = run("qemu-img", &["map", "--output=json", p(&img)]);
        assert_eq!(map.matches("\"data\": true").count(), 3, "{map}");
    }
}

#[test]
fn every_refcount_width_and_lazy_refcounts() {
    if !have_qemu("every_refcount_width_and_lazy_refcounts") {
        return;
    }
    let dir = tempdir();
    for opts in [
        "refcount_bits=1",
        "refcount_bits=2",
        "refcount_bits=4",
        "refcount_bits=8",
        "refcount_bits=32",
        "refcount_bits=64",
        "lazy_refcounts=on",
    ] {
        let img = path_in(&dir, &format!("{opts}.qcow2"));
        let o = format!("cluster_size=4096,{opts}");
        qemu_create(&img, "4M", &o, None);
        qemu_io(&img, "qcow2", &["write -P 0x61 0 64k"]);
        let mut model = qemu_raw(&img);
        let chain = try_open_with(&img, false, vloop_qcow2::Backing::FromImage, 16 << 10).unwrap();
        for i in 0..40u64 {
            let off = (i * 37 % 1000) * 4096;
            let d = pattern(i, 6000);
            write_mapped(&chain, off, &d);
            model[off as usize..off as usize + 6000].copy_from_slice(&d);
            if i % 9 == 0 {
                chain.discard(off, 8192).unwrap();
                model[off as usize..off as usize + 8192].fill(0);
                chain.flush().unwrap();
                chain.reclaim_freed(chain.free_mark()).unwrap();
            }
        }
        chain.close().unwrap();
        drop(chain);
        assert_clean(&img);
        let raw = path_in(&dir, "m.raw");
        std::fs::write(&raw, &model).unwrap();
        assert_same_as_raw(&img, &raw);
    }
}

/// The image file with a switch that makes its syncs fail, as fdatasync fails once after a
/// writeback error (and succeeds again after, the error reported).
struct FailingSync {
    file: std::fs::File,
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl vloop_qcow2::Storage for FailingSync {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        vloop_qcow2::Storage::read_at(&self.file, buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        vloop_qcow2::Storage::write_at(&self.file, buf, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        if self.fail.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.sync_data()
    }
    fn file_size(&self) -> std::io::Result<u64> {
        vloop_qcow2::Storage::file_size(&self.file)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }
    fn fd(&self) -> std::os::fd::RawFd {
        vloop_qcow2::Storage::fd(&self.file)
    }
    fn identity(&self) -> std::io::Result<(u64, u64)> {
        vloop_qcow2::Storage::identity(&self.file)
    }
}

#[test]
fn after_a_failed_sync_every_flush_fails() {
    // A sync inside an allocating write fails: the data of earlier completed writes may be
    // lost, and the next fdatasync would succeed, so no later flush may report success.
    let dir = tempdir();
    let img = overlay_on_raw(&dir, "img.qcow2", &pattern(3, 4 << 20), 4 << 20);
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let opts = vloop_qcow2::OpenOptions {
        format: Some(vloop_qcow2::Format::Qcow2),
        ..vloop_qcow2::OpenOptions::default()
    };
    let chain = Chain::open_storage(
        Box::new(FailingSync {
            file,
            fail: fail.clone(),
        }),
        &img,
        &opts,
        &mut ro_opener,
    )
    .unwrap();
    chain.write_at(&pattern(1, 65536), 0).unwrap();
    chain.flush().unwrap();
    fail.store(true, std::sync::atomic::Ordering::Relaxed);
    // A partial first write to another cluster copies the rest of it from the backing file,
    // synced before the L2 entry naming the cluster is written.
    assert!(chain.write_at(&pattern(2, 512), 1 << 20).is_err());
    assert!(
        !fail.load(std::sync::atomic::Ordering::Relaxed),
        "no sync ran"
    );
    for _ in 0..2 {
        assert!(
            chain.flush().is_err(),
            "a flush succeeded after a failed sync"
        );
    }
}

#[test]
fn zeroes_written_without_the_named_backing_file_stay_zeroes_with_it() {
    let dir = tempdir();
    let img = overlay_on_raw(&dir, "img.qcow2", &pattern(4, 1 << 20), 1 << 20);
    let chain = try_open(&img, false, vloop_qcow2::Backing::None).unwrap();
    for unmap in [false, true] {
        let at = if unmap { 3 * 65536 } else { 65536 };
        chain.write_zeroes(at, 2 * 65536, unmap).unwrap();
    }
    chain.close().unwrap();
    let chain = open_chain(&img, true);
    let got = read_all(&chain, 65536);
    let mut want = pattern(4, 1 << 20);
    want[65536..5 * 65536].fill(0);
    assert!(
        got == want,
        "first difference at {:?}",
        first_diff(&got, &want)
    );
}

/// Bytes the file holds on disk.
fn allocated(img: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(img).unwrap().blocks() * 512
}

#[test]
fn discarded_clusters_go_back_to_the_file_system_unless_told_not_to() {
    if !have_qemu("discarded_clusters_go_back_to_the_file_system_unless_told_not_to") {
        return;
    }
    let dir = tempdir();
    let mb = 1u64 << 20;
    for punch in [true, false] {
        let img = path_in(&dir, &format!("punch-{punch}.qcow2"));
        qemu_create(&img, "64M", "", None);
        let opts = vloop_qcow2::OpenOptions {
            punch_freed: punch,
            ..vloop_qcow2::OpenOptions::default()
        };
        let chain = try_open_opts(&img, &opts).unwrap();
        write_mapped(&chain, 0, &pattern(1, (16 * mb) as usize));
        chain.flush().unwrap();
        let full = allocated(&img);
        assert!(full >= 16 * mb, "{full}");
        // Freed at the flush, punched at the reclaim.
        chain.discard(0, 8 * mb).unwrap();
        chain.flush().unwrap();
        // Equal but for the odd metadata block.
        let near = |a: u64, b: u64| a.abs_diff(b) <= 256 << 10;
        assert!(near(allocated(&img), full), "punched before the reclaim");
        chain.reclaim_freed(chain.free_mark()).unwrap();
        let after = allocated(&img);
        if punch {
            // The metadata written meanwhile may take a block or two.
            assert!(after + 7 * mb <= full, "{after} of {full}");
        } else {
            assert!(near(after, full), "{after} of {full}");
        }
        // Freed by the last flush: punched at close.
        chain.discard(8 * mb, 4 * mb).unwrap();
        chain.close().unwrap();
        let closed = allocated(&img);
        if punch {
            assert!(closed + 3 * mb <= after, "{closed} of {after}");
        } else {
            assert!(near(closed, after), "{closed} of {after}");
        }
        // Punched clusters are reused and read back what is written into them.
        let d = pattern(2, (12 * mb) as usize);
        write_mapped(&chain, 32 * mb, &d);
        assert!(read_mapped(&chain, 32 * mb, 12 * mb) == d);
        assert!(read_mapped(&chain, 0, 12 * mb).iter().all(|&b| b == 0));
        assert!(
            read_mapped(&chain, 12 * mb, 4 * mb)
                == pattern(1, (16 * mb) as usize)[(12 * mb) as usize..]
        );
        chain.close().unwrap();
        drop(chain);
        assert_clean(&img);
    }
}
