//! qemu-img and qemu-io as the oracle: images made and written by QEMU, checked, compared
//! and described by it.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::{run_cmd, run_ok};

/// True when qemu-img runs; otherwise the test is skipped (a failure under `CI=true`).
pub fn have_qemu_img(test: &str) -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let why = format!("{test}: qemu-img is not installed (apt-get install qemu-utils)");
        vloop_frontend::skip::skip(&why);
    }
    ok
}

/// Runs qemu-img in `dir`; it must succeed. Returns stdout.
pub fn qemu_img(args: &[&str], dir: &Path) -> String {
    let mut c = Command::new("qemu-img");
    c.args(args).current_dir(dir);
    String::from_utf8(run_ok(c).stdout).expect("utf-8")
}

/// `qemu-img create -f qcow2 [-o OPTS] IMG SIZE` in `dir`; `opts` empty: none.
pub fn qemu_new(img: &str, opts: &str, size: &str, dir: &Path) {
    let mut args = vec!["create", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img, size]);
    qemu_img(&args, dir);
}

/// `qemu-img create -f qcow2 -b BASE -F BASE_FMT [-o OPTS] IMG` in `dir`: an overlay of
/// its base's size; `opts` empty: none.
pub fn qemu_overlay(img: &str, base: &str, base_fmt: &str, opts: &str, dir: &Path) {
    let mut args = vec!["create", "-f", "qcow2", "-b", base, "-F", base_fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.push(img);
    qemu_img(&args, dir);
}

/// qemu-io in `dir` on a qcow2 image; every command must succeed.
pub fn qemu_io(img: &str, cmds: &[&str], dir: &Path) {
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

/// qemu-img's JSON output.
pub fn qemu_json(args: &[&str], dir: &Path) -> Value {
    serde_json::from_str(&qemu_img(args, dir)).expect("qemu-img json")
}

/// `qemu-img check --output=json`: the image must be free of corruption and of leaks.
pub fn check_clean(img: &str, dir: &Path) -> Value {
    let j = qemu_json(&["check", "--output=json", img], dir);
    assert_eq!(j["check-errors"], 0, "{img}: {j}");
    assert!(j.get("corruptions").is_none_or(|v| v == 0), "{img}: {j}");
    assert!(j.get("leaks").is_none_or(|v| v == 0), "{img}: {j}");
    j
}

/// `qemu-img compare`: the two images' virtual disks must be equal.
pub fn assert_equal(a: &str, fa: &str, b: &str, fb: &str, dir: &Path) {
    qemu_img(&["compare", "-f", fa, "-F", fb, a, b], dir);
}
