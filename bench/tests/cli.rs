//! The vloop-bench binary: a short run against qemu-storage-daemon, JSON output, and the
//! error line for a missing socket.

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_vloop-bench");

#[test]
fn short_run_against_qsd_reports_iops_and_json() {
    let Some(b) = common::backend("qsd") else {
        return;
    };
    let e = common::export(b, 2);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = Command::new(BIN)
        .arg("--socket")
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
        .arg(e.daemon.pid().to_string())
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("8k mixed70 QD4 x2q:"), "{stdout}");
    assert!(stdout.contains("backend CPU:"), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("--socket PATH, --raw FILE or --compare"));
}

#[test]
fn compare_prints_the_table_and_json() {
    let Some(_) = common::backend("qsd") else {
        return;
    };
    let vloop = match common::backend("vloop") {
        Some(vloop_frontend::backend::Program::Vloop(p)) => Some(p),
        _ => None,
    };
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("c.json");
    let mut cmd = Command::new(BIN);
    cmd.args(["--compare", "--only", "-w", "randread", "--iodepth", "4"])
        .args(["--runtime", "200ms", "--rounds", "2", "--image-size", "16M"])
        .arg("--image")
        .arg(dir.path().join("img"))
        .arg("--vloop-bin")
        .arg(
            vloop
                .clone()
                .unwrap_or_else(|| dir.path().join("no-vloop-blk")),
        )
        .arg("--json")
        .arg(&json);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("4k randread QD4"), "{stdout}");
    assert!(stdout.contains("idle RSS per export"), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let row = &v["rows"][0];
    assert_eq!(row["qsd"]["iops_rounds"].as_array().unwrap().len(), 2);
    assert!(row["raw"]["iops"].as_f64().unwrap() > 0.0);
    assert!(v["qsd_memory"]["idle_rss_kib"].as_u64().unwrap() > 0);
    if vloop.is_some() {
        assert!(row["vloop"]["iops"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["vloop_over_qsd"].as_f64().unwrap() > 0.0);
    } else {
        assert!(stdout.contains("failed"), "{stdout}");
    }
}

#[test]
fn compare_stops_rounds_at_the_time_budget() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("c.json");
    let out = Command::new(BIN)
        .args(["--compare", "--only", "--no-qsd", "--runtime", "100ms"])
        .args([
            "--rounds",
            "50",
            "--time-budget",
            "1s",
            "--image-size",
            "4M",
        ])
        .arg("--image")
        .arg(dir.path().join("img"))
        .arg("--vloop-bin")
        .arg(dir.path().join("absent-vloop-blk"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rounds = v["rounds"].as_u64().unwrap();
    assert!((1..50).contains(&rounds), "{rounds} rounds");
    let raw_rounds = v["rows"][0]["raw"]["iops_rounds"].as_array().unwrap().len() as u64;
    assert_eq!(raw_rounds, rounds);
    assert!(String::from_utf8_lossy(&out.stderr).contains("time budget"));
}
