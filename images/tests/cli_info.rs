//! `vloop-image info` as a user runs it: what it recognises in images made by system tools
//! (mke2fs, xorriso, sfdisk) and by hand (partition tables), and an all-zero image.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;

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
