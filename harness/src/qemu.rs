//! Building QEMU's command line for a harness guest and running it with a time-out.
//!
//! Guest RAM is a shared memfd (vhost-user backends map it), each disk is a
//! `-chardev socket` + `-device vhost-user-blk-pci`, the console goes to ttyS0 (a log file)
//! and the guest agent's results to ttyS1 (another file).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::accel::Accel;
use vloop_frontend::process::ChildGuard;

/// Errors of running QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU could not be started.
    #[error("cannot start {0}: {1}")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// A log file could not be created.
    #[error("creating {0}: {1}")]
    Log(PathBuf, #[source] std::io::Error),
}

/// One guest boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Extra kernel command-line words (after the harness's own).
    pub append: String,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Per disk: vhost-user socket and number of queues.
    pub disks: Vec<(PathBuf, u32)>,
    /// Console (ttyS0) log.
    pub console_log: PathBuf,
    /// Results (ttyS1) file.
    pub results: PathBuf,
}

/// The kernel command line: quiet, no reboot on panic, nothing probed that the guest does
/// not use. Under TCG every initcall costs; the blacklisted ones (kprobe and trace set-up,
/// loading the built-in X.509 certificates, a KDF self-test) took about 1.7 s of a 6 s boot
/// of Debian's cloud kernel, and the crypto self-tests (`cryptomgr.notests`) another 2 s.
/// Without the certificates, signed modules still load (signatures are not enforced).
pub fn kernel_cmdline(extra: &str) -> String {
    let base = "console=ttyS0 quiet loglevel=4 panic=-1 oops=panic rdinit=/init \
                8250.nr_uarts=2 i8042.noaux i8042.nokbd i8042.nopnp i8042.dumbkbd \
                mitigations=off random.trust_cpu=on no_timer_check tsc=reliable \
                cryptomgr.notests initcall_blacklist=init_kprobe_trace,\
                load_system_certificate_list,trace_eval_init,crypto_kdf108_init";
    if extra.is_empty() {
        base.to_string()
    } else {
        format!("{base} {extra}")
    }
}

/// QEMU's arguments for `cfg`.
pub fn qemu_args(cfg: &VmConfig) -> Vec<String> {
    let p = |p: &Path| p.to_string_lossy().replace(',', ",,");
    let mut a: Vec<String> = vec![
        "-machine".into(),
        format!("q35,accel={}", cfg.accel.name()),
        // The default model under KVM: `-cpu host` fails on some QEMU 7.2 set-ups with a KVM
        // MSR error, and `max` sets MSRs that nested KVM may refuse.
        "-cpu".into(),
        "qemu64".into(),
        "-smp".into(),
        cfg.cpus.max(1).to_string(),
        "-m".into(),
        format!("{}M", cfg.mem_mib),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={}M,share=on", cfg.mem_mib),
        "-numa".into(),
        "node,memdev=mem".into(),
        "-kernel".into(),
        cfg.kernel.to_string_lossy().into_owned(),
        "-initrd".into(),
        cfg.initrd.to_string_lossy().into_owned(),
        "-append".into(),
        kernel_cmdline(&cfg.append),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-chardev".into(),
        format!("file,id=con,path={}", p(&cfg.console_log)),
        "-serial".into(),
        "chardev:con".into(),
        "-chardev".into(),
        format!("file,id=res,path={}", p(&cfg.results)),
        "-serial".into(),
        "chardev:res".into(),
    ];
    for (i, (sock, queues)) in cfg.disks.iter().enumerate() {
        a.push("-chardev".into());
        a.push(format!("socket,id=disk{i},path={}", p(sock)));
        a.push("-device".into());
        a.push(format!(
            "vhost-user-blk-pci,chardev=disk{i},num-queues={},bootindex={}",
            (*queues).max(1),
            i + 1
        ));
    }
    a
}

/// How a guest run ended.
#[derive(Debug, Clone)]
pub struct VmExit {
    /// QEMU exited by itself (the guest powered off or QEMU failed), with this description.
    pub status: Option<String>,
    /// QEMU's exit was a success.
    pub success: bool,
    /// The run hit the time-out and QEMU was killed.
    pub timed_out: bool,
    /// Wall time from start to exit.
    pub elapsed: Duration,
    /// Why the run was cut short, when `abort` said so.
    pub aborted: Option<String>,
    /// Wall time from start until the agent reported it started.
    pub agent_started: Option<Duration>,
    /// Wall time from start until the agent reported done.
    pub agent_done: Option<Duration>,
}

