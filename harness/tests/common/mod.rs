//! What the guest-booting tests share: the prerequisites (a missing one skips the test
//! locally and fails it under CI), the harness binary, and programs built on demand.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use vloop_frontend::backend::on_path;
use vloop_frontend::skip::skip;

/// Why guests cannot boot here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    for (cmd, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-storage-daemon", "qemu-system-x86"),
        ("e2fsck", "e2fsprogs"),
    ] {
        if !on_path(cmd) {
            return Some(format!("{cmd} not installed (package {pkg})"));
        }
    }
    if vloop_harness::initramfs::find_busybox().is_err() {
        return Some("busybox-static not installed".into());
    }
    if let Err(e) = vloop_harness::kernel::resolve(None, None) {
        return Some(format!("no guest kernel: {e}"));
    }
    None
}

/// True when guests can boot here; otherwise reports the test as skipped (a failure
/// under CI) and returns false.
pub fn guests_can_boot() -> bool {
    match missing_prerequisite() {
        Some(why) => {
            skip(&format!("guest test: {why}"));
            false
        }
        None => true,
    }
}

/// The harness binary under test.
pub fn harness() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vloop-harness"))
}

/// `<target>/<profile>` of this test executable (which lives in its `deps/`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Runs `cargo build` with `args` into this test's own target directory and profile (a
/// no-op when up to date).
fn cargo_build(args: &[&str]) {
    let profile = profile_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .args(args)
        .env("CARGO_TARGET_DIR", profile.parent().unwrap());
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("run cargo build");
    assert!(st.success(), "cargo build {args:?} failed");
}

/// vloop-blk beside the harness, built on demand (`cargo test -p vloop-harness` alone does
/// not build other packages' binaries).
pub fn build_vloop_blk() {
    cargo_build(&["-p", "vloop-blk", "--bin", "vloop-blk"]);
    let bin = profile_dir().join("vloop-blk");
    assert!(bin.is_file(), "{} missing after the build", bin.display());
}

/// The lossy backend example, built on demand.
pub fn lossy_backend() -> PathBuf {
    cargo_build(&["-p", "vloop-harness", "--example", "lossy-backend"]);
    let bin = profile_dir().join("examples").join("lossy-backend");
    assert!(bin.is_file(), "{} missing after the build", bin.display());
    bin
}

/// The qemu-storage-daemon template of the README: every scenario's needs (discards passed
/// down, the queue count) expressed through the placeholders.
pub const QSD_TEMPLATE: &str = "qemu-storage-daemon --blockdev driver=file,node-name=f,filename={image},discard=unmap --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={socket},writable={writable},num-queues={queues}";

/// qemu-storage-daemon serving the image as qcow2 (a qcow2 node over the file node), for the
/// scenarios whose images are qcow2.
pub const QSD_QCOW2_TEMPLATE: &str = "qemu-storage-daemon --blockdev driver=file,node-name=f,filename={image},discard=unmap --blockdev driver=qcow2,node-name=q,file=f,discard=unmap --export type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={socket},writable={writable},num-queues={queues}";

/// Output of a finished harness run, with the exit status.
pub struct Run {
    /// Exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// Starts the harness with `args` in `dir`, stdout and stderr piped.
pub fn spawn_harness(args: &[&str], dir: &Path) -> std::process::Child {
    Command::new(harness())
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start vloop-harness")
}

/// Runs the harness with `args` to the end.
pub fn run_harness(args: &[&str], dir: &Path) -> Run {
    let out = Command::new(harness())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run vloop-harness");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `vloop-harness run --scenario SCENARIO EXTRA... --results res --json report.json` in `dir`.
pub fn run_scenario(scenario: &str, extra: &[&str], dir: &Path) -> Run {
    let mut args = vec!["run", "--scenario", scenario];
    args.extend(extra);
    args.extend(["--results", "res", "--json", "report.json"]);
    run_harness(&args, dir)
}

/// The JSON report a run wrote to `dir/report.json`.
pub fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}
