//! `vloop-harness exec`: boots a guest the way `run` does, attaches each `--disk` as a
//! vhost-user-blk device served by its own backend process, mounts, copies files in, runs
//! the command with its stdout and stderr streamed to the harness's own ([`data`]), copies
//! files out (also when the command failed) and exits with the command's status.
//!
//! Exit statuses: the command's own (128 + N when signal N ended it, 127 when it was not
//! found, 126 when it could not be run); [`EXIT_FAILED`] (125) when the harness, the guest or
//! a backend failed before the command finished, or the files could not be copied out after
//! a command that succeeded; 130 or 143 when Ctrl-C or SIGTERM stopped the run (the guest and
//! backends are stopped and everything the run created is removed).

pub mod data;
pub mod spec;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vloop_frontend::backend::Template;
use vloop_guest::{Event, Step, HOME};

use crate::backend::{Backend, BackendKind, ChooseError, DiskSpec};
use crate::guest::{self, device_name, BootError, BootSpec};
use crate::images::{probe_fs, FsKind, ImageError, Images};
use crate::initramfs::copy_in_path;
use crate::interrupt;
use crate::qemu::{Limits, Watch};
use crate::scenario::chain;
use crate::setup::{Env, SetupError, SetupOptions};
use data::Relay;
use spec::{CopyIn, CopyOut, DiskArg, DiskBackend, MountArg};

/// The exit status of a run in which the harness, the guest or a backend failed before the
/// command finished (as `podman run` and `docker run` use it).
pub const EXIT_FAILED: u8 = 125;

/// How long the guest may take, after its agent said done, to close the data stream.
const STREAM_GRACE: Duration = Duration::from_secs(30);

/// Errors that keep the command from running at all.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Neither a command nor `--console`.
    #[error("nothing to run: give a command after `--` (e.g. `vloop-harness exec -- uname -a`) or --console for a shell")]
    NoCommand,
    /// An image that does not exist and has no `size=`.
    #[error("--disk {0}: no such image; add ,size=64M to create a blank one")]
    NoImage(PathBuf),
    /// An image with `size=` that exists with another size.
    #[error("--disk {path}: the image exists with {found} bytes, not the {asked} of size=; drop size= to use it as it is")]
    SizeMismatch {
        /// The image.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The size asked for.
        asked: u64,
    },
    /// `backend=cmd` without `--backend-cmd`.
    #[error("--disk {0}: backend=cmd needs --backend-cmd TEMPLATE")]
    NoTemplate(PathBuf),
    /// The backend program is missing.
    #[error(transparent)]
    Backend(#[from] ChooseError),
    /// `--mount` names a disk that is not there.
    #[error("--mount {0}: there are only {1} disk(s) (counted from 0)")]
    NoSuchDisk(usize, usize),
    /// `--mount` of a disk without a file system the guest mounts.
    #[error("--mount: disk {0} ({1}) holds no ext2/3/4 or ISO 9660 file system; format it in the command instead (e.g. mke2fs /dev/vda)")]
    NoFileSystem(usize, PathBuf),
    /// A `--copy-in` source that does not exist.
    #[error("--copy-in {0}: no such file or folder")]
    NoCopyIn(PathBuf),
    /// A `--copy-out` guest path without a name.
    #[error("--copy-out {0}: the guest path has no file name")]
    CopyOutName(String),
    /// An image could not be made or read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The guests cannot be set up.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The guest could not boot.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A file or folder of the run could not be made.
    #[error("{what} {path}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// The disks, `/dev/vda` first.
    pub disks: Vec<DiskArg>,
    /// Files put into the guest before the command.
    pub copy_in: Vec<CopyIn>,
    /// Files brought back after it.
    pub copy_out: Vec<CopyOut>,
    /// Disks mounted before it.
    pub mounts: Vec<MountArg>,
    /// Run it on the console (a shell when there is no command).
    pub console: bool,
    /// The default backend (without `--backend-cmd`).
    pub backend: BackendKind,
    /// Its program.
    pub backend_bin: Option<PathBuf>,
    /// Any backend, from a template; the default for every disk when given.
    pub backend_cmd: Option<Template>,
    /// Kernel, initramfs, accelerator, guest size, start time-out.
    pub setup: SetupOptions,
    /// vCPUs.
    pub cpus: u32,
    /// Time limit for the whole guest run.
    pub timeout: Option<Duration>,
    /// Where the run's folder goes (default: the temporary directory).
    pub results: Option<PathBuf>,
    /// Keep the run's folder when the command succeeds too.
    pub keep: bool,
    /// The command and its arguments.
    pub command: Vec<String>,
}

