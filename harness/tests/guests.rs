//! Guest-booting tests: the harness passes a healthy backend and fails a backend that loses
//! writes, with a readable reason and the logs kept. They need QEMU (qemu-system-x86,
//! qemu-storage-daemon), busybox-static, e2fsprogs and a guest kernel (fetched with
//! `apt-get download`); without them they say so on stderr and return.

use std::path::{Path, PathBuf};

use vloop_harness::accel::AccelChoice;
use vloop_harness::backend::BackendKind;
use vloop_harness::{kernel, RunOptions};

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// Why guests cannot boot here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    for (cmd, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-storage-daemon", "qemu-system-x86"),
        ("e2fsck", "e2fsprogs"),
        ("xorriso", "xorriso"),
    ] {
        if !on_path(cmd) {
            return Some(format!("{cmd} not installed (package {pkg})"));
        }
    }
    if vloop_harness::initramfs::find_busybox().is_err() {
        return Some("busybox-static not installed".into());
    }
    if let Err(e) = kernel::resolve(None, None) {
        return Some(format!("no guest kernel: {e}"));
    }
    None
}

/// The lossy backend example, built on demand (`cargo test --test guests` alone does not
/// build examples).
fn lossy_backend() -> PathBuf {
    // Test executables live in <target>/<profile>/deps; examples in <target>/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("examples").join("lossy-backend");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-p", "vloop-harness", "--example", "lossy-backend"])
        .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap());
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd
        .status()
        .expect("run cargo to build the lossy-backend example");
    assert!(st.success(), "building the lossy-backend example failed");
    assert!(
        bin.is_file(),
        "cargo built the lossy-backend example but {} is missing",
        bin.display()
    );
    bin
}

fn options(results: &Path, backend: BackendKind, bin: Option<PathBuf>) -> RunOptions {
    RunOptions {
        scenarios: vec!["ext2-format".into()],
        jobs: 1,
        shard: None,
        backend,
        backend_bin: bin,
        accel: AccelChoice::Auto,
        kernel: None,
        modules: None,
        guest_bin: None,
        image_bin: None,
        results: results.to_path_buf(),
        json: Some(results.join("report.json")),
        junit: Some(results.join("junit.xml")),
        keep: false,
        mem_mib: 256,
        timeout_s: 12,
        append: String::new(),
        pvh: true,
    }
}

#[test]
fn ext2_format_passes_on_a_healthy_backend_and_fails_when_writes_are_lost() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("SKIPPED guest test: {why}");
        return;
    }
    let lossy = lossy_backend();

    // Control: the same scenario on qemu-storage-daemon passes, so a failure below is the
    // lost writes and not a broken set-up.
    let good = tempfile::tempdir().unwrap();
    let out = vloop_harness::run(&options(good.path(), BackendKind::Qsd, None)).unwrap();
    assert_eq!(out.len(), 1);
    assert!(out[0].passed, "control run failed: {}", out[0].reason);
    assert!(
        !good.path().join("ext2-format").exists(),
        "a passed scenario leaves no files"
    );

    let bad = tempfile::tempdir().unwrap();
    let out = vloop_harness::run(&options(bad.path(), BackendKind::Vloop, Some(lossy))).unwrap();
    let o = &out[0];
    assert!(
        !o.passed,
        "the harness passed a backend that drops every write"
    );
    eprintln!("lossy backend verdict: {}", o.reason);
    assert!(
        o.reason.contains("e2fsck")
            || o.reason.contains("read-back")
            || o.reason.contains("guest step"),
        "unexpected reason: {}",
        o.reason
    );
    let kept = o.kept.as_ref().expect("a failed scenario keeps its files");
    for f in [
        "boot-console.log",
        "boot-backend0.log",
        "boot-results.jsonl",
        "disk.img",
    ] {
        assert!(kept.join(f).is_file(), "{f} not kept in {}", kept.display());
    }
    let junit = std::fs::read_to_string(bad.path().join("junit.xml")).unwrap();
    assert!(junit.contains("<failure message="), "{junit}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bad.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(json["passed"], false);
}
