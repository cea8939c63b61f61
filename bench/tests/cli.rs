//! The vloop-bench binary's single runs: a short run against qemu-storage-daemon with its JSON
//! output, the error line for a missing socket, and nothing to do. The comparisons have
//! `compare.rs` and `guest.rs`.

mod common;

use std::process::Command;

use common::{Ran, BIN};

#[test]
fn short_run_against_qsd_reports_iops_and_json() {
    let Some(b) = common::backend("qsd") else {
        return;
    };
    let e = common::export(b, 2);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("--socket")
        .arg(e.daemon.socket())
        .args([
            "-w",
            "mixed",
            "--bs",
            "8k",
            "--iodepth",
            "4",
            "--queues",
            "2",
        ])
        .args(["--runtime", "300ms", "--backend-pid"])
        .arg(e.daemon.pid().to_string());
    let Ran {
        stdout, json: v, ..
    } = common::run_json(cmd, dir.path());
    assert!(stdout.contains("8k mixed70 QD4 x2q:"), "{stdout}");
    assert!(stdout.contains("backend CPU:"), "{stdout}");
    assert!(v["result"]["ios"].as_u64().unwrap() > 0);
    assert_eq!(v["result"]["errors"].as_u64(), Some(0));
    assert!(v["result"]["latency"]["p99_us"].as_f64().unwrap() > 0.0);
}

#[test]
fn missing_socket_is_one_clear_error_line() {
    let out = Command::new(BIN)
        .args(["--socket", "/nonexistent/vloop.sock", "--runtime", "1s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("is the backend running"),
        "{err}"
    );
}

#[test]
fn nothing_to_do_is_an_error() {
    let out = Command::new(BIN).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--socket PATH, --raw FILE, --compare or --guest"));
}
