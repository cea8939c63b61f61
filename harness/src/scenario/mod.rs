//! Scenarios: what each one puts on its disks, what the guest does, and what the host checks
//! afterwards. A scenario passes only when every guest step reported success, the guest said
//! it was done, and every host check passed; it is "not run" when something it needs is
//! missing here.
//!
//! One registry entry per scenario ([`SCENARIOS`]: name, description, what it exercises in
//! a backend, whether it is a default, how many guests it boots, its function); the
//! scenarios live by family in [`ext2`] (they write), [`iso`] (read-only) and [`overlays`]
//! (several guests at once on qcow2 overlays of one base), over [`ctx`].

pub mod ctx;
pub mod ext2;
pub mod iso;
pub mod overlays;

use std::path::{Path, PathBuf};
use std::time::Instant;

pub use ctx::{chain, Check, Ctx, GuestPlan, Scenario, ScenarioError};

use crate::accel::Accel;
use crate::backend::Backend;
use crate::file_error::at;
use crate::images::Images;
use crate::setup::Env;

/// Every scenario, in the order they run (and are sharded).
pub const SCENARIOS: &[Scenario] = &[
    ext2::FORMAT,
    iso::ISO,
    ext2::IMAGE,
    ext2::PERSIST,
    iso::CDROM_COPY,
    ext2::DISCARD,
    ext2::MULTIQUEUE,
    overlays::OVERLAYS,
];

/// The scenario called `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// How a scenario ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Status {
    /// Every check held.
    #[serde(rename = "pass")]
    Pass,
    /// A check failed.
    #[serde(rename = "fail")]
    Fail,
    /// It could not run here (the reason says why).
    #[serde(rename = "not run")]
    NotRun,
}

impl Status {
    /// As the table prints it.
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::NotRun => "NOT RUN",
        }
    }
}

/// The result of one scenario.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// Scenario name.
    pub name: String,
    /// How it ended.
    pub status: Status,
    /// Whether it passed (the same as `status == Pass`).
    pub passed: bool,
    /// Why it failed or did not run (empty when it passed).
    pub reason: String,
    /// What a backend must get right to pass it.
    pub exercises: String,
    /// Accelerator used (none when no guest could be set up).
    pub accel: Option<Accel>,
    /// Wall seconds from QEMU's start until the guest agent reported it started (first boot).
    pub boot_s: Option<f64>,
    /// Wall seconds for the whole scenario (images, boots, checks).
    pub total_s: f64,
    /// Each thing checked, in order.
    pub checks: Vec<Check>,
    /// What was done and with which tools.
    pub notes: Vec<String>,
    /// Directory holding the logs and images of a failed (or `--keep`) run.
    pub kept: Option<PathBuf>,
}

impl Outcome {
    /// An outcome for `s` that says it could not run, and why.
    pub fn not_run(s: &Scenario, accel: Option<Accel>, reason: &str) -> Outcome {
        Outcome {
            name: s.name.to_string(),
            status: Status::NotRun,
            passed: false,
            reason: reason.to_string(),
            exercises: s.exercises.to_string(),
            accel,
            boot_s: None,
            total_s: 0.0,
            checks: Vec::new(),
            notes: Vec::new(),
            kept: None,
        }
    }
}

/// Runs `s` with its files under `results/<name>`; the directory is removed when the
/// scenario passes (unless `keep`).
pub fn run(
    env: &Env,
    backend: &Backend,
    images: Images,
    s: &Scenario,
    results: &Path,
    keep: bool,
) -> Outcome {
    let t = Instant::now();
    let dir = results.join(s.name);
    let mut out = Outcome::not_run(s, Some(env.accel), "");
    let _ = std::fs::remove_dir_all(&dir);
    let setup = std::fs::create_dir_all(&dir)
        .map_err(at("creating", &dir))
        .and_then(|()| {
            tempfile::Builder::new()
                .prefix("vloop-")
                .tempdir_in(std::env::temp_dir())
                .map_err(at(
                    "creating a temporary directory in",
                    &std::env::temp_dir(),
                ))
        })
        .map_err(ScenarioError::from);
    let r = setup.and_then(|tmp| {
        let mut c = Ctx {
            env,
            backend,
            images,
            dir: dir.clone(),
            tmp,
            boot_s: None,
            notes: Vec::new(),
            checks: Vec::new(),
        };
        let r = (s.run)(&mut c);
        out.boot_s = c.boot_s;
        out.notes = c.notes;
        out.checks = c.checks;
        r
    });
    out.total_s = t.elapsed().as_secs_f64();
    match r {
        Ok(()) => {
            out.status = Status::Pass;
            out.passed = true;
            if keep {
                out.kept = Some(dir);
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Err(ScenarioError::NotRun(why)) => {
            out.reason = why;
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(e) => {
            out.status = Status::Fail;
            out.reason = chain(&e);
            out.kept = Some(dir);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_names_are_unique_and_defaults_exist() {
        let mut names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SCENARIOS.len());
        assert!(find("ext2-format").is_some_and(|s| s.default && s.writes));
        assert!(find("iso").is_some_and(|s| s.default && !s.writes));
        assert!(SCENARIOS
            .iter()
            .all(|s| s.boots >= 1 && !s.exercises.is_empty()));
    }

    #[test]
    fn a_missing_tool_makes_a_scenario_not_run() {
        let e = ScenarioError::from(crate::manifest::ManifestError::NoE2fsck);
        assert!(matches!(e, ScenarioError::NotRun(ref r) if r.contains("e2fsprogs")));
        let o = Outcome::not_run(&ext2::FORMAT, None, "no QEMU");
        assert_eq!(o.status, Status::NotRun);
        assert!(!o.passed);
        let j = serde_json::to_value(&o).unwrap();
        assert_eq!(j["status"], "not run");
        assert!(j["accel"].is_null(), "no guest, no accelerator");
    }
}
