//! Text both ways for the command line and the reports: durations as the options write them
//! (read), figures in the short forms of the tables (counts, microseconds, ranges, ratios,
//! MiB), the lines every report's header and table share (the machine and its load, a
//! target's block of lines, a target that failed), and an error with its causes on one line.
//! Pure: the reports write into a `String`.

use std::fmt::Write as _;
use std::time::Duration;

use crate::figures::{Failures, Stat};
use crate::machine::{LoadSpan, Machine};
use crate::target::Target;

/// Errors of reading an option's text.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A duration is not a positive number with an optional `ms`, `s` or `m` suffix.
    #[error("bad duration '{0}': use e.g. 5s, 500ms or 1m")]
    Duration(String),
}

/// A duration as the options write it: `5s`, `500ms`, `1m`, or a number of seconds (`2`,
/// `1.5`); it must be above zero.
pub fn parse_duration(s: &str) -> Result<Duration, TextError> {
    let t = s.trim();
    let (n, unit) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = n
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .ok_or_else(|| TextError::Duration(s.to_string()))?;
    Ok(Duration::from_secs_f64(v * unit))
}

/// An optional duration: "0" (or "0s", "0ms") is none.
pub fn parse_optional_duration(s: &str) -> Result<Option<Duration>, TextError> {
    match s.trim() {
        "0" | "0s" | "0ms" => Ok(None),
        t => parse_duration(t).map(Some),
    }
}

/// A count in a short form: 9876, 17.1k, 347k, 1.89M.
pub fn count(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e5 {
        format!("{:.0}k", x / 1e3)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// Microseconds (or any small figure): one decimal below 100, none above.
pub fn small(x: f64) -> String {
    if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

/// A figure's median with its least and greatest, or `-`.
pub fn with_range(s: Option<Stat>, f: fn(f64) -> String) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.min == s.max => f(s.median),
        Some(s) => format!("{} ({}-{})", f(s.median), f(s.min), f(s.max)),
    }
}

/// A figure's median, or `-`.
pub fn median_or_dash(s: Option<Stat>) -> String {
    s.map_or_else(|| "-".into(), |s| small(s.median))
}

/// A ratio as `1.23x`, or `-`.
pub fn ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
}

/// KiB as MiB, or `-`.
pub fn mib(k: Option<u64>) -> String {
    k.map_or_else(|| "-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// The header lines of every report: when it started, on what machine, the load average
/// before and after, and the warning when the machine was not idle.
pub fn machine_lines(o: &mut String, started: &str, machine: &Machine, load: &LoadSpan) {
    let _ = writeln!(o, "started {started}; machine: {}", machine.describe());
    let _ = writeln!(
        o,
        "load average (1/5/15 min): before {}, after {}",
        load.before, load.after
    );
    if let Some(w) = load.warning() {
        let _ = writeln!(o, "{w}");
    }
}

/// A table's block of lines per row: `line(o, name, target, summary)` for each of `targets`
/// that `get` finds on the row, in that order, the row's name on the block's first line only.
pub fn row_blocks<R, S>(
    o: &mut String,
    rows: &[R],
    targets: &[Target],
    name: impl Fn(&R) -> &str,
    get: impl Fn(&R, Target) -> Option<&S>,
    line: impl Fn(&mut String, &str, Target, &S),
) {
    for row in rows {
        let mut name = name(row);
        for &t in targets {
            if let Some(s) = get(row, t) {
                line(o, name, t, s);
                name = "";
            }
        }
    }
}

/// The line of target `t` on row `name` (padded to `width`) when no round of it succeeded:
/// the first line of why.
pub fn failed_line(o: &mut String, name: &str, width: usize, t: Target, failed: &Failures) {
    let why = failed.failure.as_deref().unwrap_or("not measured");
    let first = why.lines().next().unwrap_or(why);
    let _ = writeln!(o, "{name:<width$} {:<13} failed: {first}", t.name());
}

/// `e` and its sources, joined with ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_optional_duration("0").unwrap(), None);
        assert_eq!(
            parse_optional_duration("10s").unwrap(),
            Some(Duration::from_secs(10))
        );
        assert!(parse_optional_duration("-1s").is_err());
        assert_eq!(
            parse_duration(" 5x").unwrap_err().to_string(),
            "bad duration ' 5x': use e.g. 5s, 500ms or 1m"
        );
    }

    #[test]
    fn counts_are_short() {
        assert_eq!(count(9876.4), "9876");
        assert_eq!(count(17_140.0), "17.1k");
        assert_eq!(count(347_400.0), "347k");
        assert_eq!(count(1_887_000.0), "1.89M");
        assert_eq!(small(53.24), "53.2");
        assert_eq!(small(1234.4), "1234");
        let s = Stat {
            median: 2.0,
            min: 1.0,
            max: 3.0,
        };
        assert_eq!(with_range(Some(s), small), "2.0 (1.0-3.0)");
        assert_eq!(with_range(None, small), "-");
    }

    #[test]
    fn rows_print_their_name_once_and_failures_their_first_line() {
        let rows = [("a", [Some(1), None, Some(3)]), ("b", [None, None, None])];
        let targets = [Target::Vloop, Target::Qsd, Target::Raw];
        let mut o = String::new();
        row_blocks(
            &mut o,
            &rows,
            &targets,
            |r| r.0,
            |r, t| {
                let i = targets.iter().position(|&x| x == t)?;
                r.1[i].as_ref()
            },
            |o, name, t, v| {
                let _ = writeln!(o, "{name:<3}{t} {v}");
            },
        );
        assert_eq!(o, "a  vloop 1\n   raw 3\n");
        let mut f = Failures::default();
        f.record(2, "exited\nits log: ...".into());
        let mut o = String::new();
        failed_line(&mut o, "row", 5, Target::Qsd, &f);
        failed_line(&mut o, "", 5, Target::Raw, &Failures::default());
        assert_eq!(
            o,
            "row   qsd           failed: exited\n      raw           failed: not measured\n"
        );
    }

    #[test]
    fn errors_chain_their_sources() {
        let e = crate::machine::MachineError::Read {
            path: "/proc/x".into(),
            source: std::io::Error::other("gone"),
        };
        assert_eq!(chain(&e), "cannot read /proc/x: gone");
    }
}
