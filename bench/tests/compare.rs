//! `vloop-bench --compare` end to end: short runs in each mode (both qemu-storage-daemon
//! configurations, idle CPU, memory, load and the chart in the page cache; the null mode; the
//! qcow2 mode on the allocated copy and on empty overlays), the time budget, and the modes
//! that cannot be combined.

mod common;

use std::process::Command;

use common::{Ran, BIN};

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
    let bin = vloop
        .clone()
        .unwrap_or_else(|| dir.path().join("no-vloop-blk"));
    let (stdout, v) = compare(dir.path(), &bin, &["--rounds", "2", "--idle", "0"]);
    assert!(stdout.contains("4k randread QD4"), "{stdout}");
    assert!(stdout.contains("peak RSS"), "{stdout}");
    let row = &v["rows"][0];
    assert_eq!(row["qsd"]["iops_rounds"].as_array().unwrap().len(), 2);
    assert!(row["raw"]["iops"]["median"].as_f64().unwrap() > 0.0);
    assert!(
        common::by_target(&v, "backends", "qsd")["idle_rss_kib"]
            .as_u64()
            .unwrap()
            > 0
    );
    if vloop.is_some() {
        assert!(
            row["vloop"]["iops"]["median"].as_f64().unwrap() > 0.0,
            "{row}"
        );
        assert!(row["vloop_over_qsd"].as_f64().unwrap() > 0.0);
    } else {
        assert!(stdout.contains("failed"), "{stdout}");
    }
}

#[test]
fn compare_stops_rounds_at_the_time_budget() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--compare",
        "--only",
        "--no-qsd",
        "--runtime",
        "100ms",
        "--idle",
        "0",
    ];
    let budget = [
        "--rounds",
        "50",
        "--time-budget",
        "1s",
        "--image-size",
        "4M",
    ];
    let cmd = common::bench_on_image(
        dir.path(),
        &dir.path().join("absent-vloop-blk"),
        &[&args[..], &budget].concat(),
    );
    let Ran {
        stderr, json: v, ..
    } = common::run_json(cmd, dir.path());
    let rounds = v["rounds"].as_u64().unwrap();
    assert!((1..50).contains(&rounds), "{rounds} rounds");
    let raw_rounds = v["rows"][0]["raw"]["iops_rounds"].as_array().unwrap().len() as u64;
    assert_eq!(raw_rounds, rounds);
    assert!(stderr.contains("time budget"), "{stderr}");
}

/// The vloop-blk and qemu-storage-daemon a `--compare` test needs (None: skipped).
fn both_backends() -> Option<std::path::PathBuf> {
    let vloop = match common::backend("vloop")? {
        vloop_frontend::backend::Program::Vloop(p) => p,
        _ => return None,
    };
    common::backend("qsd")?;
    Some(vloop)
}

/// Runs `vloop-bench --compare --only -w randread --iodepth 4 --runtime 200ms` with `args` on a
/// small image in `dir`; returns stdout and the JSON report.
fn compare(
    dir: &std::path::Path,
    vloop: &std::path::Path,
    args: &[&str],
) -> (String, serde_json::Value) {
    let workload = ["-w", "randread", "--iodepth", "4", "--runtime", "200ms"];
    compare_only(dir, vloop, &[&workload[..], args].concat())
}

/// Runs `vloop-bench --compare --only` with `args` on a 16 MiB image in `dir`; returns stdout
/// and the JSON report.
fn compare_only(
    dir: &std::path::Path,
    vloop: &std::path::Path,
    args: &[&str],
) -> (String, serde_json::Value) {
    let only = ["--compare", "--only", "--image-size", "16M"];
    let cmd = common::bench_on_image(dir, vloop, &[&only[..], args].concat());
    let Ran { stdout, json, .. } = common::run_json(cmd, dir);
    (stdout, json)
}

