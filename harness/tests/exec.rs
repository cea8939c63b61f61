//! `vloop-harness exec` in real guests (TCG on machines without a usable KVM): exit statuses
//! come back exactly, output streams while the command runs, files round-trip, read-only
//! disks refuse writes, several disks each get their own backend and keep their data apart,
//! and a backend that dies fails the run with its log; and
//! `exec_with`'s hooks, as a library.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{build_vloop_blk, guests_can_boot, run_harness, spawn_harness};
use vloop_harness::exec::ExecReport;
use vloop_harness::{exec_with, ExecHooks, ExecOptions};

#[test]
fn exit_statuses_come_back_exactly() {
    if !guests_can_boot() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    for code in [0, 1, 42] {
        let cmd = format!("exit {code}");
        let r = run_harness(
            &["exec", "--results", ".", "--", "sh", "-c", &cmd],
            t.path(),
        );
        assert_eq!(r.code, Some(code), "exec -- sh -c '{cmd}': {}", r.stderr);
        assert!(
            r.stderr.contains(&format!("exit status {code} ")) && r.stderr.contains("; accel "),
            "no summary line: {}",
            r.stderr
        );
    }
    let r = run_harness(
        &["exec", "--results", ".", "--", "no-such-program"],
        t.path(),
    );
    assert_eq!(r.code, Some(127), "{}", r.stderr);
    assert!(r.stderr.contains("no-such-program"), "{}", r.stderr);
}

