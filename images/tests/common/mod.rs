//! Shared helpers of the tests that run the `vloop-image` binary: running it (and other
//! tools) with a time-out, its output and hashes, the tools a test needs, and Ctrl-C while it
//! runs. `qemu` adds qemu-img and qemu-io as the oracle.

#![allow(dead_code)]

pub mod qemu;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vloop-image");

/// Runs a command with a time-out; the child is killed if it overruns.
pub fn run_cmd(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = wait_or_kill(&mut child, Duration::from_secs(300), &format!("{cmd:?}"));
    Output {
        status,
        stdout: t_out.join().expect("stdout thread"),
        stderr: t_err.join().expect("stderr thread"),
    }
}

/// Waits up to `limit` for `child` to exit; past it the child is killed and the test fails,
/// naming `what`.
fn wait_or_kill(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} timed out");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command with [`run_cmd`]; it must succeed.
pub fn run_ok(cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    let o = run_cmd(cmd);
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs `vloop-image args` in `dir`.
pub fn vloop(args: &[&str], dir: &Path) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).current_dir(dir).env_remove("RUST_LOG");
    run_cmd(c)
}

/// Runs `vloop-image args` in `dir`; it must succeed. Returns stdout.
pub fn ok(args: &[&str], dir: &Path) -> String {
    let o = vloop(args, dir);
    assert!(
        o.status.success(),
        "vloop-image {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8")
}

/// Asserts a failure with exactly one `error: ` line on stderr; returns that line.
pub fn fails(args: &[&str], dir: &Path, code: i32) -> String {
    let o = vloop(args, dir);
    let err = String::from_utf8(o.stderr).expect("utf-8");
    assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        !err.contains("backtrace") && !err.contains("panicked"),
        "{err}"
    );
    lines[0].to_string()
}

/// Whether the system tool `name` is installed; a test leaves out the part that needs it
/// otherwise, and says so (under `CI=true` a missing tool fails the test).
pub fn tool(name: &str) -> bool {
    let found = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists());
    if !found {
        let why = format!("{name} is not installed (ci/setup installs it)");
        vloop_frontend::skip::skip(&why);
    }
    found
}

/// SHA-256 of a file, lower-case hex.
pub fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(path).expect("read")))
}

/// The hash of a `sha256: HASH  FILE` line of `stdout`.
pub fn sha_line(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("sha256: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no sha256 line in {stdout}"))
        .to_string()
}

/// `vloop-image info --json IMG` in `dir`.
pub fn info_json(img: impl AsRef<Path>, dir: &Path) -> serde_json::Value {
    let img = img.as_ref().to_str().expect("utf-8");
    serde_json::from_str(&ok(&["info", "--json", img], dir)).expect("json")
}

/// Bytes a file occupies on disk (`st_blocks * 512`).
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).expect("metadata").blocks() * 512
}

/// A 64 MiB sparse file: 3 MiB of data at 5 MiB, a little at odd places, a tail.
pub fn sparse_source(path: &Path) {
    let f = File::create(path).unwrap();
    f.set_len(64 << 20).unwrap();
    let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all_at(&data, 5 << 20).unwrap();
    f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
    f.write_all_at(&[0xAB; 100], 12345).unwrap();
}

/// [`sparse_source`] with a dense run of zeroes in the middle of data: written, but all
/// zero.
pub fn sparse_source_with_zeroes(path: &Path) {
    sparse_source(path);
    let f = File::options().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; 1 << 20], 20 << 20).unwrap();
}

/// Writes 256 MiB of dense, non-zero bytes to `path`: 1, 2, ... `period`, repeated in each MiB.
pub fn write_dense(path: &Path, period: u32) {
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % period) as u8 + 1).collect();
    let f = File::create(path).unwrap();
    for i in 0..256u64 {
        f.write_all_at(&chunk, i << 20).unwrap();
    }
}

/// Whether a temporary output (`*.partial`) is in `dir`.
pub fn partial_in(dir: &Path) -> bool {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
}

/// Asserts that no temporary output is left in `dir`.
pub fn no_partial(dir: &Path) {
    assert!(
        !partial_in(dir),
        "temporary files left in {}",
        dir.display()
    );
}

/// Runs `vloop-image args` in `dir` and sends it SIGINT once `started()` holds (or it has
/// exited, or 30 s have passed); returns its exit status and stderr once it stops.
pub fn interrupt(args: &[&str], dir: &Path, started: impl Fn() -> bool) -> (ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(2));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = wait_or_kill(
        &mut child,
        Duration::from_secs(60),
        &format!("{args:?} after SIGINT"),
    );
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}
