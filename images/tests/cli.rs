//! The `vloop-image` binary as a user runs it: exit codes, one-line errors, files made.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn create_10m_is_sparse_and_right_size() {
    let d = tempfile::tempdir().unwrap();
    let out = ok(&["create", "disk.img", "--size", "10M"], d.path());
    assert!(out.contains("10 MiB"), "{out}");
    let m = fs::metadata(d.path().join("disk.img")).unwrap();
    assert_eq!(m.len(), 10 << 20);
    assert_eq!(m.blocks(), 0, "a fresh image allocates nothing");
    // Every spelling users type means the same.
    for (i, size) in ["10MiB", "20480s", "10485760", "0.009765625G"]
        .iter()
        .enumerate()
    {
        let name = format!("d{i}.img");
        ok(&["create", &name, "-s", size], d.path());
        assert_eq!(fs::metadata(d.path().join(&name)).unwrap().len(), 10 << 20);
    }
    ok(
        &["create", "p.img", "--size", "1M", "--preallocate"],
        d.path(),
    );
    assert!(fs::metadata(d.path().join("p.img")).unwrap().blocks() * 512 >= 1 << 20);
}

#[test]
fn create_refuses_to_overwrite() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("disk.img"), b"precious").unwrap();
    let line = fails(&["create", "disk.img", "--size", "1M"], d.path(), 1);
    assert!(
        line.contains("already exists") && line.contains("--force"),
        "{line}"
    );
    assert_eq!(fs::read(d.path().join("disk.img")).unwrap(), b"precious");
    ok(&["create", "disk.img", "--size", "1M", "--force"], d.path());
    assert_eq!(
        fs::metadata(d.path().join("disk.img")).unwrap().len(),
        1 << 20
    );
    let names: Vec<_> = fs::read_dir(d.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "no temporary file left behind");
}

#[test]
fn bad_size_is_one_line() {
    let d = tempfile::tempdir().unwrap();
    let line = fails(&["create", "disk.img", "--size", "10Q"], d.path(), 2);
    assert!(line.contains("'10Q' is not a size"), "{line}");
    let line = fails(&["create", "disk.img", "--size", "0"], d.path(), 1);
    assert!(line.contains("larger than 0"), "{line}");
    let line = fails(
        &["ext2", "e.img", "--from", ".", "--size", "big"],
        d.path(),
        2,
    );
    assert!(line.contains("'big' is not a size"), "{line}");
    let line = fails(&["create", "disk.img", "--size", "-5M"], d.path(), 2);
    assert!(line.contains("'-5M' is not a size"), "{line}");
    let line = fails(
        &["ext2", "e.img", "--from", ".", "--size", "-1G"],
        d.path(),
        2,
    );
    assert!(line.contains("'-1G' is not a size"), "{line}");
    let line = fails(
        &["ext2", "e.img", "--from", ".", "--block-size", "512"],
        d.path(),
        2,
    );
    assert!(
        line.contains("'512'") && line.contains("[possible values: 1024, 2048, 4096]"),
        "{line}"
    );
    assert!(!d.path().join("disk.img").exists());
}

#[test]
fn missing_from_folder_is_one_clear_line() {
    let d = tempfile::tempdir().unwrap();
    for cmd in ["ext2", "iso"] {
        let line = fails(&[cmd, "out.img", "--from", "no-such-dir"], d.path(), 1);
        assert!(
            line.contains("no-such-dir") && line.contains("no such folder"),
            "{line}"
        );
    }
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    fs::create_dir(d.path().join("src")).unwrap();
    fs::write(d.path().join("src/f"), b"data").unwrap();
    for cmd in ["ext2", "iso"] {
        let line = fails(&[cmd, "out.img", "--from", "src/f"], d.path(), 1);
        assert!(line.contains("src/f: not a folder"), "{line}");
    }
    for args in [
        &["create", "no/x.img", "--size", "1M"][..],
        &["ext2", "no/x.img", "--from", "src"],
        &["iso", "no/x.iso", "--from", "src"],
        &["copy", "src/f", "no/x.img"],
    ] {
        let line = fails(args, d.path(), 1);
        assert!(line.contains("no: no such folder"), "{args:?}: {line}");
    }
}

