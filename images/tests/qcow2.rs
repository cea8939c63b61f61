//! qcow2 in `vloop-image`: `create`, `info` and `convert` as a user runs them, checked with
//! qemu-img (the oracle): `qemu-img check` finds the images clean, `qemu-img info` agrees on
//! their geometry and backing files, `qemu-img compare` finds conversions equal to their
//! sources.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_vloop-image");

/// True when qemu-img runs; otherwise fails under `CI=true` and says SKIPPED elsewhere.
fn have_qemu_img(test: &str) -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let why = format!("{test}: qemu-img is not installed (apt-get install qemu-utils)");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("SKIPPED: {why}");
    }
    ok
}

/// Runs a command with a time-out; the child is killed if it overruns.
fn run_cmd(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().expect("stdout thread"),
        stderr: t_err.join().expect("stderr thread"),
    }
}

fn vloop(args: &[&str], dir: &Path) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).current_dir(dir).env_remove("RUST_LOG");
    run_cmd(c)
}

/// Runs `vloop-image args` in `dir`; it must succeed. Returns stdout.
fn ok(args: &[&str], dir: &Path) -> String {
    let o = vloop(args, dir);
    assert!(
        o.status.success(),
        "vloop-image {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8")
}

/// Asserts a failure with exactly one `error: ` line on stderr; returns that line.
fn fails(args: &[&str], dir: &Path, code: i32) -> String {
    let o = vloop(args, dir);
    let err = String::from_utf8(o.stderr).expect("utf-8");
    assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    lines[0].to_string()
}

/// Runs qemu-img in `dir`; it must succeed. Returns stdout.
fn qemu_img(args: &[&str], dir: &Path) -> String {
    let mut c = Command::new("qemu-img");
    c.args(args).current_dir(dir);
    let o = run_cmd(c);
    assert!(
        o.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8")
}

/// qemu-io in `dir` on a qcow2 image; every command must succeed.
fn qemu_io(img: &str, cmds: &[&str], dir: &Path) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]).current_dir(dir);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(img);
    let o = run_cmd(c);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && !out.contains("failed"),
        "qemu-io {cmds:?}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn qemu_json(args: &[&str], dir: &Path) -> Value {
    serde_json::from_str(&qemu_img(args, dir)).expect("qemu-img json")
}

/// `qemu-img check --output=json`: the image must be free of corruption and of leaks.
fn check_clean(img: &str, dir: &Path) -> Value {
    let j = qemu_json(&["check", "--output=json", img], dir);
    assert_eq!(j["check-errors"], 0, "{img}: {j}");
    assert!(j.get("corruptions").is_none_or(|v| v == 0), "{img}: {j}");
    assert!(j.get("leaks").is_none_or(|v| v == 0), "{img}: {j}");
    j
}

/// `qemu-img compare`: the two images' virtual disks must be equal (formats probed by qemu).
fn assert_equal(a: &str, fa: &str, b: &str, fb: &str, dir: &Path) {
    qemu_img(&["compare", "-f", fa, "-F", fb, a, b], dir);
}

fn info_json(img: &str, dir: &Path) -> Value {
    serde_json::from_str(&ok(&["info", "--json", img], dir)).expect("json")
}

fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(path).expect("read")))
}

fn sha_line(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("sha256: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no sha256 line in {stdout}"))
        .to_string()
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).expect("metadata").blocks() * 512
}

/// A 64 MiB sparse raw file: 3 MiB of data at 5 MiB, a little at odd places, a tail.
fn sparse_source(path: &Path) {
    let f = File::create(path).unwrap();
    f.set_len(64 << 20).unwrap();
    let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all_at(&data, 5 << 20).unwrap();
    f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
    f.write_all_at(&[0xAB; 100], 12345).unwrap();
    // A dense run of zeroes in the middle of data: written, but all zero.
    f.write_all_at(&vec![0u8; 1 << 20], 20 << 20).unwrap();
}

/// No hidden temporary file is left in `dir`.
fn no_partial(dir: &Path) {
    let left: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

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
    sparse_source(&raw);
    // Version 2, 64 KiB clusters, written by qemu-io.
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "100M",
        ],
        dir,
    );
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
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096,refcount_bits=1,lazy_refcounts=on",
            "v3.qcow2",
            "20M",
        ],
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
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "../data.raw",
            "-F",
            "raw",
            "c/mid.qcow2",
        ],
        dir,
    );
    qemu_io("c/mid.qcow2", &["write -P 9 5M 64k"], dir);
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=16384",
            "c/top.qcow2",
        ],
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
fn convert_round_trips_keep_holes_and_pass_qemu_img() {
    if !have_qemu_img("convert_round_trips_keep_holes_and_pass_qemu_img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let src = dir.join("src.raw");
    sparse_source(&src);
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
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
        dir,
    );
    qemu_io(
        "mid.qcow2",
        &[
            "write -P 0x55 4M 2M",
            "write -z 6M 1M",
            "write -P 0x56 30M 100k",
        ],
        dir,
    );
    qemu_img(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "top.qcow2",
        ],
        dir,
    );
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
    sparse_source(&dir.join("src.raw"));
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
    qemu_img(&["create", "-f", "qcow2", "cut.qcow2", "64M"], dir);
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

/// Runs `vloop-image args` in `dir` and sends it SIGINT once `started()` holds (or it has
/// exited, or 30 s have passed); returns its exit status and stderr once it stops.
fn interrupt(args: &[&str], dir: &Path, started: impl Fn() -> bool) -> (ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(2));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} did not stop after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

#[test]
fn interrupted_convert_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // Dense, non-zero content: every chunk is read, hashed and written.
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8 + 1).collect();
    let f = File::create(dir.join("big.raw")).unwrap();
    for i in 0..256u64 {
        f.write_all_at(&chunk, i << 20).unwrap();
    }
    drop(f);
    let partial = || {
        fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
    };
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
