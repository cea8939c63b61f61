//! Shared set-up of the integration tests: an image, a backend process, a connected client;
//! and the vloop-bench binary run with a JSON report, whose chart `svg` reads back.

#![allow(dead_code)]

pub mod svg;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vloop_frontend::backend::{
    on_path, BackendProcess, BackendSpec, Export as ExportSpec, Program,
};
use vloop_frontend::skip::skip;
use vloop_frontend::{Client, ClientOptions};

/// Image size used by the tests.
pub const IMAGE_SIZE: u64 = 16 << 20;

/// A running export with its files; the daemon is killed when this is dropped.
pub struct Export {
    pub daemon: BackendProcess,
    pub image: PathBuf,
    _dir: tempfile::TempDir,
}

/// The vloop-blk binary beside this test's target directory, if it was built.
pub fn vloop_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VLOOP_BLK_BIN") {
        return Some(PathBuf::from(p));
    }
    vloop_frontend::backend::sibling_binary("vloop-blk")
}

/// Whether `bin --print-capabilities` prints the vhost-user backend JSON.
fn prints_capabilities(bin: &Path) -> bool {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new(bin)
        .arg("--print-capabilities")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    status.is_some_and(|s| s.success()) && out.contains("\"type\"")
}

/// The backend to test, or None (with a visible message) when it is unavailable.
pub fn backend(which: &str) -> Option<Program> {
    match which {
        "qsd" => {
            if on_path("qemu-storage-daemon") {
                Some(Program::qsd())
            } else {
                skip("qemu-storage-daemon is not installed (apt-get install qemu-system-x86)");
                None
            }
        }
        _ => match vloop_bin() {
            Some(p) if !prints_capabilities(&p) => {
                skip(&format!(
                    "{} does not answer --print-capabilities (not a working vloop-blk build yet)",
                    p.display()
                ));
                None
            }
            Some(p) => Some(Program::Vloop(p)),
            None => {
                skip("vloop-blk is not built in this target dir (cargo build -p vloop-blk) and VLOOP_BLK_BIN is unset");
                None
            }
        },
    }
}

/// Creates an image whose sector n begins with the bytes of n, and exports it.
pub fn export(backend: Program, queues: u16) -> Export {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let mut data = vec![0u8; IMAGE_SIZE as usize];
    for (n, sector) in data.chunks_mut(512).enumerate() {
        sector[..8].copy_from_slice(&(n as u64).to_le_bytes());
    }
    std::fs::write(&image, &data).expect("write image");
    let socket = dir.path().join("blk.sock");
    let spec = BackendSpec::new(
        backend,
        ExportSpec {
            queues,
            ..ExportSpec::new(&image, &socket)
        },
    );
    let daemon = BackendProcess::spawn(&spec, &dir.path().join("blk.log"), Duration::from_secs(10))
        .expect("start backend");
    Export {
        daemon,
        image,
        _dir: dir,
    }
}

/// Connects a client with default options (and `queues` queues).
pub fn connect(socket: &Path, queues: Option<u16>) -> Client {
    let opts = ClientOptions {
        queues,
        ..ClientOptions::default()
    };
    Client::connect(socket, &opts).expect("connect client")
}

/// A recognisable 4 KiB pattern derived from `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The vloop-bench binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vloop-bench");

/// What a vloop-bench run that succeeded printed, and its JSON report.
pub struct Ran {
    /// Standard output.
    pub stdout: String,
    /// Standard error (the progress lines).
    pub stderr: String,
    /// The `--json` report.
    pub json: serde_json::Value,
}

/// `vloop-bench ARGS --image DIR/img --vloop-bin VLOOP`.
pub fn bench_on_image(dir: &Path, vloop: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--image")
        .arg(dir.join("img"))
        .arg("--vloop-bin")
        .arg(vloop);
    cmd
}

/// Runs `cmd` with `--json DIR/report.json`; asserts that it succeeds; returns what it
/// printed and the report.
pub fn run_json(mut cmd: Command, dir: &Path) -> Ran {
    let json = dir.join("report.json");
    let out = cmd
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run vloop-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let text = std::fs::read(&json).expect("the JSON report");
    let json = serde_json::from_slice(&text).expect("JSON");
    Ran {
        stdout,
        stderr,
        json,
    }
}

/// The entry of target `name` in the list `list` (`backends`, `images`) of a JSON report.
pub fn by_target<'a>(v: &'a serde_json::Value, list: &str, name: &str) -> &'a serde_json::Value {
    v[list]
        .as_array()
        .unwrap_or_else(|| panic!("no list {list} in {v}"))
        .iter()
        .find(|b| b["target"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}: {}", v[list]))
}
