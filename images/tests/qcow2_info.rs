//! `vloop-image info` on qcow2 images made by QEMU, checked against `qemu-img info` and
//! `qemu-img check` (the oracle), and on the file systems inside qcow2 chains.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::qemu::*;
use common::*;
use serde_json::Value;

/// Compares `vloop-image info --json` with `qemu-img info` and `qemu-img check`.
fn assert_info_matches_qemu(img: &str, dir: &Path) -> Value {
    let j = info_json(img, dir);
    let q = qemu_json(&["info", "--output=json", "--backing-chain", img], dir);
    let q = q.as_array().unwrap();
    let c = check_clean(img, dir);
    let top = &q[0];
    assert_eq!(j["format"], top["format"], "{img}");
    assert_eq!(j["size"], top["virtual-size"], "{img}");
    assert_eq!(j["allocated"], top["actual-size"], "{img}");
    assert_eq!(j["file_size"], fs::metadata(dir.join(img)).unwrap().len());
    let x = &j["qcow2"];
    let data = &top["format-specific"]["data"];
    assert_eq!(x["cluster_size"], top["cluster-size"], "{img}");
    let compat = if x["version"] == 3 { "1.1" } else { "0.10" };
    assert_eq!(data["compat"], compat, "{img}");
    if let Some(ct) = data.get("compression-type") {
        assert_eq!(x["compression"], *ct, "{img}");
    }
    assert_eq!(x["refcount_bits"], data["refcount-bits"], "{img}");
    assert_eq!(
        x["lazy_refcounts"],
        data.get("lazy-refcounts")
            .cloned()
            .unwrap_or(Value::Bool(false)),
        "{img}"
    );
    assert_eq!(
        x["allocated_clusters"], c["allocated-clusters"],
        "{img}: {j} {c}"
    );
    assert_eq!(x["virtual_clusters"], c["total-clusters"], "{img}");
    assert_eq!(
        x["backing_file"],
        top.get("backing-filename").cloned().unwrap_or(Value::Null),
        "{img}"
    );
    assert_eq!(
        x["backing_format"],
        top.get("backing-filename-format")
            .cloned()
            .unwrap_or(Value::Null),
        "{img}"
    );
    let chain = x["chain"].as_array().unwrap();
    assert_eq!(chain.len(), q.len(), "{img}: {j}");
    for (ours, theirs) in chain.iter().zip(q) {
        assert_eq!(
            Path::new(ours["path"].as_str().unwrap()),
            Path::new(theirs["filename"].as_str().unwrap()),
            "{img}"
        );
        assert_eq!(ours["format"], theirs["format"], "{img}");
        assert_eq!(ours["virtual_size"], theirs["virtual-size"], "{img}");
    }
    j
}

