//! qcow2 images and overlays made by `vloop-image create`, checked with qemu-img (the
//! oracle): `qemu-img check` finds them clean, `qemu-img info` agrees on their geometry and
//! backing files, and qemu-io reads and writes through them.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;

use common::qemu::*;
use common::*;

#[test]
fn created_images_pass_qemu_img_check_and_info() {
    if !have_qemu_img("created_images_pass_qemu_img_check_and_info") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for (cs, name) in [
        (512u64, "512"),
        (4096, "4K"),
        (65536, "64K"),
        (1 << 20, "1M"),
        (2 << 20, "2M"),
    ] {
        let img = format!("c{cs}.qcow2");
        let out = ok(
            &["create", &img, "--size", "3G", "--cluster-size", name],
            dir,
        );
        assert!(out.contains("qcow2"), "{out}");
        check_clean(&img, dir);
        let q = qemu_json(&["info", "--output=json", &img], dir);
        assert_eq!(q["format"], "qcow2", "{q}");
        assert_eq!(q["virtual-size"], 3u64 << 30, "{q}");
        assert_eq!(q["cluster-size"], cs, "{q}");
        assert_eq!(q["format-specific"]["data"]["compat"], "1.1", "{q}");
        assert!(q.get("backing-filename").is_none(), "{q}");
        let j = info_json(&img, dir);
        assert_eq!(j["format"], "qcow2");
        assert_eq!(j["size"], q["virtual-size"]);
        assert_eq!(j["allocated"], q["actual-size"]);
        assert_eq!(j["qcow2"]["cluster_size"], cs);
        assert_eq!(j["qcow2"]["allocated_clusters"], 0);
        assert_eq!(j["content"]["type"], "zero", "{j}");
        // qemu-io writes into it; it stays clean and reads back.
        qemu_io(
            &img,
            &["write -P 0x5a 1000k 300k", "read -P 0x5a 1000k 300k"],
            dir,
        );
        check_clean(&img, dir);
    }
    // A size that is not a whole number of sectors is rounded up, with a note.
    let out = ok(&["create", "odd.qcow2", "--size", "1000001"], dir);
    assert!(out.contains("rounded up to 1000448 bytes"), "{out}");
    let q = qemu_json(&["info", "--output=json", "odd.qcow2"], dir);
    assert_eq!(q["virtual-size"], 1000448);
    check_clean("odd.qcow2", dir);
    // --format raw on a *.qcow2 name is a raw file, as asked.
    ok(&["create", "raw.qcow2", "-s", "1M", "--format", "raw"], dir);
    let q = qemu_json(&["info", "--output=json", "-f", "raw", "raw.qcow2"], dir);
    assert_eq!(q["virtual-size"], 1 << 20);
    assert_eq!(fs::metadata(dir.join("raw.qcow2")).unwrap().len(), 1 << 20);
    no_partial(dir);
}

#[test]
fn created_overlays_name_their_backing_files_as_qemu_reads_them() {
    if !have_qemu_img("created_overlays_name_their_backing_files_as_qemu_reads_them") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    fs::create_dir(dir.join("vms")).unwrap();
    ok(&["create", "base.raw", "--size", "16M"], dir);
    // A relative name is stored as given and resolved from the image's folder.
    let out = ok(&["create", "vms/vm.qcow2", "--backing", "../base.raw"], dir);
    assert!(
        out.contains("backing file: ../base.raw (raw as probed"),
        "{out}"
    );
    assert!(
        out.contains("note: the size is the backing file's"),
        "{out}"
    );
    check_clean("vms/vm.qcow2", dir);
    let q = qemu_json(&["info", "--output=json", "vms/vm.qcow2"], dir);
    assert_eq!(q["backing-filename"], "../base.raw", "{q}");
    assert_eq!(q["backing-filename-format"], "raw", "{q}");
    assert_eq!(q["virtual-size"], 16 << 20, "{q}");
    assert_eq!(q["cluster-size"], 65536);
    // An overlay of the overlay: its own size and cluster size, its base's format probed.
    let out = ok(
        &[
            "create",
            "vms/vm2.qcow2",
            "-b",
            "vm.qcow2",
            "-F",
            "qcow2",
            "--size",
            "32M",
            "--cluster-size",
            "4K",
        ],
        dir,
    );
    assert!(
        out.contains("backing file: vm.qcow2 (qcow2, 16 MiB, found at vms/vm.qcow2)"),
        "{out}"
    );
    check_clean("vms/vm2.qcow2", dir);
    let chain = qemu_json(
        &["info", "--output=json", "--backing-chain", "vms/vm2.qcow2"],
        dir,
    );
    let chain = chain.as_array().unwrap();
    assert_eq!(chain.len(), 3, "{chain:?}");
    assert_eq!(chain[0]["virtual-size"], 32 << 20);
    assert_eq!(chain[0]["cluster-size"], 4096);
    assert_eq!(chain[0]["backing-filename"], "vm.qcow2");
    assert_eq!(chain[0]["backing-filename-format"], "qcow2");
    assert_eq!(chain[2]["format"], "raw");
    // qemu-io writes through the chain: reads come from each layer as they should.
    File::options()
        .write(true)
        .open(dir.join("base.raw"))
        .unwrap()
        .write_all_at(&[0x11; 65536], 1 << 20)
        .unwrap();
    qemu_io(
        "vms/vm2.qcow2",
        &[
            "write -P 0x22 1064960 4096",
            "read -P 0x11 1M 4096",
            "read -P 0x22 1064960 4096",
            "read -P 0 20M 1M",
        ],
        dir,
    );
    check_clean("vms/vm2.qcow2", dir);
    // The explicit format is stored as given; an absolute name too.
    let abs = dir.join("base.raw");
    ok(
        &[
            "create",
            "abs.qcow2",
            "--backing",
            abs.to_str().unwrap(),
            "--backing-format",
            "raw",
        ],
        dir,
    );
    let q = qemu_json(&["info", "--output=json", "abs.qcow2"], dir);
    assert_eq!(q["backing-filename"], abs.to_str().unwrap());
    assert_eq!(q["backing-filename-format"], "raw");

    // Names that do not resolve from the image's folder are refused before anything is
    // written, saying where they were looked for.
    let line = fails(
        &["create", "vms/bad.qcow2", "--backing", "base.raw"],
        dir,
        1,
    );
    assert!(
        line.contains("vms/base.raw") && line.contains("relative to the image's folder"),
        "{line}"
    );
    let line = fails(
        &[
            "create",
            "x.qcow2",
            "-b",
            "base.raw",
            "--backing-format",
            "qcow2",
        ],
        dir,
        1,
    );
    assert!(line.contains("base.raw"), "{line}");
    let line = fails(
        &["create", "x.img", "-b", "base.raw", "--format", "raw"],
        dir,
        1,
    );
    assert!(line.contains("--backing needs a qcow2 image"), "{line}");
    // Replacing a base by an overlay that would have it in its own chain.
    let line = fails(
        &["create", "base.raw", "-b", "vms/vm.qcow2", "--force"],
        dir,
        1,
    );
    assert!(line.contains("loop"), "{line}");
    assert!(!dir.join("vms/bad.qcow2").exists() && !dir.join("x.qcow2").exists());
    assert_eq!(fs::metadata(dir.join("base.raw")).unwrap().len(), 16 << 20);
    no_partial(dir);
    no_partial(&dir.join("vms"));
}
