//! The `vloop-image` binary as a user runs it: exit codes, one-line errors, files made (what
//! `info` recognises: `cli_info.rs`).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
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

#[test]
fn fifos_and_folders_are_refused_at_once_as_images_and_backing_files() {
    let d = tempfile::tempdir().unwrap();
    nix::unistd::mkfifo(&d.path().join("f.qcow2"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    nix::unistd::mkfifo(&d.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    fs::create_dir(d.path().join("folder")).unwrap();
    let started = Instant::now();
    // A plain open of a FIFO waits for a writer: for ever, SIGTERM or not.
    for args in [
        &["info", "f.qcow2"][..],
        &["convert", "f.qcow2", "out.raw"],
        &["copy", "f.qcow2", "out.raw"],
    ] {
        let line = fails(args, d.path(), 1);
        assert!(line.contains("f.qcow2"), "{args:?}: {line}");
    }
    fs::write(d.path().join("plain.raw"), vec![0u8; 1 << 20]).unwrap();
    for backing in ["fifo", "folder"] {
        let top = format!("over-{backing}.qcow2");
        ok(
            &[
                "create",
                &top,
                "--size",
                "1M",
                "--backing",
                "plain.raw",
                "--backing-format",
                "raw",
            ],
            d.path(),
        );
        if !tool("qemu-img") {
            return;
        }
        run_ok({
            let mut c = Command::new("qemu-img");
            c.args(["rebase", "-u", "-F", "raw", "-b", backing, &top])
                .current_dir(d.path());
            c
        });
        // info describes the image alone, and says why.
        let out = ok(&["info", &top], d.path());
        assert!(out.contains("not a regular file"), "{out}");
        let line = fails(&["convert", &top, "out.raw"], d.path(), 1);
        assert!(line.contains(backing), "{line}");
    }
    assert!(started.elapsed() < Duration::from_secs(60));
}