#[test]
fn copy_keeps_holes_and_copy_of_copy_has_same_sha() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    sparse_source(&src);
    let want = sha256(&src);
    let out = ok(&["copy", "src.img", "a.img"], d.path());
    assert_eq!(sha_line(&out), want, "{out}");
    let a = d.path().join("a.img");
    assert_eq!(fs::read(&a).unwrap(), fs::read(&src).unwrap());
    let (ms, ma) = (fs::metadata(&src).unwrap(), fs::metadata(&a).unwrap());
    assert_eq!(ma.len(), 64 << 20);
    assert!(
        ma.blocks() * 512 <= ms.blocks() * 512 + (64 << 10),
        "copy allocates {} bytes, source {}",
        ma.blocks() * 512,
        ms.blocks() * 512
    );
    assert!(ma.blocks() * 512 < 8 << 20, "the copy stayed sparse");

    let out = ok(&["copy", "a.img", "b.img", "--verify"], d.path());
    assert!(out.contains("verified"), "{out}");
    assert_eq!(sha_line(&out), want);
    assert_eq!(sha256(&d.path().join("b.img")), want);
    assert!(fs::metadata(d.path().join("b.img")).unwrap().blocks() * 512 < 8 << 20);

    // A dense source with zero runs becomes sparse.
    let dense = d.path().join("dense.img");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[0] = 1;
    bytes[(3 << 20) + 7] = 2;
    fs::write(&dense, &bytes).unwrap();
    ok(&["copy", "dense.img", "c.img"], d.path());
    assert_eq!(fs::read(d.path().join("c.img")).unwrap(), bytes);
    assert!(fs::metadata(d.path().join("c.img")).unwrap().blocks() * 512 <= 64 << 10);
}

#[test]
fn copy_errors_are_one_line_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("src.img"), [1u8; 4096]).unwrap();
    fs::write(d.path().join("dst.img"), b"old").unwrap();
    let line = fails(&["copy", "src.img", "dst.img"], d.path(), 1);
    assert!(line.contains("already exists"), "{line}");
    assert_eq!(fs::read(d.path().join("dst.img")).unwrap(), b"old");
    let line = fails(&["copy", "missing.img", "x.img"], d.path(), 1);
    assert!(line.contains("missing.img"), "{line}");
    let line = fails(&["copy", ".", "x.img"], d.path(), 1);
    assert!(line.contains("not a file or a block device"), "{line}");
    assert!(!d.path().join("x.img").exists());
    ok(&["copy", "src.img", "dst.img", "--force"], d.path());
    assert_eq!(fs::read(d.path().join("dst.img")).unwrap(), [1u8; 4096]);
    assert_eq!(
        fs::read_dir(d.path()).unwrap().count(),
        2,
        "no temporary left"
    );
}

#[test]
fn info_blank_image_is_all_zero() {
    let d = tempfile::tempdir().unwrap();
    ok(&["create", "blank.img", "--size", "10M"], d.path());
    let out = ok(&["info", "blank.img"], d.path());
    assert!(out.contains("every byte is zero"), "{out}");
    assert!(out.contains("10 MiB"), "{out}");
    let j = info_json(Path::new("blank.img"), d.path());
    assert_eq!(j["content"]["type"], "zero");
    assert_eq!(j["size"], 10 << 20);
    assert_eq!(j["allocated"], 0);
    // One byte of data anywhere and it is not blank any more.
    File::options()
        .write(true)
        .open(d.path().join("blank.img"))
        .unwrap()
        .write_all_at(&[1], 9 << 20)
        .unwrap();
    assert_eq!(
        info_json(Path::new("blank.img"), d.path())["content"]["type"],
        "unknown"
    );
}

#[test]
fn info_identifies_mke2fs_images() {
    if !tool("mke2fs") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for (kind, want) in [("ext2", "ext2"), ("ext3", "ext3"), ("ext4", "ext4")] {
        let img = d.path().join(format!("{kind}.img"));
        File::create(&img).unwrap().set_len(16 << 20).unwrap();
        let mut c = Command::new("mke2fs");
        c.args(["-q", "-F", "-t", kind, "-L", "mylabel", "-b", "1024"])
            .args(["-U", "0b2c6c3e-4bd1-4d8e-9f43-5a2f8f8a3c1e"])
            .arg(&img);
        run_ok(c);
        let j = info_json(&img, d.path());
        let c = &j["content"];
        assert_eq!(c["type"], "ext", "{j}");
        assert_eq!(c["version"], want, "{j}");
        assert_eq!(c["label"], "mylabel");
        assert_eq!(c["uuid"], "0b2c6c3e-4bd1-4d8e-9f43-5a2f8f8a3c1e");
        assert_eq!(c["block_size"], 1024);
        assert_eq!(c["blocks"], 16 << 10);
        let free = c["free_blocks"].as_u64().unwrap();
        assert!(free > 0 && free < 16 << 10, "{j}");
        let out = ok(&["info", img.to_str().unwrap()], d.path());
        assert!(out.contains(&format!("{want} file system")), "{out}");
    }
}

