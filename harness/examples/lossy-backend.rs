//! A deliberately broken vhost-user-blk backend, for proving that the harness fails when
//! writes are lost: it takes `vloop-blk`'s command line (`--socket-path S --blk-file F
//! [--read-only] [--num-queues N]`, and `--writable on|off` for templates), copies F to a
//! scratch file beside it (`F.lossy-scratch`), and becomes `qemu-storage-daemon` serving the
//! scratch copy (a file named `*.qcow2` as a qcow2 image over its backing file, as vloop-blk
//! serves it). Every write is acknowledged to the guest and none of them ever reaches F;
//! reads and the read-only flag are right, so read-only scenarios pass.
//!
//! Run the harness with `--backend-bin <this program>` (the vloop convention), or
//! `--backend-cmd '<this program> --socket-path {socket} --blk-file {image} --writable
//! {writable} --num-queues {queues}'`.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let mut sock = None;
    let mut file = None;
    let mut queues = "1".to_string();
    let mut writable = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket-path" => sock = args.next(),
            "--blk-file" => file = args.next(),
            "--num-queues" => queues = args.next().unwrap_or_else(|| "1".into()),
            "--read-only" => writable = false,
            "--writable" => writable = args.next().as_deref() != Some("off"),
            other => {
                eprintln!("error: lossy-backend: unknown argument {other}");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(sock), Some(file)) = (sock, file) else {
        eprintln!("error: lossy-backend needs --socket-path S --blk-file F");
        return ExitCode::from(2);
    };
    let scratch = PathBuf::from(format!("{file}.lossy-scratch"));
    if let Err(e) = std::fs::copy(&file, &scratch) {
        eprintln!("error: lossy-backend: copy {file}: {e}");
        return ExitCode::from(1);
    }
    eprintln!("lossy-backend: serving a scratch copy of {file}; writes never reach it");
    let esc = |s: &str| s.replace(',', ",,");
    let mut qsd = Command::new("qemu-storage-daemon");
    qsd.arg("--blockdev").arg(format!(
        "driver=file,node-name=f,filename={},discard=unmap",
        esc(&scratch.to_string_lossy())
    ));
    // The copy sits beside F, so a relative backing file name resolves to F's backing file.
    let node = if file.ends_with(".qcow2") {
        qsd.arg("--blockdev")
            .arg("driver=qcow2,node-name=q,file=f,discard=unmap");
        "q"
    } else {
        "f"
    };
    // exec: the harness's SIGTERM (and Drop guard's SIGKILL) reach qemu-storage-daemon itself.
    let e = qsd
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name={node},addr.type=unix,addr.path={},writable={},num-queues={queues}",
            esc(&sock),
            if writable { "on" } else { "off" }
        ))
        .exec();
    eprintln!("error: lossy-backend: cannot run qemu-storage-daemon: {e}");
    ExitCode::from(1)
}