#[test]
fn info_matches_qemu_img_on_qemu_made_images() {
    if !have_qemu_img("info_matches_qemu_img_on_qemu_made_images") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let raw = dir.join("data.raw");
    sparse_source_with_zeroes(&raw);
    // Version 2, 64 KiB clusters, written by qemu-io.
    qemu_new("v2.qcow2", "compat=0.10", "100M", dir);
    qemu_io(
        "v2.qcow2",
        &["write -P 1 0 3M", "write -P 2 50M 64k", "write -P 3 99M 4k"],
        dir,
    );
    let j = assert_info_matches_qemu("v2.qcow2", dir);
    assert_eq!(j["qcow2"]["version"], 2);
    assert_eq!(j["qcow2"]["allocated_clusters"], 48 + 1 + 1);
    // Version 3, 4 KiB clusters, 1-bit refcounts, lazy refcounts, and zero clusters that keep
    // their preallocated host clusters.
    qemu_new(
        "v3.qcow2",
        "cluster_size=4096,refcount_bits=1,lazy_refcounts=on",
        "20M",
        dir,
    );
    qemu_io("v3.qcow2", &["write -P 7 0 1M", "write -z 0 256k"], dir);
    let j = assert_info_matches_qemu("v3.qcow2", dir);
    assert_eq!(j["qcow2"]["zero_preallocated_clusters"], 64, "{j}");
    assert_eq!(j["qcow2"]["lazy_refcounts"], true);
    assert_eq!(j["qcow2"]["refcount_bits"], 1);
    // Compressed clusters (zlib, and zstd where this qemu-img has it).
    qemu_img(
        &["convert", "-c", "-O", "qcow2", "data.raw", "zlib.qcow2"],
        dir,
    );
    let j = assert_info_matches_qemu("zlib.qcow2", dir);
    assert!(
        j["qcow2"]["compressed_clusters"].as_u64().unwrap() > 0,
        "{j}"
    );
    let zstd = Command::new("qemu-img")
        .args([
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
        ])
        .args(["data.raw", "zstd.qcow2"])
        .current_dir(dir)
        .output()
        .unwrap();
    if zstd.status.success() {
        let j = assert_info_matches_qemu("zstd.qcow2", dir);
        assert_eq!(j["qcow2"]["compression"], "zstd");
    } else {
        eprintln!("note: this qemu-img cannot write zstd clusters; zstd info not checked");
    }
    // A chain of three over a raw base, with relative names in another folder.
    fs::create_dir(dir.join("c")).unwrap();
    qemu_overlay("c/mid.qcow2", "../data.raw", "raw", "", dir);
    qemu_io("c/mid.qcow2", &["write -P 9 5M 64k"], dir);
    qemu_overlay(
        "c/top.qcow2",
        "mid.qcow2",
        "qcow2",
        "cluster_size=16384",
        dir,
    );
    qemu_io("c/top.qcow2", &["write -P 10 7M 16k"], dir);
    let j = assert_info_matches_qemu("c/top.qcow2", dir);
    assert_eq!(j["qcow2"]["chain"].as_array().unwrap().len(), 3);
    let human = ok(&["info", "c/top.qcow2"], dir);
    for want in [
        "qcow2 version 3",
        "virtual size:  64 MiB",
        "cluster size:  16 KiB",
        "backing file:  mid.qcow2 (format qcow2)",
        "backing chain: 3 files",
        "c/../data.raw (raw, 64 MiB)",
    ] {
        assert!(human.contains(want), "{want} missing from {human}");
    }
    // A missing backing file: the image is still described, with a note.
    fs::rename(dir.join("data.raw"), dir.join("moved.raw")).unwrap();
    let j = info_json("c/top.qcow2", dir);
    assert_eq!(j["qcow2"]["backing_file"], "mid.qcow2");
    let notes = j["notes"].as_array().unwrap();
    assert!(
        notes.iter().any(|n| n
            .as_str()
            .unwrap()
            .contains("backing chain cannot be opened")),
        "{j}"
    );
}

#[test]
fn info_sees_the_file_system_inside_a_qcow2_chain() {
    if !have_qemu_img("info_sees_the_file_system_inside_a_qcow2_chain") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    fs::create_dir(dir.join("src")).unwrap();
    fs::write(dir.join("src/hello.txt"), b"hello").unwrap();
    ok(
        &[
            "ext2", "fs.img", "--from", "src", "--size", "32M", "--label", "inside",
        ],
        dir,
    );
    ok(&["convert", "fs.img", "fs.qcow2"], dir);
    ok(&["create", "overlay.qcow2", "--backing", "fs.qcow2"], dir);
    for img in ["fs.qcow2", "overlay.qcow2"] {
        let j = info_json(img, dir);
        assert_eq!(j["content"]["type"], "ext", "{img}: {j}");
        assert_eq!(j["content"]["label"], "inside", "{img}: {j}");
        assert_eq!(j["size"], 32 << 20);
    }
    // Content and name disagree: noted.
    fs::copy(dir.join("fs.qcow2"), dir.join("fs-copy.img")).unwrap();
    let out = ok(&["info", "fs-copy.img"], dir);
    assert!(out.contains("ext2 file system"), "{out}");
    assert!(
        out.contains("note: the content is a qcow2 image but the name does not end in .qcow2"),
        "{out}"
    );
    let j = info_json("fs.img", dir);
    assert_eq!(j["format"], "raw");
    assert!(j["qcow2"].is_null());
}

#[test]
fn info_escapes_control_characters_in_backing_names() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let f = fs::File::create(dir.join("odd.qcow2")).unwrap();
    let mut o = vloop_qcow2::CreateOptions::new(1 << 20);
    o.backing = Some((
        "base\nformat:        raw\0".into(),
        vloop_qcow2::Format::Raw,
    ));
    vloop_qcow2::create(&f, &o).unwrap();
    drop(f);
    let out = ok(&["info", "odd.qcow2"], dir);
    assert!(
        out.contains("backing file:  base\\nformat:        raw\\u{0} (format raw)"),
        "{out}"
    );
    // One line per field: the name did not start a line of its own.
    assert_eq!(out.matches("\nformat:").count(), 1, "{out}");
    assert!(out.lines().all(|l| !l.contains('\0')), "{out}");
}
