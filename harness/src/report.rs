//! Reports: the human table, JSON and JUnit XML.

use std::fmt::Write as _;

use crate::scenario::Outcome;

/// Facts about the whole run, printed above the table and stored in the JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunInfo {
    /// Accelerator and why.
    pub accel: String,
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

/// The human table: scenario, result, accel, boot time, total time, and for failures the
/// reason and where the logs are.
pub fn table(outcomes: &[Outcome]) -> String {
    let w = outcomes
        .iter()
        .map(|o| o.name.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<w$}  {:<6}  {:<5}  {:>7}  {:>7}",
        "scenario", "result", "accel", "boot", "total"
    );
    for o in outcomes {
        let _ = writeln!(
            s,
            "{:<w$}  {:<6}  {:<5}  {:>7}  {:>7}",
            o.name,
            if o.passed { "PASS" } else { "FAIL" },
            o.accel.name(),
            secs(o.boot_s),
            secs(Some(o.total_s)),
        );
        if !o.passed {
            let _ = writeln!(s, "    reason: {}", o.reason);
        }
        if let Some(k) = &o.kept {
            let _ = writeln!(s, "    logs and images: {}", k.display());
        }
    }
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    let _ = writeln!(s, "{} passed, {failed} failed", outcomes.len() - failed);
    s
}

/// The JSON report.
pub fn json(info: &RunInfo, outcomes: &[Outcome]) -> String {
    let v = serde_json::json!({
        "run": info,
        "passed": outcomes.iter().all(|o| o.passed),
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

/// JUnit XML: one testsuite, one testcase per scenario, a failure element for each failure.
pub fn junit(info: &RunInfo, outcomes: &[Outcome]) -> String {
    let failures = outcomes.iter().filter(|o| !o.passed).count();
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        "<testsuites name=\"vloop-harness\" tests=\"{}\" failures=\"{failures}\" time=\"{:.3}\">",
        outcomes.len(),
        info.wall_s
    );
    let _ = writeln!(
        s,
        "  <testsuite name=\"vloop-harness\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\" time=\"{:.3}\">",
        outcomes.len(),
        info.wall_s
    );
    let _ = writeln!(s, "    <properties>");
    for (k, v) in [
        ("accel", &info.accel),
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
            o.accel.name(),
            xml_escape(&o.name),
            o.total_s
        );
        if !o.passed {
            let _ = writeln!(
                s,
                "      <failure message=\"{}\" type=\"ScenarioFailed\">{}</failure>",
                xml_escape(&o.reason),
                xml_escape(&format!(
                    "{}\nlogs and images: {}",
                    o.reason,
                    o.kept
                        .as_ref()
                        .map(|k| k.display().to_string())
                        .unwrap_or_default()
                ))
            );
        }
        let _ = writeln!(
            s,
            "      <system-out>{}</system-out>",
            xml_escape(&o.notes.join("\n"))
        );
        let _ = writeln!(s, "    </testcase>");
    }
    s.push_str("  </testsuite>\n</testsuites>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::Accel;

    fn outcomes() -> Vec<Outcome> {
        vec![
            Outcome {
                name: "ext2-format".into(),
                passed: true,
                reason: String::new(),
                accel: Accel::Tcg,
                boot_s: Some(1.2),
                total_s: 4.0,
                notes: vec!["e2fsck clean".into()],
                kept: None,
            },
            Outcome {
                name: "iso".into(),
                passed: false,
                reason: "step 1 (verify) failed: a<b> & \"c\"\u{1}".into(),
                accel: Accel::Tcg,
                boot_s: None,
                total_s: 9.5,
                notes: vec![],
                kept: Some("/r/iso".into()),
            },
        ]
    }

    fn info() -> RunInfo {
        RunInfo {
            accel: "tcg (probe)".into(),
            backend: "vloop".into(),
            kernel: "k".into(),
            images: "i".into(),
            wall_s: 10.0,
            jobs: 2,
        }
    }

    #[test]
    fn table_shows_results_reasons_and_paths() {
        let t = table(&outcomes());
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["scenario", "result", "accel", "boot", "total"]);
        assert_eq!(rows[1], ["ext2-format", "PASS", "tcg", "1.2s", "4.0s"]);
        assert_eq!(rows[2], ["iso", "FAIL", "tcg", "-", "9.5s"]);
        assert!(t.contains("reason: step 1"));
        assert!(t.contains("logs and images: /r/iso"));
        assert!(t.contains("1 passed, 1 failed"));
    }

    #[test]
    fn json_parses_back() {
        let v: serde_json::Value = serde_json::from_str(&json(&info(), &outcomes())).unwrap();
        assert_eq!(v["passed"], false);
        assert_eq!(v["scenarios"][0]["accel"], "tcg");
        assert_eq!(v["scenarios"][1]["kept"], "/r/iso");
    }

    #[test]
    fn junit_is_well_formed_and_counts_failures() {
        let x = junit(&info(), &outcomes());
        assert!(x.contains("tests=\"2\" failures=\"1\""));
        assert!(x.contains(
            "<failure message=\"step 1 (verify) failed: a&lt;b&gt; &amp; &quot;c&quot;\""
        ));
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
