//! The `overlays` scenario with vloop-blk: four guests at once on qcow2 overlays of one base
//! pass every guest and host check, and so does qemu-storage-daemon (`--backend qsd`, told to
//! serve `*.qcow2` images through a qcow2 node; it does not lock the base against writers,
//! which the scenario checks only where it is promised).

mod common;

use common::{build_vloop_blk, guests_can_boot, report, run_scenario};

fn needs_qemu_utils() -> bool {
    for tool in ["qemu-img", "qemu-io"] {
        if !vloop_frontend::backend::on_path(tool) {
            vloop_frontend::skip::skip(&format!("{tool} not installed (package qemu-utils)"));
            return false;
        }
    }
    true
}

#[test]
fn four_guests_on_overlays_of_one_base_pass_with_vloop_blk() {
    if !guests_can_boot() || !needs_qemu_utils() {
        return;
    }
    build_vloop_blk();
    let t = tempfile::tempdir().unwrap();
    let r = run_scenario("overlays", &[], t.path());
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let v = report(t.path());
    assert!(v["run"]["backend"]
        .as_str()
        .unwrap()
        .starts_with("vloop-blk"));
    let o = &v["scenarios"][0];
    assert_eq!(o["name"], "overlays");
    assert_eq!(o["status"], "pass", "{}", o["reason"]);
    let checks = o["checks"].as_array().unwrap();
    assert!(checks.iter().all(|c| c["ok"] == true));
    let held = |what: &str| {
        checks
            .iter()
            .find(|c| c["what"] == what)
            .unwrap_or_else(|| panic!("no check {what:?} in {checks:?}"))["detail"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for g in 0..4 {
        assert!(held(&format!("guest{g}: disk_size")).contains("33554432 bytes"));
        held(&format!("guest{g}: write_files"));
        held(&format!("host: guest{g} overlay: qemu-img check"));
        held(&format!("host: guest{g} overlay: allocation"));
        let back = held(&format!(
            "host: guest{g} overlay: read-back (vloop-qcow2 + ext4-view)"
        ));
        assert!(back.contains("nothing else"), "{back}");
        held(&format!(
            "host: guest{g} overlay: e2fsck -fn (qemu-img convert)"
        ));
    }
    assert!(held("host: base unchanged").contains("same SHA-256"));
    let lock = held("host: base locked against writers");
    assert!(lock.contains("\"write\" lock"), "{lock}");
    let notes = o["notes"].as_array().unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap().contains("4 guests booted at once")),
        "{notes:?}"
    );
    // A passed scenario leaves nothing behind.
    assert!(!t.path().join("res/overlays").exists());
}

#[test]
fn qemu_storage_daemon_serves_the_overlays_as_qcow2_too() {
    if !guests_can_boot() || !needs_qemu_utils() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let r = run_scenario("overlays", &["--backend", "qsd"], t.path());
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let o = &report(t.path())["scenarios"][0];
    assert_eq!(o["status"], "pass", "{o}");
}
