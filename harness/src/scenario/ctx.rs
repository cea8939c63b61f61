//! What a scenario is (its registry entry) and what it works with: the run's guests, backend
//! and image tools, its folder, the boots it makes (one at a time, or several guests at once,
//! each in its own thread with its own backend processes, QEMU and logs) and the checks it
//! records (each one a thing the backend got right or wrong), and the plan steps scenarios
//! are built from.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vloop_guest::{Entry, FileSpec, Step};

use crate::backend::{Backend, DiskSpec};
use crate::file_error::{at, FileError};
use crate::guest::{self, BootError, BootReport, BootSpec};
use crate::images::{ImageError, Images};
use crate::manifest::{
    compare, e2fsck, file_entries, sample_tree, scan_ext2, summarise, write_tree, ManifestError,
};
use crate::qemu::{Limits, Progress, Watch};
use crate::setup::Env;

/// One scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Name on the command line.
    pub name: &'static str,
    /// One line on what it does.
    pub about: &'static str,
    /// What a backend must get right to pass it.
    pub exercises: &'static str,
    /// Run when no `--scenario` is given.
    pub default: bool,
    /// Guests it boots (a cost estimate for scheduling).
    pub boots: u32,
    /// Whether its guests write (a backend that loses writes fails it).
    pub writes: bool,
    /// The scenario itself.
    pub run: fn(&mut Ctx) -> Result<(), ScenarioError>,
}

/// Why a scenario did not pass.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The scenario cannot run here (a tool it needs is missing).
    #[error("{0}")]
    NotRun(String),
    /// An image could not be made.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A guest could not boot.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A guest did not carry out its plan.
    #[error("{0}")]
    Guest(String),
    /// A check on the host failed.
    #[error("host: {0}")]
    Host(String),
    /// A file of the scenario could not be read or written.
    #[error(transparent)]
    Io(#[from] FileError),
}

impl From<ManifestError> for ScenarioError {
    fn from(e: ManifestError) -> Self {
        match e {
            ManifestError::NoE2fsck | ManifestError::NoQemuUtils(_) => {
                ScenarioError::NotRun(e.to_string())
            }
            other => ScenarioError::Host(chain(&other)),
        }
    }
}

/// An error with its causes, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        next = c.source();
    }
    s
}

/// One thing a scenario checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    /// What was checked (`boot: verify`, `host: e2fsck -fn`...).
    pub what: String,
    /// Whether it held.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

/// The scenario's view of the run.
pub struct Ctx<'a> {
    /// What every guest shares.
    pub env: &'a Env,
    /// The backend under test.
    pub backend: &'a Backend,
    /// The image tools.
    pub images: Images,
    /// The scenario's folder (kept when it fails).
    pub dir: PathBuf,
    /// Sockets and initramfs (short paths, removed at the end).
    pub tmp: tempfile::TempDir,
    /// Seconds from QEMU's start until the first guest's agent started.
    pub boot_s: Option<f64>,
    /// What was done, for the report.
    pub notes: Vec<String>,
    /// What was checked.
    pub checks: Vec<Check>,
}

/// How long a scenario guest may linger after its agent said done.
const POWEROFF_GRACE: Duration = Duration::from_secs(2);

/// One guest of [`Ctx::boot_all`].
#[derive(Debug, Clone)]
pub struct GuestPlan {
    /// Prefix of its files and checks (`g0` gives `g0-console.log`, `g0: verify`...).
    pub label: String,
    /// Its disks, each served by its own process of the backend under test.
    pub disks: Vec<DiskSpec>,
    /// vCPUs.
    pub cpus: u32,
    /// What its agent does.
    pub steps: Vec<Step>,
}