#[test]
fn compare_reports_both_qsd_configurations_idle_cpu_memory_load_and_a_chart() {
    let Some(vloop) = both_backends() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("c.svg");
    let (stdout, v) = compare(
        dir.path(),
        &vloop,
        &[
            "--rounds",
            "2",
            "--idle",
            "1s",
            "--plot",
            svg.to_str().unwrap(),
        ],
    );
    // Header: machine and load, before and after, in the table and the JSON.
    assert!(stdout.contains("; machine: "), "{stdout}");
    assert!(
        v["started"].as_str().unwrap().ends_with('Z'),
        "{}",
        v["started"]
    );
    assert!(
        stdout.contains("load average (1/5/15 min): before "),
        "{stdout}"
    );
    assert!(v["machine"]["cpus"].as_u64().unwrap() >= 1);
    assert!(v["machine"]["kernel"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));
    for at in ["before", "after"] {
        assert!(
            v["load"][at]["one"].as_f64().unwrap() >= 0.0,
            "{}",
            v["load"]
        );
    }
    let busy = v["load"]["busy"].as_bool().unwrap();
    assert_eq!(
        stdout.contains("WARNING: the 1-minute load average"),
        busy,
        "{stdout}"
    );
    assert_eq!(v["mode"], "page-cache");
    assert_eq!(
        v["targets"],
        serde_json::json!(["vloop", "qsd", "qsd-iothread", "raw"])
    );
    // Every target measured in both rounds, with the per-row figures.
    let row = &v["rows"][0];
    for t in ["vloop", "qsd", "qsd_iothread", "raw"] {
        let s = &row[t];
        assert_eq!(s["rounds"].as_array().unwrap().len(), 2, "{t}: {s}");
        for f in [
            "iops",
            "mib_s",
            "p50_us",
            "p99_us",
            "p999_us",
            "frontend_cpu_us_per_io",
        ] {
            let st = &s[f];
            assert!(st["median"].as_f64().unwrap() > 0.0, "{t} {f}: {st}");
            assert!(st["min"].as_f64().unwrap() <= st["max"].as_f64().unwrap());
        }
        let r0 = &s["rounds"][0];
        assert!(r0["load_before"].as_f64().is_some(), "{r0}");
        if t != "raw" {
            assert!(
                s["backend_cpu_us_per_io"]["median"].as_f64().unwrap() > 0.0,
                "{t}: {s}"
            );
            assert!(s["peak_rss_kib"].as_u64().unwrap() > 0, "{t}: {s}");
            assert!(
                !r0["backend_threads"].as_array().unwrap().is_empty(),
                "{r0}"
            );
        }
    }
    // Ratios against the better qsd, which is named and has the higher median IOPS.
    let best = row["best_qsd"].as_str().unwrap();
    let key = best.replace('-', "_");
    let other = if best == "qsd" { "qsd_iothread" } else { "qsd" };
    assert!(row[&key]["iops"]["median"].as_f64() >= row[other]["iops"]["median"].as_f64());
    for r in [
        "vloop_over_qsd",
        "vloop_p50_over_qsd",
        "vloop_cpu_over_qsd",
        "vloop_over_raw",
    ] {
        assert!(row[r].as_f64().unwrap() > 0.0, "{r}: {row}");
    }
    assert!(
        stdout.contains(&format!("{:<22} {best}", row["name"].as_str().unwrap())),
        "{stdout}"
    );
    // Idle CPU and memory per backend: the iothread's command line serves from it.
    for name in ["vloop", "qsd", "qsd-iothread"] {
        let b = common::by_target(&v, "backends", name);
        let idle = &b["idle"];
        assert!(idle["failure"].is_null(), "{name}: {idle}");
        assert!(idle["cpu_pct"].as_f64().unwrap() >= 0.0, "{name}: {idle}");
        assert!(
            (0.9..5.0).contains(&idle["secs"].as_f64().unwrap()),
            "{idle}"
        );
        assert_eq!(idle["queues"], 1);
        assert!(b["idle_rss_kib"].as_u64().unwrap() > 0);
        assert!(
            b["peak_rss_kib"].as_u64() >= b["idle_rss_kib"].as_u64(),
            "{b}"
        );
    }
    let cmd = common::by_target(&v, "backends", "qsd-iothread")["command"].to_string();
    assert!(
        cmd.contains("iothread,id=iothread0") && cmd.contains(",iothread=iothread0"),
        "{cmd}"
    );
    assert!(!common::by_target(&v, "backends", "qsd")["command"]
        .to_string()
        .contains("iothread"));
    // The chart: an SVG document naming the workload and every target.
    let texts = common::svg::texts(&std::fs::read_to_string(&svg).unwrap());
    for want in ["4k randread QD4", "vloop", "qsd", "qsd-iothread", "raw"] {
        assert!(texts.iter().any(|t| t == want), "no '{want}' in {texts:?}");
    }
}

