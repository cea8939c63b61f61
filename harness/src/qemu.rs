//! Building QEMU's command line for a harness guest and running it under a watch.
//!
//! Guest RAM is a shared memfd (vhost-user backends map it), each disk is a
//! `-chardev socket` + `-device vhost-user-blk-pci`, the console goes to ttyS0 (a log file,
//! or the terminal for `exec --console`), the guest agent's results to ttyS1 (another file),
//! and `exec`'s data stream to a virtio-serial port whose chardev connects to a socket the
//! harness listens on.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vloop_frontend::process::ChildGuard;
use vloop_guest::{Event, DATA_PORT_NAME};

use crate::accel::Accel;

/// Errors of running QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU could not be started.
    #[error("cannot start {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// A log file could not be created.
    #[error("creating {0}")]
    Log(PathBuf, #[source] std::io::Error),
}

/// Where the guest's console (ttyS0) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// A log file.
    File(PathBuf),
    /// This process's terminal (stdin and stdout), through QEMU's multiplexer: `Ctrl-a x`
    /// quits QEMU.
    Terminal,
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
    pub disks: Vec<(PathBuf, u16)>,
    /// The console (ttyS0).
    pub console: Console,
    /// Results (ttyS1) file.
    pub results: PathBuf,
    /// The socket the data port's chardev connects to, when the guest has one.
    pub data_socket: Option<PathBuf>,
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
        match &cfg.console {
            Console::File(log) => format!("file,id=con,path={}", p(log)),
            Console::Terminal => "stdio,id=con,mux=on,signal=off".into(),
        },
        "-serial".into(),
        "chardev:con".into(),
        "-chardev".into(),
        format!("file,id=res,path={}", p(&cfg.results)),
        "-serial".into(),
        "chardev:res".into(),
    ];
    if let Some(sock) = &cfg.data_socket {
        a.extend([
            "-device".into(),
            "virtio-serial-pci,id=vser".into(),
            "-chardev".into(),
            format!("socket,id=data,path={}", p(sock)),
            "-device".into(),
            format!("virtserialport,bus=vser.0,chardev=data,name={DATA_PORT_NAME}"),
        ]);
    }
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

/// How long a guest may take, and how long it may linger after its agent said done.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From QEMU's start until the agent reports that it started.
    pub start: Duration,
    /// From QEMU's start until the end, if limited.
    pub total: Option<Duration>,
    /// After the agent reported done, until QEMU is stopped.
    pub after_done: Duration,
}

/// What the watch wants after looking at a guest's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watch {
    /// Let it run.
    Continue,
    /// Stop it now: something went wrong (the reason).
    Abort(String),
    /// Stop it now: everything it had to do is done.
    Finish,
}

/// What the watch sees of a running guest.
#[derive(Debug)]
pub struct Progress<'a> {
    /// Wall time since QEMU started.
    pub elapsed: Duration,
    /// The agent's events so far.
    pub events: &'a [Event],
    /// When the agent reported that it started.
    pub started: Option<Duration>,
    /// When the agent reported done.
    pub done: Option<Duration>,
}

/// How a guest run ended.
#[derive(Debug, Clone)]
pub struct VmExit {
    /// QEMU exited by itself (the guest powered off or QEMU failed), or was stopped; in words.
    pub status: Option<String>,
    /// QEMU's exit was a success (or it was stopped after the agent was done).
    pub success: bool,
    /// The limit that ran out, when one did (QEMU was killed).
    pub timed_out: Option<String>,
    /// Wall time from start to exit.
    pub elapsed: Duration,
    /// Why the watch cut the run short, when it did.
    pub aborted: Option<String>,
    /// Wall time from start until the agent reported it started.
    pub agent_started: Option<Duration>,
    /// Wall time from start until the agent reported done.
    pub agent_done: Option<Duration>,
    /// Every event the agent reported.
    pub events: Vec<Event>,
}

/// Reads the guest's JSON-lines results, skipping lines that are not events.
pub fn parse_events(text: &str) -> Vec<Event> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Event>(l.trim().trim_matches('\0')).ok())
        .collect()
}

/// The agent's results file as it grows: complete lines are parsed once each.
#[derive(Debug, Default)]
struct ResultsTail {
    file: Option<std::fs::File>,
    partial: Vec<u8>,
    events: Vec<Event>,
}

impl ResultsTail {
    /// Reads what was appended to `path` since the last call.
    fn poll(&mut self, path: &Path) {
        if self.file.is_none() {
            self.file = std::fs::File::open(path).ok();
        }
        let Some(f) = self.file.as_mut() else {
            return;
        };
        let _ = f.read_to_end(&mut self.partial);
        if let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') {
            let lines: Vec<u8> = self.partial.drain(..=end).collect();
            self.events
                .extend(parse_events(&String::from_utf8_lossy(&lines)));
        }
    }
}

