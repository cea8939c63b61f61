//! The conformance suite, `vloop-harness run --scenario all --backend-cmd TEMPLATE`, against
//! two backends the harness knows only through a template: qemu-storage-daemon passes every
//! scenario but `overlays`, which its raw-file template cannot serve and which is reported as
//! not run (with a template that opens the image as qcow2 it passes that one too); a backend
//! that acknowledges writes and drops them fails exactly the scenarios that write, and the
//! report says what it got wrong in each.

mod common;

use common::{
    guests_can_boot, lossy_backend, report, run_harness, run_scenario, QSD_QCOW2_TEMPLATE,
    QSD_TEMPLATE,
};
use vloop_harness::scenario::{overlays::OVERLAYS, SCENARIOS};

/// Every scenario, two guests at a time, through `template`; reports in `dir`.
fn run_all(template: &str, dir: &std::path::Path) -> common::Run {
    run_harness(
        &[
            "run",
            "--scenario",
            "all",
            "--jobs",
            "2",
            "--backend-cmd",
            template,
            "--results",
            "res",
            "--json",
            "report.json",
            "--junit",
            "junit.xml",
        ],
        dir,
    )
}

#[test]
fn qemu_storage_daemon_through_a_template_passes_every_scenario_it_can_serve() {
    if !guests_can_boot() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let r = run_all(QSD_TEMPLATE, t.path());
    // 2: a scenario did not run (overlays: the raw template serves the qcow2 file's bytes).
    assert_eq!(r.code, Some(2), "{}\n{}", r.stdout, r.stderr);
    let v = report(t.path());
    assert_eq!(v["counts"]["passed"], SCENARIOS.len() - 1, "{}", r.stdout);
    assert_eq!(v["counts"]["not_run"], 1, "{}", r.stdout);
    let overlays = v["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == OVERLAYS.name)
        .unwrap();
    assert_eq!(overlays["status"], "not run");
    let why = overlays["reason"].as_str().unwrap();
    assert!(
        why.contains("does not serve qcow2") && why.contains("262144 bytes"),
        "{why}"
    );
    assert!(v["run"]["backend"]
        .as_str()
        .unwrap()
        .starts_with("--backend-cmd qemu-storage-daemon"));
    assert!(!v["run"]["accel_why"].as_str().unwrap().is_empty());
    let junit = std::fs::read_to_string(t.path().join("junit.xml")).unwrap();
    assert!(
        junit.contains("failures=\"0\" errors=\"0\" skipped=\"1\""),
        "{junit}"
    );
    assert!(r.stdout.contains("accelerator: "), "{}", r.stdout);
}

#[test]
fn qemu_storage_daemon_with_a_qcow2_template_passes_the_overlays_scenario() {
    if !guests_can_boot() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let r = run_scenario(
        OVERLAYS.name,
        &["--backend-cmd", QSD_QCOW2_TEMPLATE],
        t.path(),
    );
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let o = &report(t.path())["scenarios"][0];
    assert_eq!(o["status"], "pass", "{}", o["reason"]);
    let notes = o["notes"].as_array().unwrap();
    // qemu-storage-daemon's export shares every permission, so it leaves the base writable;
    // the scenario says so instead of checking a promise the backend never made.
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap().contains("a writer could open the base")),
        "{notes:?}"
    );
}

#[test]
fn a_backend_that_drops_writes_fails_the_data_scenarios_and_says_which() {
    if !guests_can_boot() {
        return;
    }
    let lossy = lossy_backend();
    let template = format!(
        "{} --socket-path {{socket}} --blk-file {{image}} --writable {{writable}} --num-queues {{queues}}",
        lossy.display()
    );
    let t = tempfile::tempdir().unwrap();
    let r = run_all(&template, t.path());
    assert_eq!(r.code, Some(1), "{}\n{}", r.stdout, r.stderr);
    let v = report(t.path());
    for s in SCENARIOS {
        let o = v["scenarios"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == s.name)
            .unwrap();
        if s.writes {
            assert_eq!(o["status"], "fail", "{} passed on a lossy backend", s.name);
            let wrong: Vec<&serde_json::Value> = o["checks"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["ok"] == false)
                .collect();
            assert!(!wrong.is_empty(), "{}: no failed check named", s.name);
            eprintln!(
                "{}: wrong: {} ({})",
                s.name, wrong[0]["what"], wrong[0]["detail"]
            );
            assert!(
                r.stdout
                    .contains(&format!("wrong: {}", wrong[0]["what"].as_str().unwrap())),
                "the table does not say what {} got wrong:\n{}",
                s.name,
                r.stdout
            );
            let kept = t.path().join(o["kept"].as_str().unwrap());
            assert!(
                ["boot", "boot1", "guest0"]
                    .iter()
                    .any(|b| kept.join(format!("{b}-backend0.log")).is_file()),
                "{}: no backend log kept",
                s.name
            );
        } else {
            assert_eq!(o["status"], "pass", "{}: {}", s.name, o["reason"]);
        }
    }
    let failed = SCENARIOS.iter().filter(|s| s.writes).count();
    let junit = std::fs::read_to_string(t.path().join("junit.xml")).unwrap();
    assert!(junit.contains(&format!("failures=\"{failed}\"")), "{junit}");
}