/// How long each part took.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Timings {
    /// Before QEMU started (kernel, initramfs, backends).
    pub setup_s: f64,
    /// From QEMU's start until the agent was ready (modules loaded, disks present).
    pub boot_s: Option<f64>,
    /// The command, by the guest's clock.
    pub command_s: Option<f64>,
    /// Everything.
    pub total_s: f64,
}

/// How a run of `exec` ended.
#[derive(Debug, Clone)]
pub struct ExecReport {
    /// The exit status to leave with.
    pub status: u8,
    /// How the command ended, in words (`exited with status 0`).
    pub detail: String,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// Timings.
    pub timings: Timings,
    /// The accelerator and why (`tcg (KVM unusable: ...)`).
    pub accel: String,
    /// The run's folder, when kept.
    pub kept: Option<PathBuf>,
}

impl ExecReport {
    /// The summary line exec prints on stderr.
    pub fn summary(&self) -> String {
        let s = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}s"));
        format!(
            "vloop-harness: exit status {} ({}); boot {}, command {}, set-up {:.2}s, total {:.2}s; accel {}",
            self.status,
            self.detail,
            s(self.timings.boot_s),
            s(self.timings.command_s),
            self.timings.setup_s,
            self.timings.total_s,
            self.accel
        )
    }

    fn failed(error: String, timings: Timings, accel: String) -> ExecReport {
        ExecReport {
            status: EXIT_FAILED,
            detail: "the run failed".into(),
            error: Some(error),
            timings,
            accel,
            kept: None,
        }
    }
}

/// A prepared disk: what the backend serves and which backend.
struct Disk {
    spec: DiskSpec,
    backend: Backend,
    fs: Option<FsKind>,
}

/// Checks the disks, creates those with `size=` that are missing (into `created`).
fn prepare_disks(opts: &ExecOptions, created: &mut Vec<PathBuf>) -> Result<Vec<Disk>, ExecError> {
    let images = Images::default();
    let mut out = Vec::new();
    for d in &opts.disks {
        match (d.path.exists(), d.size) {
            (false, None) => return Err(ExecError::NoImage(d.path.clone())),
            (false, Some(size)) => {
                images.create(&d.path, size)?;
                created.push(d.path.clone());
            }
            (true, Some(asked)) => {
                let found = std::fs::metadata(&d.path)
                    .map_err(|source| ExecError::Io {
                        what: "reading",
                        path: d.path.clone(),
                        source,
                    })?
                    .len();
                // vloop's writer rounds a size up to whole 512-byte sectors.
                if found != asked.div_ceil(512).saturating_mul(512) {
                    return Err(ExecError::SizeMismatch {
                        path: d.path.clone(),
                        found,
                        asked,
                    });
                }
            }
            (true, None) => {}
        }
        let known = |kind| Backend::find(kind, opts.backend_bin.as_deref());
        let backend = match (d.backend, &opts.backend_cmd) {
            (DiskBackend::Default, Some(t)) | (DiskBackend::Cmd, Some(t)) => {
                Backend::template(t.clone())
            }
            (DiskBackend::Cmd, None) => return Err(ExecError::NoTemplate(d.path.clone())),
            (DiskBackend::Default, None) => known(opts.backend)?,
            (DiskBackend::Vloop, _) => Backend::find(BackendKind::Vloop, None)?,
            (DiskBackend::Qsd, _) => Backend::find(BackendKind::Qsd, None)?,
        };
        out.push(Disk {
            spec: DiskSpec {
                image: d.path.clone(),
                readonly: d.readonly,
                queues: d.queues,
            },
            backend,
            fs: None,
        });
    }
    Ok(out)
}

/// A guest path as the agent reads it: relative ones are relative to the home folder.
fn in_home(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{HOME}/{p}")
    }
}