#[test]
fn output_streams_while_the_command_runs() {
    if !guests_can_boot() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mut child = spawn_harness(
        &[
            "exec",
            "--results",
            ".",
            "--",
            "sh",
            "-c",
            "echo first; sleep 3; echo second >&2; echo third",
        ],
        t.path(),
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let first_at = Instant::now();
    let third = lines.next().unwrap().unwrap();
    let third_at = Instant::now();
    assert!(lines.next().is_none());
    let st = child.wait().unwrap();
    let exit_at = Instant::now();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(st.success(), "{stderr}");
    assert_eq!((first.as_str(), third.as_str()), ("first", "third"));
    assert!(stderr.contains("second\n"), "{stderr}");
    assert!(
        third_at - first_at >= Duration::from_millis(2500),
        "the first line came only {:?} before the last: output was not streamed",
        third_at - first_at
    );
    assert!(exit_at - first_at >= Duration::from_millis(2500));
}

#[test]
fn files_round_trip_byte_for_byte_also_when_the_command_fails() {
    if !guests_can_boot() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(t.path().join("in.bin"), &data).unwrap();
    std::fs::create_dir(t.path().join("back")).unwrap();
    let r = run_harness(
        &[
            "exec",
            "--results",
            ".",
            "--copy-in",
            "in.bin:/tmp/",
            "--copy-out",
            "/root/out.bin:back/",
            "--copy-out",
            "/root/tree:back/tree",
            "--",
            "sh",
            "-c",
            "cp /tmp/in.bin out.bin && mkdir -p tree/a && echo deep > tree/a/f && exit 3",
        ],
        t.path(),
    );
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    let back = std::fs::read(t.path().join("back/out.bin")).unwrap();
    assert!(back == data, "the copy differs from the original");
    assert_eq!(
        std::fs::read_to_string(t.path().join("back/tree/a/f")).unwrap(),
        "deep\n"
    );
}

#[test]
fn a_read_only_disk_refuses_writes_in_the_guest() {
    if !guests_can_boot() {
        return;
    }
    build_vloop_blk();
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("ro.img");
    ext2_with_hello(&img, "hello\n");
    let before = std::fs::read(&img).unwrap();
    let r = run_harness(
        &[
            "exec",
            "--results",
            ".",
            "--disk",
            "ro.img,ro",
            "--mount",
            "0:/mnt",
            "--",
            "sh",
            "-c",
            "cat /sys/block/vda/ro; cat /mnt/hello.txt; echo x > /mnt/new.txt && echo WROTE; \
             dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync && echo WROTE",
        ],
        t.path(),
    );
    assert!(
        r.stdout.starts_with("1\nhello\n"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    assert!(
        !r.stdout.contains("WROTE"),
        "a write succeeded: {}",
        r.stdout
    );
    assert!(r.stderr.contains("Read-only file system"), "{}", r.stderr);
    assert_ne!(r.code, Some(0));
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
}

#[test]
fn exec_with_uses_the_callers_set_up_and_backend_and_hands_over_pids_and_lines() {
    use vloop_frontend::backend::{which, Program};
    use vloop_harness::backend::Backend;
    use vloop_harness::setup::{Env, SetupOptions};

    if !guests_can_boot() {
        return;
    }
    // O_DIRECT needs a file system that has it (tmpfs may not): the image goes under /var/tmp.
    let t = tempfile::Builder::new()
        .prefix("vloop-exec-with")
        .tempdir_in("/var/tmp")
        .unwrap();
    let env = Env::prepare(&SetupOptions::default()).unwrap();
    let opts = exec_options(
        &[format!("{},size=1M", t.path().join("d.img").display())],
        t.path(),
        "echo one; printf 'two\\nthr'; sleep 1; echo ee; cat /sys/block/vda/size",
    );
    let qsd = Backend::program(Program::Qsd {
        bin: which("qemu-storage-daemon").unwrap(),
        iothread: true,
    })
    .with_direct(true);
    let (report, backends, lines) = exec_collecting(&opts, Some(&env), Some(qsd));
    assert_eq!(report.status, 0, "{:?}", report.error);
    assert_eq!(report.accel, env.accel_line());
    // The lines as the command wrote them, the one split across writes put back together.
    assert_eq!(lines, ["one", "two", "three", "2048"]);
    assert_eq!(backends.len(), 1, "{backends:?}");
    let c = &backends[0].1;
    assert!(
        c.contains("qemu-storage-daemon")
            && c.contains("iothread=iothread0")
            && c.contains("cache.direct=on"),
        "{backends:?}"
    );
}

#[test]
fn several_disks_each_with_its_own_backend_keep_their_data_apart() {
    if !guests_can_boot() {
        return;
    }
    build_vloop_blk();
    let t = tempfile::tempdir().unwrap();
    let p = |name: &str| t.path().join(name);
    let images = vloop_harness::images::Images::default();
    // vda: a raw image created by the run, served on two queues. vdb: a qcow2 overlay over a
    // raw base of known bytes. vdc: an ext2 image, read-only.
    let base: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(p("base.img"), &base).unwrap();
    images.overlay(&p("b.qcow2"), "base.img", 8 << 20).unwrap();
    ext2_with_hello(&p("c.img"), "hello from vdc\n");
    let c_before = std::fs::read(p("c.img")).unwrap();
    let head_sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&base[..65536]));
    let disks = [
        format!("{},size=4M,queues=2", p("a.img").display()),
        p("b.qcow2").display().to_string(),
        format!("{},ro", p("c.img").display()),
    ];
    let opts = ExecOptions {
        mounts: vec!["2:/mnt".parse().unwrap()],
        cpus: 2,
        ..exec_options(
            &disks,
            t.path(),
            "cat /sys/block/vda/size /sys/block/vdb/size /sys/block/vdc/size; \
             ls /sys/block/vda/mq; \
             printf on-vda | dd of=/dev/vda bs=1 seek=4096 conv=notrunc,fsync 2>/dev/null; \
             printf on-vdb | dd of=/dev/vdb bs=1 seek=70000 conv=notrunc,fsync 2>/dev/null; \
             dd if=/dev/vdb bs=65536 count=1 2>/dev/null | sha256sum; \
             cat /mnt/hello.txt",
        )
    };
    let (report, pids, lines) = exec_collecting(&opts, None, None);
    assert_eq!(report.status, 0, "{:?}", report.error);
    assert_eq!(
        lines,
        [
            "8192".to_string(),
            "16384".to_string(),
            "16384".to_string(),
            "0".to_string(),
            "1".to_string(),
            format!("{head_sum}  -"),
            "hello from vdc".to_string(),
        ],
        "sizes, vda's queues, vdb's first 64 KiB read through the overlay, vdc's file"
    );
    // One vloop-blk process per disk, each serving its own image.
    assert_eq!(pids.len(), 3, "{pids:?}");
    let mut distinct: Vec<u32> = pids.iter().map(|(pid, _)| *pid).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{pids:?}");
    for ((_, cmdline), image) in pids.iter().zip(["a.img", "b.qcow2", "c.img"]) {
        assert!(
            cmdline.contains("vloop-blk") && cmdline.contains(image),
            "{pids:?}"
        );
    }
    // On the host: each write landed in its own image and nowhere else.
    let a = std::fs::read(p("a.img")).unwrap();
    assert_eq!(a.len(), 4 << 20);
    assert_eq!(&a[4096..4102], b"on-vda");
    assert!(a[..4096].iter().chain(&a[4102..]).all(|&b| b == 0));
    let b = vloop_harness::images::open_qcow2(&p("b.qcow2")).unwrap();
    let mut got = vec![0u8; base.len()];
    b.read_at(&mut got, 0).unwrap();
    assert_eq!(&got[70_000..70_006], b"on-vdb");
    assert!(got[..70_000] == base[..70_000] && got[70_006..] == base[70_006..]);
    assert!(
        std::fs::read(p("base.img")).unwrap() == base,
        "the base changed"
    );
    assert!(
        std::fs::read(p("c.img")).unwrap() == c_before,
        "vdc changed"
    );
}

/// An 8 MiB ext2 image at `img` holding `hello.txt` with `text` (its tree beside it).
fn ext2_with_hello(img: &std::path::Path, text: &str) {
    let tree = img.with_extension("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("hello.txt"), text).unwrap();
    vloop_harness::images::Images::default()
        .ext2(img, &tree, 8 << 20)
        .unwrap();
}

/// `exec` options for `disks` (as `--disk` takes them) that run `sh -c command` on one vCPU
/// with vloop-blk, results under `results`.
fn exec_options(disks: &[String], results: &std::path::Path, command: &str) -> ExecOptions {
    ExecOptions {
        disks: disks.iter().map(|d| d.parse().unwrap()).collect(),
        copy_in: vec![],
        copy_out: vec![],
        mounts: vec![],
        console: false,
        backend: vloop_harness::backend::BackendKind::Vloop,
        backend_bin: None,
        backend_cmd: None,
        setup: vloop_harness::setup::SetupOptions::default(),
        cpus: 1,
        timeout: None,
        results: Some(results.to_path_buf()),
        keep: false,
        command: vec!["sh".into(), "-c".into(), command.into()],
    }
}

/// `exec_with(opts)` on `env` and `backend` (`None`: its own): its report, each backend's
/// PID and command line as they listened, and the command's stdout lines.
fn exec_collecting(
    opts: &ExecOptions,
    env: Option<&vloop_harness::setup::Env>,
    backend: Option<vloop_harness::backend::Backend>,
) -> (ExecReport, Vec<(u32, String)>, Vec<String>) {
    let backends = Arc::new(Mutex::new(Vec::new()));
    let b2 = backends.clone();
    let mut on_backends = move |pids: &[u32]| {
        for &pid in pids {
            let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            b2.lock()
                .unwrap()
                .push((pid, String::from_utf8_lossy(&c).replace('\0', " ")));
        }
    };
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l2 = lines.clone();
    let report = exec_with(
        opts,
        ExecHooks {
            env,
            backend,
            on_backends: Some(&mut on_backends),
            on_stdout_line: Some(Box::new(move |l: &str| {
                l2.lock().unwrap().push(l.to_string())
            })),
        },
    );
    let backends = std::mem::take(&mut *backends.lock().unwrap());
    let lines = std::mem::take(&mut *lines.lock().unwrap());
    (report, backends, lines)
}

/// The rest of a child's stdout, kept open while the test runs.
type Stdout = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// `vloop-harness exec OPTIONS -- sh -c 'echo ready; sleep 120'` in `dir`, returned once the
/// command has printed `ready` (with the rest of its stdout; stderr still piped).
fn exec_until_ready(options: &[&str], dir: &std::path::Path) -> (std::process::Child, Stdout) {
    let mut args = vec!["exec"];
    args.extend(options);
    args.extend(["--", "sh", "-c", "echo ready; sleep 120"]);
    let mut child = spawn_harness(&args, dir);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    (child, lines)
}

#[test]
fn a_backend_that_dies_fails_the_run_with_its_log() {
    if !guests_can_boot() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let pidfile = t.path().join("backend.pid");
    std::fs::write(t.path().join("d.img"), vec![0u8; 1 << 20]).unwrap();
    let template = format!(
        "sh -c 'echo backend-marker pid $$ >&2; echo $$ > {}; exec qemu-storage-daemon --blockdev driver=file,node-name=f,filename=$1 --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$2,writable=on' sh {{image}} {{socket}}",
        pidfile.display()
    );
    let (mut child, _stdout) = exec_until_ready(
        &[
            "--results",
            ".",
            "--disk",
            "d.img",
            "--backend-cmd",
            &template,
        ],
        t.path(),
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(st.code(), Some(125), "{stderr}");
    assert!(
        killed_at.elapsed() < Duration::from_secs(30),
        "the harness took {:?} to notice",
        killed_at.elapsed()
    );
    assert!(stderr.contains("backend of disk 0 exited"), "{stderr}");
    assert!(
        stderr.contains(&format!("backend-marker pid {pid}")),
        "the backend's log is not in the message: {stderr}"
    );
    assert!(stderr.contains("logs kept in"), "{stderr}");
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

#[test]
fn ctrl_c_stops_the_guest_and_backends_and_removes_what_the_run_created() {
    if !guests_can_boot() {
        return;
    }
    build_vloop_blk();
    let t = tempfile::tempdir().unwrap();
    let runs = t.path().join("runs");
    let (mut child, _stdout) = exec_until_ready(
        &[
            "--results",
            runs.to_str().unwrap(),
            "--disk",
            "scratch.img,size=16M",
        ],
        t.path(),
    );
    let dir = t.path().to_string_lossy().into_owned();
    assert!(
        processes_mentioning(&dir).len() >= 2,
        "QEMU and the backend should be running"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let st = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(st.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    assert!(
        processes_mentioning(&dir).is_empty(),
        "left running: {:?}",
        processes_mentioning(&dir)
    );
    assert!(
        !t.path().join("scratch.img").exists(),
        "the image the run created is still there"
    );
    let left: Vec<_> = std::fs::read_dir(&runs).unwrap().flatten().collect();
    assert!(left.is_empty(), "the run's folder is still there: {left:?}");
}