#[test]
fn compare_null_mode_has_no_raw_column_and_serves_no_image() {
    let Some(vloop) = both_backends() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (stdout, v) = compare(
        dir.path(),
        &vloop,
        &["--null", "--rounds", "1", "--idle", "0"],
    );
    assert!(stdout.contains("null (no image I/O)"), "{stdout}");
    assert_eq!(v["mode"], "null");
    assert_eq!(
        v["targets"],
        serde_json::json!(["vloop", "qsd", "qsd-iothread"])
    );
    let row = &v["rows"][0];
    assert!(row["raw"].is_null(), "{row}");
    assert!(row["vloop_over_raw"].is_null());
    for t in ["vloop", "qsd", "qsd_iothread"] {
        assert!(
            row[t]["iops"]["median"].as_f64().unwrap() > 0.0,
            "{t}: {row}"
        );
        assert_eq!(row[t]["errors"], 0, "{t}");
    }
    assert!(row["vloop_over_qsd"].as_f64().unwrap() > 0.0);
    let vcmd = common::by_target(&v, "backends", "vloop")["command"].to_string();
    assert!(vcmd.contains(r#""--io-engine","null""#), "{vcmd}");
    for q in ["qsd", "qsd-iothread"] {
        let c = common::by_target(&v, "backends", q)["command"].to_string();
        assert!(
            c.contains("driver=null-co,") && c.contains("read-zeroes=off"),
            "{c}"
        );
        assert!(!c.contains("filename="), "{c}");
    }
    // --null measures the hop, not a cache mode: it cannot be combined with --direct.
    let out = Command::new(BIN)
        .args(["--compare", "--null", "--direct"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// A cheap digest of a file's content (FNV-1a), to tell whether it changed.
fn digest(path: &std::path::Path) -> u64 {
    std::fs::read(path)
        .unwrap()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
}

const QCOW2_TARGETS: [&str; 4] = ["vloop", "qsd", "qsd_iothread", "vloop_raw"];

#[test]
fn compare_qcow2_mode_serves_the_allocated_copy_and_empty_overlays() {
    let Some(vloop) = both_backends() else {
        return;
    };
    if !vloop_frontend::backend::on_path("qemu-img") {
        vloop_frontend::skip::skip("qemu-img is not installed (apt-get install qemu-utils)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("img");
    let qcow2 = dir.path().join("img.qcow2");

    // Random writes on the fully allocated copy (in place) and on the raw image.
    let (stdout, v) = compare_only(
        dir.path(),
        &vloop,
        &[
            "--qcow2",
            "-w",
            "randwrite",
            "--iodepth",
            "4",
            "--runtime",
            "200ms",
            "--rounds",
            "1",
            "--idle",
            "0",
        ],
    );
    assert_eq!(
        v["targets"],
        serde_json::json!(["vloop", "qsd", "qsd-iothread", "vloop-raw"])
    );
    let q = &v["qcow2"];
    assert_eq!(q["path"], qcow2.to_str().unwrap(), "{q}");
    assert_eq!(q["reused"], false);
    assert_eq!(
        q["check"]["total-clusters"], 256,
        "16 MiB of 64 KiB clusters: {q}"
    );
    assert_eq!(q["check"]["allocated-clusters"], 256, "{q}");
    assert_eq!(q["info"]["virtual-size"], 16 << 20);
    for (t, format, path) in [
        ("vloop", "qcow2", &qcow2),
        ("qsd", "qcow2", &qcow2),
        ("qsd-iothread", "qcow2", &qcow2),
        ("vloop-raw", "raw", &raw),
    ] {
        let i = common::by_target(&v, "images", t);
        assert_eq!(i["format"], format, "{i}");
        assert_eq!(i["image"], path.to_str().unwrap(), "{i}");
        assert!(i["empty_overlay"].is_null(), "{i}");
    }
    let row = &v["rows"][0];
    assert_eq!(row["name"], "4k randwrite QD4");
    assert_eq!(row["on"], "allocated");
    assert!(
        row["raw"].is_null(),
        "no raw io_uring column in qcow2 mode: {row}"
    );
    for t in QCOW2_TARGETS {
        assert!(
            row[t]["iops"]["median"].as_f64().unwrap() > 0.0,
            "{t}: {row}"
        );
        assert_eq!(row[t]["errors"], 0, "{t}");
    }
    for r in ["vloop_over_qsd", "vloop_over_vloop_raw"] {
        assert!(row[r].as_f64().unwrap() > 0.0, "{r}: {row}");
    }
    assert!(row["vloop_over_raw"].is_null());
    let cmd = |t| common::by_target(&v, "backends", t)["command"].to_string();
    let q_arg = format!(
        "\"--blk-file\",\"{}\",\"--format\",\"qcow2\"",
        qcow2.display()
    );
    assert!(cmd("vloop").contains(&q_arg), "{}", cmd("vloop"));
    let r_arg = format!("\"--blk-file\",\"{}\",\"--format\",\"raw\"", raw.display());
    assert!(cmd("vloop-raw").contains(&r_arg), "{}", cmd("vloop-raw"));
    for t in ["qsd", "qsd-iothread"] {
        let c = cmd(t);
        assert!(
            c.contains(&format!("filename={},", qcow2.display()))
                && c.contains("driver=qcow2,node-name=q,file=f")
                && c.contains("type=vhost-user-blk,id=e,node-name=q,"),
            "{c}"
        );
    }
    assert!(stdout.contains("page cache, qcow2, image "), "{stdout}");
    assert!(stdout.contains("IOPS vs vloop-raw"), "{stdout}");
    assert!(!stdout.contains("IOPS vs raw"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "qcow2: vloop, qsd and qsd-iothread serve {} (converted",
            qcow2.display()
        )),
        "{stdout}"
    );
    // Killed after in-place writes, every backend left the copy clean and fully allocated.
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&qcow2)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // Sequential writes on empty overlays: each run writes its fresh overlay (or sparse file)
    // once, never the raw image beneath.
    let mtime = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let reusable = mtime(&qcow2) > mtime(&raw);
    let before = digest(&raw);
    let (stdout, v) = compare_only(
        dir.path(),
        &vloop,
        &[
            "--qcow2",
            "--empty-overlay",
            "-w",
            "write",
            "--bs",
            "1M",
            "--iodepth",
            "2",
            "--runtime",
            "20s",
            "--rounds",
            "1",
            "--idle",
            "0",
        ],
    );
    assert_eq!(digest(&raw), before, "the backing file was written");
    assert_eq!(v["qcow2"]["reused"], reusable, "{}", v["qcow2"]);
    let row = &v["rows"][0];
    assert_eq!(row["name"], "1M write QD2 overlay");
    assert_eq!(row["on"], "empty-overlay");
    assert_eq!(row["workload"]["one_pass"], true);
    for t in QCOW2_TARGETS {
        let r0 = &row[t]["rounds"][0];
        assert_eq!(r0["ios"], 16, "{t} writes 16 MiB once: {r0}");
        assert_eq!(r0["errors"], 0, "{t}");
        assert!(
            r0["secs"].as_f64().unwrap() < 15.0,
            "{t} ends at the end: {r0}"
        );
    }
    assert!(row["vloop_over_vloop_raw"].as_f64().unwrap() > 0.0, "{row}");
    for t in ["vloop", "qsd", "qsd-iothread"] {
        let i = common::by_target(&v, "images", t);
        assert_eq!(
            i["empty_overlay"],
            format!("an empty qcow2 overlay over {} (raw)", raw.display()),
            "{i}"
        );
    }
    assert_eq!(
        common::by_target(&v, "images", "vloop-raw")["empty_overlay"],
        "a sparse raw file of 16777216 bytes"
    );
    let c = common::by_target(&v, "backends", "vloop")["command"].to_string();
    assert!(
        c.contains(".vloop-bench-overlays") && c.contains("vloop.qcow2\",\"--format\",\"qcow2\""),
        "{c}"
    );
    let c = common::by_target(&v, "backends", "qsd")["command"].to_string();
    assert!(
        c.contains(".vloop-bench-overlays") && c.contains("qsd.qcow2,"),
        "{c}"
    );
    assert!(stdout.contains("overlay rows: every run"), "{stdout}");
    // The overlays are gone with the run.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".vloop-bench-overlays"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // The qcow2 mode serves images, so it excludes the null mode; overlays need it.
    for bad in [
        &["--compare", "--qcow2", "--null"][..],
        &["--compare", "--only", "--empty-overlay"][..],
    ] {
        let out = Command::new(BIN).args(bad).output().unwrap();
        assert!(!out.status.success(), "{bad:?}");
    }
}
