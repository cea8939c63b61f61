//! Reports: the human table, JSON and JUnit XML. Each says which accelerator the guests
//! ran on and why (the KVM probe's verdict), which backend served the disks, and per
//! scenario what the backend got right and wrong; scenarios that could not run are counted
//! as such ("not run", JUnit `skipped`), never as passes.

use std::fmt::Write as _;

use crate::accel::Accel;
use crate::scenario::{Outcome, Status};

/// Facts about the whole run, printed with the table and stored in the JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunInfo {
    /// Accelerator used (`kvm` or `tcg`).
    pub accel: String,
    /// Why: the KVM probe's verdict or the option that forced it.
    pub accel_why: String,
    /// Backend program.
    pub backend: String,
    /// Kernel image and its source.
    pub kernel: String,
    /// Image tools.
    pub images: String,
    /// Wall seconds for the whole run.
    pub wall_s: f64,
    /// Parallel jobs.
    pub jobs: usize,
}

fn secs(s: Option<f64>) -> String {
    s.map_or_else(|| "-".into(), |v| format!("{v:.1}s"))
}

/// Counts of passed, failed and not-run scenarios.
pub fn counts(outcomes: &[Outcome]) -> (usize, usize, usize) {
    let n = |st: Status| outcomes.iter().filter(|o| o.status == st).count();
    (n(Status::Pass), n(Status::Fail), n(Status::NotRun))
}

/// The human table: scenario, result, accel, boot time, total time; per scenario what the
/// backend got right and wrong, why a scenario failed or did not run and where its files
/// are; then the run's accelerator (and why) and backend.
pub fn table(info: &RunInfo, outcomes: &[Outcome]) -> String {
    let w = outcomes
        .iter()
        .map(|o| o.name.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<w$}  {:<7}  {:<5}  {:>7}  {:>7}",
        "scenario", "result", "accel", "boot", "total"
    );
    for o in outcomes {
        let _ = writeln!(
            s,
            "{:<w$}  {:<7}  {:<5}  {:>7}  {:>7}",
            o.name,
            o.status.label(),
            o.accel.map_or("-", Accel::name),
            secs(o.boot_s),
            secs(Some(o.total_s)),
        );
        match o.status {
            Status::Pass => {
                let _ = writeln!(
                    s,
                    "    right: {} ({} checks held)",
                    o.exercises,
                    o.checks.len()
                );
            }
            Status::Fail => {
                let _ = writeln!(s, "    exercises: {}", o.exercises);
                for c in o.checks.iter().filter(|c| !c.ok) {
                    let _ = writeln!(s, "    wrong: {}: {}", c.what, c.detail);
                }
                let right: Vec<&str> = o
                    .checks
                    .iter()
                    .filter(|c| c.ok)
                    .map(|c| c.what.as_str())
                    .collect();
                if !right.is_empty() {
                    let _ = writeln!(s, "    right: {}", right.join(", "));
                }
                let _ = writeln!(s, "    reason: {}", o.reason);
            }
            Status::NotRun => {
                let _ = writeln!(s, "    not run: {}", o.reason);
            }
        }
        if let Some(k) = &o.kept {
            let _ = writeln!(s, "    logs and images: {}", k.display());
        }
    }
    let (passed, failed, not_run) = counts(outcomes);
    let _ = writeln!(s, "{passed} passed, {failed} failed, {not_run} not run");
    let _ = writeln!(s, "accelerator: {} ({})", info.accel, info.accel_why);
    let _ = writeln!(s, "backend: {}", info.backend);
    s
}

/// The JSON report.
pub fn json(info: &RunInfo, outcomes: &[Outcome]) -> String {
    let (passed, failed, not_run) = counts(outcomes);
    let v = serde_json::json!({
        "run": info,
        "passed": failed == 0 && not_run == 0,
        "counts": { "passed": passed, "failed": failed, "not_run": not_run },
        "scenarios": outcomes,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// Escapes text for XML attributes and content; drops characters XML 1.0 forbids.
pub fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            '\t' | '\n' | '\r' => o.push(c),
            c if (c as u32) < 0x20 => {}
            c => o.push(c),
        }
    }
    o
}

