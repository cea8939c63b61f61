//! `vloop-image convert` between raw and qcow2 (chains flattened), checked with qemu-img (the
//! oracle): `qemu-img compare` finds conversions equal to their sources and `qemu-img check`
//! finds them clean; errors, interruptions and the probing guard leave nothing behind.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::qemu::*;
use common::*;

#[test]
fn convert_round_trips_keep_holes_and_pass_qemu_img() {
    if !have_qemu_img("convert_round_trips_keep_holes_and_pass_qemu_img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let src = dir.join("src.raw");
    sparse_source_with_zeroes(&src);
    let want = sha256(&src);
    let data = 3u64 << 20;
    for (cs, name) in [(512u64, "512"), (65536, "64K"), (2 << 20, "2M")] {
        let q = format!("out{cs}.qcow2");
        let out = ok(
            &["convert", "src.raw", &q, "--cluster-size", name, "--verify"],
            dir,
        );
        assert!(out.contains("verified"), "{out}");
        assert_eq!(sha_line(&out), want, "{out}");
        check_clean(&q, dir);
        assert_equal("src.raw", "raw", &q, "qcow2", dir);
        let j = qemu_json(&["info", "--output=json", &q], dir);
        assert_eq!(j["cluster-size"], cs);
        assert_eq!(j["virtual-size"], 64 << 20);
        // Holes kept: the data (rounded to clusters) plus metadata, not 64 MiB.
        let most = data + 4 * cs.max(65536) + (1 << 20);
        let used = j["actual-size"].as_u64().unwrap();
        assert!(used <= most, "{q}: {used} bytes allocated");
        // And back to raw: the same bytes, sparse.
        let r = format!("back{cs}.raw");
        let out = ok(&["convert", &q, &r, "--verify"], dir);
        assert_eq!(sha_line(&out), want);
        assert_eq!(sha256(&dir.join(&r)), want);
        assert!(allocated(&dir.join(&r)) <= data + (1 << 20));
        // qemu-img's own reading of the qcow2 output agrees with the hash printed.
        qemu_img(&["convert", "-O", "raw", &q, "oracle.raw"], dir);
        assert_eq!(sha256(&dir.join("oracle.raw")), want);
        fs::remove_file(dir.join("oracle.raw")).unwrap();
    }
    // raw to raw: a sparse copy.
    let out = ok(&["convert", "src.raw", "copy.img"], dir);
    assert!(out.contains("(raw) -> copy.img (raw)"), "{out}");
    assert_eq!(sha256(&dir.join("copy.img")), want);
    assert!(allocated(&dir.join("copy.img")) <= data + (1 << 20));
    // --format names the output's format whatever its name.
    ok(
        &["convert", "src.raw", "named.img", "--format", "qcow2"],
        dir,
    );
    assert_eq!(
        qemu_json(&["info", "--output=json", "named.img"], dir)["format"],
        "qcow2"
    );

    // A qemu-made chain of three: compressed base, zero clusters and discards on top.
    qemu_img(
        &["convert", "-c", "-O", "qcow2", "src.raw", "base.qcow2"],
        dir,
    );
    qemu_overlay("mid.qcow2", "base.qcow2", "qcow2", "", dir);
    qemu_io(
        "mid.qcow2",
        &[
            "write -P 0x55 4M 2M",
            "write -z 6M 1M",
            "write -P 0x56 30M 100k",
        ],
        dir,
    );
    qemu_overlay("top.qcow2", "mid.qcow2", "qcow2", "cluster_size=4096", dir);
    qemu_io(
        "top.qcow2",
        &[
            "write -P 0x66 5000k 8k",
            "discard 4M 64k",
            "write -P 0x67 63M 1M",
        ],
        dir,
    );
    let out = ok(&["convert", "top.qcow2", "flat.qcow2", "--verify"], dir);
    assert!(out.contains("a chain of 3 files flattened"), "{out}");
    check_clean("flat.qcow2", dir);
    assert_equal("top.qcow2", "qcow2", "flat.qcow2", "qcow2", dir);
    let j = qemu_json(&["info", "--output=json", "flat.qcow2"], dir);
    assert!(j.get("backing-filename").is_none(), "{j}");
    qemu_img(&["convert", "-O", "raw", "top.qcow2", "oracle.raw"], dir);
    assert_eq!(sha_line(&out), sha256(&dir.join("oracle.raw")));
    let out = ok(&["convert", "top.qcow2", "flat.raw"], dir);
    assert_equal("top.qcow2", "qcow2", "flat.raw", "raw", dir);
    assert_eq!(
        sha256(&dir.join("flat.raw")),
        sha256(&dir.join("oracle.raw"))
    );
    assert_eq!(sha_line(&out), sha256(&dir.join("oracle.raw")));
    assert!(allocated(&dir.join("flat.raw")) <= 8 << 20);
    no_partial(dir);
}

#[test]
fn convert_of_an_odd_sized_raw_file_rounds_the_qcow2_up() {
    if !have_qemu_img("convert_of_an_odd_sized_raw_file_rounds_the_qcow2_up") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8 + 1).collect();
    fs::write(dir.join("odd.raw"), &bytes).unwrap();
    let out = ok(&["convert", "odd.raw", "odd.qcow2", "--verify"], dir);
    assert!(out.contains("rounded up to 100352 bytes"), "{out}");
    assert_eq!(sha_line(&out), sha256(&dir.join("odd.raw")));
    check_clean("odd.qcow2", dir);
    let j = qemu_json(&["info", "--output=json", "odd.qcow2"], dir);
    assert_eq!(j["virtual-size"], 100352);
    ok(&["convert", "odd.qcow2", "back.raw"], dir);
    let back = fs::read(dir.join("back.raw")).unwrap();
    assert_eq!(&back[..bytes.len()], &bytes[..]);
    assert!(back[bytes.len()..].iter().all(|&b| b == 0));
}

