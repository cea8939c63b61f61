//! `vloop-harness run`: set-up (programs, kernel, initramfs, accelerator), the selected
//! scenarios in parallel with live progress, and the reports. With `--backend-cmd` it is the
//! conformance suite of any vhost-user-blk backend.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vloop_frontend::backend::Template;

use crate::backend::{Backend, BackendKind};
use crate::images::{ImageTools, Images};
use crate::interrupt;
use crate::report::{self, RunInfo};
use crate::scenario::{self, Outcome, Scenario, Status, SCENARIOS};
use crate::setup::{Env, SetupOptions};

/// Errors that stop a run before any scenario starts, or keep its reports from being written.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The command line asked for something impossible.
    #[error("{0}")]
    Usage(String),
    /// A report could not be written.
    #[error("writing {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// Which program serves the disks.
#[derive(Debug, Clone)]
pub enum BackendChoice {
    /// vloop-blk or qemu-storage-daemon, optionally at a given path.
    Known {
        /// Which one.
        kind: BackendKind,
        /// Its path (default: found beside the harness or on PATH).
        bin: Option<PathBuf>,
    },
    /// Any program, from a `--backend-cmd` template.
    Template(Template),
}

impl BackendChoice {
    /// The backend, or why it cannot be had.
    pub fn resolve(&self) -> Result<Backend, String> {
        match self {
            BackendChoice::Known { kind, bin } => {
                Backend::find(*kind, bin.as_deref()).map_err(|e| e.to_string())
            }
            BackendChoice::Template(t) => Ok(Backend::template(t.clone())),
        }
    }

    /// How reports name it when it could not be resolved.
    pub fn describe(&self) -> String {
        match self {
            BackendChoice::Known { kind, bin } => format!(
                "{kind:?} {}",
                bin.as_ref()
                    .map_or_else(|| "(not found)".into(), |b| b.display().to_string())
            )
            .to_lowercase(),
            BackendChoice::Template(t) => format!("--backend-cmd {}", t.text()),
        }
    }
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Scenario names (empty: the defaults; `all`: every scenario).
    pub scenarios: Vec<String>,
    /// Parallel guests.
    pub jobs: usize,
    /// `(i, n)`: run only scenarios whose index modulo n is i - 1.
    pub shard: Option<(usize, usize)>,
    /// The backend under test.
    pub backend: BackendChoice,
    /// Kernel, initramfs, accelerator, guest size and time-out.
    pub setup: SetupOptions,
    /// Which writers make the images.
    pub image_tools: ImageTools,
    /// Where failed scenarios keep their files.
    pub results: PathBuf,
    /// `--json`.
    pub json: Option<PathBuf>,
    /// `--junit`.
    pub junit: Option<PathBuf>,
    /// Keep the files of passed scenarios too.
    pub keep: bool,
}

/// Parses `I/N` (1-based).
pub fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("--shard {s}: expected I/N, e.g. 1/3"))?;
    let (i, n): (usize, usize) = (
        i.trim()
            .parse()
            .map_err(|_| format!("--shard {s}: I is not a number"))?,
        n.trim()
            .parse()
            .map_err(|_| format!("--shard {s}: N is not a number"))?,
    );
    if n == 0 || i == 0 || i > n {
        return Err(format!("--shard {s}: need 1 <= I <= N"));
    }
    Ok((i, n))
}

/// The scenarios a run selects, in registry order.
pub fn select(
    names: &[String],
    shard: Option<(usize, usize)>,
) -> Result<Vec<&'static Scenario>, String> {
    let mut picked: Vec<&'static Scenario> = if names.is_empty() {
        SCENARIOS.iter().filter(|s| s.default).collect()
    } else if names.iter().any(|n| n == "all") {
        SCENARIOS.iter().collect()
    } else {
        for n in names {
            if scenario::find(n).is_none() {
                return Err(format!(
                    "unknown scenario {n:?}; `vloop-harness run --list` lists them"
                ));
            }
        }
        SCENARIOS
            .iter()
            .filter(|s| names.iter().any(|n| n == s.name))
            .collect()
    };
    if let Some((i, n)) = shard {
        picked = picked
            .into_iter()
            .enumerate()
            .filter(|(k, _)| k % n == i - 1)
            .map(|(_, s)| s)
            .collect();
    }
    Ok(picked)
}

