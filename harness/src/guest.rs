//! One guest boot: a backend process per disk, the per-boot initramfs (plan and files copied
//! in), QEMU under a watch that stops it when a backend dies or the user interrupts, and the
//! agent's events afterwards. Scenarios and `exec` both boot through here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vloop_frontend::backend::{tail, BackendProcess};
use vloop_guest::{Event, Plan, Step};

use crate::backend::{Backend, BackendError, DiskSpec};
use crate::initramfs::{self, InitramfsError};
use crate::interrupt;
use crate::qemu::{self, Console, Limits, Progress, QemuError, VmConfig, VmExit, Watch};
use crate::setup::Env;

/// Errors that keep a guest from booting at all.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A disk's backend did not start.
    #[error("the backend of disk {disk} did not start (log: {})", log.display())]
    Backend {
        /// Index of the disk.
        disk: usize,
        /// Its log.
        log: PathBuf,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// The per-boot initramfs could not be written.
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    /// QEMU could not be started.
    #[error(transparent)]
    Qemu(#[from] QemuError),
}

/// How long a backend may take to create its socket.
const BACKEND_START: Duration = Duration::from_secs(10);
/// How long a backend may take to exit after SIGTERM, once the guest is gone.
const BACKEND_STOP: Duration = Duration::from_secs(5);

/// One boot to make.
#[derive(Debug)]
pub struct BootSpec<'a> {
    /// Prefix of its files (`boot` gives `boot-console.log`, `boot-backend0.log`...).
    pub label: &'a str,
    /// The disks, each served by its own process of the backend named beside it.
    pub disks: Vec<(DiskSpec, &'a Backend)>,
    /// vCPUs.
    pub cpus: u32,
    /// What the agent does.
    pub steps: Vec<Step>,
    /// Host paths packed into the initramfs (copy-in item `i` is the `i`-th).
    pub copy_in: Vec<PathBuf>,
    /// Where the console goes (a file in the boot's folder unless the terminal).
    pub terminal: bool,
    /// The socket the data port's chardev connects to, when the plan uses the data port.
    pub data_socket: Option<PathBuf>,
    /// Time limits.
    pub limits: Limits,
}

/// How one boot went.
#[derive(Debug)]
pub struct BootReport {
    /// QEMU's end and the agent's events.
    pub exit: VmExit,
    /// The console log (none when the console was the terminal).
    pub console_log: Option<PathBuf>,
    /// QEMU's own log.
    pub qemu_log: PathBuf,
    /// Each disk's backend log.
    pub backend_logs: Vec<PathBuf>,
}

/// The name of disk `i` in the guest: `vda`, `vdb`...
pub fn device_name(i: usize) -> String {
    let mut n = String::from("vd");
    // vda..vdz, then vdaa.. as Linux names them.
    let mut k = i;
    let mut letters = Vec::new();
    loop {
        letters.push(char::from(b'a' + (k % 26) as u8));
        if k < 26 {
            break;
        }
        k = k / 26 - 1;
    }
    n.extend(letters.iter().rev());
    n
}

/// Boots one guest with its files in `dir` and its sockets and initramfs in `tmp`; `watch`
/// sees its progress (after the harness's own checks: an interrupt, a backend that died).
pub fn boot(
    env: &Env,
    dir: &Path,
    tmp: &Path,
    spec: BootSpec,
    watch: &mut dyn FnMut(&Progress) -> Watch,
) -> Result<BootReport, BootError> {
    boot_with(env, dir, tmp, spec, &mut |_| {}, watch)
}

/// [`boot`], calling `started` with the PIDs of the disks' backend processes (in disk order)
/// once they all listen, before QEMU starts.
pub fn boot_with(
    env: &Env,
    dir: &Path,
    tmp: &Path,
    spec: BootSpec,
    started: &mut dyn FnMut(&[u32]),
    watch: &mut dyn FnMut(&Progress) -> Watch,
) -> Result<BootReport, BootError> {
    let label = spec.label;
    let mut backends: Vec<BackendProcess> = Vec::new();
    let mut socks = Vec::new();
    let mut backend_logs = Vec::new();
    for (i, (d, backend)) in spec.disks.iter().enumerate() {
        let sock = tmp.join(format!("{label}-{i}.sock"));
        let log = dir.join(format!("{label}-backend{i}.log"));
        let p = backend
            .start(d, &sock, &log, BACKEND_START)
            .map_err(|source| BootError::Backend {
                disk: i,
                log: log.clone(),
                source,
            })?;
        backends.push(p);
        socks.push((sock, d.queues));
        backend_logs.push(log);
    }
    started(&backends.iter().map(BackendProcess::pid).collect::<Vec<_>>());
    let data_port = spec.data_socket.is_some();
    let plan = Plan {
        scenario: label.to_string(),
        modules: env.modules_for(data_port),
        devices: (0..spec.disks.len()).map(device_name).collect(),
        steps: spec.steps,
        data_port,
    };
    let initrd = tmp.join(format!("{label}-initrd.img"));
    initramfs::write_initrd(&env.base_initrd, &plan, &spec.copy_in, &initrd)?;
    let console_log = (!spec.terminal).then(|| dir.join(format!("{label}-console.log")));
    let cfg = VmConfig {
        qemu: env.qemu.clone(),
        accel: env.accel,
        kernel: env.kernel.clone(),
        initrd,
        append: env.append.clone(),
        mem_mib: env.mem_mib,
        cpus: spec.cpus,
        disks: socks,
        console: console_log.clone().map_or(Console::Terminal, Console::File),
        results: dir.join(format!("{label}-results.jsonl")),
        data_socket: spec.data_socket,
    };
    let qemu_log = dir.join(format!("{label}-qemu.log"));
    let mut guarded = |p: &Progress| {
        if let Some(sig) = interrupt::requested() {
            return Watch::Abort(format!("interrupted by {sig}"));
        }
        if p.done.is_none() {
            for (i, b) in backends.iter_mut().enumerate() {
                if let Some(st) = b.try_wait() {
                    return Watch::Abort(format!(
                        "the backend of disk {i} exited ({st}) while the guest ran; its log ({}) ends:\n{}",
                        b.log().display(),
                        b.log_tail(10)
                    ));
                }
            }
        }
        watch(p)
    };
    let exit = qemu::run(&cfg, &qemu_log, spec.limits, &mut guarded)?;
    for b in &mut backends {
        b.stop(BACKEND_STOP);
    }
    Ok(BootReport {
        exit,
        console_log,
        qemu_log,
        backend_logs,
    })
}

impl BootReport {
    /// How the guest ended when it did not finish its plan, in words.
    pub fn how_it_ended(&self) -> String {
        let exit = &self.exit;
        let how = if let Some(why) = &exit.aborted {
            format!("was stopped: {why}")
        } else if let Some(why) = &exit.timed_out {
            format!("was killed: {why}")
        } else {
            format!(
                "stopped ({}) before reporting done",
                exit.status.as_deref().unwrap_or("?")
            )
        };
        if exit.agent_started.is_some() {
            format!("the guest {how}")
        } else {
            format!("the guest never reported: QEMU {how}")
        }
    }

    /// Ok when the agent ran every step and said done; else why not.
    pub fn verdict(&self) -> Result<(), String> {
        for e in &self.exit.events {
            match e {
                Event::Fatal { error } => return Err(format!("guest agent failed: {error}")),
                Event::Step {
                    ok: false,
                    index,
                    op,
                    detail,
                    ..
                } => return Err(format!("guest step {index} ({op}) failed: {detail}")),
                Event::Done { ok: true, .. } => return Ok(()),
                Event::Done { ok: false, .. } => {
                    return Err("guest finished with a failed step".into())
                }
                _ => {}
            }
        }
        Err(self.how_it_ended())
    }

    /// The verdict's reason with the last lines of QEMU's log, of the console (unless a step
    /// said what failed) and, when the run was cut short, of the backends' logs.
    pub fn explain(&self, reason: &str) -> String {
        let one_line = |p: &Path, n: usize| {
            tail(p, n)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" | ")
        };
        let mut msg = reason.to_string();
        let q = one_line(&self.qemu_log, 2);
        if !q.is_empty() {
            msg.push_str(&format!("; qemu: {q}"));
        }
        if let Some(c) = &self.console_log {
            let c = one_line(c, 3);
            if !c.is_empty() && !reason.contains("step") {
                msg.push_str(&format!("; console: {c}"));
            }
        }
        if self.exit.aborted.is_some() || self.exit.timed_out.is_some() {
            for (i, log) in self.backend_logs.iter().enumerate() {
                let b = one_line(log, 2);
                if !b.is_empty() && !reason.contains(&b) {
                    msg.push_str(&format!("; backend{i}: {b}"));
                }
            }
        }
        msg
    }

    /// Every step the agent reported: its name, whether it passed, and what it said.
    pub fn steps(&self) -> Vec<(String, bool, String)> {
        self.exit
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Step { op, ok, detail, .. } => Some((op.clone(), *ok, detail.clone())),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(events: Vec<Event>, timed_out: bool) -> BootReport {
        BootReport {
            exit: VmExit {
                status: (!timed_out).then(|| "exit status: 0".into()),
                success: !timed_out,
                timed_out: timed_out.then(|| "the agent did not start within 5s".into()),
                elapsed: Duration::from_secs(1),
                aborted: None,
                agent_started: events
                    .iter()
                    .any(|e| matches!(e, Event::Start { .. }))
                    .then_some(Duration::from_secs(1)),
                agent_done: None,
                events,
            },
            console_log: None,
            qemu_log: "/nonexistent".into(),
            backend_logs: vec![],
        }
    }

    #[test]
    fn events_decide_the_verdict() {
        let text = "garbage\r\n{\"event\":\"start\",\"scenario\":\"x\",\"uptime_s\":1.5,\"setup_ms\":3}\n\
                    {\"event\":\"step\",\"index\":0,\"op\":\"mkfs\",\"ok\":true,\"ms\":1,\"detail\":\"\"}\n\
                    {\"event\":\"done\",\"ok\":true,\"uptime_s\":2.0}\n";
        let ev = qemu::parse_events(text);
        assert_eq!(ev.len(), 3);
        assert_eq!(report(ev.clone(), false).verdict(), Ok(()));
        assert_eq!(
            report(ev.clone(), false).steps(),
            [("mkfs".to_string(), true, String::new())]
        );

        let failed = qemu::parse_events(
            "{\"event\":\"start\",\"scenario\":\"x\",\"uptime_s\":1.5,\"setup_ms\":3}\n\
             {\"event\":\"step\",\"index\":4,\"op\":\"verify\",\"ok\":false,\"ms\":1,\"detail\":\"a: missing\"}\n",
        );
        let e = report(failed, false).verdict().unwrap_err();
        assert!(e.contains("step 4 (verify) failed: a: missing"), "{e}");

        let e = report(vec![], true).verdict().unwrap_err();
        assert!(e.contains("never reported") && e.contains("killed"), "{e}");

        let e = report(ev[..2].to_vec(), false).verdict().unwrap_err();
        assert!(e.contains("before reporting done"), "{e}");
    }

    #[test]
    fn devices_are_named_as_linux_names_them() {
        assert_eq!(device_name(0), "vda");
        assert_eq!(device_name(25), "vdz");
        assert_eq!(device_name(26), "vdaa");
        assert_eq!(device_name(27), "vdab");
    }
}
