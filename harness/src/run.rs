//! A whole harness run: set-up (programs, kernel, initramfs, accelerator), scenarios in
//! parallel with live progress, and the reports.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::accel::{self, AccelChoice};
use crate::backend::{Backend, BackendKind};
use crate::images::Images;
use crate::initramfs;
use crate::kernel;
use crate::report::{self, RunInfo};
use crate::scenario::{self, Env, Outcome, SCENARIOS};

/// Errors that stop a run before any scenario starts (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A program the harness needs is missing.
    #[error("{0}")]
    Missing(String),
    /// The command line asked for something impossible.
    #[error("{0}")]
    Usage(String),
    /// The guest kernel could not be found or fetched.
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    /// The initramfs could not be built.
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
    /// A report could not be written.
    #[error("writing {0}: {1}")]
    Write(PathBuf, #[source] std::io::Error),
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
    /// Backend kind.
    pub backend: BackendKind,
    /// Backend program (default: `vloop-blk` beside the harness, or `qemu-storage-daemon`).
    pub backend_bin: Option<PathBuf>,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--modules`.
    pub modules: Option<PathBuf>,
    /// `--guest-bin`.
    pub guest_bin: Option<PathBuf>,
    /// `--image-bin`.
    pub image_bin: Option<PathBuf>,
    /// Where failed scenarios keep their files.
    pub results: PathBuf,
    /// `--json`.
    pub json: Option<PathBuf>,
    /// `--junit`.
    pub junit: Option<PathBuf>,
    /// Keep the files of passed scenarios too.
    pub keep: bool,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Per-boot time-out in seconds under KVM (TCG: ten times this).
    pub timeout_s: u64,
    /// Extra kernel command line.
    pub append: String,
    /// Boot the extracted vmlinux through its PVH entry point (faster under TCG).
    pub pvh: bool,
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
) -> Result<Vec<&'static str>, String> {
    let mut picked: Vec<&'static str> = if names.is_empty() {
        SCENARIOS
            .iter()
            .filter(|s| s.default)
            .map(|s| s.name)
            .collect()
    } else if names.iter().any(|n| n == "all") {
        SCENARIOS.iter().map(|s| s.name).collect()
    } else {
        for n in names {
            if !SCENARIOS.iter().any(|s| s.name == n) {
                return Err(format!(
                    "unknown scenario {n:?}; `vloop-harness run --list` lists them"
                ));
            }
        }
        SCENARIOS
            .iter()
            .filter(|s| names.iter().any(|n| n == s.name))
            .map(|s| s.name)
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

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn beside_me(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut d = exe.parent()?;
    if d.file_name().is_some_and(|n| n == "deps") {
        d = d.parent()?;
    }
    Some(d.join(name)).filter(|p| p.is_file())
}

fn find_backend(kind: BackendKind, bin: Option<&Path>) -> Result<Backend, RunError> {
    let bin = match (bin, kind) {
        (Some(b), _) => {
            if !b.is_file() {
                return Err(RunError::Missing(format!("--backend-bin {} does not exist", b.display())));
            }
            b.to_path_buf()
        }
        (None, BackendKind::Vloop) => beside_me("vloop-blk").or_else(|| which("vloop-blk")).ok_or_else(|| {
            RunError::Missing("vloop-blk not found beside vloop-harness nor on PATH; build it with `cargo build --release` or pass --backend-bin".into())
        })?,
        (None, BackendKind::Qsd) => which("qemu-storage-daemon")
            .ok_or_else(|| RunError::Missing("qemu-storage-daemon not found; install the package qemu-system-x86".into()))?,
    };
    Ok(Backend { kind, bin })
}

/// Runs the selected scenarios; returns the outcomes (the caller decides the exit code).
pub fn run(opts: &RunOptions) -> Result<Vec<Outcome>, RunError> {
    let t0 = Instant::now();
    let names = select(&opts.scenarios, opts.shard).map_err(RunError::Usage)?;
    let qemu = which("qemu-system-x86_64").ok_or_else(|| {
        RunError::Missing(
            "qemu-system-x86_64 not found; install the package qemu-system-x86 (ci/setup does)"
                .into(),
        )
    })?;
    let backend = find_backend(opts.backend, opts.backend_bin.as_deref())?;
    let k = kernel::resolve(opts.kernel.as_deref(), opts.modules.as_deref())?;
    let modules = match &k.modules {
        Some(dir) => kernel::resolve_modules(dir, kernel::GUEST_MODULES)?,
        None => {
            tracing::warn!("no modules directory for {}: assuming virtio_pci, virtio_blk and isofs are built in", k.image.display());
            Vec::new()
        }
    };
    let boot_kernel = if opts.pvh {
        pvh_kernel(&k.image)
    } else {
        k.image.clone()
    };
    let guest = initramfs::find_guest(opts.guest_bin.as_deref())?;
    let busybox = initramfs::find_busybox()?;
    let base = initramfs::base_archive(&guest, &busybox, &modules)?;
    let base_path = initramfs::cached_base(&base, &kernel::cache_dir())?;
    let (accel, why) = accel::choose(opts.accel);
    let images = Images::find(opts.image_bin.as_deref());
    let env = Env {
        qemu,
        accel,
        kernel: boot_kernel.clone(),
        base_initrd: base_path,
        modules: initramfs::plan_module_names(&modules),
        backend: backend.clone(),
        images: images.clone(),
        mem_mib: opts.mem_mib,
        boot_timeout: Duration::from_secs(opts.timeout_s),
        append: opts.append.clone(),
    };
    let jobs = opts.jobs.max(1).min(names.len().max(1));
    eprintln!(
        "vloop-harness: {} scenario(s), {jobs} job(s); accel {accel} ({why}); backend {}; kernel {} ({}); images: {}; set-up {:.1}s",
        names.len(),
        backend.bin.display(),
        boot_kernel.display(),
        k.source,
        images.tool(),
        t0.elapsed().as_secs_f64()
    );
    let outcomes = run_parallel(&env, &names, jobs, &opts.results, opts.keep);
    let info = RunInfo {
        accel: format!("{accel} ({why})"),
        backend: format!("{:?} {}", backend.kind, backend.bin.display()).to_lowercase(),
        kernel: format!("{} ({})", boot_kernel.display(), k.source),
        images: images.tool().into(),
        wall_s: t0.elapsed().as_secs_f64(),
        jobs,
    };
    println!("\n{}", report::table(&outcomes));
    println!("wall time {:.1}s (accel {accel})", info.wall_s);
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

/// The PVH-bootable vmlinux of `image`, extracted into the cache; `image` itself when that
/// is impossible.
fn pvh_kernel(image: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(image) else {
        return image.to_path_buf();
    };
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = kernel::cache_dir().join("pvh");
    let out = dir.join(format!("{name}-{}-{}.vmlinux", md.len(), md.mtime()));
    let r = std::fs::create_dir_all(&dir)
        .map_err(|e| crate::pvh::PvhError::Io(dir.clone(), e))
        .and_then(|()| crate::pvh::extract(image, &out));
    match r {
        Ok(()) => out,
        Err(e) => {
            tracing::warn!("booting the bzImage as is: {e}");
            image.to_path_buf()
        }
    }
}

fn run_parallel(
    env: &Env,
    names: &[&'static str],
    jobs: usize,
    results: &Path,
    keep: bool,
) -> Vec<Outcome> {
    // Longest first (scenarios with two boots), so the last guest to finish starts early;
    // the report keeps the registry order.
    let mut order: Vec<(usize, &'static str)> = names.iter().copied().enumerate().collect();
    order.sort_by_key(|(_, n)| std::cmp::Reverse(scenario::boots(n)));
    let queue: Arc<Mutex<VecDeque<(usize, &'static str)>>> =
        Arc::new(Mutex::new(order.into_iter().collect()));
    let done: Arc<Mutex<Vec<Option<Outcome>>>> = Arc::new(Mutex::new(vec![None; names.len()]));
    let total = names.len();
    let finished = Arc::new(Mutex::new(0usize));
    std::thread::scope(|s| {
        for _ in 0..jobs {
            let (queue, done, finished) = (queue.clone(), done.clone(), finished.clone());
            s.spawn(move || loop {
                let Some((i, name)) = queue.lock().ok().and_then(|mut q| q.pop_front()) else {
                    return;
                };
                eprintln!("  [ .. ] {name}: running");
                let o = scenario::run(env, name, results, keep);
                let n = finished.lock().map(|mut f| {
                    *f += 1;
                    *f
                });
                eprintln!(
                    "  [{}] {name}: {:.1}s{}  ({}/{total})",
                    if o.passed { "PASS" } else { "FAIL" },
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

    #[test]
    fn selects_defaults_all_named_and_shards() {
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
