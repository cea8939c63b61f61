//! QEMU smoke test: a real `qemu-system-x86_64` (TCG, no guest kernel) completes the
//! vhost-user handshake with `vloop-blk`, the firmware reads the disk through it, and the
//! device shows up in `info qtree`. Skipped, visibly, when QEMU is not installed.

use std::fs::File;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const TIMEOUT: Duration = Duration::from_secs(60);

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_handshake_and_firmware_read() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        vloop_frontend::skip::skip("qemu-system-x86_64 is not installed (ci/setup installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let sock = dir.path().join("blk.sock");
    let mut daemon = common::start(&img, &sock, &[]);
    let log = daemon.log().to_path_buf();

    let mut qemu = Kill(
        Command::new("qemu-system-x86_64")
            .args([
                "-accel", "tcg", "-m", "128", "-smp", "1", "-display", "none",
            ])
            .args(["-serial", "none", "-monitor", "stdio", "-no-reboot"])
            .args(["-object", "memory-backend-memfd,id=mem,size=128M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=c0,path={}", sock.display()))
            .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Give the firmware time to probe the disk, then look and quit.
    std::thread::sleep(Duration::from_secs(4));
    let mut stdin = qemu.0.stdin.take().unwrap();
    writeln!(stdin, "info qtree").unwrap();
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    let deadline = Instant::now() + TIMEOUT;
    while qemu.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "QEMU did not quit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    qemu.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    qemu.0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        out.contains("vhost-user-blk"),
        "device missing from info qtree: {out}\n{err}"
    );

    // The daemon saw the connection, served the firmware's reads, and is still running.
    let deadline = Instant::now() + TIMEOUT;
    let text = loop {
        let t = std::fs::read_to_string(&log).unwrap();
        if t.contains("frontend disconnected") && t.contains("requests") {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "no disconnect in the daemon log:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(text.contains("frontend connected"), "{text}");
    assert!(
        !text.contains(" 0 requests"),
        "the firmware read nothing:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    assert!(daemon.is_running(), "the daemon exited:\n{text}");
}
