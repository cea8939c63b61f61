//! The guest agent: `/init` of the harness initramfs.
//!
//! Mounts /proc, /sys and /dev, loads the modules the plan lists, waits for the block devices
//! (and the data port, when the plan uses one), runs the plan's steps and writes one JSON line
//! per event to the results serial port (`/dev/ttyS1`, separate from the console on ttyS0).
//! It then powers the guest off, or, with a data port, closes the data stream and waits for
//! the host to stop the machine; if anything goes wrong before that, it still reports and
//! powers off, so the host never has to guess why a guest stopped.
//!
//! Run as `/init io PLAN` by a command in the guest, it is instead the I/O tool of
//! [`vloop_guest::io`] (an ordinary process: it never powers anything off).

mod agent;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agent::exec::DataPort;
use agent::sys::{load_module, mount_basics, wait_for_device};
use agent::Res;
use vloop_guest::{Event, Plan, Step, MODULES_DIR, PLAN_PATH, RESULTS_PORT};

/// Set when a command owns the console: the agent's own messages then stay off it.
static QUIET: AtomicBool = AtomicBool::new(false);

/// A message from the agent on the console (the kernel log), unless a command owns it.
macro_rules! say {
    ($($arg:tt)*) => {
        if !QUIET.load(Ordering::Relaxed) {
            eprintln!($($arg)*);
        }
    };
}

/// How long the agent waits for the host to stop the machine after closing the data stream.
const LINGER: Duration = Duration::from_secs(120);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(vloop_guest::io::APPLET) {
        std::process::exit(agent::io::main(&args[2..]));
    }
    std::panic::set_hook(Box::new(|info| {
        eprintln!("vloop-guest: panic: {info}");
        report_raw(&Event::Fatal {
            error: format!("guest agent panicked: {info}"),
        });
        power_off();
    }));
    if std::process::id() != 1 {
        eprintln!("vloop-guest: this program is the /init of a vloop harness guest; it powers the machine off when done");
        std::process::exit(2);
    }
    match run() {
        Ok((ok, data)) => {
            say!("vloop-guest: done, ok={ok}");
            if let Some(d) = data {
                d.finish();
                std::thread::sleep(LINGER);
            }
        }
        Err(e) => {
            eprintln!("vloop-guest: fatal: {e}");
            report_raw(&Event::Fatal { error: e });
        }
    }
    power_off();
}

fn run() -> Res<(bool, Option<DataPort>)> {
    mount_basics()?;
    let uptime_start = uptime();
    let t0 = Instant::now();
    let text = fs::read_to_string(PLAN_PATH).map_err(|e| format!("read {PLAN_PATH}: {e}"))?;
    let plan: Plan = serde_json::from_str(&text).map_err(|e| format!("parse {PLAN_PATH}: {e}"))?;
    let console = plan
        .steps
        .iter()
        .any(|s| matches!(s, Step::Exec { console: true, .. }));
    QUIET.store(console, Ordering::Relaxed);
    for m in &plan.modules {
        load_module(&Path::new(MODULES_DIR).join(m))?;
    }
    for d in &plan.devices {
        wait_for_device(d, Duration::from_secs(60))?;
    }
    let data = if plan.data_port {
        Some(DataPort::open(Duration::from_secs(60))?)
    } else {
        None
    };
    report_raw(&Event::Start {
        scenario: plan.scenario.clone(),
        uptime_s: uptime_start,
        setup_ms: ms(t0),
    });
    let mut all_ok = true;
    for (index, step) in plan.steps.iter().enumerate() {
        let t = Instant::now();
        let r = match step {
            Step::CopyIn { .. } | Step::Exec { .. } | Step::CopyOut { .. } => {
                agent::exec::run(step, data.as_ref(), &report_raw)
            }
            _ => agent::disk::run(step),
        };
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(e) => (false, e),
        };
        say!("vloop-guest: step {index} {} ok={ok} {detail}", step.op());
        report_raw(&Event::Step {
            index,
            op: step.op().to_string(),
            ok,
            ms: ms(t),
            detail,
        });
        if !ok {
            all_ok = false;
            break;
        }
    }
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    report_raw(&Event::Done {
        ok: all_ok,
        uptime_s: uptime(),
    });
    Ok((all_ok, data))
}

fn ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn uptime() -> f64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(-1.0)
}

/// The results port, opened once (reopening a tty re-initialises the UART).
static PORT: std::sync::Mutex<Option<File>> = std::sync::Mutex::new(None);

fn report_raw(ev: &Event) {
    let Ok(mut line) = serde_json::to_string(ev) else {
        return;
    };
    line.push('\n');
    let Ok(mut port) = PORT.lock() else {
        return;
    };
    if port.is_none() {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(RESULTS_PORT)
        {
            Ok(f) => {
                set_raw(&f);
                *port = Some(f);
            }
            Err(e) => {
                eprintln!("vloop-guest: cannot open {RESULTS_PORT}: {e}; event: {line}");
                return;
            }
        }
    }
    if let Some(f) = port.as_mut() {
        let _ = f.write_all(line.as_bytes());
        // SAFETY: tcdrain on a valid open fd only waits for output to drain.
        unsafe { libc::tcdrain(f.as_raw_fd()) };
    }
}

/// Raw output (no "\n" to "\r\n") at 115200 baud: QEMU's UART paces output by the baud
/// rate, and the default 9600 costs about 1 ms per byte.
fn set_raw(f: &File) {
    // SAFETY: termios is plain data; zeroed is a valid starting value for tcgetattr to fill.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: f is an open fd and t a valid termios for the duration of the calls.
    unsafe {
        if libc::tcgetattr(f.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            t.c_cflag = (t.c_cflag & !libc::CBAUD) | libc::B115200;
            libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
}

fn power_off() -> ! {
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with POWER_OFF stops the machine; as pid 1 we are allowed to.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    // Only reached when reboot failed: exiting pid 1 panics the kernel, and panic=-1 with
    // QEMU's -no-reboot ends the guest as well.
    std::process::exit(1);
}