/// JUnit XML: one testsuite, one testcase per scenario, a failure element for each failure
/// and a skipped element for each scenario that could not run.
pub fn junit(info: &RunInfo, outcomes: &[Outcome]) -> String {
    let (_, failures, skipped) = counts(outcomes);
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        "<testsuites name=\"vloop-harness\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{:.3}\">",
        outcomes.len(),
        info.wall_s
    );
    let _ = writeln!(
        s,
        "  <testsuite name=\"vloop-harness\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{:.3}\">",
        outcomes.len(),
        info.wall_s
    );
    let _ = writeln!(s, "    <properties>");
    for (k, v) in [
        ("accel", &info.accel),
        ("accel_why", &info.accel_why),
        ("backend", &info.backend),
        ("kernel", &info.kernel),
        ("images", &info.images),
    ] {
        let _ = writeln!(
            s,
            "      <property name=\"{k}\" value=\"{}\"/>",
            xml_escape(v)
        );
    }
    let _ = writeln!(s, "    </properties>");
    for o in outcomes {
        let _ = writeln!(
            s,
            "    <testcase classname=\"vloop-harness.{}\" name=\"{}\" time=\"{:.3}\">",
            o.accel.map_or("none", Accel::name),
            xml_escape(&o.name),
            o.total_s
        );
        match o.status {
            Status::Pass => {}
            Status::Fail => {
                let wrong: Vec<String> = o
                    .checks
                    .iter()
                    .filter(|c| !c.ok)
                    .map(|c| format!("wrong: {}: {}", c.what, c.detail))
                    .collect();
                let _ = writeln!(
                    s,
                    "      <failure message=\"{}\" type=\"ScenarioFailed\">{}</failure>",
                    xml_escape(&o.reason),
                    xml_escape(&format!(
                        "{}\n{}\nlogs and images: {}",
                        o.reason,
                        wrong.join("\n"),
                        o.kept
                            .as_ref()
                            .map(|k| k.display().to_string())
                            .unwrap_or_default()
                    ))
                );
            }
            Status::NotRun => {
                let _ = writeln!(
                    s,
                    "      <skipped message=\"{}\"/>",
                    xml_escape(&format!("not run: {}", o.reason))
                );
            }
        }
        let _ = writeln!(
            s,
            "      <system-out>{}</system-out>",
            xml_escape(&format!(
                "accelerator: {} ({})\n{}",
                info.accel,
                info.accel_why,
                o.notes.join("\n")
            ))
        );
        let _ = writeln!(s, "    </testcase>");
    }
    s.push_str("  </testsuite>\n</testsuites>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Check;

    fn outcome(name: &str, status: Status) -> Outcome {
        Outcome {
            name: name.into(),
            status,
            passed: status == Status::Pass,
            reason: String::new(),
            exercises: "reads and writes".into(),
            accel: Some(Accel::Tcg),
            boot_s: None,
            total_s: 0.0,
            checks: vec![],
            notes: vec![],
            kept: None,
        }
    }

    fn outcomes() -> Vec<Outcome> {
        vec![
            Outcome {
                boot_s: Some(1.2),
                total_s: 4.0,
                notes: vec!["e2fsck clean".into()],
                checks: vec![Check {
                    what: "boot: mkfs".into(),
                    ok: true,
                    detail: String::new(),
                }],
                ..outcome("ext2-format", Status::Pass)
            },
            Outcome {
                reason: "step 1 (verify) failed: a<b> & \"c\"\u{1}".into(),
                total_s: 9.5,
                kept: Some("/r/iso".into()),
                checks: vec![
                    Check {
                        what: "boot: mount".into(),
                        ok: true,
                        detail: String::new(),
                    },
                    Check {
                        what: "boot: verify".into(),
                        ok: false,
                        detail: "a: missing".into(),
                    },
                ],
                ..outcome("iso", Status::Fail)
            },
            Outcome {
                reason: "e2fsck is not installed".into(),
                ..outcome("persist", Status::NotRun)
            },
        ]
    }

    fn info() -> RunInfo {
        RunInfo {
            accel: "tcg".into(),
            accel_why: "KVM unusable: probe timed out".into(),
            backend: "vloop".into(),
            kernel: "k".into(),
            images: "i".into(),
            wall_s: 10.0,
            jobs: 2,
        }
    }

    #[test]
    fn table_shows_results_what_went_right_and_wrong_and_the_accelerator() {
        let t = table(&info(), &outcomes());
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["scenario", "result", "accel", "boot", "total"]);
        assert_eq!(rows[1], ["ext2-format", "PASS", "tcg", "1.2s", "4.0s"]);
        assert!(t.contains("right: reads and writes (1 checks held)"), "{t}");
        assert_eq!(rows[3], ["iso", "FAIL", "tcg", "-", "9.5s"]);
        assert!(t.contains("wrong: boot: verify: a: missing"));
        assert!(t.contains("right: boot: mount"));
        assert!(t.contains("reason: step 1"));
        assert!(t.contains("logs and images: /r/iso"));
        assert!(
            rows.iter().any(|r| r[..3] == ["persist", "NOT", "RUN"]),
            "{t}"
        );
        assert!(t.contains("not run: e2fsck is not installed"));
        assert!(t.contains("1 passed, 1 failed, 1 not run"));
        assert!(t.contains("accelerator: tcg (KVM unusable: probe timed out)"));
    }

    #[test]
    fn json_parses_back() {
        let v: serde_json::Value = serde_json::from_str(&json(&info(), &outcomes())).unwrap();
        assert_eq!(v["passed"], false);
        assert_eq!(v["counts"]["not_run"], 1);
        assert_eq!(v["run"]["accel_why"], "KVM unusable: probe timed out");
        assert_eq!(v["scenarios"][0]["accel"], "tcg");
        assert_eq!(v["scenarios"][1]["kept"], "/r/iso");
        assert_eq!(v["scenarios"][1]["checks"][1]["ok"], false);
        assert_eq!(v["scenarios"][2]["status"], "not run");
    }

    #[test]
    fn junit_is_well_formed_and_counts_failures_and_skips() {
        let x = junit(&info(), &outcomes());
        assert!(x.contains("tests=\"3\" failures=\"1\" errors=\"0\" skipped=\"1\""));
        assert!(x.contains(
            "<failure message=\"step 1 (verify) failed: a&lt;b&gt; &amp; &quot;c&quot;\""
        ));
        assert!(x.contains("<skipped message=\"not run: e2fsck is not installed\"/>"));
        assert!(x.contains("<property name=\"accel_why\" value=\"KVM unusable"));
        assert!(!x.contains('\u{1}'));
        // Balanced elements, checked with a tiny tag matcher.
        let mut stack = Vec::new();
        let mut rest = x.as_str();
        while let Some(i) = rest.find('<') {
            let end = rest[i..].find('>').unwrap() + i;
            let tag = &rest[i + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.ends_with('/') {
                continue;
            }
            let name = tag
                .trim_start_matches('/')
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
            if tag.starts_with('/') {
                assert_eq!(stack.pop(), Some(name));
            } else {
                stack.push(name);
            }
        }
        assert!(stack.is_empty());
    }
}