/// Runs the selected scenarios and writes the reports; returns the outcomes (the caller
/// decides the exit code). When the guests cannot be set up or the backend is missing, every
/// scenario is reported as not run, with the reason.
pub fn run(opts: &RunOptions) -> Result<Vec<Outcome>, RunError> {
    let t0 = Instant::now();
    let picked = select(&opts.scenarios, opts.shard).map_err(RunError::Usage)?;
    if let Err(e) = interrupt::install() {
        tracing::warn!("{e}; Ctrl-C will not stop the guests cleanly");
    }
    let images = Images {
        tools: opts.image_tools,
    };
    let prepared = Env::prepare(&opts.setup)
        .map_err(|e| scenario::chain(&e))
        .and_then(|env| opts.backend.resolve().map(|b| (env, b)));
    let (outcomes, info) = match prepared {
        Err(why) => {
            eprintln!("vloop-harness: cannot run any scenario: {why}");
            let info = RunInfo {
                accel: "none".into(),
                accel_why: format!("no guest was started: {why}"),
                backend: opts.backend.describe(),
                kernel: String::new(),
                images: images.tool().into(),
                wall_s: t0.elapsed().as_secs_f64(),
                jobs: 0,
            };
            let outcomes = picked
                .iter()
                .map(|s| Outcome::not_run(s, None, &why))
                .collect();
            (outcomes, info)
        }
        Ok((env, backend)) => {
            let jobs = opts.jobs.max(1).min(picked.len().max(1));
            eprintln!(
                "vloop-harness: {} scenario(s), {jobs} job(s); accel {}; backend {}; kernel {} ({}); images: {}; set-up {:.1}s",
                picked.len(),
                env.accel_line(),
                backend.describe(),
                env.kernel.display(),
                env.kernel_source,
                images.tool(),
                t0.elapsed().as_secs_f64()
            );
            let outcomes = run_parallel(
                &env,
                &backend,
                images,
                &picked,
                jobs,
                &opts.results,
                opts.keep,
            );
            let info = RunInfo {
                accel: env.accel.name().into(),
                accel_why: env.accel_why.clone(),
                backend: backend.describe(),
                kernel: format!("{} ({})", env.kernel.display(), env.kernel_source),
                images: images.tool().into(),
                wall_s: t0.elapsed().as_secs_f64(),
                jobs,
            };
            (outcomes, info)
        }
    };
    println!("\n{}", report::table(&info, &outcomes));
    println!("wall time {:.1}s (accel {})", info.wall_s, info.accel);
    for (path, text) in [
        (
            &opts.json,
            opts.json.as_ref().map(|_| report::json(&info, &outcomes)),
        ),
        (
            &opts.junit,
            opts.junit.as_ref().map(|_| report::junit(&info, &outcomes)),
        ),
    ] {
        if let (Some(p), Some(t)) = (path, text) {
            if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| RunError::Write(p.clone(), e))?;
            }
            std::fs::write(p, t).map_err(|e| RunError::Write(p.clone(), e))?;
        }
    }
    Ok(outcomes)
}

fn run_parallel(
    env: &Env,
    backend: &Backend,
    images: Images,
    picked: &[&'static Scenario],
    jobs: usize,
    results: &Path,
    keep: bool,
) -> Vec<Outcome> {
    // Longest first (scenarios with two boots), so the last guest to finish starts early;
    // the report keeps the registry order.
    let mut order: Vec<(usize, &'static Scenario)> = picked.iter().copied().enumerate().collect();
    order.sort_by_key(|(_, s)| std::cmp::Reverse(s.boots));
    let queue: Arc<Mutex<VecDeque<(usize, &'static Scenario)>>> =
        Arc::new(Mutex::new(order.into_iter().collect()));
    let done: Arc<Mutex<Vec<Option<Outcome>>>> = Arc::new(Mutex::new(vec![None; picked.len()]));
    let total = picked.len();
    let finished = Arc::new(Mutex::new(0usize));
    std::thread::scope(|s| {
        for _ in 0..jobs {
            let (queue, done, finished) = (queue.clone(), done.clone(), finished.clone());
            s.spawn(move || loop {
                let Some((i, sc)) = queue.lock().ok().and_then(|mut q| q.pop_front()) else {
                    return;
                };
                let o = if let Some(sig) = interrupt::requested() {
                    Outcome::not_run(sc, Some(env.accel), &format!("interrupted by {sig}"))
                } else {
                    eprintln!("  [ .. ] {}: running", sc.name);
                    scenario::run(env, backend, images, sc, results, keep)
                };
                let n = finished.lock().map(|mut f| {
                    *f += 1;
                    *f
                });
                eprintln!(
                    "  [{}] {}: {:.1}s{}  ({}/{total})",
                    match o.status {
                        Status::Pass => "PASS",
                        Status::Fail => "FAIL",
                        Status::NotRun => "SKIP",
                    },
                    sc.name,
                    o.total_s,
                    if o.passed {
                        String::new()
                    } else {
                        format!(" - {}", o.reason)
                    },
                    n.unwrap_or(0)
                );
                if let Ok(mut d) = done.lock() {
                    d[i] = Some(o);
                }
            });
        }
    });
    let v = done
        .lock()
        .map(|mut d| std::mem::take(&mut *d))
        .unwrap_or_default();
    v.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: Vec<&Scenario>) -> Vec<&'static str> {
        v.into_iter().map(|s| s.name).collect()
    }

    #[test]
    fn selects_defaults_all_named_and_shards() {
        let select = |n: &[String], s| select(n, s).map(names);
        assert_eq!(select(&[], None).unwrap(), ["ext2-format", "iso"]);
        assert_eq!(
            select(&["all".into()], None).unwrap().len(),
            SCENARIOS.len()
        );
        assert_eq!(
            select(&["iso".into(), "persist".into()], None).unwrap(),
            ["iso", "persist"]
        );
        assert!(select(&["nope".into()], None)
            .unwrap_err()
            .contains("--list"));
        let all = vec!["all".to_string()];
        let mut union: Vec<&str> = (1..=3)
            .flat_map(|i| select(&all, Some((i, 3))).unwrap())
            .collect();
        union.sort_unstable();
        let mut every: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        every.sort_unstable();
        assert_eq!(union, every);
        assert_eq!(
            select(&all, Some((1, 3))).unwrap(),
            select(&all, Some((1, 3))).unwrap()
        );
    }

    #[test]
    fn parses_shards() {
        assert_eq!(parse_shard("2/4"), Ok((2, 4)));
        assert!(parse_shard("0/4").is_err());
        assert!(parse_shard("5/4").is_err());
        assert!(parse_shard("x").is_err());
    }
}
