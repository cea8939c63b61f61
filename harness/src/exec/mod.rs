//! `vloop-harness exec`: boots a guest the way `run` does, attaches each `--disk` as a
//! vhost-user-blk device served by its own backend process, mounts, copies files in, runs
//! the command with its stdout and stderr streamed to the harness's own ([`data`]), copies
//! files out (also when the command failed) and exits with the command's status.
//!
//! [`exec_with`] is the same for a program that drives guests as a library: it may bring
//! its own prepared set-up and backend, learn the backends' PIDs, and take the command's
//! stdout line by line as it arrives ([`ExecHooks`]).
//!
//! Exit statuses: the command's own (128 + N when signal N ended it, 127 when it was not
//! found, 126 when it could not be run); [`EXIT_FAILED`] (125) when the harness, the guest or
//! a backend failed before the command finished, or the files could not be copied out after
//! a command that succeeded; 130 or 143 when Ctrl-C or SIGTERM stopped the run (the guest and
//! backends are stopped and everything the run created is removed).

pub mod data;
pub mod plan;
pub mod spec;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vloop_guest::Event;

use crate::backend::Backend;
use crate::file_error::at;
use crate::guest::{self, BootSpec};
use crate::images::probe_fs;
use crate::interrupt;
use crate::qemu::{Limits, Watch};
use crate::scenario::chain;
use crate::setup::Env;
use data::{LineSink, Relay};
use plan::{copy_out_targets, prepare_disks, steps};
pub use plan::{ExecError, ExecOptions};

/// The exit status of a run in which the harness, the guest or a backend failed before the
/// command finished (as `podman run` and `docker run` use it).
pub const EXIT_FAILED: u8 = 125;

/// How long the guest may take, after its agent said done, to close the data stream.
const STREAM_GRACE: Duration = Duration::from_secs(30);

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

/// Called with the PIDs of a guest's disk backends, in disk order.
pub type PidsHook<'a> = &'a mut dyn FnMut(&[u32]);

/// What a program that drives `exec` as a library adds to a run; the default adds nothing.
#[derive(Default)]
pub struct ExecHooks<'a> {
    /// The set-up to boot with, prepared once by the caller for many runs (instead of one
    /// prepared from `opts.setup` for this run).
    pub env: Option<&'a Env>,
    /// The backend of every disk without `backend=` (instead of `opts.backend`,
    /// `opts.backend_bin` and `opts.backend_cmd`), e.g. one with options of its own.
    pub backend: Option<Backend>,
    /// Called with the PIDs of the disks' backend processes, in disk order, once they all
    /// listen and before QEMU starts.
    pub on_backends: Option<PidsHook<'a>>,
    /// Takes the command's stdout line by line as it arrives (on the data channel's thread),
    /// instead of this process's stdout.
    pub on_stdout_line: Option<LineSink>,
}

/// Runs `opts.command` in a guest; never returns without having stopped the guest and its
/// backends.
pub fn exec(opts: &ExecOptions) -> ExecReport {
    exec_with(opts, ExecHooks::default())
}

/// [`exec`] with `hooks`.
pub fn exec_with(opts: &ExecOptions, hooks: ExecHooks<'_>) -> ExecReport {
    let t0 = Instant::now();
    if let Err(e) = interrupt::install() {
        tracing::warn!("{e}; Ctrl-C will not stop the guest cleanly");
    }
    let mut created = Vec::new();
    let mut timings = Timings::default();
    let mut accel = "none (no guest was started)".to_string();
    let r = exec_inner(opts, hooks, t0, &mut created, &mut timings, &mut accel);
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
    hooks: ExecHooks<'_>,
    t0: Instant,
    created: &mut Vec<PathBuf>,
    timings: &mut Timings,
    accel: &mut String,
) -> Result<ExecReport, ExecError> {
    if opts.command.is_empty() && !opts.console {
        return Err(ExecError::NoCommand);
    }
    let ExecHooks {
        env: given_env,
        backend,
        on_backends,
        on_stdout_line,
    } = hooks;
    let mut disks = prepare_disks(opts, backend.as_ref(), created)?;
    for m in &opts.mounts {
        if let Some(d) = disks.get_mut(m.disk) {
            d.fs = probe_fs(&d.spec.image)?;
        }
    }
    let steps = steps(opts, &disks)?;
    let targets = copy_out_targets(opts)?;
    let prepared;
    let env = match given_env {
        Some(e) => e,
        None => {
            prepared = Env::prepare(&opts.setup)?;
            &prepared
        }
    };
    *accel = env.accel_line();
    let base = opts.results.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).map_err(at("creating", &base))?;
    let dir = tempfile::Builder::new()
        .prefix("vloop-exec-")
        .tempdir_in(&base)
        .map_err(at("creating a folder in", &base))?;
    let tmp = tempfile::Builder::new()
        .prefix("vloop-")
        .tempdir_in(std::env::temp_dir())
        .map_err(at("creating a folder in", &std::env::temp_dir()))?;
    let data_socket = tmp.path().join("data.sock");
    let listener = UnixListener::bind(&data_socket).map_err(at("listening on", &data_socket))?;
    let relay = Relay::start_with(listener, targets, on_stdout_line)
        .map_err(at("relaying", &data_socket))?;
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
    let mut no_hook = |_: &[u32]| {};
    let started = on_backends.unwrap_or(&mut no_hook);
    let boot = guest::boot_with(env, dir.path(), tmp.path(), spec, started, &mut |p| {
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