/// The plan: mounts, copies in, the command, copies out, unmounts.
fn steps(opts: &ExecOptions, disks: &[Disk]) -> Result<Vec<Step>, ExecError> {
    let mut steps = Vec::new();
    for m in &opts.mounts {
        let d = disks
            .get(m.disk)
            .ok_or(ExecError::NoSuchDisk(m.disk, disks.len()))?;
        let fs =
            d.fs.ok_or_else(|| ExecError::NoFileSystem(m.disk, d.spec.image.clone()))?;
        steps.push(Step::Mount {
            dev: format!("/dev/{}", device_name(m.disk)),
            dir: in_home(&m.dir),
            fstype: fs.fstype().into(),
            readonly: d.spec.readonly || fs == FsKind::Iso9660,
            options: String::new(),
        });
    }
    for (i, c) in opts.copy_in.iter().enumerate() {
        if std::fs::symlink_metadata(&c.host).is_err() {
            return Err(ExecError::NoCopyIn(c.host.clone()));
        }
        let name = c
            .host
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| ExecError::NoCopyIn(c.host.clone()))?;
        steps.push(Step::CopyIn {
            from: copy_in_path(i, &name),
            to: c.guest.clone(),
        });
    }
    let mut argv = opts.command.clone();
    let mut env = Vec::new();
    if opts.console {
        if argv.is_empty() {
            argv = vec!["sh".into()];
            env.push(("PS1".to_string(), "vloop:\\w# ".to_string()));
        }
        env.push((
            "TERM".to_string(),
            std::env::var("TERM").unwrap_or_else(|_| "linux".into()),
        ));
    } else if argv.is_empty() {
        return Err(ExecError::NoCommand);
    }
    steps.push(Step::Exec {
        argv,
        env,
        console: opts.console,
    });
    if !opts.copy_out.is_empty() {
        steps.push(Step::CopyOut {
            paths: opts.copy_out.iter().map(|c| c.guest.clone()).collect(),
        });
    }
    for m in opts.mounts.iter().rev() {
        steps.push(Step::Umount {
            dir: in_home(&m.dir),
        });
    }
    Ok(steps)
}