#[test]
fn convert_refuses_and_leaves_nothing_on_errors() {
    if !have_qemu_img("convert_refuses_and_leaves_nothing_on_errors") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    sparse_source_with_zeroes(&dir.join("src.raw"));
    fs::write(dir.join("dst.qcow2"), b"keep").unwrap();
    let line = fails(&["convert", "src.raw", "dst.qcow2"], dir, 1);
    assert!(
        line.contains("already exists") && line.contains("--force"),
        "{line}"
    );
    assert_eq!(fs::read(dir.join("dst.qcow2")).unwrap(), b"keep");
    ok(&["convert", "src.raw", "dst.qcow2", "--force"], dir);
    check_clean("dst.qcow2", dir);
    let line = fails(&["convert", "dst.qcow2", "dst.qcow2", "--force"], dir, 1);
    assert!(line.contains("backing chain"), "{line}");
    let line = fails(&["convert", "missing.qcow2", "x.raw"], dir, 1);
    assert!(line.contains("missing.qcow2"), "{line}");
    let line = fails(
        &["convert", "src.raw", "x.raw", "--cluster-size", "4K"],
        dir,
        1,
    );
    assert!(
        line.contains("--cluster-size needs a qcow2 output"),
        "{line}"
    );
    let line = fails(
        &["convert", "src.raw", "x.qcow2", "--cluster-size", "3K"],
        dir,
        1,
    );
    assert!(line.contains("cluster size 3072 is invalid"), "{line}");
    let line = fails(&["convert", "src.raw", "x.qcow2", "-O", "vmdk"], dir, 2);
    assert!(line.contains("[possible values: raw, qcow2]"), "{line}");
    let line = fails(&["convert", "src.raw", "x.qcow2", "-f", "qcow2"], dir, 1);
    assert!(line.contains("src.raw"), "{line}");
    let line = fails(&["convert", "src.raw", "no/x.qcow2"], dir, 1);
    assert!(line.contains("no: no such folder"), "{line}");

    // A source whose data clusters lie past the end of its file: the read fails half way,
    // at the first cluster that is gone (qemu-io appended the clusters in order, so the last
    // 6 MiB of the data at 40 MiB are cut off), and the partial output is removed.
    qemu_new("cut.qcow2", "", "64M", dir);
    qemu_io("cut.qcow2", &["write -P 1 0 8M", "write -P 2 40M 8M"], dir);
    let f = File::options()
        .write(true)
        .open(dir.join("cut.qcow2"))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - (6 << 20)).unwrap();
    drop(f);
    for out in ["cut-out.qcow2", "cut-out.raw"] {
        let line = fails(&["convert", "cut.qcow2", out], dir, 1);
        assert!(
            line.contains("read error in cut.qcow2 at byte 44040192")
                && line.contains("the conversion was discarded")
                && line.contains("past the end of the file"),
            "{line}"
        );
        assert!(!dir.join(out).exists());
    }
    no_partial(dir);
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["cut.qcow2", "dst.qcow2", "src.raw"]);
}

