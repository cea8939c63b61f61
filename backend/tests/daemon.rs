//! End-to-end tests of the `vloop-blk` binary: a vhost-user frontend (vhost's `Frontend`)
//! negotiates features, reads the config space, does real I/O through a vring in shared memory,
//! disconnects and reconnects; plus the command-line error paths and SIGTERM.

use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const BIN: &str = env!("CARGO_BIN_EXE_vloop-blk");
const TIMEOUT: Duration = Duration::from_secs(20);

mod common;

use common::{image, start, wait_exit};
use vloop_frontend::blk::CONFIG_LEN;
fn connect(socket: &Path) -> Frontend {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(stream) => {
                // Every reply must come within the time-out: a test never hangs.
                stream.set_read_timeout(Some(TIMEOUT)).unwrap();
                stream.set_write_timeout(Some(TIMEOUT)).unwrap();
                return Frontend::from_stream(stream, 2);
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn negotiate(f: &mut Frontend) -> u64 {
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    f.set_features(features).unwrap();
    let proto = f.get_protocol_features().unwrap();
    assert!(proto.contains(
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
    ));
    f.set_protocol_features(proto).unwrap();
    features
}

fn capacity(f: &mut Frontend) -> u64 {
    let (_, cfg) = f
        .get_config(
            0,
            CONFIG_LEN,
            VhostUserConfigFlags::WRITABLE,
            &[0u8; CONFIG_LEN as usize],
        )
        .unwrap();
    u64::from_le_bytes(cfg[0..8].try_into().unwrap())
}

fn wait_readable(fd: &EventFd) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, TIMEOUT.as_millis() as i32) };
    assert_eq!(r, 1, "no used-buffer notification within the time-out");
    fd.read().unwrap();
}

const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x3000;
const DATA: u64 = 0x4000;
const STATUS: u64 = 0x5000;
const QSIZE: u16 = 16;

/// A guest: shared memory plus one vring, driven by hand.
struct Guest {
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    next: u16,
}

impl Guest {
    fn attach(f: &mut Frontend) -> Guest {
        let memfd =
            nix::sys::memfd::memfd_create(c"guest", nix::sys::memfd::MemFdCreateFlag::empty())
                .unwrap();
        let file = File::from(memfd);
        file.set_len(0x10_0000).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            0x10_0000,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let region = mem.find_region(GuestAddress(0)).unwrap();
        f.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
            .unwrap();
        f.set_vring_num(0, QSIZE).unwrap();
        f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host + DESC,
                used_ring_addr: host + USED,
                avail_ring_addr: host + AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
        f.set_vring_base(0, 0).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(0).unwrap();
        f.set_vring_call(0, &call).unwrap();
        f.set_vring_kick(0, &kick).unwrap();
        f.set_vring_enable(0, true).unwrap();
        Guest {
            mem,
            kick,
            call,
            next: 0,
        }
    }

    /// Submit one request (header, one data buffer, status) and wait for its completion.
    fn request(&mut self, t: u32, sector: u64, len: u32, device_writes: bool) -> (u8, u32) {
        let m = &self.mem;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let (next, write) = (1u16, 2u16);
        let descs: [(u64, u32, u16, u16); 3] = [
            (HDR, 16, next, 1),
            (DATA, len, next | if device_writes { write } else { 0 }, 2),
            (STATUS, 1, write, 0),
        ];
        for (i, (addr, l, flags, nx)) in descs.iter().enumerate() {
            let at = DESC + 16 * i as u64;
            m.write_obj(*addr, GuestAddress(at)).unwrap();
            m.write_obj(*l, GuestAddress(at + 8)).unwrap();
            m.write_obj(*flags, GuestAddress(at + 12)).unwrap();
            m.write_obj(*nx, GuestAddress(at + 14)).unwrap();
        }
        let slot = u64::from(self.next % QSIZE);
        m.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        // EVENT_IDX is negotiated: ask for a notification once the used index passes the
        // current one (used_event sits right after the avail ring).
        m.write_obj(self.next, GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE)))
            .unwrap();
        self.next = self.next.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        m.write_obj(self.next, GuestAddress(AVAIL + 2)).unwrap();
        self.kick.write(1).unwrap();
        // A notification may come before this request completed (the backend signals a call
        // eventfd as soon as it is set): wait until the used index says it did.
        let deadline = Instant::now() + TIMEOUT;
        loop {
            wait_readable(&self.call);
            let used_idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
            if used_idx == self.next {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "used index {used_idx}, expected {}",
                self.next
            );
        }
        let used_len: u32 = m.read_obj(GuestAddress(USED + 4 + 8 * slot + 4)).unwrap();
        (m.read_obj(GuestAddress(STATUS)).unwrap(), used_len)
    }
}