/// Where each `--copy-out` lands: into HOST when it is a folder, else at HOST.
fn copy_out_targets(opts: &ExecOptions) -> Result<Vec<PathBuf>, ExecError> {
    opts.copy_out
        .iter()
        .map(|c| {
            if c.host.is_dir() {
                let name = Path::new(c.guest.trim_end_matches('/'))
                    .file_name()
                    .ok_or_else(|| ExecError::CopyOutName(c.guest.clone()))?;
                Ok(c.host.join(name))
            } else {
                Ok(c.host.clone())
            }
        })
        .collect()
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ExecError {
    let path = path.to_path_buf();
    move |source| ExecError::Io { what, path, source }
}

/// Runs `opts.command` in a guest; never returns without having stopped the guest and its
/// backends.
pub fn exec(opts: &ExecOptions) -> ExecReport {
    let t0 = Instant::now();
    if let Err(e) = interrupt::install() {
        tracing::warn!("{e}; Ctrl-C will not stop the guest cleanly");
    }
    let mut created = Vec::new();
    let mut timings = Timings::default();
    let mut accel = "none (no guest was started)".to_string();
    let r = exec_inner(opts, t0, &mut created, &mut timings, &mut accel);
    timings.total_s = t0.elapsed().as_secs_f64();
    let mut report = match r {
        Ok(r) => r,
        Err(e) => ExecReport::failed(chain(&e), timings, accel),
    };
    report.timings = timings;
    if let Some(sig) = interrupt::requested() {
        for p in &created {
            let _ = std::fs::remove_file(p);
        }
        if let Some(k) = report.kept.take() {
            let _ = std::fs::remove_dir_all(k);
        }
        report.status = interrupt::exit_status(sig);
        report.detail = format!("interrupted by {sig}");
        report.error = Some(format!(
            "interrupted by {sig}: the guest and its backends were stopped and the files this run created removed"
        ));
    }
    report
}

fn exec_inner(
    opts: &ExecOptions,
    t0: Instant,
    created: &mut Vec<PathBuf>,
    timings: &mut Timings,
    accel: &mut String,
) -> Result<ExecReport, ExecError> {
    if opts.command.is_empty() && !opts.console {
        return Err(ExecError::NoCommand);
    }
    let mut disks = prepare_disks(opts, created)?;
    for m in &opts.mounts {
        if let Some(d) = disks.get_mut(m.disk) {
            d.fs = probe_fs(&d.spec.image)?;
        }
    }
    let steps = steps(opts, &disks)?;
    let targets = copy_out_targets(opts)?;
    let env = Env::prepare(&opts.setup)?;
    *accel = env.accel_line();
    let base = opts.results.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).map_err(io("creating", &base))?;
    let dir = tempfile::Builder::new()
        .prefix("vloop-exec-")
        .tempdir_in(&base)
        .map_err(io("creating a folder in", &base))?;
    let tmp = tempfile::Builder::new()
        .prefix("vloop-")
        .tempdir_in(std::env::temp_dir())
        .map_err(io("creating a folder in", &std::env::temp_dir()))?;
    let data_socket = tmp.path().join("data.sock");
    let listener = UnixListener::bind(&data_socket).map_err(io("listening on", &data_socket))?;
    let relay = Relay::start(listener, targets).map_err(io("relaying", &data_socket))?;
    let limit = env.boot_timeout * env.accel.slowness();
    let spec = BootSpec {
        label: "exec",
        disks: disks.iter().map(|d| (d.spec.clone(), &d.backend)).collect(),
        cpus: opts.cpus.max(1),
        steps,
        copy_in: opts.copy_in.iter().map(|c| c.host.clone()).collect(),
        terminal: opts.console,
        data_socket: Some(data_socket),
        limits: Limits {
            start: limit,
            total: opts.timeout,
            after_done: STREAM_GRACE,
        },
    };
    timings.setup_s = t0.elapsed().as_secs_f64();
    let boot = guest::boot(&env, dir.path(), tmp.path(), spec, &mut |p| {
        if p.done.is_some() && relay.ended() {
            Watch::Finish
        } else {
            Watch::Continue
        }
    });
    let received = relay.finish();
    let boot = boot?;
    timings.boot_s = boot.exit.agent_started.map(|d| d.as_secs_f64());
    let exit = boot.exit.events.iter().find_map(|e| match e {
        Event::Exit { status, ms, detail } => Some((*status, *ms, detail.clone())),
        _ => None,
    });
    let mut problems: Vec<String> = received.errors.clone();
    let (status, detail) = match exit {
        Some((status, ms, detail)) => {
            timings.command_s = Some(ms as f64 / 1000.0);
            if let Err(e) = boot.verdict() {
                problems.push(boot.explain(&e));
            } else if !received.ended {
                problems.push("the guest's data stream ended early: output or copied-out files may be incomplete".into());
            }
            let code = u8::try_from(status).unwrap_or(EXIT_FAILED);
            if code == 0 && !problems.is_empty() {
                (
                    EXIT_FAILED,
                    format!("{detail}, but the run failed after it"),
                )
            } else {
                (code, detail)
            }
        }
        None => {
            let why = boot.verdict().err().unwrap_or_else(|| boot.how_it_ended());
            problems.insert(0, boot.explain(&why));
            (EXIT_FAILED, "the command did not finish".to_string())
        }
    };
    let dir = dir.keep();
    let kept = if status == 0 && !opts.keep {
        let _ = std::fs::remove_dir_all(&dir);
        None
    } else {
        Some(dir)
    };
    Ok(ExecReport {
        status,
        detail,
        error: (!problems.is_empty()).then(|| problems.join("; ")),
        timings: *timings,
        accel: accel.clone(),
        kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ExecOptions {
        ExecOptions {
            disks: vec![],
            copy_in: vec![],
            copy_out: vec![],
            mounts: vec![],
            console: false,
            backend: BackendKind::Vloop,
            backend_bin: None,
            backend_cmd: None,
            setup: SetupOptions::default(),
            cpus: 1,
            timeout: None,
            results: None,
            keep: false,
            command: vec!["true".into()],
        }
    }

    fn disk(image: &str, readonly: bool, fs: Option<FsKind>) -> Disk {
        Disk {
            spec: DiskSpec {
                image: image.into(),
                readonly,
                queues: 1,
            },
            backend: Backend::template(Template::parse("b {socket}").unwrap()),
            fs,
        }
    }

    #[test]
    fn the_plan_mounts_copies_runs_copies_back_and_unmounts() {
        let t = tempfile::tempdir().unwrap();
        let script = t.path().join("t.sh");
        std::fs::write(&script, "true").unwrap();
        let o = ExecOptions {
            copy_in: vec![format!("{}:bin/", script.display()).parse().unwrap()],
            copy_out: vec!["out.txt:res".parse().unwrap()],
            mounts: vec!["1:/data".parse().unwrap(), "0:cd".parse().unwrap()],
            ..opts()
        };
        let disks = [
            disk("a.iso", false, Some(FsKind::Iso9660)),
            disk("b.img", true, Some(FsKind::Ext)),
        ];
        let s = steps(&o, &disks).unwrap();
        let ops: Vec<&str> = s.iter().map(Step::op).collect();
        assert_eq!(
            ops,
            ["mount", "mount", "copy_in", "exec", "copy_out", "umount", "umount"]
        );
        assert_eq!(
            s[0],
            Step::Mount {
                dev: "/dev/vdb".into(),
                dir: "/data".into(),
                fstype: "ext4".into(),
                readonly: true,
                options: String::new(),
            }
        );
        assert!(
            matches!(&s[1], Step::Mount { dir, fstype, readonly: true, .. }
            if dir == "/root/cd" && fstype == "iso9660")
        );
        assert_eq!(
            s[2],
            Step::CopyIn {
                from: "/vloop/in/0/t.sh".into(),
                to: "bin/".into(),
            }
        );
        assert!(matches!(&s[5], Step::Umount { dir } if dir == "/root/cd"));

        let none = ExecOptions {
            mounts: vec!["2:/x".parse().unwrap()],
            ..opts()
        };
        assert!(matches!(
            steps(&none, &disks),
            Err(ExecError::NoSuchDisk(2, 2))
        ));
        let blank = [disk("c.img", false, None)];
        let m = ExecOptions {
            mounts: vec!["0:/x".parse().unwrap()],
            ..opts()
        };
        assert!(matches!(
            steps(&m, &blank),
            Err(ExecError::NoFileSystem(0, _))
        ));
        let missing = ExecOptions {
            copy_in: vec!["/nonexistent/x".parse().unwrap()],
            ..opts()
        };
        assert!(matches!(steps(&missing, &[]), Err(ExecError::NoCopyIn(_))));
    }

    #[test]
    fn a_console_without_a_command_is_a_shell() {
        let o = ExecOptions {
            console: true,
            command: vec![],
            ..opts()
        };
        let s = steps(&o, &[]).unwrap();
        assert!(
            matches!(&s[0], Step::Exec { argv, console: true, env } if argv == &["sh"] && env.iter().any(|(k, _)| k == "PS1"))
        );
        let o = ExecOptions {
            command: vec![],
            ..opts()
        };
        assert!(matches!(steps(&o, &[]), Err(ExecError::NoCommand)));
    }

    #[test]
    fn disks_are_created_once_and_checked() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("new.img");
        let o = ExecOptions {
            disks: vec![format!("{},size=1M,backend=cmd", p.display())
                .parse()
                .unwrap()],
            backend_cmd: Some(Template::parse("b {socket}").unwrap()),
            ..opts()
        };
        let mut created = Vec::new();
        prepare_disks(&o, &mut created).unwrap();
        assert_eq!(created, std::slice::from_ref(&p));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let mut again = Vec::new();
        prepare_disks(&o, &mut again).unwrap();
        assert!(
            again.is_empty(),
            "an existing image of that size is used as it is"
        );
        let other = ExecOptions {
            disks: vec![format!("{},size=2M", p.display()).parse().unwrap()],
            backend_cmd: o.backend_cmd.clone(),
            ..opts()
        };
        assert!(matches!(
            prepare_disks(&other, &mut again),
            Err(ExecError::SizeMismatch { .. })
        ));
        let missing = ExecOptions {
            disks: vec!["/nonexistent.img".parse().unwrap()],
            ..opts()
        };
        assert!(matches!(
            prepare_disks(&missing, &mut again),
            Err(ExecError::NoImage(_))
        ));
        let no_template = ExecOptions {
            disks: vec![format!("{},backend=cmd", p.display()).parse().unwrap()],
            ..opts()
        };
        assert!(matches!(
            prepare_disks(&no_template, &mut again),
            Err(ExecError::NoTemplate(_))
        ));
    }

    #[test]
    fn copies_out_land_inside_a_folder_or_at_the_path() {
        let t = tempfile::tempdir().unwrap();
        let o = ExecOptions {
            copy_out: vec![
                format!("/root/a.txt:{}", t.path().display())
                    .parse()
                    .unwrap(),
                format!("/root/dir/:{}/b", t.path().display())
                    .parse()
                    .unwrap(),
            ],
            ..opts()
        };
        assert_eq!(
            copy_out_targets(&o).unwrap(),
            [t.path().join("a.txt"), t.path().join("b")]
        );
    }

    #[test]
    fn the_summary_names_each_time_and_the_accelerator() {
        let r = ExecReport {
            status: 0,
            detail: "exited with status 0".into(),
            error: None,
            timings: Timings {
                setup_s: 0.2,
                boot_s: Some(2.1),
                command_s: Some(0.01),
                total_s: 2.6,
            },
            accel: "tcg (KVM unusable: x)".into(),
            kept: None,
        };
        assert_eq!(
            r.summary(),
            "vloop-harness: exit status 0 (exited with status 0); boot 2.10s, command 0.01s, set-up 0.20s, total 2.60s; accel tcg (KVM unusable: x)"
        );
    }
}