/// Grace between SIGTERM and SIGKILL when QEMU is stopped (SIGTERM lets it restore the
/// terminal it took over).
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Runs QEMU until it exits, a limit runs out or `watch` stops it; QEMU's own stdout and
/// stderr go to `qemu_log` (only stderr with a terminal console, whose output is the
/// guest's console).
pub fn run(
    cfg: &VmConfig,
    qemu_log: &Path,
    limits: Limits,
    watch: &mut dyn FnMut(&Progress) -> Watch,
) -> Result<VmExit, QemuError> {
    let f =
        std::fs::File::create(qemu_log).map_err(|e| QemuError::Log(qemu_log.to_path_buf(), e))?;
    let f2 = f
        .try_clone()
        .map_err(|e| QemuError::Log(qemu_log.to_path_buf(), e))?;
    let mut cmd = Command::new(&cfg.qemu);
    cmd.args(qemu_args(cfg)).stderr(f2);
    match cfg.console {
        Console::File(_) => cmd.stdin(Stdio::null()).stdout(f),
        Console::Terminal => cmd.stdin(Stdio::inherit()).stdout(Stdio::inherit()),
    };
    let t = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| QemuError::Spawn(cfg.qemu.clone(), e))?;
    let mut g = ChildGuard::new(child, "qemu");
    let mut exit = VmExit {
        status: None,
        success: false,
        timed_out: None,
        elapsed: Duration::ZERO,
        aborted: None,
        agent_started: None,
        agent_done: None,
        events: Vec::new(),
    };
    let mut tail = ResultsTail::default();
    loop {
        let exited = g.try_wait();
        tail.poll(&cfg.results);
        for e in &tail.events {
            match e {
                Event::Start { .. } if exit.agent_started.is_none() => {
                    exit.agent_started = Some(t.elapsed())
                }
                Event::Done { .. } if exit.agent_done.is_none() => {
                    exit.agent_done = Some(t.elapsed())
                }
                _ => {}
            }
        }
        if let Some(st) = exited {
            exit.status = Some(st.to_string());
            exit.success = st.success();
            break;
        }
        let elapsed = t.elapsed();
        let verdict = watch(&Progress {
            elapsed,
            events: &tail.events,
            started: exit.agent_started,
            done: exit.agent_done,
        });
        match verdict {
            Watch::Continue => {}
            Watch::Finish => {
                g.stop(STOP_GRACE);
                exit.status = Some("stopped once the agent was done".into());
                exit.success = true;
                break;
            }
            Watch::Abort(why) => {
                g.stop(STOP_GRACE);
                exit.aborted = Some(why);
                break;
            }
        }
        // The agent syncs before it reports done, and every write it made has been
        // acknowledged by the backend: a guest slow to power off is stopped after a grace.
        if let Some(done) = exit.agent_done {
            if elapsed > done + limits.after_done {
                g.stop(STOP_GRACE);
                exit.status = Some("stopped after the agent reported done".into());
                exit.success = true;
                break;
            }
        }
        let over = if exit.agent_started.is_none() && elapsed >= limits.start {
            Some(format!("the agent did not start within {:?}", limits.start))
        } else {
            limits
                .total
                .filter(|&l| elapsed >= l)
                .map(|l| format!("the guest did not finish within {l:?}"))
        };
        if let Some(why) = over {
            g.stop(STOP_GRACE);
            exit.timed_out = Some(why);
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tail.poll(&cfg.results);
    exit.events = tail.events;
    exit.elapsed = t.elapsed();
    Ok(exit)
}

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
            console: Console::File("/c.log".into()),
            results: "/r.jsonl".into(),
            data_socket: None,
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
        assert!(!s.contains("virtserialport"));
        let kvm = qemu_args(&VmConfig {
            accel: Accel::Kvm,
            ..cfg.clone()
        });
        assert!(kvm.join(" ").contains("q35,accel=kvm -cpu qemu64"));
        let exec = qemu_args(&VmConfig {
            console: Console::Terminal,
            data_socket: Some("/d.sock".into()),
            ..cfg
        })
        .join(" ");
        assert!(exec.contains("-chardev stdio,id=con,mux=on,signal=off -serial chardev:con"));
        assert!(exec.contains(
            "-chardev socket,id=data,path=/d.sock -device virtserialport,bus=vser.0,chardev=data,name=org.vloop.data"
        ));
    }

    #[test]
    fn results_are_parsed_line_by_line_as_they_grow() {
        use std::io::Write;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("r.jsonl");
        let mut tail = ResultsTail::default();
        tail.poll(&p);
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"noise\r\n{\"event\":\"done\",\"ok\":tr")
            .unwrap();
        tail.poll(&p);
        assert!(tail.events.is_empty());
        f.write_all(b"ue,\"uptime_s\":2.0}\n").unwrap();
        tail.poll(&p);
        assert_eq!(
            tail.events,
            [Event::Done {
                ok: true,
                uptime_s: 2.0
            }]
        );
    }
}