#[test]
fn serves_io_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 4 << 20);
    let sock = dir.path().join("blk.sock");
    let mut d = start(&img, &sock, &["--num-queues", "2"]);
    let mode = fs::metadata(&sock).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    let mut f = connect(&sock);
    let features = negotiate(&mut f);
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1");
    assert_ne!(features & (1 << 9), 0, "VIRTIO_BLK_F_FLUSH");
    assert_ne!(features & (1 << 13), 0, "VIRTIO_BLK_F_DISCARD");
    assert_eq!(f.get_queue_num().unwrap(), 2);
    assert_eq!(capacity(&mut f), (4 << 20) / 512);
    let (_, part) = f
        .get_config(34, 2, VhostUserConfigFlags::WRITABLE, &[0u8; 2])
        .unwrap();
    assert_eq!(part, 2u16.to_le_bytes());

    let mut g = Guest::attach(&mut f);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
    g.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(g.request(1, 8, 4096, false), (0, 1), "write");
    g.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(g.request(0, 8, 4096, true), (0, 4097), "read");
    let mut back = vec![0u8; 4096];
    g.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
    assert_eq!(g.request(4, 0, 0, false).0, 0, "flush");
    // Past the end: IOERR, and the daemon keeps going.
    assert_eq!(g.request(0, (4 << 20) / 512, 512, true).0, 1);
    let on_disk = fs::read(&img).unwrap();
    assert_eq!(&on_disk[4096..8192], &pattern[..]);

    // Disconnect; the daemon serves the next frontend.
    drop(g);
    drop(f);
    let mut f = connect(&sock);
    negotiate(&mut f);
    assert_eq!(capacity(&mut f), (4 << 20) / 512);
    drop(f);

    // SIGTERM: clean exit, socket removed.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_exit(&mut d);
    assert!(status.success(), "exit status {status}");
    assert!(!sock.exists());
}