#[test]
fn info_identifies_xorriso_iso() {
    if !tool("xorriso") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(
        src.join("a-rather-long-file-name-for-rock-ridge.txt"),
        b"hi",
    )
    .unwrap();
    let mut c = Command::new("xorriso");
    c.args(["-as", "mkisofs", "-R", "-J", "-V", "MY_VOLUME", "-o"])
        .arg(d.path().join("x.iso"))
        .arg(&src);
    run_ok(c);
    let j = info_json(Path::new("x.iso"), d.path());
    let c = &j["content"];
    assert_eq!(c["type"], "iso9660", "{j}");
    assert_eq!(c["volume_id"], "MY_VOLUME");
    assert_eq!(c["rock_ridge"], true, "{j}");
    assert_eq!(c["joliet"], true, "{j}");
    assert_eq!(c["volume_size"], j["size"], "{j}");
}

/// A GPT disk written byte by byte: protective MBR, header at LBA 1, entries at LBA 2.
fn write_gpt(path: &Path) {
    let f = File::create(path).unwrap();
    f.set_len(8 << 20).unwrap();
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0xEE;
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&((8u32 << 11) - 1).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    f.write_all_at(&mbr, 0).unwrap();
    let mut h = [0u8; 512];
    h[..8].copy_from_slice(b"EFI PART");
    h[56..72].copy_from_slice(&[7; 16]);
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&128u32.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    f.write_all_at(&h, 512).unwrap();
    let mut e = [0u8; 128];
    // Linux file system data: 0FC63DAF-8483-4772-8E79-3D69D8477DE4, stored mixed-endian.
    e[..16].copy_from_slice(&[
        0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D,
        0xE4,
    ]);
    e[16] = 1;
    e[32..40].copy_from_slice(&2048u64.to_le_bytes());
    e[40..48].copy_from_slice(&10239u64.to_le_bytes());
    for (i, c) in "root".encode_utf16().enumerate() {
        e[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
    }
    f.write_all_at(&e, 2 * 512 + 128).unwrap(); // entry 2; entry 1 left empty
}

#[test]
fn info_identifies_partition_tables() {
    let d = tempfile::tempdir().unwrap();
    write_gpt(&d.path().join("gpt.img"));
    let j = info_json(Path::new("gpt.img"), d.path());
    let c = &j["content"];
    assert_eq!(c["type"], "gpt", "{j}");
    assert_eq!(c["entries"], 128);
    assert_eq!(c["partitions"].as_array().unwrap().len(), 1, "{j}");
    let p = &c["partitions"][0];
    assert_eq!(p["number"], 2);
    assert_eq!(p["type_guid"], "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
    assert_eq!(
        (p["first_lba"].as_u64(), p["last_lba"].as_u64()),
        (Some(2048), Some(10239))
    );
    assert_eq!(p["name"], "root");

    // A hand-made MBR with two partitions.
    let mbr_img = d.path().join("mbr.img");
    let f = File::create(&mbr_img).unwrap();
    f.set_len(4 << 20).unwrap();
    let mut s = [0u8; 512];
    for (i, (t, start, len)) in [(0x83u8, 2048u32, 4096u32), (0x82, 6144, 2048)]
        .into_iter()
        .enumerate()
    {
        let e = &mut s[446 + 16 * i..462 + 16 * i];
        e[4] = t;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
    }
    s[446] = 0x80;
    s[510] = 0x55;
    s[511] = 0xAA;
    f.write_all_at(&s, 0).unwrap();
    let j = info_json(Path::new("mbr.img"), d.path());
    let c = &j["content"];
    assert_eq!(c["type"], "mbr", "{j}");
    let parts = c["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["type_id"], "0x83");
    assert_eq!(parts[0]["bootable"], true);
    assert_eq!(parts[1]["type_name"], "Linux swap");
    assert_eq!(parts[1]["start_sector"], 6144);
    let out = ok(&["info", "mbr.img"], d.path());
    assert!(out.contains("MBR partition table"), "{out}");

    if tool("sfdisk") {
        for (label, want) in [("gpt", "gpt"), ("dos", "mbr")] {
            let img = d.path().join(format!("sf-{label}.img"));
            File::create(&img).unwrap().set_len(16 << 20).unwrap();
            let script = d.path().join(format!("{label}.sfdisk"));
            fs::write(&script, format!("label: {label}\n,4M,L\n,4M,L\n")).unwrap();
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!(
                "sfdisk -q '{}' < '{}'",
                img.display(),
                script.display()
            ));
            run_ok(c);
            let j = info_json(&img, d.path());
            assert_eq!(j["content"]["type"], want, "{j}");
            let parts = j["content"]["partitions"].as_array().unwrap();
            assert_eq!(parts.len(), 2, "{j}");
            assert_eq!(parts[0]["number"], 1);
            if label == "gpt" {
                let mut c = Command::new("sfdisk");
                c.arg("--disk-id").arg(&img);
                let o = run_cmd(c);
                let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
                assert_eq!(j["content"]["disk_guid"], id.as_str(), "{j}");
                assert_eq!(parts[0]["first_lba"], 2048, "{j}");
                assert_eq!(parts[0]["last_lba"], 2048 + 8192 - 1, "{j}");
            }
        }
    }
}

/// A small folder with a long name, a nested directory, a symlink and an empty file.
fn sample_folder(dir: &Path) {
    let long = "a-file-name-of-more-than-one-hundred-characters-".repeat(3);
    fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    fs::write(dir.join(&long), b"long name").unwrap();
    fs::write(dir.join("sub/deeper/data.bin"), vec![7u8; 100_000]).unwrap();
    fs::write(dir.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("sub/deeper/data.bin", dir.join("link")).unwrap();
}

#[test]
fn ext2_builds_are_reproducible_and_recognised() {
    let d = tempfile::tempdir().unwrap();
    sample_folder(&d.path().join("src"));
    let build = |name: &str| {
        let out = ok(
            &[
                "ext2",
                name,
                "--from",
                "src",
                "--label",
                "vloop",
                "--timestamp",
                "1700000000",
            ],
            d.path(),
        );
        assert!(out.contains("ext2"), "{out}");
        let sha = sha_line(&out);
        assert_eq!(
            sha,
            sha256(&d.path().join(name)),
            "printed hash is the file's"
        );
        sha
    };
    assert_eq!(build("a.img"), build("b.img"), "same tree, same bytes");
    let line = fails(&["ext2", "a.img", "--from", "src"], d.path(), 1);
    assert!(line.contains("already exists"), "{line}");
    let line = fails(
        &["ext2", "small.img", "--from", "src", "--size", "16K"],
        d.path(),
        1,
    );
    assert!(line.contains("too small"), "{line}");

    let j = info_json(Path::new("a.img"), d.path());
    assert_eq!(j["content"]["type"], "ext", "{j}");
    assert_eq!(j["content"]["version"], "ext2", "{j}");
    assert_eq!(j["content"]["label"], "vloop", "{j}");
    if tool("e2fsck") {
        let mut c = Command::new("e2fsck");
        c.arg("-fn").arg(d.path().join("a.img"));
        run_ok(c);
    }
}

#[test]
fn iso_builds_are_reproducible_recognised_and_copied_exactly() {
    let d = tempfile::tempdir().unwrap();
    sample_folder(&d.path().join("src"));
    let build = |name: &str| {
        let mut c = Command::new(BIN);
        c.args(["iso", name, "--from", "src", "--volume-id", "VLOOP_TEST"])
            .current_dir(d.path())
            .env("SOURCE_DATE_EPOCH", "1700000000");
        let o = run_ok(c);
        let sha = sha_line(&String::from_utf8(o.stdout).unwrap());
        assert_eq!(sha, sha256(&d.path().join(name)));
        sha
    };
    let sha = build("a.iso");
    assert_eq!(sha, build("b.iso"), "same tree, same bytes");

    let j = info_json(Path::new("a.iso"), d.path());
    let c = &j["content"];
    assert_eq!(c["type"], "iso9660", "{j}");
    assert_eq!(c["volume_id"], "VLOOP_TEST", "{j}");
    assert_eq!(c["rock_ridge"], true, "{j}");
    assert_eq!(c["joliet"], true, "{j}");

    let out = ok(&["copy", "a.iso", "copy.iso", "--verify"], d.path());
    assert_eq!(sha_line(&out), sha);
    assert_eq!(
        fs::read(d.path().join("copy.iso")).unwrap(),
        fs::read(d.path().join("a.iso")).unwrap()
    );

    if tool("xorriso") {
        let mut c = Command::new("xorriso");
        c.args(["-indev", "a.iso", "-find", "/"])
            .current_dir(d.path());
        let o = run_ok(c);
        let listing = String::from_utf8_lossy(&o.stdout);
        let long = "a-file-name-of-more-than-one-hundred-characters-".repeat(3);
        for want in [long.as_str(), "sub/deeper/data.bin", "empty", "link"] {
            assert!(listing.contains(want), "{want} missing from {listing}");
        }
    }
}

#[test]
fn interrupted_copy_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("big.img");
    // Dense, non-zero content: every chunk is read, hashed and written.
    write_dense(&src, 253);
    let partial = || partial_in(d.path());
    let (status, err) = interrupt(
        &["copy", "big.img", "out.img", "--verify"],
        d.path(),
        partial,
    );
    if status.success() {
        // The whole copy and verification beat the signal: it must then be complete.
        eprintln!("copy finished before SIGINT arrived; checking the result instead");
        assert_eq!(sha256(&d.path().join("out.img")), sha256(&src));
    } else {
        assert_eq!(status.code(), Some(130), "{err}");
        assert_eq!(err.trim(), "error: interrupted; the copy was discarded");
        assert!(!d.path().join("out.img").exists());
    }
    assert!(!partial(), "temporary file left behind");
}

/// Ctrl-C while `ext2` or `iso` writes its image: exit 130, and neither the temporary
/// file nor an output is left behind.
#[test]
fn interrupted_builds_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    // Dense, non-zero content, so that writing the image takes a while.
    write_dense(&src.join("big.bin"), 251);
    let hidden = || -> Vec<String> {
        fs::read_dir(d.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    };
    for (cmd, out) in [("ext2", "out.img"), ("iso", "out.iso")] {
        let (status, err) = interrupt(&[cmd, out, "--from", "src"], d.path(), || {
            !hidden().is_empty()
        });
        assert_eq!(hidden(), Vec::<String>::new(), "{cmd}: temporary file left");
        if status.success() || err.trim() == "error: interrupted" {
            // The build beat the signal (it came while hashing, or after): the image is
            // then complete.
            eprintln!("{cmd} finished writing before SIGINT arrived");
            assert!(d.path().join(out).exists());
            fs::remove_file(d.path().join(out)).unwrap();
        } else {
            assert_eq!(status.code(), Some(130), "{cmd}: {err}");
            assert_eq!(
                err.trim(),
                "error: interrupted; the unfinished image was removed",
                "{cmd}"
            );
            assert!(!d.path().join(out).exists(), "{cmd}");
        }
    }
}

/// A sparse image over 4 GiB is built without hashing all of it; `--sha256` asks for the
/// hash of a small one explicitly, and it is the file's.
#[test]
fn large_images_are_not_hashed_unless_asked() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("src")).unwrap();
    fs::write(d.path().join("src/f"), b"data").unwrap();
    let start = Instant::now();
    let out = ok(
        &["ext2", "big.img", "--from", "src", "--size", "6G"],
        d.path(),
    );
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    assert!(!out.contains("sha256: "), "{out}");
    assert!(
        out.contains("note: SHA-256 not computed for an image over 4 GiB (pass --sha256"),
        "{out}"
    );
    assert_eq!(
        fs::metadata(d.path().join("big.img")).unwrap().len(),
        6 << 30
    );
    let out = ok(
        &[
            "ext2",
            "small.img",
            "--from",
            "src",
            "--size",
            "8M",
            "--sha256",
        ],
        d.path(),
    );
    assert_eq!(sha_line(&out), sha256(&d.path().join("small.img")));
    let out = ok(&["iso", "small.iso", "--from", "src", "--sha256"], d.path());
    assert_eq!(sha_line(&out), sha256(&d.path().join("small.iso")));
}

/// Many long names: one summary line on stdout, nothing on stderr.
#[test]
fn iso_long_names_give_one_summary_line() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..50 {
        fs::write(
            src.join(format!("{}{i:02}.txt", "long-name-".repeat(10))),
            b"x",
        )
        .unwrap();
    }
    let o = vloop(&["iso", "out.iso", "--from", "src"], d.path());
    assert!(o.status.success());
    let stdout = String::from_utf8(o.stdout).unwrap();
    let stderr = String::from_utf8(o.stderr).unwrap();
    assert_eq!(stderr, "", "nothing on stderr");
    let notes: Vec<&str> = stdout.lines().filter(|l| l.starts_with("note: ")).collect();
    assert_eq!(notes.len(), 1, "{stdout}");
    assert!(notes[0].contains("names or places adjusted"), "{stdout}");
}
