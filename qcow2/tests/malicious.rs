//! Malicious images, crafted by patching the headers and tables of small valid ones: every
//! one gets an error (at open or for the request), never a panic, a huge allocation or a read
//! outside the file.

mod common;

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use common::*;
use vloop_qcow2::{
    create, Backing, Chain, CreateOptions, Error, Extent, Format, HeaderError, LayerError,
    OpenOptions, Storage,
};

const CS: u64 = 65536;

/// A storage that fails the test on any read reaching past the end of the file.
struct Guard(File);

impl Storage for Guard {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let size = self.0.file_size()?;
        assert!(
            off + buf.len() as u64 <= size,
            "read of {} bytes at {off} past the end ({size})",
            buf.len()
        );
        Storage::read_at(&self.0, buf, off)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<usize> {
        let size = self.0.file_size()?;
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        assert!(
            off + len <= size,
            "read of {len} bytes at {off} past the end ({size})"
        );
        Storage::read_vectored_at(&self.0, bufs, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        Storage::write_at(&self.0, buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn file_size(&self) -> io::Result<u64> {
        self.0.file_size()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn fd(&self) -> RawFd {
        Storage::fd(&self.0)
    }
    fn identity(&self) -> io::Result<(u64, u64)> {
        self.0.identity()
    }
}

/// A valid 4 MiB image with data in its first two clusters; returns the path.
fn valid(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    let img = path_in(dir, name);
    let f = File::create(&img).unwrap();
    create(&f, &CreateOptions::new(4 << 20)).unwrap();
    drop(f);
    let chain = open_chain(&img, false);
    chain.write_at(&pattern(1, 2 * CS as usize), 0).unwrap();
    chain.close().unwrap();
    img
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Patches the image: `f` gets the bytes and the offsets of the L1 table, the first L2
/// table and the refcount table.
fn patch(img: &Path, f: impl FnOnce(&mut Vec<u8>, u64, u64, u64)) {
    let mut b = std::fs::read(img).unwrap();
    let l1 = be64(&b, 40);
    let rt = be64(&b, 48);
    let l2 = be64(&b, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    f(&mut b, l1, l2, rt);
    std::fs::write(img, b).unwrap();
}

fn put(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}

fn open_guarded(img: &Path, read_only: bool) -> vloop_qcow2::chain::Result<Chain> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(img)
        .unwrap();
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        read_only,
        backing: Backing::FromImage,
        ..OpenOptions::default()
    };
    Chain::open_storage(Box::new(Guard(f)), img, &opts, &mut ro_opener)
}

/// Opens (read-only) and reads the first two clusters; returns the first error.
fn read_err(img: &Path) -> Error {
    let chain = match open_guarded(img, true) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut buf = vec![0u8; 2 * CS as usize];
    let mut ext = Vec::new();
    if let Err(e) = chain.map_read(0, 2 * CS, &mut ext) {
        return e;
    }
    chain.read_at(&mut buf, 0).expect_err("the read succeeded")
}

fn layer(e: &Error) -> &LayerError {
    match e {
        Error::Layer { source, .. } => source,
        other => panic!("not a layer error: {other:?}"),
    }
}

#[test]
fn l1_entries_past_the_end_unaligned_or_into_metadata() {
    let dir = tempdir();
    let img = valid(&dir, "past.qcow2");
    patch(&img, |b, l1, _, _| put(b, l1, (1 << 40) | (1 << 63)));
    assert!(matches!(
        layer(&read_err(&img)),
        LayerError::PastEnd {
            what: "L2 table",
            ..
        }
    ));
    let img = valid(&dir, "unaligned.qcow2");
    patch(&img, |b, l1, l2, _| put(b, l1, (l2 + 512) | (1 << 63)));
    assert!(matches!(layer(&read_err(&img)), LayerError::Table(_)));
    for (name, target) in [("into-l1.qcow2", 'l'), ("into-rt.qcow2", 'r')] {
        let img = valid(&dir, name);
        patch(&img, |b, l1, _, rt| {
            put(b, l1, if target == 'l' { l1 } else { rt } | (1 << 63))
        });
        assert!(
            matches!(layer(&read_err(&img)), LayerError::Overlap { .. }),
            "{name}"
        );
    }
}

#[test]
fn l2_entries_past_the_end_unaligned_or_into_metadata() {
    let dir = tempdir();
    let img = valid(&dir, "data-past.qcow2");
    patch(&img, |b, _, l2, _| put(b, l2, (1 << 40) | (1 << 63)));
    assert!(matches!(
        layer(&read_err(&img)),
        LayerError::PastEnd {
            what: "data cluster",
            ..
        }
    ));
    let img = valid(&dir, "data-unaligned.qcow2");
    patch(&img, |b, _, l2, _| put(b, l2, (3 * CS + 4096) | (1 << 63)));
    assert!(matches!(layer(&read_err(&img)), LayerError::Table(_)));
    // Pointing a data cluster at the L1 table: reading is harmless, writing is refused.
    let img = valid(&dir, "data-meta.qcow2");
    patch(&img, |b, l1, l2, _| put(b, l2, l1 | (1 << 63)));
    let chain = open_guarded(&img, false).unwrap();
    let mut ext = Vec::new();
    assert_eq!(
        chain.map_write(0, 512, &mut ext).unwrap(),
        vloop_qcow2::WritePath::Slow
    );
    let e = chain
        .write_slow(0, &[IoSlice::new(&[1u8; 512])])
        .unwrap_err();
    assert!(matches!(layer(&e), LayerError::DataInMetadata(_)), "{e:?}");
    let e = chain.discard(0, CS).unwrap_err();
    assert!(matches!(layer(&e), LayerError::DataInMetadata(_)), "{e:?}");
}

#[test]
fn a_zero_cluster_in_a_version_2_image_is_corruption() {
    let dir = tempdir();
    let img = path_in(&dir, "v2-zero.qcow2");
    let f = File::create(&img).unwrap();
    let mut o = CreateOptions::new(4 << 20);
    o.version = 2;
    create(&f, &o).unwrap();
    drop(f);
    let chain = open_chain(&img, false);
    chain.write_at(&pattern(1, 2 * CS as usize), 0).unwrap();
    chain.close().unwrap();
    drop(chain);
    // Version 2 has no zero clusters: bit 0 set is not "reads as zeroes" (QEMU reports
    // corruption too).
    patch(&img, |b, _, l2, _| {
        let e = be64(b, l2 as usize);
        put(b, l2, e | 1)
    });
    let e = read_err(&img);
    assert!(
        matches!(
            layer(&e),
            LayerError::Table(vloop_qcow2::table::TableError::ZeroInVersion2(_))
        ),
        "{e:?}"
    );
}

#[test]
fn table_offsets_in_the_header_are_refused() {
    let dir = tempdir();
    for (name, at, v) in [
        ("l1-past.qcow2", 40, 1u64 << 40),
        ("l1-unaligned.qcow2", 40, 3 * CS + 8),
        ("l1-header.qcow2", 40, 0),
        ("rt-past.qcow2", 48, 1 << 40),
        ("rt-header.qcow2", 48, 0),
    ] {
        let img = valid(&dir, name);
        patch(&img, |b, _, _, _| put(b, at, v));
        let e = open_guarded(&img, false)
            .err()
            .unwrap_or_else(|| panic!("{name} opened"));
        assert!(
            matches!(
                layer(&e),
                LayerError::PastEnd { .. } | LayerError::Header(HeaderError::TableOffset { .. })
            ),
            "{name}: {e:?}"
        );
    }
}

#[test]
fn sizes_out_of_range_are_refused() {
    let dir = tempdir();
    let cases: [(&str, usize, Vec<u8>); 5] = [
        ("bits-8.qcow2", 20, 8u32.to_be_bytes().to_vec()),
        ("bits-22.qcow2", 20, 22u32.to_be_bytes().to_vec()),
        ("huge-size.qcow2", 24, (1u64 << 62).to_be_bytes().to_vec()),
        ("huge-l1.qcow2", 36, u32::MAX.to_be_bytes().to_vec()),
        ("huge-rt.qcow2", 56, 100_000u32.to_be_bytes().to_vec()),
    ];
    for (name, at, bytes) in cases {
        let img = valid(&dir, name);
        patch(&img, |b, _, _, _| {
            b[at..at + bytes.len()].copy_from_slice(&bytes)
        });
        let e = open_guarded(&img, true)
            .err()
            .unwrap_or_else(|| panic!("{name} opened"));
        assert!(matches!(layer(&e), LayerError::Header(_)), "{name}: {e:?}");
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn refcount_blocks_past_the_end_or_counting_too_few() {
    let dir = tempdir();
    let img = valid(&dir, "rb-past.qcow2");
    patch(&img, |b, _, _, rt| put(b, rt, 1 << 40));
    // The refcounts of the image's metadata are read when it opens read-write; read-only it
    // needs none.
    let e = open_guarded(&img, false).err().expect("opened read-write");
    assert!(
        matches!(
            layer(&e),
            LayerError::PastEnd {
                what: "refcount block",
                ..
            }
        ),
        "{e:?}"
    );
    let chain = open_guarded(&img, true).unwrap();
    assert_eq!(read_mapped(&chain, 0, 512), pattern(1, 512));
    drop(chain);
    // A refcount of zero for a cluster in use: freeing it is refused, not wrapped.
    let img = valid(&dir, "rc-zero.qcow2");
    patch(&img, |b, _, l2, rt| {
        let block = be64(b, rt as usize);
        let data = be64(b, l2 as usize) & 0x00ff_ffff_ffff_fe00;
        let at = (block + 2 * (data / CS)) as usize;
        b[at..at + 2].copy_from_slice(&[0, 0]);
    });
    let chain = open_guarded(&img, false).unwrap();
    let e = chain.discard(0, CS).unwrap_err();
    assert!(
        matches!(layer(&e), LayerError::RefcountUnderflow(_)),
        "{e:?}"
    );
}

#[test]
fn compressed_descriptors_past_the_end_or_garbage() {
    let dir = tempdir();
    let shift = 62 - (16 - 8);
    let img = valid(&dir, "comp-past.qcow2");
    patch(&img, |b, _, l2, _| {
        put(b, l2, (1 << 62) | (3 << shift) | (1 << 40))
    });
    assert!(matches!(read_err(&img), Error::CompressedPastEnd { .. }));
    // Compressed data that is the header: not valid deflate.
    let img = valid(&dir, "comp-garbage.qcow2");
    patch(&img, |b, _, l2, _| {
        put(b, l2, (1 << 62) | (7 << shift) | 100)
    });
    assert!(matches!(read_err(&img), Error::Compressed { .. }));
    // Sector count running past the end of the file: the read is cut at the end.
    let img = valid(&dir, "comp-long.qcow2");
    let len = std::fs::metadata(&img).unwrap().len();
    patch(&img, |b, _, l2, _| {
        put(b, l2, (1 << 62) | (255 << shift) | (len - 1000))
    });
    assert!(matches!(read_err(&img), Error::Compressed { .. }));
}

#[test]
fn backing_loops_and_overlong_chains_are_refused() {
    let dir = tempdir();
    let a = path_in(&dir, "a.qcow2");
    let b = path_in(&dir, "b.qcow2");
    for (img, backing) in [(&a, "b.qcow2"), (&b, "a.qcow2")] {
        let f = File::create(img).unwrap();
        let mut o = CreateOptions::new(1 << 20);
        o.backing = Some((backing.into(), Format::Qcow2));
        create(&f, &o).unwrap();
    }
    assert!(matches!(
        try_open(&a, true, Backing::FromImage),
        Err(Error::Loop { .. })
    ));
    // An opener that refuses a file the chain already holds (as a lock held by the top image
    // would) is not asked for it: the loop is what gets reported.
    let mut locking_opener = |p: &Path, _: Option<Format>| -> io::Result<File> {
        if p.ends_with("a.qcow2") {
            return Err(io::Error::other("locked"));
        }
        File::open(p)
    };
    let opts = OpenOptions::default();
    let top = File::open(&a).unwrap();
    let Err(err) = Chain::open(top, &a, &opts, &mut locking_opener) else {
        panic!("a chain looping back opened");
    };
    assert!(matches!(err, Error::Loop { .. }), "{err}");
    assert!(err.to_string().contains("loops"), "{err}");
    let selfish = path_in(&dir, "self.qcow2");
    let f = File::create(&selfish).unwrap();
    let mut o = CreateOptions::new(1 << 20);
    o.backing = Some(("self.qcow2".into(), Format::Qcow2));
    create(&f, &o).unwrap();
    assert!(matches!(
        try_open(&selfish, true, Backing::FromImage),
        Err(Error::Loop { .. })
    ));
    // 70 layers.
    let mut below: Option<String> = None;
    for i in 0..70 {
        let name = format!("l{i}.qcow2");
        let f = File::create(path_in(&dir, &name)).unwrap();
        let mut o = CreateOptions::new(1 << 20);
        o.backing = below.take().map(|n| (n, Format::Qcow2));
        create(&f, &o).unwrap();
        below = Some(name);
    }
    let top = path_in(&dir, "l69.qcow2");
    assert!(matches!(
        try_open(&top, true, Backing::FromImage),
        Err(Error::TooLong { .. })
    ));
    assert!(try_open(&path_in(&dir, "l60.qcow2"), true, Backing::FromImage).is_ok());
    // Overriding the backing file cuts the chain.
    let c = try_open(&top, true, Backing::None).unwrap();
    assert_eq!(c.layers(), 1);
}

#[test]
fn unsupported_features_name_the_fix() {
    let dir = tempdir();
    let cases: [(&str, usize, u64, &str); 5] = [
        ("dirty.qcow2", 72, 1, "qemu-img check -r all"),
        ("corrupt.qcow2", 72, 2, "qemu-img check -r all"),
        ("datafile.qcow2", 72, 4, "external data file"),
        ("extl2.qcow2", 72, 16, "extended L2"),
        ("bit9.qcow2", 72, 1 << 9, "bit 9"),
    ];
    for (name, at, v, words) in cases {
        let img = valid(&dir, name);
        patch(&img, |b, _, _, _| put(b, at as u64, v));
        let e = open_guarded(&img, false)
            .err()
            .unwrap_or_else(|| panic!("{name} opened"));
        let text = format!("{e}: {}", layer(&e));
        assert!(text.contains(words), "{name}: {text}");
    }
    let img = valid(&dir, "bitmaps.qcow2");
    patch(&img, |b, _, _, _| put(b, 88, 1));
    assert!(matches!(
        layer(&open_guarded(&img, false).err().unwrap()),
        LayerError::Header(HeaderError::Bitmaps)
    ));
    assert!(open_guarded(&img, true).is_ok());
    let img = valid(&dir, "crypt.qcow2");
    patch(&img, |b, _, _, _| {
        b[32..36].copy_from_slice(&2u32.to_be_bytes())
    });
    assert!(matches!(
        layer(&open_guarded(&img, true).err().unwrap()),
        LayerError::Header(HeaderError::Encrypted(2))
    ));
    // Unknown autoclear bits are cleared by a read-write open.
    let img = valid(&dir, "autoclear.qcow2");
    patch(&img, |b, _, _, _| put(b, 88, 1 << 5));
    drop(open_guarded(&img, false).unwrap());
    assert_eq!(be64(&std::fs::read(&img).unwrap(), 88), 0);
}

#[test]
fn truncated_images_are_refused() {
    let dir = tempdir();
    let img = valid(&dir, "trunc.qcow2");
    for len in [0u64, 50, 100, 4096, 3 * CS + 100] {
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(len).unwrap();
        drop(f);
        assert!(!read_err(&img).to_string().is_empty(), "length {len}");
    }
}

/// Moves guest cluster 0 of a [`valid`] image to the last cluster of the file, then cuts the
/// file in that cluster's middle; returns the file's length before the cut.
fn cut_in_its_data_cluster(img: &Path) -> u64 {
    let len = std::fs::metadata(img).unwrap().len();
    patch(img, |b, _, l2, _| put(b, l2, (len - CS) | (1 << 63)));
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.set_len(len - CS / 2).unwrap();
    len
}

#[test]
fn mapped_extents_stay_inside_the_file() {
    let dir = tempdir();
    let img = valid(&dir, "inside.qcow2");
    let len = cut_in_its_data_cluster(&img);
    let chain = open_guarded(&img, true).unwrap();
    let mut ext = Vec::new();
    chain.map_read(0, CS, &mut ext).unwrap();
    for e in &ext {
        if let Extent::Data { host, len: n, .. } = *e {
            assert!(host + n <= len - CS / 2, "{ext:?}");
        }
    }
    assert_eq!(ext.last(), Some(&Extent::Zero { len: CS / 2 }));
    let mut buf = vec![1u8; CS as usize];
    chain.read_at(&mut buf, 0).unwrap();
    assert!(buf[CS as usize / 2..].iter().all(|&b| b == 0));
}

#[test]
fn a_write_into_a_cluster_cut_by_the_end_of_the_file_reads_back() {
    let dir = tempdir();
    let img = valid(&dir, "cut.qcow2");
    cut_in_its_data_cluster(&img);
    let chain = open_guarded(&img, false).unwrap();
    // The write lands in place, past the old end: the file grows, and so must the length the
    // chain maps reads against (or they read the new bytes as zeroes).
    let tail = pattern(9, 512);
    let at = CS - 512;
    assert_eq!(
        write_mapped(&chain, at, &tail),
        vloop_qcow2::WritePath::Slow
    );
    assert_eq!(read_mapped(&chain, at, 512), tail);
    let mut buf = vec![0u8; 512];
    chain.read_at(&mut buf, at).unwrap();
    assert_eq!(buf, tail);
    chain.close().unwrap();
    let chain = open_guarded(&img, true).unwrap();
    assert_eq!(read_mapped(&chain, at, 512), tail);
}

#[test]
fn refcount_blocks_missing_or_over_other_metadata_refuse_a_read_write_open() {
    let dir = tempdir();
    // A cleared refcount table entry: the header and the tables read as free, and the first
    // allocation put a new refcount block over the header.
    let img = valid(&dir, "rt-cleared.qcow2");
    patch(&img, |b, _, _, rt| put(b, rt, 0));
    let e = open_guarded(&img, false).err().expect("opened read-write");
    assert!(matches!(layer(&e), LayerError::Uncounted(0)), "{e:?}");
    let chain = open_guarded(&img, true).unwrap();
    assert_eq!(read_mapped(&chain, 0, 512), pattern(1, 512));
    drop(chain);
    // A refcount block that is the L1 table, the refcount table or an L2 table: refcounts
    // were written over their entries.
    for which in ["L1 table", "refcount table", "L2 table"] {
        let img = valid(&dir, &format!("rb-{}.qcow2", which.replace(' ', "-")));
        patch(&img, |b, l1, l2, rt| {
            let at = match which {
                "L1 table" => l1,
                "refcount table" => rt,
                _ => l2,
            };
            put(b, rt, at)
        });
        let e = open_guarded(&img, false).err().expect("opened read-write");
        assert!(
            matches!(layer(&e), LayerError::Overlap { .. }),
            "{which}: {e:?}"
        );
        let chain = open_guarded(&img, true).unwrap();
        assert_eq!(read_mapped(&chain, 0, 512), pattern(1, 512), "{which}");
    }
    // An L2 table that is the refcount table.
    let img = valid(&dir, "l2-over-rt.qcow2");
    patch(&img, |b, l1, _, rt| put(b, l1, rt | (1 << 63)));
    let e = open_guarded(&img, false).err().expect("opened read-write");
    assert!(
        matches!(
            layer(&e),
            LayerError::Overlap {
                what: "L2 table",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn a_write_to_a_cluster_past_the_end_of_the_file_is_refused() {
    let dir = tempdir();
    for zero in [false, true] {
        let img = valid(&dir, &format!("past-{zero}.qcow2"));
        let flag = if zero { 1 } else { 0 };
        patch(&img, |b, _, l2, _| put(b, l2, (1 << 40) | (1 << 63) | flag));
        let len = std::fs::metadata(&img).unwrap().len();
        let chain = open_guarded(&img, false).unwrap();
        let mut ext = Vec::new();
        // Reads of it are refused (a zero cluster reads as zeroes); a write must not grow the
        // file to it.
        let e = match chain.map_write(0, 512, &mut ext) {
            Ok(vloop_qcow2::WritePath::Slow) => chain
                .write_slow(0, &[std::io::IoSlice::new(&[7u8; 512])])
                .unwrap_err(),
            other => panic!("zero {zero}: {other:?} {ext:?}"),
        };
        assert!(
            matches!(layer(&e), LayerError::PastEnd { .. }),
            "zero {zero}: {e:?}"
        );
        chain.close().unwrap();
        assert!(
            std::fs::metadata(&img).unwrap().len() <= len,
            "zero {zero}: the file grew"
        );
    }
}

#[test]
fn an_l2_table_named_twice_is_not_counted_again() {
    let dir = tempdir();
    let img = path_in(&dir, "twice.qcow2");
    let f = File::create(&img).unwrap();
    // Two L1 entries (one L2 table covers 512 MiB).
    create(&f, &CreateOptions::new(1 << 30)).unwrap();
    drop(f);
    let chain = open_chain(&img, false);
    chain.write_at(&pattern(1, 4096), 0).unwrap();
    chain.close().unwrap();
    patch(&img, |b, l1, _, _| {
        let first = be64(b, l1 as usize);
        put(b, l1 + 8, first)
    });
    let chain = open_guarded(&img, true).unwrap();
    let e = chain.info().unwrap_err();
    assert!(
        matches!(
            layer(&e),
            LayerError::Overlap {
                what: "L2 table",
                ..
            }
        ),
        "{e:?}"
    );
}
