//! ISO 9660 builder: images read back by xorriso and isoinfo (and checked by isovfy), compared
//! with the source folder.

mod iso_common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iso_common::*;

/// True when `name` runs; otherwise the test is skipped (a failure under `CI=true`).
fn tool(name: &str, probe: &[&str]) -> bool {
    let ok = Command::new(name)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let why = format!("{name} not installed (apt-get install xorriso genisoimage)");
        vloop_frontend::skip::skip(&why);
    }
    ok
}

/// Runs `cmd` with a time-out; returns (success, stdout, stderr). The child is killed
/// when the time-out passes or the test panics.
fn run(cmd: &mut Command, dir: &Path) -> (bool, Vec<u8>, String) {
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = Kill(
        cmd.stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "{cmd:?} timed out");
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = String::from_utf8_lossy(&fs::read(&err).unwrap()).into_owned();
    (status.success(), fs::read(&out).unwrap(), stderr)
}

#[test]
fn xorriso_lists_every_path_with_its_long_name() {
    if !tool("xorriso", &["-version"]) {
        return;
    }
    let (d, tree, img) = build_sample();
    let (ok, out, err) = run(
        Command::new("xorriso")
            .arg("-indev")
            .arg(&img)
            .args(["-find", "/"]),
        d.path(),
    );
    assert!(ok, "xorriso failed: {err}");
    assert!(!err.contains("FAILURE") && !err.contains("SORRY"), "{err}");
    let listed: BTreeSet<Vec<u8>> = out
        .split(|&b| b == b'\n')
        .filter_map(|l| {
            l.strip_prefix(b"'/")?
                .strip_suffix(b"'")
                .map(<[u8]>::to_vec)
        })
        .filter(|p| !p.is_empty() && p.as_slice() != RR_MOVED)
        .collect();
    let want: BTreeSet<Vec<u8>> = tree.walk().into_iter().map(|(p, _)| p).collect();
    assert_eq!(listed, want);
    assert!(listed.contains(LONG_RR.as_bytes()));
}

#[test]
fn xorriso_extracts_the_same_tree() {
    if !tool("xorriso", &["-version"]) || !tool("diff", &["--version"]) {
        return;
    }
    let (d, _tree, img) = build_sample();
    let out = d.path().join("extracted");
    let (ok, _, err) = run(
        Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(&img)
            .args(["-extract", "/"])
            .arg(&out),
        d.path(),
    );
    assert!(ok, "xorriso extract failed: {err}");
    let rr = out.join(std::ffi::OsStr::from_bytes(RR_MOVED));
    if rr.exists() {
        fs::remove_dir(rr).unwrap();
    }
    let (same, diff, _) = run(
        Command::new("diff")
            .args(["-r", "--no-dereference"])
            .arg(d.path().join("src"))
            .arg(&out),
        d.path(),
    );
    assert!(
        same,
        "extracted tree differs:\n{}",
        String::from_utf8_lossy(&diff)
    );
    // Modes survive extraction too.
    for rel in ["one", "empty", "empty-dir"] {
        let a = fs::symlink_metadata(d.path().join("src").join(rel)).unwrap();
        let b = fs::symlink_metadata(out.join(rel)).unwrap();
        assert_eq!(a.mode() & 0o7777, b.mode() & 0o7777, "{rel}");
    }
}

#[test]
fn isoinfo_lists_rock_ridge_and_joliet() {
    if !tool("isoinfo", &["-version"]) {
        return;
    }
    let (d, _tree, img) = build_sample();
    for (flag, expect) in [("-R", LONG_RR), ("-J", &JOLIET_A[..64])] {
        let (ok, out, err) = run(
            Command::new("isoinfo").args([flag, "-l", "-i"]).arg(&img),
            d.path(),
        );
        assert!(ok, "isoinfo {flag} failed: {err}");
        assert!(err.trim().is_empty(), "isoinfo {flag}: {err}");
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains(expect), "isoinfo {flag} -l lacks {expect}");
        assert!(
            out.contains("entry-0999"),
            "isoinfo {flag} -l lacks the 1000th entry"
        );
    }
    if tool("isovfy", &["-version"]) {
        let (ok, out, err) = run(Command::new("isovfy").arg("-i").arg(&img), d.path());
        let out = String::from_utf8_lossy(&out);
        assert!(ok && out.contains("No errors found"), "isovfy: {out}{err}");
    }
}