fn run(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vloop-blk {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn last_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn command_line_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("s.sock");
    let s = sock.to_str().unwrap();

    let o = run(&["--print-capabilities"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["type"], "block");

    let missing = d.join("missing.img");
    let o = run(&["--socket-path", s, "--blk-file", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let line = last_line(&o);
    assert!(line.starts_with("error: cannot open image"), "{line}");
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));

    let img = image(d, 1 << 20);
    let imgs = img.to_str().unwrap();
    let o = run(&[
        "--socket-path",
        s,
        "--blk-file",
        imgs,
        "--logical-block-size",
        "1000",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        last_line(&o).contains("--logical-block-size 1000"),
        "{}",
        last_line(&o)
    );

    let o = run(&["--socket-path", s, "--blk-file", imgs, "--num-queues", "0"]);
    assert_eq!(o.status.code(), Some(1));

    // A served image cannot be served twice; a live socket is not stolen.
    let _first = start(&img, &sock, &[]);
    let sock2 = d.join("other.sock");
    let o = run(&["--socket-path", sock2.to_str().unwrap(), "--blk-file", imgs]);
    assert_eq!(o.status.code(), Some(1));
    assert!(last_line(&o).contains("in use"), "{}", last_line(&o));
    let img2 = d.join("disk2.img");
    File::create(&img2).unwrap().set_len(1 << 20).unwrap();
    let o = run(&["--socket-path", s, "--blk-file", img2.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        last_line(&o).contains("is in use by a running backend"),
        "{}",
        last_line(&o)
    );
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let img = image(dir.path(), 1 << 20);
    let _d = start(&img, &sock, &[]);
    let mut f = connect(&sock);
    negotiate(&mut f);
    assert_eq!(capacity(&mut f), 2048);
}

#[test]
fn serves_an_inherited_listening_fd() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let sock = dir.path().join("fd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(BIN);
    cmd.args(["--fd", "3", "--blk-file"])
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe dup2 runs between fork and exec; it gives the child the
    // listening socket as fd 3 without FD_CLOEXEC.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _d = vloop_frontend::process::ChildGuard::new(cmd.spawn().unwrap(), "vloop-blk");
    // The daemon owns the socket now; our copy only keeps the path alive.
    let mut f = connect(&sock);
    negotiate(&mut f);
    assert_eq!(capacity(&mut f), 2048);

    // A descriptor that is not a listening socket is refused.
    let o = run(&["--fd", "0", "--blk-file", "/dev/null"]);
    assert_eq!(o.status.code(), Some(1));
}

/// Read one CONFIG_CHANGE_MSG off the backend request channel and acknowledge it when asked.
fn expect_config_change(chan: &mut std::os::unix::net::UnixStream) {
    use std::io::{Read, Write};
    let mut hdr = [0u8; 12];
    chan.read_exact(&mut hdr)
        .expect("no CONFIG_CHANGE_MSG on the backend request channel");
    let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
    let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
    assert_eq!(code, 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG");
    assert_eq!(flags & 0x3, 1, "version 1");
    assert_eq!(size, 0);
    if flags & 0x8 != 0 {
        let mut reply = Vec::new();
        reply.extend_from_slice(&2u32.to_le_bytes());
        reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&0u64.to_le_bytes());
        chan.write_all(&reply).unwrap();
    }
}

fn sighup(d: &vloop_frontend::backend::BackendProcess) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

/// Grow and shrink the image under a connected frontend; SIGHUP makes the daemon adopt the
/// new size, announce it on the backend request channel, report it in GET_CONFIG and
/// serve exactly the new range.
fn resize_on_sighup(extra: &[&str]) {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 4 * MIB);
    let sock = dir.path().join("blk.sock");
    let mut d = start(&img, &sock, extra);
    let mut f = connect(&sock);
    negotiate(&mut f);
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(TIMEOUT)).unwrap();
    f.set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    let mut g = Guest::attach(&mut f);
    assert_eq!(capacity(&mut f), 4 * MIB / 512);
    assert_eq!(g.request(0, 6 * MIB / 512, 512, true).0, 1, "past the end");

    // Grow to 8 MiB with data in the new part.
    let file = fs::OpenOptions::new().write(true).open(&img).unwrap();
    file.set_len(8 * MIB).unwrap();
    let pattern: Vec<u8> = (0..512u32).map(|i| (i % 251) as u8 + 1).collect();
    file.write_all_at(&pattern, 6 * MIB).unwrap();
    sighup(&d);
    expect_config_change(&mut ours);
    assert_eq!(capacity(&mut f), 8 * MIB / 512);
    assert_eq!(
        g.request(0, 6 * MIB / 512, 512, true),
        (0, 513),
        "read grown part"
    );
    let mut back = vec![0u8; 512];
    g.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);

    // Shrink to 2 MiB: past the new end fails cleanly, before it still works.
    file.set_len(2 * MIB).unwrap();
    sighup(&d);
    expect_config_change(&mut ours);
    assert_eq!(capacity(&mut f), 2 * MIB / 512);
    assert_eq!(
        g.request(0, 3 * MIB / 512, 512, true).0,
        1,
        "past the new end"
    );
    assert_eq!(
        g.request(0, 2 * MIB / 512 - 1, 512, true).0,
        0,
        "last sector"
    );

    // SIGHUP with an unchanged size is harmless and still announced.
    sighup(&d);
    expect_config_change(&mut ours);
    assert_eq!(capacity(&mut f), 2 * MIB / 512);

    drop(g);
    drop(f);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(wait_exit(&mut d).success());
}

#[test]
fn sighup_announces_a_resized_image() {
    resize_on_sighup(&[]);
}

#[test]
fn sighup_announces_a_resized_read_only_image() {
    resize_on_sighup(&["--read-only"]);
}
