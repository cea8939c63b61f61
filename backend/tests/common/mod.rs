//! What the vloop-blk integration tests share: the daemon under test, started through the
//! project's one backend process spec (`vloop_frontend::backend`), killed when a test ends.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use vloop_frontend::backend::{BackendProcess, BackendSpec, Export, Program};

/// How long a test waits for the daemon to start, answer or exit.
pub const WAIT: Duration = Duration::from_secs(20);

/// The vloop-blk binary under test: this build's, or the one `VLOOP_BLK_BIN` names (to run
/// the tests against another build, e.g. an older one).
pub fn bin() -> PathBuf {
    std::env::var_os("VLOOP_BLK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vloop-blk")))
}

/// A running `vloop-blk` serving `image` on `socket` with `extra` arguments, logging at info
/// level to a file beside the socket.
pub fn start(image: &Path, socket: &Path, extra: &[&str]) -> BackendProcess {
    let mut spec = BackendSpec::new(Program::Vloop(bin()), Export::new(image, socket));
    spec.extra_args = extra.iter().map(|s| s.to_string()).collect();
    spec.env.push(("RUST_LOG".into(), "info".into()));
    let log = unique_log(socket);
    BackendProcess::spawn(&spec, &log, WAIT)
        .unwrap_or_else(|e| panic!("vloop-blk did not start: {e}"))
}

fn unique_log(socket: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    socket.with_extension(format!("{}.{n}.log", std::process::id()))
}

/// The whole log of `p`.
pub fn log(p: &BackendProcess) -> String {
    std::fs::read_to_string(p.log()).unwrap_or_default()
}

/// Send `sig` to `p`.
pub fn signal(p: &BackendProcess, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid() as i32), sig).unwrap();
}

/// SIGTERM, then the exit status within [`WAIT`] (the daemon is killed if it ignores it).
pub fn terminate(p: &mut BackendProcess) -> ExitStatus {
    signal(p, nix::sys::signal::Signal::SIGTERM);
    match p.wait_timeout(WAIT) {
        Some(s) => s,
        None => {
            let _ = p.kill();
            panic!("vloop-blk ignored SIGTERM for {WAIT:?}:\n{}", log(p));
        }
    }
}

/// Wait until `p` exits on its own.
pub fn wait_exit(p: &mut BackendProcess) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = p.try_wait() {
            return s;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A sparse image of `size` bytes at `dir/disk.img`.
pub fn image(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// Bytes that differ from sector to sector and from seed to seed, for data written and read back.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed.wrapping_add((i >> 9) as u8))
        .collect()
}

/// A connected frontend is served: a write, its read-back and a flush on queue 0.
pub fn serves(c: &mut vloop_frontend::Client) {
    let q = c.queue(0).unwrap();
    let data = pattern(0x5a, 4096);
    q.write(8, &data).unwrap();
    assert_eq!(q.read(8, 4096).unwrap(), data);
    q.flush().unwrap();
}
