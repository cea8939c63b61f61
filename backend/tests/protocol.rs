//! Protocol-level tests: a hostile or broken vhost-user frontend against the real `vloop-blk`
//! binary, driven by the project's frontend client (`vloop_frontend::client`).
//!
//! Every test ends the same way: the daemon still serves a new, well-behaved connection, its
//! log shows no panic, and SIGTERM makes it exit 0.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VringConfigData};
use vloop_frontend::blk::{header, S_IOERR, S_OK, S_UNSUPP};
use vloop_frontend::client::STATUS_UNSET;
use vloop_frontend::{Client, ClientOptions, Descriptor, GuestMem, Request, RequestType};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const IMAGE_SIZE: u64 = 4 << 20;
const SECTORS: u64 = IMAGE_SIZE / 512;
const WAIT: Duration = Duration::from_secs(20);
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

fn opts() -> ClientOptions {
    ClientOptions {
        queue_size: 64,
        slots: 8,
        slot_data_size: 64 << 10,
        scratch_size: 64 << 10,
        timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

mod common;

use common::pattern;

use vloop_frontend::backend::BackendProcess;

/// A running `vloop-blk` (killed on drop), with the checks every test ends with.
struct Vloop(BackendProcess);

impl Vloop {
    fn command(image: &Path, socket: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(common::bin());
        c.arg("--socket-path")
            .arg(socket)
            .arg("--blk-file")
            .arg(image)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    }

    /// Starts the daemon and waits until it accepts connections.
    fn start(image: &Path, socket: &Path, extra: &[&str]) -> Vloop {
        let v = Vloop(common::start(image, socket, extra));
        let deadline = Instant::now() + WAIT;
        loop {
            let is_socket = std::fs::symlink_metadata(socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if is_socket && UnixStream::connect(socket).is_ok() {
                // That probe was a connection: the daemon serves it, sees it close and waits
                // for the next one.
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "vloop-blk did not listen within {WAIT:?}:\n{}",
                v.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        common::log(&self.0)
    }

    fn running(&mut self) -> bool {
        self.0.is_running()
    }

    /// A new, well-behaved connection: write, read back, flush.
    fn assert_serves(&mut self) {
        assert!(self.running(), "vloop-blk died:\n{}", self.log());
        let mut c = connect_retry(self.0.socket());
        common::serves(&mut c);
    }

    /// SIGTERM; the daemon must exit 0 within the time-out, with no panic in its log.
    fn finish(mut self) {
        self.assert_serves();
        let status = common::terminate(&mut self.0);
        let log = self.log();
        assert!(!log.contains("panicked"), "vloop-blk panicked:\n{log}");
        assert!(status.success(), "vloop-blk exited with {status}:\n{log}");
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects a client, retrying while the daemon finishes a previous connection.
fn connect_retry(socket: &Path) -> Client {
    let deadline = Instant::now() + WAIT;
    loop {
        match connect_timeout(socket, Duration::from_secs(5)) {
            Some(Ok(c)) => return c,
            Some(Err(e)) if Instant::now() > deadline => panic!("cannot connect: {e}"),
            None if Instant::now() > deadline => panic!("connection not served within {WAIT:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `Client::connect` in a thread, so that a daemon that never answers cannot hang the test.
fn connect_timeout(
    socket: &Path,
    timeout: Duration,
) -> Option<Result<Client, vloop_frontend::ClientError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let s = socket.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send(Client::connect(&s, &opts()));
    });
    rx.recv_timeout(timeout).ok()
}

struct Setup {
    dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let f = File::create(&image).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    let socket = dir.path().join("vloop.sock");
    Setup { dir, image, socket }
}

fn raw_frontend(socket: &Path) -> Frontend {
    let f = Frontend::connect(socket, 1).unwrap();
    f.set_owner().unwrap();
    f
}

fn negotiate(f: &mut Frontend) {
    let features = f.get_features().unwrap();
    let pf = f.get_protocol_features().unwrap();
    f.set_protocol_features(
        pf & (VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK),
    )
    .unwrap();
    f.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    f.set_features(features & ((1 << 32) | (1 << 30))).unwrap();
}

#[test]
fn kick_before_mem_table() {
    let s = setup();
    let d = Vloop::start(&s.image, &s.socket, &[]);
    {
        let mut f = raw_frontend(&s.socket);
        negotiate(&mut f);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        // Rings that point at memory the backend has never been given.
        let _ = f.set_vring_num(0, 64);
        let _ = f.set_vring_base(0, 0);
        let _ = f.set_vring_call(0, &call);
        let _ = f.set_vring_kick(0, &kick);
        kick.write(1).unwrap();
        let _ = f.set_vring_enable(0, true);
        kick.write(1).unwrap();
        let addr = VringConfigData {
            queue_max_size: 64,
            queue_size: 64,
            flags: 0,
            desc_table_addr: 0x1000,
            used_ring_addr: 0x3000,
            avail_ring_addr: 0x2000,
            log_addr: None,
        };
        assert!(
            f.set_vring_addr(0, &addr).is_err(),
            "ring addresses accepted without a memory table"
        );
        let _ = kick.write(1);
    }
    d.finish();
}

#[test]
fn vring_addresses_outside_the_memory_table() {
    let s = setup();
    let d = Vloop::start(&s.image, &s.socket, &[]);
    let mem = GuestMem::new(64 << 10).unwrap();
    let region = mem.region_info();
    let base = mem.host_base() as u64;
    let cases = [
        // Descriptor table beyond the end of the only region.
        (base + (1 << 30), base + 0x1000, base + 0x2000),
        // Used ring at an address no region maps.
        (base, base + 0x1000, 0x10),
        // Available ring just past the end.
        (base, base + mem.len(), base + 0x2000),
    ];
    for (desc, avail, used) in cases {
        let mut f = raw_frontend(&s.socket);
        negotiate(&mut f);
        f.set_mem_table(&[region]).unwrap();
        f.set_vring_num(0, 64).unwrap();
        f.set_vring_base(0, 0).unwrap();
        let r = f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 64,
                queue_size: 64,
                flags: 0,
                desc_table_addr: desc,
                used_ring_addr: used,
                avail_ring_addr: avail,
                log_addr: None,
            },
        );
        assert!(
            r.is_err(),
            "ring outside guest memory accepted: {desc:#x} {avail:#x} {used:#x}"
        );
    }
    // A ring whose start is mapped but whose end runs past the region, then kicked.
    {
        let mut f = raw_frontend(&s.socket);
        negotiate(&mut f);
        f.set_mem_table(&[region]).unwrap();
        f.set_vring_num(0, 256).unwrap();
        f.set_vring_base(0, 0).unwrap();
        let end = base + mem.len();
        let r = f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 256,
                queue_size: 256,
                flags: 0,
                desc_table_addr: end - 16,
                used_ring_addr: end - 8,
                avail_ring_addr: end - 4,
                log_addr: None,
            },
        );
        if r.is_ok() {
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            let _ = f.set_vring_call(0, &call);
            let _ = f.set_vring_kick(0, &kick);
            let _ = f.set_vring_enable(0, true);
            kick.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    d.finish();
}

#[test]
fn get_config_past_the_config_size() {
    let s = setup();
    let d = Vloop::start(&s.image, &s.socket, &[]);
    for (offset, size) in [(0x1000u32 - 4, 8u32), (0xffff_fff0, 32), (0x1000, 1)] {
        let mut c = connect_retry(&s.socket);
        let r = c.frontend().get_config(
            offset,
            size,
            VhostUserConfigFlags::empty(),
            &vec![0u8; size as usize],
        );
        assert!(
            r.is_err(),
            "GET_CONFIG {offset:#x}+{size} answered: {:?}",
            r.map(|(_, b)| b)
        );
    }
    // Inside the window, past the fields: zeroes, and the connection keeps serving.
    let mut c = connect_retry(&s.socket);
    let (_, bytes) = c
        .frontend()
        .get_config(0x100, 16, VhostUserConfigFlags::empty(), &[0u8; 16])
        .unwrap();
    assert_eq!(bytes, vec![0u8; 16]);
    let q = c.queue(0).unwrap();
    q.write(1, &pattern(1, 512)).unwrap();
    assert_eq!(q.read(1, 512).unwrap(), pattern(1, 512));
    drop(c);
    d.finish();
}

/// Writes one GET_FEATURES request on a raw socket.
fn send_get_features(sock: &mut UnixStream) {
    let mut m = Vec::new();
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    sock.write_all(&m).unwrap();
}

#[test]
fn second_client_waits_and_first_keeps_working() {
    let s = setup();
    let d = Vloop::start(&s.image, &s.socket, &[]);
    let mut first = connect_retry(&s.socket);
    let q = first.queue(0).unwrap();
    q.write(16, &pattern(2, 4096)).unwrap();

    let mut second = UnixStream::connect(&s.socket).unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    send_get_features(&mut second);
    let mut buf = [0u8; 20];
    match second.read(&mut buf) {
        Ok(0) => {} // refused
        Ok(n) => panic!("a second frontend was served ({n} bytes) while the first is connected"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }
    // The first one is unaffected.
    for i in 0..20u8 {
        let q = first.queue(0).unwrap();
        q.write(32 + u64::from(i), &pattern(i, 512)).unwrap();
        assert_eq!(q.read(32 + u64::from(i), 512).unwrap(), pattern(i, 512));
    }
    assert_eq!(
        first.queue(0).unwrap().read(16, 4096).unwrap(),
        pattern(2, 4096)
    );
    drop(first);
    // Once the first is gone, the queued one is served.
    second.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = 0;
    while got < 20 {
        let n = second.read(&mut buf[got..]).unwrap();
        assert!(n > 0, "the waiting frontend was dropped");
        got += n;
    }
    assert_eq!(u32::from_le_bytes(buf[0..4].try_into().unwrap()), 1);
    drop(second);
    d.finish();
}

#[test]
fn client_disconnects_mid_request() {
    let s = setup();
    let mut d = Vloop::start(&s.image, &s.socket, &[]);
    for round in 0..5u8 {
        let mut c = connect_retry(&s.socket);
        let q = c.queue(0).unwrap();
        for slot in 0..q.slots() {
            q.fill_slot(slot, &pattern(round ^ slot as u8, 64 << 10))
                .unwrap();
            q.submit_in(
                slot,
                if slot % 2 == 0 {
                    Request::Write {
                        sector: u64::from(slot) * 128,
                        len: 64 << 10,
                    }
                } else {
                    Request::Read {
                        sector: u64::from(slot) * 128,
                        len: 64 << 10,
                    }
                },
            )
            .unwrap();
        }
        q.kick().unwrap();
        // Gone before the completions arrive (memory stays mapped on this side).
        c.shutdown_socket();
        drop(c);
        assert!(d.running(), "vloop-blk died:\n{}", d.log());
    }
    d.finish();
}

/// Submits a raw chain from the scratch area and returns its status byte.
fn raw_status(q: &mut vloop_frontend::Queue, parts: &[(u64, u32, bool)], status_at: u64) -> u8 {
    q.mem().write(status_at, &[STATUS_UNSET]).unwrap();
    let head = q.push_chain(q.raw_desc_base(), parts);
    q.kick().unwrap();
    let used = q.next_used(Duration::from_secs(10)).unwrap();
    assert_eq!(used.id, u32::from(head));
    q.read_byte(status_at).unwrap()
}

#[test]
fn hostile_chains_get_the_right_status_and_the_queue_keeps_serving() {
    let s = setup();
    let d = Vloop::start(&s.image, &s.socket, &[]);
    let mut c = connect_retry(&s.socket);
    let q = c.queue(0).unwrap();
    let (scratch, scratch_len) = q.scratch();
    let hdr = scratch;
    let data = scratch + 4096;
    let st = scratch + 512;
    let put = |q: &mut vloop_frontend::Queue, kind, sector| {
        q.mem().write(hdr, &header(kind, sector)).unwrap();
    };
    q.write(0, &pattern(9, 4096)).unwrap();

    // A read whose data buffer is device-readable.
    put(q, RequestType::In, 0);
    let r = raw_status(
        q,
        &[(hdr, 16, false), (data, 512, false), (st, 1, true)],
        st,
    );
    assert_eq!(r, S_IOERR, "read with a device-readable buffer");
    // A write whose data buffer is device-writable.
    put(q, RequestType::Out, 0);
    let r = raw_status(q, &[(hdr, 16, false), (data, 512, true), (st, 1, true)], st);
    assert_eq!(r, S_IOERR, "write with a device-writable buffer");
    // A huge length (past guest memory).
    put(q, RequestType::In, 0);
    let r = raw_status(
        q,
        &[(hdr, 16, false), (data, 0xffff_fe00, true), (st, 1, true)],
        st,
    );
    assert_eq!(r, S_IOERR, "read of 4 GiB");
    // Past the capacity, and starting at it.
    put(q, RequestType::In, SECTORS - 1);
    let r = raw_status(
        q,
        &[(hdr, 16, false), (data, 1024, true), (st, 1, true)],
        st,
    );
    assert_eq!(r, S_IOERR, "read across the end");
    put(q, RequestType::Out, SECTORS);
    let r = raw_status(
        q,
        &[(hdr, 16, false), (data, 512, false), (st, 1, true)],
        st,
    );
    assert_eq!(r, S_IOERR, "write at the capacity");
    put(q, RequestType::In, u64::MAX);
    let r = raw_status(q, &[(hdr, 16, false), (data, 512, true), (st, 1, true)], st);
    assert_eq!(r, S_IOERR, "sector overflow");
    // Unknown type.
    put(q, RequestType::Other(0x4242), 0);
    let r = raw_status(q, &[(hdr, 16, false), (st, 1, true)], st);
    assert_eq!(r, S_UNSUPP, "unknown type");
    // Header too short.
    put(q, RequestType::In, 0);
    let r = raw_status(q, &[(hdr, 8, false), (st, 1, true)], st);
    assert_eq!(r, S_IOERR, "8-byte header");
    // Length not a multiple of 512.
    let r = raw_status(q, &[(hdr, 16, false), (data, 100, true), (st, 1, true)], st);
    assert_eq!(r, S_IOERR, "unaligned length");
    // Unaligned data buffer address with a valid length: served.
    let r = raw_status(
        q,
        &[(hdr, 16, false), (data + 3, 512, true), (st, 1, true)],
        st,
    );
    assert_eq!(r, S_OK, "unaligned buffer");

    // Chains without a usable status: completed with nothing written, queue goes on.
    let first = q.raw_desc_base();
    q.push_chain(first, &[(hdr, 16, false)]);
    q.kick().unwrap();
    let u = q.next_used(Duration::from_secs(10)).unwrap();
    assert_eq!((u.id, u.len), (u32::from(first), 0));
    q.push_chain(first, &[(hdr, 16, false), (1 << 40, 1, true)]);
    q.kick().unwrap();
    let u = q.next_used(Duration::from_secs(10)).unwrap();
    assert_eq!((u.id, u.len), (u32::from(first), 0));

    // A descriptor loop: the chain ends where virtio-queue detects the loop.
    let l = first;
    q.set_desc(
        l,
        Descriptor {
            addr: hdr,
            len: 16,
            flags: DESC_F_NEXT,
            next: l + 1,
        },
    );
    q.set_desc(
        l + 1,
        Descriptor {
            addr: data,
            len: 512,
            flags: DESC_F_NEXT | DESC_F_WRITE,
            next: l,
        },
    );
    q.push_avail(l);
    q.kick().unwrap();
    // Whatever the backend makes of it, it must not hang the queue.
    let _ = q.next_used(Duration::from_secs(5));

    // Nested indirect tables: an indirect table whose entry is itself indirect.
    let table = scratch + 8192;
    let raw_desc = |d: Descriptor| {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&d.addr.to_le_bytes());
        b.extend_from_slice(&d.len.to_le_bytes());
        b.extend_from_slice(&d.flags.to_le_bytes());
        b.extend_from_slice(&d.next.to_le_bytes());
        b
    };
    q.mem()
        .write(
            table,
            &raw_desc(Descriptor {
                addr: table,
                len: 16,
                flags: DESC_F_INDIRECT,
                next: 0,
            }),
        )
        .unwrap();
    q.set_desc(
        l,
        Descriptor {
            addr: table,
            len: 16,
            flags: DESC_F_INDIRECT,
            next: 0,
        },
    );
    q.push_avail(l);
    q.kick().unwrap();
    let _ = q.next_used(Duration::from_secs(5));
    // An indirect table of odd length.
    q.set_desc(
        l,
        Descriptor {
            addr: table,
            len: 17,
            flags: DESC_F_INDIRECT,
            next: 0,
        },
    );
    q.push_avail(l);
    q.kick().unwrap();
    let _ = q.next_used(Duration::from_secs(5));
    assert!(scratch_len >= 16 << 10);

    // The queue still serves ordinary requests, and the data is intact.
    assert_eq!(q.read(0, 4096).unwrap(), pattern(9, 4096));
    q.write(4, &pattern(3, 1024)).unwrap();
    assert_eq!(q.read(4, 1024).unwrap(), pattern(3, 1024));
    drop(c);
    d.finish();
}

#[test]
fn head_index_out_of_range_does_not_stop_the_daemon() {
    let s = setup();
    let mut d = Vloop::start(&s.image, &s.socket, &[]);
    {
        let mut c = connect_retry(&s.socket);
        let q = c.queue(0).unwrap();
        q.push_avail(0xfff0);
        q.kick().unwrap();
        let _ = q.next_used(Duration::from_secs(2));
    }
    assert!(d.running());
    d.finish();
}

#[test]
fn socket_mode_is_0600() {
    let s = setup();
    let d = Vloop::start(&s.image, &s.socket, &[]);
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {:o}", mode & 0o777);
    d.finish();
}

#[test]
fn stale_socket_is_replaced_but_a_live_one_is_not_stolen() {
    let s = setup();
    // A socket file nobody listens on, as a crashed daemon leaves behind.
    drop(UnixListener::bind(&s.socket).unwrap());
    assert!(s.socket.exists());
    let mut live = Vloop::start(&s.image, &s.socket, &[]);
    live.assert_serves();

    // A second daemon (another image) on the live socket must refuse to start.
    let other = s.dir.path().join("other.img");
    File::create(&other).unwrap().set_len(IMAGE_SIZE).unwrap();
    let mut c = Vloop::command(&other, &s.socket, &[]);
    let out = run_timeout(&mut c, WAIT);
    assert!(
        !out.status.success(),
        "second daemon took over a live socket"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "unclear error: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    live.finish();
}

struct Output {
    status: ExitStatus,
    stderr: Vec<u8>,
}

fn run_timeout(c: &mut Command, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let errp = dir.path().join("stderr");
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&errp).unwrap())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{c:?} did not exit within {timeout:?}");
    });
    Output {
        status,
        stderr: std::fs::read(&errp).unwrap_or_default(),
    }
}

#[test]
fn image_lock_holds_against_a_second_daemon() {
    let s = setup();
    let d = Vloop::start(&s.image, &s.socket, &[]);
    let sock2 = s.dir.path().join("second.sock");
    let out = run_timeout(&mut Vloop::command(&s.image, &sock2, &[]), WAIT);
    assert!(
        !out.status.success(),
        "two daemons serve one image read-write"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lock"), "unclear error: {err}");
    // Read-only against read-write is refused too (the writer denies shared readers no
    // access, but a read-only export must not see a disk changing under it).
    let out = run_timeout(
        &mut Vloop::command(&s.image, &sock2, &["--read-only"]),
        WAIT,
    );
    eprintln!(
        "read-only second daemon: {} ({})",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    d.finish();
}

#[test]
fn image_lock_holds_against_qemu_tools() {
    if !vloop_frontend::backend::on_path("qemu-io") || !vloop_frontend::backend::on_path("qemu-img")
    {
        vloop_frontend::skip::skip("qemu-io / qemu-img not installed (apt-get install qemu-utils)");
        return;
    }
    let s = setup();
    let d = Vloop::start(&s.image, &s.socket, &[]);
    let img = s.image.to_str().unwrap();
    let out = run_timeout(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x55 0 512", img]),
        WAIT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || err.contains("lock"),
        "qemu-io wrote to an image served read-write"
    );
    assert!(
        err.contains("lock"),
        "qemu-io failed for another reason: {err}"
    );
    let out = run_timeout(
        Command::new("qemu-img").args(["resize", "-f", "raw", img, "8M"]),
        WAIT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "qemu-img resized an image served read-write"
    );
    assert!(
        err.contains("lock"),
        "qemu-img failed for another reason: {err}"
    );
    assert_eq!(std::fs::metadata(&s.image).unwrap().len(), IMAGE_SIZE);
    d.finish();
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A tmpfs mounted for the test; unmounted (lazily) on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_gives_ioerr_and_recovers() {
    if !is_root() {
        vloop_frontend::skip::skip("mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2M", "vloop-full"])
        .arg(&mnt)
        .status()
        .unwrap();
    if !st.success() {
        vloop_frontend::skip::skip("cannot mount a tmpfs here");
        return;
    }
    let _guard = Tmpfs(mnt.clone());
    let image = mnt.join("disk.img");
    File::create(&image).unwrap().set_len(IMAGE_SIZE).unwrap();
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![1u8; 1536 << 10]).unwrap();
    let socket = dir.path().join("full.sock");
    let d = Vloop::start(&image, &socket, &[]);
    {
        let mut c = connect_retry(&socket);
        let q = c.queue(0).unwrap();
        let chunk = pattern(7, 64 << 10);
        let mut failed_at = None;
        for i in 0..32u64 {
            let done = q
                .execute({
                    let slot = q.next_free_slot().unwrap();
                    q.fill_slot(slot, &chunk).unwrap();
                    Request::Write {
                        sector: i * 128,
                        len: 64 << 10,
                    }
                })
                .unwrap();
            if done.status != S_OK {
                assert_eq!(done.status, S_IOERR, "full disk: status {}", done.status);
                failed_at = Some(i);
                break;
            }
        }
        let failed_at = failed_at.expect("2 MiB tmpfs never filled up");
        // Space freed: the same write succeeds, and reads back.
        std::fs::remove_file(&filler).unwrap();
        q.write(failed_at * 128, &chunk).unwrap();
        assert_eq!(q.read(failed_at * 128, 64 << 10).unwrap(), chunk);
        // Earlier writes are intact.
        assert_eq!(q.read(0, 64 << 10).unwrap(), chunk);
        q.flush().unwrap();
    }
    d.finish();
}

#[test]
fn truncated_image_reads_fail_cleanly() {
    let s = setup();
    let d = Vloop::start(&s.image, &s.socket, &[]);
    {
        let mut c = connect_retry(&s.socket);
        let q = c.queue(0).unwrap();
        let end = SECTORS - 8;
        q.write(end, &pattern(4, 4096)).unwrap();
        q.write(0, &pattern(5, 4096)).unwrap();
        // Shrink the image to half under the daemon.
        File::options()
            .write(true)
            .open(&s.image)
            .unwrap()
            .set_len(IMAGE_SIZE / 2)
            .unwrap();
        let done = q
            .execute(Request::Read {
                sector: end,
                len: 4096,
            })
            .unwrap();
        assert_eq!(done.status, S_IOERR, "read past the new end");
        let done = q
            .execute(Request::Read {
                sector: SECTORS / 2 - 1,
                len: 1024,
            })
            .unwrap();
        assert_eq!(done.status, S_IOERR, "read across the new end");
        // Below the new end: still fine.
        assert_eq!(q.read(0, 4096).unwrap(), pattern(5, 4096));
    }
    // Grow it back for the final health check.
    File::options()
        .write(true)
        .open(&s.image)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();
    d.finish();
}

#[test]
fn inflight_fd_is_offered_created_and_checked() {
    use std::os::fd::AsRawFd;

    use vhost::vhost_user::message::VhostUserInflight;
    use vloop_blk::inflight::{queue_region_size, InflightRegion};
    let s = setup();
    let d = Vloop::start(&s.image, &s.socket, &[]);
    // Bigger than the device (1 queue of at most 1024 by default): refused, and the
    // connection ends.
    for (nq, qs) in [(2u16, 64u16), (1, 4096), (20303, 20299)] {
        let mut bad = raw_frontend(&s.socket);
        bad.get_features().unwrap();
        let pf = bad.get_protocol_features().unwrap();
        bad.set_protocol_features(pf & VhostUserProtocolFeatures::INFLIGHT_SHMFD)
            .unwrap();
        let r = bad.get_inflight_fd(&VhostUserInflight::new(0, 0, nq, qs));
        assert!(
            r.is_err(),
            "inflight region for {nq} queues of {qs} created"
        );
    }
    // The log names the setting that would let such a frontend in: QEMU itself reports only
    // that GET_INFLIGHT_FD failed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let wanted = [
        "start vloop-blk with --num-queues 2, or give the frontend num-queues=1",
        "start vloop-blk with --queue-size 4096, or give the frontend queue-size=1024",
    ];
    while !wanted.iter().all(|w| d.log().contains(w)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for w in wanted {
        assert!(d.log().contains(w), "no {w:?} in:\n{}", d.log());
    }
    {
        let mut f = raw_frontend(&s.socket);
        let features = f.get_features().unwrap();
        let pf = f.get_protocol_features().unwrap();
        assert!(
            pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
            "INFLIGHT_SHMFD not offered: {pf:?}"
        );
        f.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        )
        .unwrap();
        f.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        f.set_features(features & ((1 << 32) | (1 << 30))).unwrap();
        let (info, file) = f
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, 64))
            .unwrap();
        assert_eq!(info.mmap_size, queue_region_size(64));
        assert_eq!(file.metadata().unwrap().len(), info.mmap_size);
        // The region is initialised for the queue it was asked for.
        let region = InflightRegion::open(&file, info.mmap_size, 0, 1, 64).unwrap();
        assert!(region.queue(0).unwrap().recover(0).is_empty());
        // Handing it back (as after a reconnect) is accepted...
        f.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
        // ...a region too small for the queues it claims is not.
        let bad = VhostUserInflight::new(64, 0, 4, 256);
        assert!(f.set_inflight_fd(&bad, file.as_raw_fd()).is_err());
    }
    d.finish();
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn connections_do_not_leak_descriptors() {
    let s = setup();
    let mut d = Vloop::start(&s.image, &s.socket, &["--num-queues", "2"]);
    let pid = d.0.pid();
    // Warm up (lazy initialisation, thread stacks), then count.
    for _ in 0..2 {
        d.assert_serves();
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = open_fds(pid);
    for _ in 0..20 {
        d.assert_serves();
    }
    // The last connection is torn down asynchronously.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = open_fds(pid);
    while after > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = open_fds(pid);
    }
    assert!(
        after <= before,
        "vloop-blk holds {} more descriptors after 20 connections ({before} -> {after})",
        after - before
    );
    d.finish();
}

#[test]
fn a_driver_without_flush_is_served_and_negotiates_no_write_cache() {
    // vloop-bench --no-flush: the client leaves VIRTIO_BLK_F_FLUSH and CONFIG_WCE out, so the
    // daemon writes every write through (executor test a_driver_without_flush_gets_write_through).
    let s = setup();
    let d = Vloop::start(&s.image, &s.socket, &[]);
    let cache = (1u64 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH)
        | (1u64 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE);
    for flush in [false, true] {
        let o = ClientOptions { flush, ..opts() };
        let mut c = Client::connect(&s.socket, &o).unwrap();
        let acked = c.acked_features() & cache;
        assert_eq!(acked, if flush { cache } else { 0 }, "flush {flush}");
        let q = c.queue(0).unwrap();
        q.write(64, &pattern(7, 4096)).unwrap();
        assert_eq!(q.read(64, 4096).unwrap(), pattern(7, 4096));
        drop(c);
    }
    d.finish();
}