impl Ctx<'_> {
    /// Records a note for the report.
    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// Records a check.
    pub fn check(&mut self, what: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            what: what.into(),
            ok,
            detail: detail.into(),
        });
    }

    /// A path in the scenario's folder.
    pub fn image(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The sample tree (see [`sample_tree`]) written to `tree/` in the scenario's folder;
    /// returns the folder, the files and the manifest of files, directories and links.
    pub fn sample_tree(&self) -> Result<(PathBuf, Vec<FileSpec>, Vec<Entry>), ScenarioError> {
        let tree = self.image("tree");
        let (files, dirs) = sample_tree(2 * MIB + 7);
        write_tree(&tree, &files, &dirs).map_err(at("writing the tree", &tree))?;
        let mut entries = file_entries(&files);
        entries.extend(dirs);
        Ok((tree, files, entries))
    }

    /// How long each of `guests` guests booted at once may take: the accelerator's time-out,
    /// times the guests each CPU of the host runs (they share the CPUs, and under TCG each
    /// guest keeps one busy).
    fn limit(&self, guests: usize) -> Duration {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let share = u32::try_from(guests.div_ceil(cpus).max(1)).unwrap_or(u32::MAX);
        self.env.boot_timeout * self.env.accel.slowness() * share
    }

    /// The boot of one guest of the scenario.
    fn boot_spec<'b>(
        &'b self,
        label: &'b str,
        disks: &[DiskSpec],
        cpus: u32,
        steps: Vec<Step>,
        limit: Duration,
    ) -> BootSpec<'b> {
        BootSpec {
            label,
            disks: disks.iter().map(|d| (d.clone(), self.backend)).collect(),
            cpus,
            steps,
            copy_in: Vec::new(),
            terminal: false,
            data_socket: None,
            limits: Limits {
                start: limit,
                total: Some(limit),
                after_done: POWEROFF_GRACE,
            },
        }
    }

    /// Boots one guest with `disks` (all served by the backend under test) and runs `steps`.
    pub fn boot(
        &mut self,
        label: &str,
        disks: &[DiskSpec],
        cpus: u32,
        steps: Vec<Step>,
    ) -> Result<(), ScenarioError> {
        let spec = self.boot_spec(label, disks, cpus, steps, self.limit(1));
        let r = guest::boot(self.env, &self.dir, self.tmp.path(), spec, &mut |_| {
            Watch::Continue
        })?;
        self.record(label, &r)
    }

    /// Boots every guest of `guests` at once, each in its own thread with its own backend
    /// processes and QEMU (files prefixed with its label); `watch` sees each guest's progress
    /// with its index. Returns how each boot went, in order; nothing is recorded yet (see
    /// [`Ctx::record_all`]), so the scenario can look first.
    pub fn boot_all(
        &self,
        guests: &[GuestPlan],
        watch: &(dyn Fn(usize, &Progress) -> Watch + Sync),
    ) -> Vec<Result<BootReport, BootError>> {
        let limit = self.limit(guests.len());
        let (env, dir, tmp) = (self.env, self.dir.as_path(), self.tmp.path());
        std::thread::scope(|s| {
            let threads: Vec<_> = guests
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let spec = self.boot_spec(&g.label, &g.disks, g.cpus, g.steps.clone(), limit);
                    s.spawn(move || guest::boot(env, dir, tmp, spec, &mut |p| watch(i, p)))
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    /// Records the boots of [`Ctx::boot_all`] in order (notes, each guest's steps, why a
    /// guest failed); the first failure is the error.
    pub fn record_all(
        &mut self,
        guests: &[GuestPlan],
        runs: Vec<Result<BootReport, BootError>>,
    ) -> Result<(), ScenarioError> {
        let mut first = None;
        for (g, run) in guests.iter().zip(runs) {
            let r = match run {
                Ok(r) => self.record(&g.label, &r),
                Err(e) => {
                    self.check(format!("{}: boot", g.label), false, chain(&e));
                    Err(e.into())
                }
            };
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Records one boot: when its agent started and ended, each step it reported, and why it
    /// failed when it did.
    fn record(&mut self, label: &str, r: &BootReport) -> Result<(), ScenarioError> {
        if let Some(b) = r.exit.agent_started {
            self.boot_s.get_or_insert(b.as_secs_f64());
        }
        let at = |d: Option<Duration>| {
            d.map_or_else(|| "-".to_string(), |d| format!("{:.1}s", d.as_secs_f64()))
        };
        self.note(format!(
            "{label}: agent started at {}, done at {}, QEMU exited at {:.1}s",
            at(r.exit.agent_started),
            at(r.exit.agent_done),
            r.exit.elapsed.as_secs_f64(),
        ));
        for (op, ok, detail) in r.steps() {
            self.check(format!("{label}: {op}"), ok, detail);
        }
        r.verdict().map_err(|e| {
            if !r.steps().iter().any(|s| !s.1) {
                self.check(format!("{label}: guest"), false, r.explain(&e));
            }
            ScenarioError::Guest(r.explain(&format!("{label}: {e}")))
        })
    }

    /// Runs a host check and records it.
    pub fn host<T>(
        &mut self,
        what: &str,
        f: impl FnOnce() -> Result<(T, String), ScenarioError>,
    ) -> Result<T, ScenarioError> {
        match f() {
            Ok((v, detail)) => {
                self.check(format!("host: {what}"), true, detail);
                Ok(v)
            }
            Err(ScenarioError::NotRun(why)) => Err(ScenarioError::NotRun(why)),
            Err(e) => {
                let detail = match &e {
                    ScenarioError::Host(m) => m.clone(),
                    other => chain(other),
                };
                let detail = detail
                    .strip_prefix(&format!("{what}: "))
                    .map_or(detail.clone(), str::to_string);
                self.check(format!("host: {what}"), false, detail);
                Err(e)
            }
        }
    }

    /// `e2fsck -fn` and a read-back of every entry with ext4-view, both on the host.
    pub fn host_check_ext2(&mut self, img: &Path, entries: &[Entry]) -> Result<(), ScenarioError> {
        self.host("e2fsck -fn", || {
            let s = e2fsck(img)?;
            Ok(((), format!("clean ({s})")))
        })?;
        self.host("read-back (ext4-view)", || {
            let found = scan_ext2(img)?;
            let problems = compare(entries, &found, true, &["lost+found"]);
            if problems.is_empty() {
                Ok(((), format!("{} entries as written", entries.len())))
            } else {
                Err(ScenarioError::Host(format!(
                    "read-back (ext4-view): {}",
                    summarise(&problems, 4)
                )))
            }
        })
    }
}

/// Where scenario guests mount their disk.
pub const MNT: &str = "/mnt/d";
/// The scenario guests' disk.
pub const DEV: &str = "/dev/vda";
/// A mebibyte.
pub const MIB: u64 = 1024 * 1024;

/// Mount the disk.
pub fn mount(fstype: &str, readonly: bool) -> Step {
    Step::Mount {
        dev: DEV.into(),
        dir: MNT.into(),
        fstype: fstype.into(),
        readonly,
        options: String::new(),
    }
}

/// Format the disk as ext2.
pub fn mkfs() -> Step {
    Step::Mkfs {
        dev: DEV.into(),
        // 4 KiB blocks: busybox would pick 1 KiB for small disks, and formats 40% slower.
        args: vec!["-b".into(), "4096".into()],
    }
}

/// Unmount the disk.
pub fn umount() -> Step {
    Step::Umount { dir: MNT.into() }
}

/// Write `files` with `writers` writers.
pub fn write(files: &[FileSpec], writers: u32) -> Step {
    Step::WriteFiles {
        dir: MNT.into(),
        files: files.to_vec(),
        writers,
    }
}

/// Verify exactly `entries` (besides lost+found).
pub fn verify(entries: &[Entry]) -> Step {
    Step::Verify {
        dir: MNT.into(),
        entries: entries.to_vec(),
        exact: true,
        ignore: vec!["lost+found".into()],
    }
}

/// Writes `files` to the mounted ext2 file system with `writers` concurrent writers, unmounts,
/// drops the page cache, mounts it again and verifies `entries`, then unmounts.
pub fn write_remount_verify(files: &[FileSpec], writers: u32, entries: &[Entry]) -> [Step; 6] {
    [
        write(files, writers),
        umount(),
        Step::DropCaches,
        mount("ext2", false),
        verify(entries),
        umount(),
    ]
}

/// A file spec.
pub fn spec(path: &str, size: u64, seed: u64) -> FileSpec {
    FileSpec {
        path: path.into(),
        size,
        seed,
    }
}

/// SHA-256 of a host file.
pub fn file_sha(p: &Path) -> Result<String, ScenarioError> {
    std::fs::read(p)
        .map(|d| vloop_guest::sha256_hex(&d))
        .map_err(|e| at("reading", p)(e).into())
}