/// Turns the backing format header extension of an image `vloop-image create` made (its
/// first extension) into an unknown one, which qcow2 readers skip: the image then names no
/// backing format, as images made before QEMU required one do.
fn forget_backing_format(path: &Path) {
    let f = File::options().read(true).write(true).open(path).unwrap();
    let mut h = [0u8; 104];
    f.read_exact_at(&mut h, 0).unwrap();
    let ext = u64::from(u32::from_be_bytes(h[100..104].try_into().unwrap()));
    let mut ty = [0u8; 4];
    f.read_exact_at(&mut ty, ext).unwrap();
    assert_eq!(u32::from_be_bytes(ty), 0xe279_2aca);
    f.write_all_at(&0x7f00_0001u32.to_be_bytes(), ext).unwrap();
}

/// The CVE-2008-2004 class: a guest that owns a raw disk writes a qcow2 image into it whose
/// backing file is a host file. Reading that disk as qcow2 would copy the host file out.
#[test]
fn probing_never_reads_a_host_file_through_a_guest_written_header() {
    if !have_qemu_img("probing_never_reads_a_host_file_through_a_guest_written_header") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let secret = dir.join("secret.raw");
    fs::write(&secret, b"host secret ".repeat(100_000)).unwrap();
    // What the guest writes into its disk: a valid qcow2 image over the host file.
    ok(
        &[
            "create",
            "evil.qcow2",
            "--backing",
            secret.to_str().unwrap(),
            "--backing-format",
            "raw",
        ],
        dir,
    );
    let evil = fs::read(dir.join("evil.qcow2")).unwrap();
    let mut disk = vec![0u8; 4 << 20];
    disk[..evil.len()].copy_from_slice(&evil);
    fs::write(dir.join("guest.img"), &disk).unwrap();
    // The guest's disk, probed: refused, not read as qcow2.
    let line = fails(&["convert", "guest.img", "out.raw"], dir, 1);
    assert!(
        line.contains("looks like a qcow2 image") && line.contains("--source-format raw"),
        "{line}"
    );
    assert!(!dir.join("out.raw").exists());
    // Named raw, it is read as the bytes it holds.
    ok(
        &["convert", "guest.img", "out.raw", "--source-format", "raw"],
        dir,
    );
    assert_eq!(fs::read(dir.join("out.raw")).unwrap(), disk);
    // As the backing file of an overlay that names no backing format: refused too.
    ok(
        &[
            "create",
            "top.qcow2",
            "--backing",
            "guest.img",
            "--backing-format",
            "raw",
        ],
        dir,
    );
    forget_backing_format(&dir.join("top.qcow2"));
    let line = fails(&["convert", "top.qcow2", "flat.raw"], dir, 1);
    assert!(line.contains("neither its name"), "{line}");
    assert!(!dir.join("flat.raw").exists());
    // qemu-img probes such a base as qcow2 and reads the host file: this is the attack.
    let leak = Command::new("qemu-img")
        .args(["convert", "-O", "raw", "top.qcow2", "leak.raw"])
        .current_dir(dir)
        .output()
        .unwrap();
    if leak.status.success() {
        let bytes = fs::read(dir.join("leak.raw")).unwrap();
        assert!(
            bytes.windows(12).any(|w| w == b"host secret "),
            "the oracle did not read through the header"
        );
    }
    // create --backing does not record a probed qcow2 format for such a file either.
    let line = fails(&["create", "o.qcow2", "--backing", "guest.img"], dir, 1);
    assert!(line.contains("--backing-format qcow2"), "{line}");
    no_partial(dir);
}

#[test]
fn interrupted_convert_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // Dense, non-zero content: every chunk is read, hashed and written.
    write_dense(&dir.join("big.raw"), 253);
    let partial = || partial_in(dir);
    let (status, err) = interrupt(
        &["convert", "big.raw", "out.qcow2", "--verify"],
        dir,
        partial,
    );
    if status.success() {
        eprintln!("the conversion finished before SIGINT arrived; checking the result instead");
        assert!(dir.join("out.qcow2").exists());
    } else {
        assert_eq!(status.code(), Some(130), "{err}");
        assert_eq!(
            err.trim(),
            "error: interrupted; the conversion was discarded"
        );
        assert!(!dir.join("out.qcow2").exists());
    }
    assert!(!partial(), "temporary file left behind");
}