/// Runs QEMU to completion or time-out; QEMU's own stdout/stderr go to `qemu_log`.
///
/// `abort` is polled while QEMU runs: when it returns a reason (e.g. a backend died), QEMU is
/// killed and the reason recorded, instead of waiting for the time-out.
pub fn run(
    cfg: &VmConfig,
    qemu_log: &Path,
    limit: Duration,
    abort: &mut dyn FnMut() -> Option<String>,
) -> Result<VmExit, QemuError> {
    let f =
        std::fs::File::create(qemu_log).map_err(|e| QemuError::Log(qemu_log.to_path_buf(), e))?;
    let f2 = f
        .try_clone()
        .map_err(|e| QemuError::Log(qemu_log.to_path_buf(), e))?;
    let t = Instant::now();
    let child = Command::new(&cfg.qemu)
        .args(qemu_args(cfg))
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .spawn()
        .map_err(|e| QemuError::Spawn(cfg.qemu.clone(), e))?;
    let mut g = ChildGuard::new(child, "qemu");
    let mut exit = VmExit {
        status: None,
        success: false,
        timed_out: false,
        elapsed: Duration::ZERO,
        agent_started: None,
        agent_done: None,
        aborted: None,
    };
    let mut seen_len = 0u64;
    loop {
        if let Some(st) = g.try_wait() {
            exit.status = Some(st.to_string());
            exit.success = st.success();
            break;
        }
        // Watch the results port: when the agent starts and when it is done.
        let len = std::fs::metadata(&cfg.results).map_or(0, |m| m.len());
        if len != seen_len {
            seen_len = len;
            let text = std::fs::read_to_string(&cfg.results).unwrap_or_default();
            if exit.agent_started.is_none() && text.contains("\"event\":\"start\"") {
                exit.agent_started = Some(t.elapsed());
            }
            if exit.agent_done.is_none() && text.contains("\"event\":\"done\"") {
                exit.agent_done = Some(t.elapsed());
            }
        }
        // The agent syncs before it reports done, and every write it made has been
        // acknowledged by the backend: a guest slow to power off is stopped after a grace.
        if let Some(done) = exit.agent_done {
            if t.elapsed() > done + POWEROFF_GRACE {
                g.kill();
                exit.status = Some("killed after the agent reported done".into());
                exit.success = true;
                break;
            }
        }
        if t.elapsed() >= limit {
            g.kill();
            exit.timed_out = true;
            break;
        }
        if exit.agent_done.is_none() {
            if let Some(why) = abort() {
                g.kill();
                exit.aborted = Some(why);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    exit.elapsed = t.elapsed();
    Ok(exit)
}

/// How long a guest may take to power off after its agent reported done.
const POWEROFF_GRACE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_shared_memory_serials_and_disks() {
        let cfg = VmConfig {
            qemu: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "x=1".into(),
            mem_mib: 256,
            cpus: 2,
            disks: vec![("/s0".into(), 1), ("/s,1".into(), 2)],
            console_log: "/c.log".into(),
            results: "/r.jsonl".into(),
        };
        let a = qemu_args(&cfg);
        let s = a.join(" ");
        assert!(s.contains("-machine q35,accel=tcg"), "{s}");
        assert!(s.contains("memory-backend-memfd,id=mem,size=256M,share=on"));
        assert!(s.contains("-numa node,memdev=mem"));
        assert!(s.contains("-smp 2"));
        assert!(!s.contains("-cpu host"));
        assert!(s.contains(
            "socket,id=disk0,path=/s0 -device vhost-user-blk-pci,chardev=disk0,num-queues=1"
        ));
        assert!(s.contains(
            "socket,id=disk1,path=/s,,1 -device vhost-user-blk-pci,chardev=disk1,num-queues=2"
        ));
        let serials: Vec<&String> = a.iter().filter(|x| x.starts_with("chardev:")).collect();
        assert_eq!(serials, ["chardev:con", "chardev:res"]);
        let append = &a[a.iter().position(|x| x == "-append").unwrap() + 1];
        assert!(
            append.starts_with("console=ttyS0")
                && append.contains("panic=-1")
                && append.ends_with("x=1")
        );
        assert!(a.contains(&"-no-reboot".to_string()));
        let kvm = qemu_args(&VmConfig {
            accel: Accel::Kvm,
            ..cfg
        });
        assert!(kvm.join(" ").contains("q35,accel=kvm -cpu qemu64"));
    }
}
