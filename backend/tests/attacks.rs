//! Attacks on the `vloop-blk` binary by a hostile guest (which controls its rings) or a hostile
//! client (which controls every message and descriptor on the socket): each test is one way to
//! try to crash the daemon, hang it, make it spin or leak, or keep it from serving the next
//! frontend; the first ones are the findings of an attack on an earlier daemon, the last ones
//! ("further attacks") the probes that followed. They are driven by the project's raw
//! frontend (`vloop_frontend::raw`), which can send anything.
//!
//! Every test ends with the same three checks ([`Daemon::survives`]): the daemon is idle (it
//! uses less than 5% of one CPU over the second after the attack), a fresh well-behaved
//! frontend is served (write, read back, flush), and SIGTERM makes it exit 0 within two
//! seconds, with no panic in its log.

mod common;

use common::pattern;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::Frontend;
use vloop_frontend::backend::{BackendError, BackendProcess, BackendSpec, Export, Program};
use vloop_frontend::blk::S_OK;
use vloop_frontend::process::{cpu_time, open_fds};
use vloop_frontend::raw::{fds, Header, MemRegion, Negotiation, RawQueue, VringAddrs, VERSION};
use vloop_frontend::{
    Client, ClientOptions, GuestMem, RawDevice, RawError, RawFrontend, RequestType, RingLayout,
};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const IMAGE_SIZE: u64 = 4 << 20;
/// How long a daemon may take to start listening (a loaded machine builds and tests at once).
const START: Duration = Duration::from_secs(20);
/// CPU the daemon may use in the second after an attack: 5% of one CPU.
const IDLE_CPU: Duration = Duration::from_millis(50);
/// How long SIGTERM may take.
const STOP: Duration = Duration::from_secs(2);
/// Time-out of every exchange with the daemon.
const REPLY: Duration = Duration::from_secs(10);
/// How long a well-behaved frontend may wait to be served (behind a connection the daemon
/// must drop first).
const SERVED: Duration = Duration::from_secs(15);
/// Log lines one attack may add (connected, the one warning, disconnected, the counters).
const FEW_LINES: usize = 8;
/// Guest memory of the raw devices.
const MEM: u64 = 2 << 20;
/// Where raw devices put their requests' headers, data and status bytes.
const REQS: u64 = 0x10000;

fn opts() -> ClientOptions {
    ClientOptions {
        queue_size: 64,
        slots: 8,
        slot_data_size: 64 << 10,
        scratch_size: 4096,
        timeout: REPLY,
        ..ClientOptions::default()
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// A running `vloop-blk` on a fresh image in a fresh directory.
struct Daemon {
    proc: BackendProcess,
    dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
}

fn spec(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> BackendSpec {
    let image = dir.join("disk.img");
    if !image.exists() {
        File::create(&image).unwrap().set_len(IMAGE_SIZE).unwrap();
    }
    let mut s = BackendSpec::new(
        Program::Vloop(common::bin()),
        Export::new(image, dir.join("vloop.sock")),
    );
    s.extra_args = extra.iter().map(|a| a.to_string()).collect();
    s.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([("RUST_LOG".to_string(), "info".to_string())])
        .collect();
    s
}

impl Daemon {
    fn start(extra: &[&str]) -> Daemon {
        Self::start_with(extra, &[], |_| {})
    }

    /// Starts the daemon with `extra` arguments, `env` and `tweak` applied to its command.
    fn start_with(
        extra: &[&str],
        env: &[(&str, &str)],
        tweak: impl FnOnce(&mut Command),
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, extra, env, tweak).unwrap_or_else(|e| panic!("{e}"))
    }

    fn start_in(
        dir: tempfile::TempDir,
        extra: &[&str],
        env: &[(&str, &str)],
        tweak: impl FnOnce(&mut Command),
    ) -> Result<Daemon, BackendError> {
        let s = spec(dir.path(), extra, env);
        let log = dir.path().join("vloop-blk.log");
        let proc = BackendProcess::spawn_with(&s, &log, START, tweak)?;
        Ok(Daemon {
            proc,
            image: s.export.image.clone(),
            socket: s.export.socket.clone(),
            dir,
        })
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.proc.log()).unwrap_or_default()
    }

    fn log_lines(&self) -> usize {
        self.log().lines().count()
    }

    /// Lines of the log that contain `what`.
    fn log_count(&self, what: &str) -> usize {
        self.log().lines().filter(|l| l.contains(what)).count()
    }

    /// Waits up to `limit` until the log has `n` lines containing `what`.
    fn wait_log(&self, what: &str, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.log_count(what) < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// A raw connection (retrying while the daemon finishes a previous one).
    fn raw(&self) -> RawFrontend {
        let mut fe = RawFrontend::connect_retry(&self.socket, START)
            .unwrap_or_else(|e| panic!("cannot connect: {e}\n{}", self.log()));
        fe.set_timeout(REPLY).unwrap();
        fe
    }

    /// A raw device with fresh guest memory, negotiated as `how` says.
    fn device(&self, how: &Negotiation) -> RawDevice {
        let mem = Arc::new(GuestMem::new(MEM).unwrap());
        let mut d = RawDevice::new(self.raw(), mem);
        d.negotiate(how)
            .unwrap_or_else(|e| panic!("negotiation failed: {e}\n{}", self.log()));
        d
    }

    /// A device negotiated as `how`, its memory table set and queue 0 started on a ring of
    /// 16 at guest address 0.
    fn started(&self, how: &Negotiation) -> RawDevice {
        let mut d = self.device(how);
        d.set_mem_table().unwrap();
        d.start_queue(0, RingLayout::new(16, 0).unwrap(), 0)
            .unwrap();
        d
    }

    /// A well-behaved client, set up within [`SERVED`]. (vhost's frontend retries a read that
    /// times out, so the set-up runs in a thread that is abandoned on time-out; it ends when
    /// the daemon is killed.)
    fn client(&self) -> Client {
        let socket = self.socket.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let deadline = Instant::now() + START;
            let s = loop {
                match UnixStream::connect(&socket) {
                    Ok(s) => break Ok(s),
                    Err(e) if Instant::now() >= deadline => {
                        break Err(format!("cannot connect: {e}"))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            let c = s.and_then(|s| {
                Client::start(Frontend::from_stream(s, 1), &opts()).map_err(|e| e.to_string())
            });
            let _ = tx.send(c);
        });
        match rx.recv_timeout(SERVED) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!("a well-behaved client was not served: {e}\n{}", self.log()),
            Err(_) => panic!(
                "a well-behaved client was not served within {SERVED:?}:\n{}",
                self.log()
            ),
        }
    }

    /// (a) The daemon uses less than 5% of one CPU over the next second.
    fn assert_idle(&self, when: &str) {
        let t0 = cpu_time(self.pid()).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let used = cpu_time(self.pid()).unwrap().saturating_sub(t0);
        assert!(
            used < IDLE_CPU,
            "vloop-blk used {used:?} of CPU in one second {when}:\n{}",
            self.log()
        );
    }

    /// (b) A fresh well-behaved frontend is served: write, read back, flush.
    fn assert_serves(&mut self) {
        assert!(self.proc.is_running(), "vloop-blk died:\n{}", self.log());
        let mut c = self.client();
        common::serves(&mut c);
    }

    /// (c) SIGTERM makes it exit 0 within two seconds, with no panic in its log.
    fn assert_terminates(mut self) {
        signal(self.pid(), nix::sys::signal::Signal::SIGTERM);
        let status = self.proc.wait_timeout(STOP);
        let log = self.log();
        let status =
            status.unwrap_or_else(|| panic!("vloop-blk ignored SIGTERM for {STOP:?}:\n{log}"));
        assert!(!log.contains("panicked"), "vloop-blk panicked:\n{log}");
        assert!(status.success(), "vloop-blk exited with {status}:\n{log}");
    }

    /// The three checks every attack ends with.
    fn survives(mut self) {
        self.assert_idle("after the attack");
        self.assert_serves();
        self.assert_terminates();
    }
}

/// Whether the peer of `fd` closed the connection within `limit` (reads end of file).
fn peer_closed(fd: RawFd, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) };
        if r <= 0 {
            return false;
        }
        let mut b = [0u8; 256];
        // SAFETY: reading into a live local buffer of the length given.
        let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
        if n == 0 || (n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN))
        {
            return true;
        }
    }
}

/// An attack message must end the connection: it fails (the backend refused it or closed)
/// and the socket is closed soon after.
fn assert_refused(d: &Daemon, fe: &RawFrontend, r: Result<(), RawError>, what: &str) {
    assert!(r.is_err(), "{what} was accepted:\n{}", d.log());
    assert!(
        fe.closed_within(Duration::from_secs(5)),
        "the connection stayed open after {what}:\n{}",
        d.log()
    );
}

// ---- 1. a broken EVENT_IDX ring spins a worker ----

/// Sets queue 0 up (EVENT_IDX) with `layout`, writes `avail_idx` and kicks a few times; the
/// daemon must refuse the ring or (with `must_stop`) stop the queue, stay idle, and log a few
/// lines at most.
fn broken_ring(layout: RingLayout, avail_idx: u16, must_stop: bool) {
    let d = Daemon::start(&[]);
    let lines = d.log_lines();
    {
        let mut dev = d.device(&Negotiation::default());
        assert!(dev.event_idx(), "EVENT_IDX not negotiated");
        dev.set_mem_table().unwrap();
        match dev.start_queue(0, layout, 0) {
            Ok(q) => {
                // Inside guest memory (a straddling ring has its index there).
                let _ = q.set_avail_idx(avail_idx);
                for _ in 0..3 {
                    q.kick().unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                }
                d.assert_idle("with a broken ring kicked");
                if must_stop {
                    assert!(
                        d.wait_log("queue 0 stopped", 1, Duration::from_secs(5)),
                        "the broken ring did not stop its queue:\n{}",
                        d.log()
                    );
                }
                // More kicks change nothing; the connection still answers.
                dev.queues[0].kick().unwrap();
                dev.fe.get_features().unwrap();
                assert!(d.log_count("queue 0 stopped") <= 1);
            }
            Err(e) => {
                // Refused when it was set up: the connection ends.
                assert!(
                    dev.fe.closed_within(Duration::from_secs(5)),
                    "ring refused ({e}) but the connection stays open"
                );
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let added = d.log_lines() - lines;
    assert!(
        added <= FEW_LINES,
        "one broken ring added {added} log lines:\n{}",
        d.log()
    );
    d.survives();
}

#[test]
fn event_idx_ring_with_avail_index_far_ahead_of_used() {
    broken_ring(RingLayout::new(16, 0).unwrap(), 1000, true);
}

#[test]
fn event_idx_ring_with_avail_ring_where_the_queue_reports_not_ready() {
    // The available ring at guest address 0: virtio-queue reports such a queue not ready
    // (a queue that was reset), while its index there still reads as "new requests".
    let l = RingLayout::new(16, 0x1000).unwrap();
    let layout = RingLayout { avail: 0, ..l };
    broken_ring(layout, 1, true);
}

#[test]
fn event_idx_ring_with_avail_ring_straddling_the_end_of_memory() {
    // Flags and index inside guest memory, the ring entries past its end.
    let l = RingLayout::new(16, 0).unwrap();
    let layout = RingLayout {
        avail: MEM - 4,
        used: 0x1000,
        ..l
    };
    broken_ring(layout, 1, true);
}

#[test]
fn event_idx_ring_with_descriptors_or_used_ring_straddling_the_end_of_memory() {
    let l = RingLayout::new(16, 0x1000).unwrap();
    broken_ring(
        RingLayout {
            desc: MEM - 16,
            ..l
        },
        1,
        false,
    );
    broken_ring(RingLayout { used: MEM - 8, ..l }, 1, false);
}

#[test]
fn mem_table_that_cuts_a_running_ring_is_refused() {
    let d = Daemon::start(&[]);
    let lines = d.log_lines();
    {
        let mut dev = d.device(&Negotiation::default());
        dev.set_mem_table().unwrap();
        // The available ring ends where the next table will end.
        let l = RingLayout::new(16, 0x1000).unwrap();
        let layout = RingLayout {
            avail: MEM / 2 - 4,
            ..l
        };
        let q = dev.start_queue(0, layout, 0).unwrap();
        q.set_avail_idx(1).unwrap();
        // Half the memory: the ring's entries are past the end of the new table.
        let r = dev.fe.set_mem_table(&[MemRegion {
            memory_size: MEM / 2,
            ..MemRegion::of(&dev.mem)
        }]);
        let _ = dev.queues[0].kick();
        std::thread::sleep(Duration::from_millis(300));
        let added = d.log_lines() - lines;
        assert!(added <= FEW_LINES, "{added} log lines:\n{}", d.log());
        assert_refused(&d, &dev.fe, r, "a memory table that cuts a running ring");
    }
    d.survives();
}

#[test]
fn a_queue_enabled_again_and_again_is_logged_once() {
    let d = Daemon::start(&[]);
    let lines = d.log_lines();
    {
        let mut dev = d.device(&Negotiation::default());
        dev.set_mem_table().unwrap();
        let l = RingLayout::new(16, 0x1000).unwrap();
        dev.start_queue(0, l, 0).unwrap();
        for _ in 0..5000 {
            dev.fe.set_vring_enable(0, false).unwrap();
            dev.fe.set_vring_enable(0, true).unwrap();
        }
        // The library has read them all once it answers a request with a reply.
        dev.fe.get_features().unwrap();
    }
    assert!(d.wait_log("frontend disconnected", 1, Duration::from_secs(5)));
    assert_eq!(d.log_count("frontend enabled queue 0"), 1, "{}", d.log());
    let added = d.log_lines() - lines;
    assert!(added <= FEW_LINES, "{added} log lines:\n{}", d.log());
    d.survives();
}

#[test]
fn a_new_kick_for_a_running_ring_is_watched_and_the_old_one_ends_nothing() {
    let d = Daemon::start(&[]);
    {
        let mut dev = d.started(&Negotiation::default());
        flush_request(&d, &dev.queues[0], 0, 1);
        let new = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.fe.set_vring_kick(0, Some(new.as_raw_fd())).unwrap();
        let old = std::mem::replace(&mut dev.queues[0].kick, new);
        // The library watched the old eventfd still (the frontend holds it): a kick there made
        // the worker read the new, empty one and end.
        old.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        flush_request(&d, &dev.queues[0], 1, 2);
        flush_request(&d, &dev.queues[0], 2, 3);
    }
    d.survives();
}

#[test]
fn a_stopped_ring_restarted_by_a_kick_outside_the_new_memory_table_is_refused() {
    let d = Daemon::start(&[]);
    {
        let mut dev = d.device(&Negotiation::default());
        dev.set_mem_table().unwrap();
        let l = RingLayout::new(16, 0x1000).unwrap();
        let layout = RingLayout {
            avail: MEM / 2 - 4,
            ..l
        };
        dev.start_queue(0, layout, 0).unwrap();
        // Stopped, the ring may lie outside the next table: it is not served.
        dev.fe.get_vring_base(0).unwrap();
        dev.fe
            .set_mem_table(&[MemRegion {
                memory_size: MEM / 2,
                ..MemRegion::of(&dev.mem)
            }])
            .unwrap();
        // A kick without new addresses would restart it where it was.
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let r = dev.fe.set_vring_kick(0, Some(kick.as_raw_fd()));
        assert_refused(
            &d,
            &dev.fe,
            r,
            "a kick restarting a ring outside the memory table",
        );
    }
    d.survives();
}

#[test]
fn a_new_kick_for_a_running_ring_without_protocol_features_is_refused() {
    // Without VHOST_USER_F_PROTOCOL_FEATURES the library enables every ring itself and takes
    // no SET_VRING_ENABLE, so the old kick cannot be unwatched: the connection ends.
    let d = Daemon::start(&[]);
    {
        let dev = d.device(&Negotiation::default());
        dev.fe.set_features(1 << 32).unwrap();
        dev.set_mem_table().unwrap();
        set_ring_addresses(&dev);
        let (call, kick, new) = (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        dev.fe.set_vring_call(0, Some(call.as_raw_fd())).unwrap();
        dev.fe.set_vring_kick(0, Some(kick.as_raw_fd())).unwrap();
        let r = dev.fe.set_vring_kick(0, Some(new.as_raw_fd()));
        assert_refused(&d, &dev.fe, r, "a new kick without protocol features");
        assert!(
            d.wait_log(
                "a new kick for a running ring without protocol features",
                1,
                REPLY
            ),
            "{}",
            d.log()
        );
    }
    d.survives();
}

// ---- 2. more than 32 descriptors on a message, under a low descriptor limit ----

#[test]
fn messages_with_more_than_32_fds_leak_nothing_under_a_low_fd_limit() {
    const LIMIT: u64 = 256;
    const CONNECTIONS: usize = 40;
    const FDS: usize = 40;
    let mut d = Daemon::start_with(&[], &[], |c| {
        // SAFETY: setrlimit is async-signal-safe; the closure touches no other state.
        unsafe {
            c.pre_exec(|| {
                let l = libc::rlimit {
                    rlim_cur: LIMIT,
                    rlim_max: LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    });
    // Warm up (lazily created state), then count.
    d.assert_serves();
    std::thread::sleep(Duration::from_millis(200));
    let before = open_fds(d.pid()).unwrap();
    let files: Vec<File> = (0..FDS).map(|_| fds::memfd(4096, false).unwrap()).collect();
    let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
    for i in 0..CONNECTIONS {
        let fe = d.raw();
        fe.send(FrontendReq::GET_FEATURES, &[], &raw).unwrap();
        assert!(
            fe.closed_within(Duration::from_secs(5)),
            "connection {i}: a message with {FDS} descriptors did not end the connection"
        );
        assert!(
            d.proc.is_running(),
            "vloop-blk died after {i} connections:\n{}",
            d.log()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = open_fds(d.pid()).unwrap();
    while after > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = open_fds(d.pid()).unwrap();
    }
    assert!(
        after <= before,
        "vloop-blk holds {} more descriptors after {CONNECTIONS} connections ({before} -> {after})",
        after.saturating_sub(before)
    );
    d.survives();
}

// ---- 3. guest memory descriptors that do not back their regions ----

#[test]
fn mem_table_with_an_empty_memfd_is_refused() {
    let d = Daemon::start(&[]);
    for sealable in [false, true] {
        let dev = d.device(&Negotiation::default());
        let empty = fds::memfd(0, sealable).unwrap();
        let ua = dev.user_addr(0);
        let r = dev.fe.set_mem_table(&[MemRegion {
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            user_addr: ua,
            mmap_offset: 0,
            fd: empty.as_raw_fd(),
        }]);
        // Whatever the daemon answered, ring addresses in that region come next.
        let _ = dev.fe.set_vring_num(0, 16);
        let _ = dev.fe.set_vring_addr(
            0,
            &VringAddrs {
                desc: ua,
                avail: ua + 0x1000,
                used: ua + 0x2000,
                ..VringAddrs::default()
            },
        );
        assert_refused(&d, &dev.fe, r, "a 1 MiB region backed by an empty memfd");
    }
    // A region whose end overflows, backed by a memfd that is long enough for its start.
    let dev = d.device(&Negotiation::default());
    let m = fds::memfd(MEM, false).unwrap();
    let r = dev.fe.set_mem_table(&[MemRegion {
        guest_phys_addr: 0,
        memory_size: 1 << 20,
        user_addr: dev.user_addr(0),
        mmap_offset: u64::MAX - 4095,
        fd: m.as_raw_fd(),
    }]);
    assert_refused(&d, &dev.fe, r, "a region at offset 2^64 - 4096");
    drop(dev);
    d.survives();
}

/// A client whose guest memory (a memfd that does not allow sealing, as
/// `memory-backend-memfd,seal=off` makes) is cut to nothing after one request, then kicked;
/// returns it, its memory no longer touched by this process.
fn truncate_under_the_daemon(d: &Daemon) -> Client {
    let mut c = d.client();
    let q = c.queue(0).unwrap();
    q.write(0, &pattern(3, 4096)).unwrap();
    let mem = q.mem();
    assert!(
        !vloop_blk::protocol::fds::is_sealed_against_shrinking(mem.file()),
        "an unsealable memfd was sealed"
    );
    mem.file().set_len(0).unwrap();
    q.kick_now().unwrap();
    c
}

#[test]
fn memfd_truncated_after_set_up_does_not_kill_the_daemon() {
    let mut d = Daemon::start(&[]);
    {
        let _c = truncate_under_the_daemon(&d);
        // The worker has read the ring (a queue that stops or a connection that ends says so).
        let seen =
            |d: &Daemon| d.log_count("queue 0 stopped") + d.log_count("guest memory faulted") > 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !seen(&d) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(d.proc.is_running(), "vloop-blk died:\n{}", d.log());
        assert!(
            seen(&d),
            "the worker never read the truncated ring:\n{}",
            d.log()
        );
    }
    // A memfd that allows sealing is sealed by the daemon: it cannot be cut any more.
    {
        let mem = Arc::new(GuestMem::from_file(fds::memfd(MEM, true).unwrap()).unwrap());
        let mut dev = RawDevice::new(d.raw(), mem.clone());
        dev.negotiate(&Negotiation::default()).unwrap();
        dev.set_mem_table().unwrap();
        assert!(
            mem.file().set_len(0).is_err(),
            "a sealable memfd was not sealed"
        );
        assert!(mem.file().set_len(4096).is_err());
        dev.start_queue(0, RingLayout::new(16, 0).unwrap(), 0)
            .unwrap();
        let q = &dev.queues[0];
        let status = q
            .write_request(0, 0, RequestType::Flush, 0, 0, REQS)
            .unwrap();
        q.set_avail_idx(1).unwrap();
        q.kick().unwrap();
        q.wait_used(1, REPLY).unwrap();
        assert_eq!(q.byte(status).unwrap(), S_OK);
    }
    d.survives();
}

#[test]
fn memfd_truncated_after_set_up_ends_the_connection() {
    let d = Daemon::start(&[]);
    {
        let mut c = truncate_under_the_daemon(&d);
        let fd = c.frontend().as_raw_fd();
        assert!(
            peer_closed(fd, Duration::from_secs(5)),
            "the connection survived its memory being truncated:\n{}",
            d.log()
        );
    }
    d.survives();
}

// ---- 4. inflight regions ----

fn inflight_negotiation() -> Negotiation {
    Negotiation {
        protocol: VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        ..Negotiation::default()
    }
}

#[test]
fn inflight_memfd_handed_out_is_sealed() {
    let d = Daemon::start(&[]);
    {
        let dev = d.device(&inflight_negotiation());
        let (info, file) = dev
            .fe
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, 64))
            .unwrap();
        assert_eq!(file.metadata().unwrap().len(), info.mmap_size);
        assert!(
            file.set_len(0).is_err(),
            "the inflight memfd can be truncated"
        );
        assert!(file.set_len(info.mmap_size / 2).is_err());
        assert!(file.set_len(info.mmap_size * 2).is_err(), "it can grow");
        // SAFETY: F_GET_SEALS on a live descriptor.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want, "seals {seals:#x}");
        // The connection goes on with the region.
        dev.fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
        dev.fe.get_features().unwrap();
    }
    d.survives();
}

#[test]
fn requests_left_in_flight_are_not_run_past_a_disconnect() {
    // The frontend's inflight region has 924 whole-disk reads in flight (256 MiB each: the
    // limits on segments and sizes not negotiated, their data descriptors all on the same
    // 16 MiB of guest memory). The resubmission at the kick, hundreds of seconds of copying,
    // ends when the frontend disconnects, as a pass does: the next frontend is served at once.
    use vloop_blk::inflight::{queue_region_size, InflightRegion};
    use vloop_frontend::blk::{header, HEADER_LEN};
    use vloop_frontend::ring::{Descriptor, DESC_F_NEXT, DESC_F_WRITE};
    const DISK: u64 = 256 << 20;
    const SEG: u64 = 16 << 20;
    const SEGS: u16 = (DISK / SEG) as u16;
    const RING: u16 = 1024;
    const FIRST_HEAD: u16 = 100;
    let dir = tempfile::tempdir().unwrap();
    File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let mut d = Daemon::start_in(dir, &[], &[], |_| {}).unwrap_or_else(|e| panic!("{e}"));
    {
        let mem = Arc::new(GuestMem::new(SEG + (1 << 20)).unwrap());
        let mut dev = RawDevice::new(d.raw(), mem.clone());
        dev.negotiate(&inflight_negotiation()).unwrap();
        dev.set_mem_table().unwrap();
        let layout = RingLayout::new(RING, 0).unwrap();
        let q = RawQueue::detached(mem.clone(), layout).unwrap();
        // One tail for every chain: the data descriptors, then the status byte.
        let (hdr, status, data) = (0x8000u64, 0x8100u64, 1u64 << 20);
        mem.write(hdr, &header(RequestType::In, 0)).unwrap();
        for s in 0..SEGS {
            let seg = Descriptor {
                addr: data,
                len: SEG as u32,
                flags: DESC_F_WRITE | DESC_F_NEXT,
                next: s + 1,
            };
            q.set_desc(s, seg).unwrap();
        }
        let last = Descriptor {
            addr: status,
            len: 1,
            flags: DESC_F_WRITE,
            next: 0,
        };
        q.set_desc(SEGS, last).unwrap();
        let (region, file) = InflightRegion::create(1, RING).unwrap();
        let track = region.queue(0).unwrap();
        for h in FIRST_HEAD..RING {
            let first = Descriptor {
                addr: hdr,
                len: HEADER_LEN,
                flags: DESC_F_NEXT,
                next: 0,
            };
            q.set_desc(h, first).unwrap();
            track.take(h, u64::from(h));
        }
        let info = VhostUserInflight::new(queue_region_size(RING), 0, 1, RING);
        dev.fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
        dev.start_queue(0, layout, 0).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let t = Instant::now();
    d.assert_serves();
    let served = t.elapsed();
    eprintln!("served {served:?} after a disconnect during a long resubmission");
    assert!(
        served < Duration::from_secs(3),
        "the next frontend waited {served:?} for requests of a frontend that left:\n{}",
        d.log()
    );
    d.survives();
}

#[test]
fn set_inflight_fd_that_can_shrink_is_refused() {
    let d = Daemon::start(&[]);
    let size = vloop_blk::inflight::queue_region_size(64);
    let info = VhostUserInflight::new(size, 0, 1, 64);
    let unsealable = fds::memfd(size, false).unwrap();
    let tmpfs = tempfile::tempfile_in("/dev/shm").unwrap();
    tmpfs.set_len(size).unwrap();
    for (what, f) in [
        ("a memfd that does not allow sealing", &unsealable),
        ("a file on tmpfs", &tmpfs),
    ] {
        let dev = d.device(&inflight_negotiation());
        let r = dev.fe.set_inflight_fd(&info, f.as_raw_fd());
        assert_refused(&d, &dev.fe, r, &format!("SET_INFLIGHT_FD with {what}"));
        assert_eq!(f.metadata().unwrap().len(), size);
    }
    // A memfd that allows sealing is sealed, then accepted.
    let sealable = fds::memfd(size, true).unwrap();
    {
        // A fresh region's header: version 1, 64 descriptors.
        use std::os::unix::fs::FileExt;
        sealable.write_all_at(&1u16.to_le_bytes(), 8).unwrap();
        sealable.write_all_at(&64u16.to_le_bytes(), 10).unwrap();
    }
    let dev = d.device(&inflight_negotiation());
    dev.fe.set_inflight_fd(&info, sealable.as_raw_fd()).unwrap();
    assert!(
        sealable.set_len(0).is_err(),
        "the accepted region can shrink"
    );
    dev.fe.get_features().unwrap();
    drop(dev);
    d.survives();
}

#[test]
fn set_inflight_fd_on_hugetlbfs_is_refused() {
    // Sealable and of the right size, but where the huge page pool has no page for a hole
    // the daemon's first access to the region would raise SIGBUS.
    let d = Daemon::start(&[]);
    let size = 2 << 20;
    let huge = match fds::hugetlb_memfd(size) {
        Ok(f) => f,
        Err(e) => {
            vloop_frontend::skip::skip(&format!("no hugetlb memfd here: {e}"));
            return;
        }
    };
    let dev = d.device(&inflight_negotiation());
    let r = dev
        .fe
        .set_inflight_fd(&VhostUserInflight::new(size, 0, 1, 256), huge.as_raw_fd());
    assert_refused(&d, &dev.fe, r, "SET_INFLIGHT_FD with a hugetlb memfd");
    drop(dev);
    d.survives();
}

// ---- 5. 6. descriptors the daemon writes to that block ----

#[test]
fn blocking_call_eventfd_at_its_maximum_count() {
    let d = Daemon::start(&[]);
    {
        let mem = Arc::new(GuestMem::new(MEM).unwrap());
        let dev = RawDevice::start(d.raw(), mem, &Negotiation::default(), 16).unwrap();
        let call = fds::blocking_eventfd(fds::EVENTFD_MAX).unwrap();
        dev.fe.set_vring_call(0, Some(call.as_raw_fd())).unwrap();
        let q = &dev.queues[0];
        // Two requests, each asking for a call (used_event at the request before it).
        for i in 0..2u16 {
            let status = q
                .write_request(i, 4 * i, RequestType::Flush, 0, 0, REQS + 64 * u64::from(i))
                .unwrap();
            q.set_used_event(i).unwrap();
            q.set_avail_idx(i + 1).unwrap();
            q.kick().unwrap();
            q.wait_used(i + 1, REPLY).unwrap_or_else(|seen| {
                panic!(
                    "request {i} not completed (used index {seen}): the worker is stuck:\n{}",
                    d.log()
                )
            });
            assert_eq!(q.byte(status).unwrap(), S_OK);
        }
        d.assert_idle("with a call eventfd that cannot be written");
    }
    d.survives();
}

#[test]
fn kick_call_and_err_fds_must_be_eventfds() {
    let d = Daemon::start(&[]);
    let (_r, full) = fds::full_pipe().unwrap();
    let (sock, _peer) = UnixStream::pair().unwrap();
    let null = File::open("/dev/null").unwrap();
    let cases: [(&str, FrontendReq, RawFd); 4] = [
        (
            "the write end of a full pipe as kick",
            FrontendReq::SET_VRING_KICK,
            full.as_raw_fd(),
        ),
        (
            "the write end of a full pipe as call",
            FrontendReq::SET_VRING_CALL,
            full.as_raw_fd(),
        ),
        (
            "a socket as err",
            FrontendReq::SET_VRING_ERR,
            sock.as_raw_fd(),
        ),
        (
            "/dev/null as kick",
            FrontendReq::SET_VRING_KICK,
            null.as_raw_fd(),
        ),
    ];
    for (what, req, fd) in cases {
        let dev = d.started(&Negotiation::default());
        let r = match req {
            FrontendReq::SET_VRING_KICK => dev.fe.set_vring_kick(0, Some(fd)),
            FrontendReq::SET_VRING_CALL => dev.fe.set_vring_call(0, Some(fd)),
            _ => dev.fe.set_vring_err(0, Some(fd)),
        };
        assert_refused(&d, &dev.fe, r, what);
    }
    d.survives();
}

// ---- 7. the backend request channel ----

fn backend_req_negotiation() -> Negotiation {
    Negotiation {
        protocol: VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::BACKEND_REQ,
        ..Negotiation::default()
    }
}

#[test]
fn sighup_with_a_backend_channel_nobody_reads() {
    use nix::sys::signal::Signal;
    let d = Daemon::start(&[]);
    let (ours, theirs) = UnixStream::pair().unwrap();
    {
        let dev = d.device(&backend_req_negotiation());
        assert!(dev
            .protocol
            .contains(VhostUserProtocolFeatures::BACKEND_REQ));
        // Full before the daemon's first send, and never read.
        fds::fill_socket(&theirs).unwrap();
        dev.fe.set_backend_req_fd(theirs.as_raw_fd()).unwrap();
        drop(theirs);
        File::options()
            .write(true)
            .open(&d.image)
            .unwrap()
            .set_len(IMAGE_SIZE + (1 << 20))
            .unwrap();
        signal(d.pid(), Signal::SIGHUP);
        assert!(d.wait_log("SIGHUP received", 1, Duration::from_secs(2)));
        std::thread::sleep(Duration::from_millis(300));
        // The announcement is stuck; signals are still handled.
        signal(d.pid(), Signal::SIGHUP);
        assert!(
            d.wait_log("SIGHUP received", 2, Duration::from_secs(2)),
            "a second SIGHUP was not handled while the first announcement is stuck:\n{}",
            d.log()
        );
        d.assert_idle("with an announcement stuck on a full channel");
        dev.fe.get_features().unwrap();
    }
    // The channel stays full (its reading end open, unread) while the daemon is checked and
    // stopped.
    d.survives();
    drop(ours);
}

#[test]
fn backend_request_fd_must_be_a_unix_stream_socket() {
    let d = Daemon::start(&[]);
    let (_r, w) = fds::full_pipe().unwrap();
    let (dgram, _peer) = UnixDatagram::pair().unwrap();
    let eventfd = fds::blocking_eventfd(0).unwrap();
    for (what, fd) in [
        ("a pipe", w.as_fd().as_raw_fd()),
        ("a datagram socket", dgram.as_raw_fd()),
        ("an eventfd", eventfd.as_raw_fd()),
    ] {
        let dev = d.device(&backend_req_negotiation());
        let r = dev.fe.set_backend_req_fd(fd);
        assert_refused(
            &d,
            &dev.fe,
            r,
            &format!("{what} as the backend request channel"),
        );
    }
    d.survives();
}

#[test]
fn backend_channel_and_inflight_messages_need_their_protocol_features() {
    // Requests of a protocol feature the frontend did not negotiate are refused: without
    // BACKEND_REQ there is no backend channel (a SIGHUP would announce the new size on it),
    // without INFLIGHT_SHMFD no inflight region.
    let d = Daemon::start(&[]);
    {
        let dev = d.device(&Negotiation::default());
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let r = dev.fe.set_backend_req_fd(ours.as_raw_fd());
        assert_refused(&d, &dev.fe, r, "SET_BACKEND_REQ_FD without BACKEND_REQ");
    }
    {
        let dev = d.device(&Negotiation::default());
        let r = dev
            .fe
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, 64))
            .map(|_| ());
        assert_refused(&d, &dev.fe, r, "GET_INFLIGHT_FD without INFLIGHT_SHMFD");
    }
    // RESET_OWNER forgets what was negotiated: without negotiating again, refused.
    {
        let mut dev = d.device(&backend_req_negotiation());
        let _ = dev.fe.set(FrontendReq::RESET_OWNER, &[], &[]);
        // No REPLY_ACK either: the refusal is the connection closing.
        dev.fe.set_reply_ack(false);
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let _ = dev.fe.set_backend_req_fd(ours.as_raw_fd());
        assert!(
            dev.fe.closed_within(Duration::from_secs(5)),
            "SET_BACKEND_REQ_FD after RESET_OWNER was taken:\n{}",
            d.log()
        );
    }
    // Negotiated, both are taken.
    {
        let how = Negotiation {
            protocol: backend_req_negotiation().protocol
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            ..Negotiation::default()
        };
        let dev = d.device(&how);
        let (ours, _theirs) = UnixStream::pair().unwrap();
        dev.fe.set_backend_req_fd(ours.as_raw_fd()).unwrap();
        dev.fe
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, 64))
            .unwrap();
        dev.fe.get_features().unwrap();
    }
    d.survives();
}

// ---- 8. a frontend that sends and never reads ----

/// Bytes waiting in the receive queue of `sock`.
fn queued(sock: &UnixStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `n`, a live local.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0);
    n as usize
}

/// A connection that sends requests with replies and never reads them, until the replies stop
/// arriving (the daemon is blocked sending to it); then it stops sending too, and stays
/// connected.
fn flood(d: &Daemon) -> RawFrontend {
    let fe = d.raw();
    fe.set_owner().unwrap();
    let mut last = 0;
    let mut sent = 0;
    loop {
        for _ in 0..16 {
            fe.send(FrontendReq::GET_FEATURES, &[], &[]).unwrap();
        }
        sent += 16;
        std::thread::sleep(Duration::from_millis(20));
        let now = queued(fe.socket());
        if now == last && now > 0 {
            break;
        }
        last = now;
        assert!(sent < 1_000_000, "the replies keep arriving");
    }
    fe
}

#[test]
fn sigterm_while_a_frontend_floods_requests_without_reading_replies() {
    let mut d = Daemon::start(&[]);
    let f = flood(&d);
    d.assert_idle("with a frontend that does not read its replies");
    drop(f);
    d.assert_serves();
    // Stopped in the middle of a second flood.
    let _f = flood(&d);
    d.assert_terminates();
}

// ---- 9. 10. names in shared directories ----

#[test]
fn predictable_relay_directory_name_is_not_used() {
    let tmp = tempfile::tempdir().unwrap();
    let tmpdir = tmp.path().to_str().unwrap().to_string();
    let d = Daemon::start_with(&[], &[("TMPDIR", &tmpdir)], |_| {});
    // The names the daemon once used for its relay directory, taken first (as root a plain
    // file is enough to block a directory).
    let planted: Vec<PathBuf> = (0..4)
        .map(|n| tmp.path().join(format!("vloop-blk-{}-{n}", d.pid())))
        .collect();
    for p in &planted {
        std::fs::write(p, b"taken").unwrap();
    }
    {
        let mut c = d.client();
        c.queue(0).unwrap().write(0, &pattern(9, 512)).unwrap();
    }
    // Nothing of the daemon's is left in TMPDIR.
    let mut left: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    left.sort();
    assert_eq!(left, planted);
    d.survives();
}

fn run_timeout(c: &mut Command, limit: Duration) -> Option<(ExitStatus, String)> {
    let errp = tempfile::NamedTempFile::new().unwrap();
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(errp.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some((st, std::fs::read_to_string(errp.path()).unwrap_or_default()));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn live_socket_of_another_user_is_not_unlinked() {
    let dir = tempfile::tempdir().unwrap();
    // A shared directory: world-writable, not sticky.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = Daemon::start_in(dir, &[], &[], |_| {}).unwrap();
    let other = d.dir.path().join("other.img");
    File::create(&other).unwrap().set_len(IMAGE_SIZE).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut second = Command::new(common::bin());
    second
        .arg("--socket-path")
        .arg(&d.socket)
        .arg("--blk-file")
        .arg(&other);
    if is_root() {
        // Another user, to whom the live socket (mode 0600, root's) refuses connections.
        // SAFETY: setgroups, setgid and setuid are async-signal-safe system calls.
        unsafe {
            second.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    } else {
        std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let out = run_timeout(&mut second, START);
    if !is_root() {
        std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (status, err) = out.expect("the second daemon took over the live socket and serves on it");
    assert!(!status.success(), "the second daemon started: {err}");
    assert!(err.contains("cannot be probed"), "unclear error: {err}");
    let meta = std::fs::symlink_metadata(&d.socket).expect("the live socket was unlinked");
    assert!(meta.file_type().is_socket());
    d.survives();
}

// ---- lower severity ----

#[test]
fn inflight_counters_at_u64_max_keep_resubmission_order() {
    let d = Daemon::start(&[]);
    let (info, file) = {
        let dev = d.device(&inflight_negotiation());
        dev.fe
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, 16))
            .unwrap()
    };
    // What a previous backend left: heads 4 and 0 in flight, taken in that order, with
    // counters at the very top (written as the region format lays them out: a 16-byte queue
    // header, then per descriptor `u8 inflight, u8 padding[5], u16 next, u64 counter`).
    {
        use std::os::unix::fs::FileExt;
        for (head, counter) in [(4u64, u64::MAX - 1), (0, u64::MAX)] {
            let at = 16 + 16 * head;
            file.write_all_at(&counter.to_le_bytes(), at + 8).unwrap();
            file.write_all_at(&[1], at).unwrap();
        }
    }
    {
        let mem = Arc::new(GuestMem::new(MEM).unwrap());
        let mut dev = RawDevice::new(d.raw(), mem);
        dev.negotiate(&inflight_negotiation()).unwrap();
        dev.fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
        dev.set_mem_table().unwrap();
        // The rings as the previous backend left them: two chains taken, none used.
        let layout = RingLayout::new(16, 0).unwrap();
        let probe = RawQueue::detached(dev.mem.clone(), layout).unwrap();
        for (slot, head) in [(0u16, 4u16), (1, 0)] {
            probe
                .write_request(
                    slot,
                    head,
                    RequestType::Flush,
                    0,
                    0,
                    REQS + 64 * u64::from(head),
                )
                .unwrap();
        }
        probe.set_avail_idx(2).unwrap();
        // As QEMU after a reconnect: the ring restarts at the used index.
        let q = dev.start_queue(0, layout, 0).unwrap();
        q.wait_used(2, REPLY).unwrap_or_else(|seen| {
            panic!(
                "in-flight requests not resubmitted (used {seen}):\n{}",
                d.log()
            )
        });
        assert_eq!(q.used_elem(0).unwrap().0, 4, "resubmitted out of order");
        assert_eq!(q.used_elem(1).unwrap().0, 0, "resubmitted out of order");
        // New requests still complete.
        let status = q
            .write_request(2, 8, RequestType::Flush, 0, 0, REQS + 64 * 8)
            .unwrap();
        q.set_avail_idx(3).unwrap();
        q.kick().unwrap();
        q.wait_used(3, REPLY).unwrap_or_else(|seen| {
            panic!("a new request not completed (used {seen}):\n{}", d.log())
        });
        assert_eq!(q.byte(status).unwrap(), S_OK);
    }
    d.survives();
}

fn mem_slots_negotiation() -> Negotiation {
    Negotiation {
        protocol: VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        ..Negotiation::default()
    }
}

/// Region `i` of `n` equal parts of `dev`'s memory, at the guest and frontend addresses the
/// whole-memory table would give it.
fn part(dev: &RawDevice, i: u64, n: u64) -> MemRegion {
    let whole = MemRegion::of(&dev.mem);
    let size = whole.memory_size / n;
    MemRegion {
        guest_phys_addr: i * size,
        memory_size: size,
        user_addr: whole.user_addr + i * size,
        mmap_offset: i * size,
        fd: whole.fd,
    }
}

/// Request `k` on `q`: `kind` of 4096 bytes at `sector`, its header, data and status at guest
/// address `gpa`, which the queue's memory holds at offset `off`; published, and completed
/// with S_OK. Returns the data's offset in the memory.
fn request_at(
    d: &Daemon,
    q: &RawQueue,
    k: u16,
    (kind, sector): (RequestType, u64),
    (gpa, off): (u64, u64),
) -> u64 {
    let head = (k * 3) % q.layout.size;
    let status = q
        .write_request_mapped(k, head, (kind, sector, 4096), (gpa, off))
        .unwrap();
    q.set_avail_idx(k + 1).unwrap();
    q.kick().unwrap();
    q.wait_used(k + 1, REPLY)
        .unwrap_or_else(|seen| panic!("request {k} not completed (used {seen}):\n{}", d.log()));
    assert_eq!(q.byte(status).unwrap(), S_OK, "request {k}:\n{}", d.log());
    off + u64::from(vloop_frontend::blk::HEADER_LEN)
}

#[test]
fn memory_regions_added_and_removed_one_at_a_time_serve_requests() {
    let d = Daemon::start(&[]);
    {
        let mut dev = d.device(&mem_slots_negotiation());
        assert!(
            dev.protocol
                .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
            "CONFIGURE_MEM_SLOTS not offered"
        );
        assert_eq!(dev.fe.get_max_mem_slots().unwrap(), 509);
        let (low, high) = (part(&dev, 0, 2), part(&dev, 1, 2));
        dev.fe.add_mem_reg(&low).unwrap();
        dev.fe.add_mem_reg(&high).unwrap();
        // The ring and the writes in the low half, the reads in the high one.
        dev.start_queue(0, RingLayout::new(16, 0).unwrap(), 0)
            .unwrap();
        let mem = dev.mem.clone();
        let q = &dev.queues[0];
        let top = high.guest_phys_addr + 0x1000;
        let (one, two) = (pattern(1, 4096), pattern(2, 4096));
        let mut read = vec![0u8; 4096];
        let off = REQS;
        mem.write(off + 16, &one).unwrap();
        request_at(&d, q, 0, (RequestType::Out, 8), (off, off));
        let back = request_at(&d, q, 1, (RequestType::In, 8), (top, top));
        mem.read(back, &mut read).unwrap();
        assert!(read == one, "read back other data than written");
        // The high half goes (with a descriptor, as older frontends send) and comes back at
        // other guest addresses.
        dev.fe.rem_mem_reg(&high, Some(mem.raw_fd())).unwrap();
        let moved = MemRegion {
            guest_phys_addr: 4 * MEM,
            ..high
        };
        dev.fe.add_mem_reg(&moved).unwrap();
        mem.write(off + 16, &two).unwrap();
        request_at(&d, q, 2, (RequestType::Out, 16), (off, off));
        let moved_top = moved.guest_phys_addr + 0x1000;
        let back = request_at(&d, q, 3, (RequestType::In, 16), (moved_top, top));
        mem.read(back, &mut read).unwrap();
        assert!(
            read == two,
            "read back through the moved region other data than written"
        );
    }
    d.survives();
}

#[test]
fn a_ring_whose_region_is_removed_and_added_grown_resumes() {
    let d = Daemon::start(&[]);
    {
        let mut dev = d.device(&mem_slots_negotiation());
        // The ring's region, as QEMU changes one: removed, then added grown, while the ring
        // runs.
        let (small, data) = (part(&dev, 0, 4), part(&dev, 1, 2));
        dev.fe.add_mem_reg(&small).unwrap();
        dev.fe.add_mem_reg(&data).unwrap();
        dev.start_queue(0, RingLayout::new(16, 0).unwrap(), 0)
            .unwrap();
        let mem = dev.mem.clone();
        let q = &dev.queues[0];
        let one = pattern(3, 4096);
        mem.write(REQS + 16, &one).unwrap();
        request_at(&d, q, 0, (RequestType::Out, 0), (REQS, REQS));
        dev.fe.rem_mem_reg(&small, None).unwrap();
        // Requests sent together while the ring is parked are answered in order, the enable
        // of the parked ring included.
        dev.fe.send(FrontendReq::GET_FEATURES, &[], &[]).unwrap();
        let on = vhost::vhost_user::message::VhostUserVringState::new(0, 1);
        dev.fe
            .send(FrontendReq::SET_VRING_ENABLE, on.as_slice(), &[])
            .unwrap();
        let codes: Vec<u32> = (0..2)
            .map(|_| dev.fe.recv().unwrap().header.request)
            .collect();
        let want: Vec<u32> = [FrontendReq::GET_FEATURES, FrontendReq::SET_VRING_ENABLE]
            .map(u32::from)
            .to_vec();
        assert_eq!(codes, want, "replies out of order");
        // A request made while the ring's memory is gone waits for it.
        let top = data.guest_phys_addr + 0x1000;
        let status = q
            .write_request(1, 3, RequestType::In, 0, 4096, top)
            .unwrap();
        q.set_avail_idx(2).unwrap();
        q.kick().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(q.used_idx().unwrap(), 1, "a parked ring was served");
        dev.fe.add_mem_reg(&part(&dev, 0, 2)).unwrap();
        q.wait_used(2, REPLY).unwrap_or_else(|seen| {
            panic!(
                "the parked request not completed (used {seen}):\n{}",
                d.log()
            )
        });
        assert_eq!(q.byte(status).unwrap(), S_OK);
        let mut read = vec![0u8; 4096];
        mem.read(top + 16, &mut read).unwrap();
        assert!(read == one, "read back other data than written");
        // It goes on serving.
        flush_request(&d, q, 2, 3);
        for bad in ["stopped", "refused"] {
            assert_eq!(d.log_count(bad), 0, "{bad} in the log:\n{}", d.log());
        }
    }
    d.survives();
}

#[test]
fn a_fault_while_the_library_sets_a_ring_up_ends_the_connection() {
    let mut d = Daemon::start(&[]);
    {
        let mem = Arc::new(GuestMem::from_file(fds::memfd(MEM, false).unwrap()).unwrap());
        let mut dev = RawDevice::new(d.raw(), mem.clone());
        dev.negotiate(&mem_slots_negotiation()).unwrap();
        dev.fe.add_mem_reg(&MemRegion::of(&mem)).unwrap();
        let layout = RingLayout::new(16, 0).unwrap();
        dev.start_queue(0, layout, 0).unwrap();
        flush_request(&d, &dev.queues[0], 0, 1);
        dev.fe.get_vring_base(0).unwrap();
        // The library reads the ring's indices when it is set up again: that read faults.
        mem.file().set_len(0).unwrap();
        let addrs = VringAddrs {
            desc: dev.user_addr(layout.desc),
            avail: dev.user_addr(layout.avail),
            used: dev.user_addr(layout.used),
            ..VringAddrs::default()
        };
        let _ = dev.fe.set_vring_addr(0, &addrs);
        let _ = dev.fe.get_vring_base(0);
        assert!(
            dev.fe.closed_within(Duration::from_secs(5)),
            "the connection survived its memory being truncated:\n{}",
            d.log()
        );
        assert!(d.proc.is_running(), "vloop-blk died:\n{}", d.log());
        assert!(
            d.wait_log("guest memory faulted", 1, Duration::from_secs(2)),
            "the fault was not reported:\n{}",
            d.log()
        );
    }
    d.survives();
}

/// Mappings of process `pid` (lines of its maps file).
fn mappings(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

#[test]
fn memory_regions_added_and_removed_in_a_loop_leak_nothing() {
    let d = Daemon::start(&[]);
    {
        let mut dev = d.device(&mem_slots_negotiation());
        dev.fe.add_mem_reg(&part(&dev, 0, 2)).unwrap();
        dev.start_queue(0, RingLayout::new(16, 0).unwrap(), 0)
            .unwrap();
        let high = part(&dev, 1, 2);
        let cycle = |n: usize| {
            for _ in 0..n {
                dev.fe.add_mem_reg(&high).unwrap();
                dev.fe.rem_mem_reg(&high, Some(high.fd)).unwrap();
            }
        };
        cycle(20);
        let (fds, maps) = (open_fds(d.pid()).unwrap(), mappings(d.pid()));
        cycle(500);
        let (fds_after, maps_after) = (open_fds(d.pid()).unwrap(), mappings(d.pid()));
        assert!(
            fds_after <= fds,
            "500 regions added and removed: {fds} descriptors before, {fds_after} after"
        );
        assert!(
            maps_after <= maps + 2,
            "500 regions added and removed: {maps} mappings before, {maps_after} after"
        );
        flush_request(&d, &dev.queues[0], 0, 1);
    }
    d.survives();
}

#[test]
fn truncating_the_last_of_509_memory_regions_does_not_kill_the_daemon() {
    let mut d = Daemon::start(&[]);
    {
        // Guest memory that cannot be sealed, as the region with the highest guest address.
        let mem = Arc::new(GuestMem::from_file(fds::memfd(MEM, false).unwrap()).unwrap());
        let mut dev = RawDevice::new(d.raw(), mem.clone());
        dev.negotiate(&mem_slots_negotiation()).unwrap();
        let slots = dev.fe.get_max_mem_slots().unwrap();
        let small = fds::memfd(slots * 4096, true).unwrap();
        for i in 0..slots - 1 {
            dev.fe
                .add_mem_reg(&MemRegion {
                    guest_phys_addr: i * 4096,
                    memory_size: 4096,
                    user_addr: 0x6000_0000_0000 + i * 4096,
                    mmap_offset: i * 4096,
                    fd: small.as_raw_fd(),
                })
                .unwrap();
        }
        let high = 1u64 << 32;
        dev.fe
            .add_mem_reg(&MemRegion {
                guest_phys_addr: high,
                ..MemRegion::of(&mem)
            })
            .unwrap();
        dev.start_queue(0, RingLayout::new(16, 0).unwrap(), 0)
            .unwrap();
        let data = pattern(5, 4096);
        mem.write(REQS + 16, &data).unwrap();
        request_at(
            &d,
            &dev.queues[0],
            0,
            (RequestType::Out, 0),
            (high + REQS, REQS),
        );
        mem.file().set_len(0).unwrap();
        dev.queues[0].kick().unwrap();
        assert!(
            dev.fe.closed_within(Duration::from_secs(5)),
            "the connection survived its memory being truncated:\n{}",
            d.log()
        );
        assert!(d.proc.is_running(), "vloop-blk died:\n{}", d.log());
        assert!(
            d.log_count("guest memory faulted") == 1,
            "the fault was not reported once:\n{}",
            d.log()
        );
    }
    d.survives();
}

/// Both halves of memory as regions, queue 0's ring in the high one, and that region
/// removed: the ring is parked.
fn park_queue_0(dev: &mut RawDevice) -> Result<(), RawError> {
    dev.fe.add_mem_reg(&part(dev, 0, 2))?;
    dev.fe.add_mem_reg(&part(dev, 1, 2))?;
    let layout = RingLayout::new(16, MEM / 2 + 0x1000).unwrap();
    dev.start_queue(0, layout, 0)?;
    dev.fe.rem_mem_reg(&part(dev, 1, 2), None)
}

/// One hostile use of ADD_MEM_REG or REM_MEM_REG, on a device negotiated with
/// CONFIGURE_MEM_SLOTS unless `plain`.
struct RegionAttack {
    what: &'static str,
    plain: bool,
    run: fn(&mut RawDevice) -> Result<(), RawError>,
}

#[test]
fn hostile_memory_regions_are_refused() {
    fn add_raw(dev: &mut RawDevice, body: &[u8], fds: &[RawFd]) -> Result<(), RawError> {
        dev.fe.set(FrontendReq::ADD_MEM_REG, body, fds)
    }
    fn body(r: &MemRegion) -> Vec<u8> {
        r.single().as_slice().to_vec()
    }
    let attacks = [
        RegionAttack {
            what: "ADD_MEM_REG without CONFIGURE_MEM_SLOTS negotiated",
            plain: true,
            run: |dev| dev.fe.add_mem_reg(&part(dev, 0, 1)),
        },
        RegionAttack {
            what: "REM_MEM_REG without CONFIGURE_MEM_SLOTS negotiated",
            plain: true,
            run: |dev| {
                dev.set_mem_table()?;
                dev.fe.rem_mem_reg(&part(dev, 0, 1), None)
            },
        },
        RegionAttack {
            what: "ADD_MEM_REG without a descriptor",
            plain: false,
            run: |dev| add_raw(dev, &body(&part(dev, 0, 1)), &[]),
        },
        RegionAttack {
            what: "ADD_MEM_REG with two descriptors",
            plain: false,
            run: |dev| {
                let r = part(dev, 0, 1);
                add_raw(dev, &body(&r), &[r.fd, r.fd])
            },
        },
        RegionAttack {
            what: "ADD_MEM_REG with a short body",
            plain: false,
            run: |dev| {
                let r = part(dev, 0, 1);
                add_raw(dev, &body(&r)[..32], &[r.fd])
            },
        },
        RegionAttack {
            what: "an empty region",
            plain: false,
            run: |dev| {
                dev.fe.add_mem_reg(&MemRegion {
                    memory_size: 0,
                    ..part(dev, 0, 1)
                })
            },
        },
        RegionAttack {
            what: "a region whose frontend addresses wrap around",
            plain: false,
            run: |dev| {
                dev.fe.add_mem_reg(&MemRegion {
                    user_addr: u64::MAX - 4095,
                    ..part(dev, 0, 1)
                })
            },
        },
        RegionAttack {
            what: "a region whose guest addresses wrap around",
            plain: false,
            run: |dev| {
                dev.fe.add_mem_reg(&MemRegion {
                    guest_phys_addr: u64::MAX - 4095,
                    ..part(dev, 0, 1)
                })
            },
        },
        RegionAttack {
            what: "a region longer than its memfd",
            plain: false,
            run: |dev| {
                dev.fe.add_mem_reg(&MemRegion {
                    mmap_offset: 4096,
                    ..part(dev, 0, 1)
                })
            },
        },
        RegionAttack {
            what: "a region backed by an eventfd",
            plain: false,
            run: |dev| {
                let e = EventFd::new(EFD_NONBLOCK).unwrap();
                dev.fe.add_mem_reg(&MemRegion {
                    fd: e.as_raw_fd(),
                    ..part(dev, 0, 1)
                })
            },
        },
        RegionAttack {
            what: "a region overlapping another in guest memory",
            plain: false,
            run: |dev| {
                let low = part(dev, 0, 2);
                dev.fe.add_mem_reg(&low)?;
                dev.fe.add_mem_reg(&MemRegion {
                    guest_phys_addr: low.memory_size / 2,
                    ..part(dev, 1, 2)
                })
            },
        },
        RegionAttack {
            what: "REM_MEM_REG of a region never added",
            plain: false,
            run: |dev| {
                dev.fe.add_mem_reg(&part(dev, 0, 2))?;
                dev.fe.rem_mem_reg(&part(dev, 1, 2), None)
            },
        },
        RegionAttack {
            what: "SET_VRING_ADDR for a ring whose region was removed",
            plain: false,
            run: |dev| {
                park_queue_0(dev)?;
                let addrs = VringAddrs {
                    desc: dev.user_addr(0x1000),
                    avail: dev.user_addr(0x2000),
                    used: dev.user_addr(0x3000),
                    ..VringAddrs::default()
                };
                dev.fe.set_vring_addr(0, &addrs)
            },
        },
        RegionAttack {
            what: "protocol features dropped while a ring's region is removed",
            plain: false,
            run: |dev| {
                park_queue_0(dev)?;
                // Without them the library would enable the parked ring.
                dev.fe.set_features(dev.acked & !(1 << 30))
            },
        },
        RegionAttack {
            what: "a stopped ring restarted after its region moved to other guest addresses",
            plain: false,
            run: |dev| {
                let whole = part(dev, 0, 1);
                dev.fe.add_mem_reg(&whole)?;
                dev.start_queue(0, RingLayout::new(16, 0).unwrap(), 0)?;
                dev.fe.get_vring_base(0)?;
                dev.fe.rem_mem_reg(&whole, None)?;
                // The same frontend addresses; the library keeps the ring at guest address 0.
                dev.fe.add_mem_reg(&MemRegion {
                    guest_phys_addr: 4 * MEM,
                    ..whole
                })?;
                let kick = EventFd::new(EFD_NONBLOCK).unwrap();
                dev.fe.set_vring_kick(0, Some(kick.as_raw_fd()))
            },
        },
        RegionAttack {
            what: "more regions than GET_MAX_MEM_SLOTS offers",
            plain: false,
            run: |dev| {
                let n = dev.fe.get_max_mem_slots()? + 1;
                for i in 0..n {
                    dev.fe.add_mem_reg(&MemRegion {
                        memory_size: 4096,
                        ..part(dev, i, MEM / 4096)
                    })?;
                }
                Ok(())
            },
        },
    ];
    let d = Daemon::start(&[]);
    for a in attacks {
        let how = if a.plain {
            Negotiation::default()
        } else {
            mem_slots_negotiation()
        };
        // The relay refuses each (the library would refuse some itself, without the checks
        // these tests are for). Refusals are logged at most 5 a second.
        let refusals = d.log_count(" refused: ");
        let mut dev = d.device(&how);
        let r = (a.run)(&mut dev);
        assert_refused(&d, &dev.fe, r, a.what);
        assert!(
            d.wait_log(" refused: ", refusals + 1, Duration::from_secs(2)),
            "{} was not refused by the relay:\n{}",
            a.what,
            d.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        d.log_count("panicked") == 0,
        "a panic in the log:\n{}",
        d.log()
    );
    d.survives();
}

#[test]
fn protocol_features_never_offered_are_refused() {
    let d = Daemon::start(&[]);
    let fe = d.raw();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let offered = fe.get_protocol_features().unwrap();
    let all = VhostUserProtocolFeatures::from_bits_retain(u64::MAX);
    assert!(!offered.contains(all));
    fe.send_message(
        Header {
            request: FrontendReq::SET_PROTOCOL_FEATURES.into(),
            flags: VERSION | VhostUserHeaderFlag::NEED_REPLY.bits(),
            size: 8,
        },
        &u64::MAX.to_le_bytes(),
        &[],
    )
    .unwrap();
    // REPLY_ACK is among the bits and the request asks for a reply: the daemon must answer
    // with a failure or hang up.
    match fe.recv_timeout(Duration::from_secs(5)) {
        Ok(r) => assert_ne!(r.u64().unwrap(), 0, "every protocol feature acknowledged"),
        Err(e) => assert!(!matches!(e, RawError::Timeout(_)), "no answer: {e}"),
    }
    drop(fe);
    d.survives();
}

/// inotify events on names in one directory.
struct Watch(std::os::fd::OwnedFd);

impl Watch {
    fn new(dir: &Path) -> Watch {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: inotify_init1 has no memory effects; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor owned by nobody else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        let mask = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ATTRIB;
        // SAFETY: a live descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) };
        assert!(wd >= 0);
        Watch(fd)
    }

    /// Every event so far: (mask, name).
    fn events(&self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: reading into a live buffer of the length given.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            let mut off = 0;
            while off + 16 <= n as usize {
                let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap());
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
                let name = &buf[off + 16..off + 16 + len];
                let name = String::from_utf8_lossy(name)
                    .trim_end_matches('\0')
                    .to_string();
                out.push((mask, name));
                off += 16 + len;
            }
        }
    }
}

#[test]
fn socket_never_exists_at_its_path_with_the_umask_mode() {
    let dir = tempfile::tempdir().unwrap();
    let watch = Watch::new(dir.path());
    let d = Daemon::start_in(dir, &[], &[], |c| {
        // SAFETY: umask is async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                libc::umask(0);
                Ok(())
            })
        };
    })
    .unwrap();
    let events: Vec<(u32, String)> = watch
        .events()
        .into_iter()
        .filter(|(_, n)| n == "vloop.sock")
        .collect();
    assert!(!events.is_empty(), "no event for the socket");
    assert_eq!(
        events[0].0 & libc::IN_MOVED_TO,
        libc::IN_MOVED_TO,
        "the socket was created at its path (with the umask's mode) instead of moved there: {events:?}"
    );
    assert!(
        events
            .iter()
            .all(|(m, _)| m & (libc::IN_CREATE | libc::IN_ATTRIB) == 0),
        "the socket was created or its mode changed at its path: {events:?}"
    );
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {:o}", mode & 0o777);
    d.survives();
}

/// A seccomp filter that fails every OFD lock operation (F_OFD_GETLK, F_OFD_SETLK,
/// F_OFD_SETLKW) with `errno`, as a file system without lock support does.
#[cfg(target_arch = "x86_64")]
fn no_ofd_locks(c: &mut Command, errno: i32) {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let prog = vec![
        f(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        f(JEQ_K, 0, 6, AUDIT_ARCH_X86_64),
        f(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        f(JEQ_K, 0, 4, libc::SYS_fcntl as u32),
        f(LD_W_ABS, 0, 0, 24), // low half of seccomp_data.args[1]
        f(JEQ_K, 3, 0, libc::F_OFD_GETLK as u32),
        f(JEQ_K, 2, 0, libc::F_OFD_SETLK as u32),
        f(JEQ_K, 1, 0, libc::F_OFD_SETLKW as u32),
        f(RET_K, 0, 0, SECCOMP_RET_ALLOW),
        f(RET_K, 0, 0, SECCOMP_RET_ERRNO | errno as u32),
    ];
    // SAFETY: prctl is async-signal-safe; `prog` is moved into the closure and outlives the
    // call that copies it into the kernel.
    unsafe {
        c.pre_exec(move || {
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &fprog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

#[test]
fn image_that_cannot_be_locked_is_refused_unless_locking_is_off() {
    #[cfg(not(target_arch = "x86_64"))]
    {
        vloop_frontend::skip::skip("the seccomp filter of this test is written for x86_64");
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        for errno in [libc::ENOLCK, libc::EINVAL] {
            let dir = tempfile::tempdir().unwrap();
            match Daemon::start_in(dir, &[], &[], |c| no_ofd_locks(c, errno)) {
                Err(BackendError::Exited { status, log, .. }) => {
                    assert!(!status.success());
                    assert!(log.contains("--locking off"), "unclear error: {log}");
                }
                Ok(d) => panic!(
                    "an image that cannot be locked (errno {errno}) is served:\n{}",
                    d.log()
                ),
                Err(e) => panic!("{e}"),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::start_in(dir, &["--locking", "off"], &[], |c| {
            no_ofd_locks(c, libc::ENOLCK)
        })
        .unwrap();
        d.survives();
    }
}

// ---- further attacks ----

/// Offers request number `n` of queue `q` (a FLUSH in slot `n`, descriptors `2n` and
/// `2n + 1`), kicks, and waits for it: the used index must reach `used`.
fn flush_request(d: &Daemon, q: &RawQueue, n: u16, used: u16) {
    let size = q.layout.size;
    let status = q
        .write_request(
            n,
            n.wrapping_mul(2) % size,
            RequestType::Flush,
            0,
            0,
            REQS + 64 * u64::from(n % size),
        )
        .unwrap();
    q.set_avail_idx(n.wrapping_add(1)).unwrap();
    q.kick().unwrap();
    q.wait_used(used, REPLY).unwrap_or_else(|seen| {
        panic!(
            "request {n} not completed (used index {seen}, want {used}):\n{}",
            d.log()
        )
    });
    assert_eq!(q.byte(status).unwrap(), S_OK);
}

/// SET_VRING_NUM, SET_VRING_BASE and SET_VRING_ADDR for queue 0: a ring of 16 at guest
/// address 0, not started (no kick yet).
fn set_ring_addresses(dev: &RawDevice) {
    let l = RingLayout::new(16, 0).unwrap();
    dev.fe.set_vring_num(0, 16).unwrap();
    dev.fe.set_vring_base(0, 0).unwrap();
    let addrs = VringAddrs {
        desc: dev.user_addr(l.desc),
        avail: dev.user_addr(l.avail),
        used: dev.user_addr(l.used),
        ..VringAddrs::default()
    };
    dev.fe.set_vring_addr(0, &addrs).unwrap();
}

#[test]
fn kick_eventfd_in_semaphore_mode() {
    let d = Daemon::start(&[]);
    {
        let dev = d.device(&Negotiation::default());
        dev.set_mem_table().unwrap();
        set_ring_addresses(&dev);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.fe.set_vring_call(0, Some(call.as_raw_fd())).unwrap();
        // Each read of a semaphore eventfd takes 1 from its counter: a counter of 2^40 keeps
        // it readable for ever.
        // SAFETY: eventfd has no memory effects; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_SEMAPHORE | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor owned by nobody else.
        let sem = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        nix::unistd::write(&sem, &(1u64 << 40).to_ne_bytes()).unwrap();
        let r = dev
            .fe
            .set_vring_kick(0, Some(sem.as_raw_fd()))
            .and_then(|()| dev.fe.set_vring_enable(0, true));
        if r.is_ok() {
            d.assert_idle("with a semaphore eventfd as kick");
        }
        assert_refused(&d, &dev.fe, r, "a semaphore eventfd as kick");
    }
    d.survives();
}

#[test]
fn kick_and_call_on_one_eventfd() {
    let d = Daemon::start(&[]);
    {
        let dev = d.started(&Negotiation::default());
        let q = &dev.queues[0];
        // Every call the device makes is a kick.
        dev.fe.set_vring_call(0, Some(q.kick.as_raw_fd())).unwrap();
        for n in 0..3 {
            q.set_used_event(n).unwrap();
            flush_request(&d, q, n, n + 1);
        }
        d.assert_idle("calling itself through its kick");
    }
    d.survives();
}

#[test]
fn vring_num_zero_huge_or_not_a_power_of_two_is_refused() {
    let d = Daemon::start(&[]);
    for num in [0u32, 3, 100, 2048, 65536, u32::MAX] {
        let dev = d.device(&Negotiation::default());
        dev.set_mem_table().unwrap();
        let r = dev.fe.set_vring_num(0, num);
        assert_refused(&d, &dev.fe, r, &format!("SET_VRING_NUM {num}"));
    }
    d.survives();
}

#[test]
fn vring_base_past_the_ring_and_across_the_index_wrap() {
    let d = Daemon::start(&[]);
    {
        // The available ring at 0 and its next index at 40000: a broken ring.
        let mut dev = d.device(&Negotiation::default());
        dev.set_mem_table().unwrap();
        let q = dev
            .start_queue(0, RingLayout::new(16, 0).unwrap(), 40000)
            .unwrap();
        q.kick().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        d.assert_idle("with a vring base past the ring");
    }
    {
        // A ring restarted just before the 16-bit wrap (as after a migration): requests on
        // both sides of it complete.
        let mut dev = d.device(&Negotiation::default());
        dev.set_mem_table().unwrap();
        let layout = RingLayout::new(16, 0).unwrap();
        let probe = RawQueue::detached(dev.mem.clone(), layout).unwrap();
        // The used index as the driver left it, read by the daemon at SET_VRING_ADDR.
        dev.mem
            .write(layout.used + 2, &0xfffeu16.to_le_bytes())
            .unwrap();
        probe.set_avail_idx(0xfffe).unwrap();
        let q = dev.start_queue(0, layout, 0xfffe).unwrap();
        for n in [0xfffeu16, 0xffff, 0, 1] {
            flush_request(&d, q, n, n.wrapping_add(1));
        }
    }
    d.survives();
}

#[test]
fn set_features_while_the_queue_runs() {
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    let d = Daemon::start(&[]);
    {
        let dev = d.started(&Negotiation::default());
        let acked = dev.acked;
        let q = &dev.queues[0];
        flush_request(&d, q, 0, 1);
        // EVENT_IDX off, on, off again under a started ring.
        for (n, f) in [
            (1u16, acked & !(1 << VIRTIO_RING_F_EVENT_IDX)),
            (2, acked),
            (3, acked & !(1 << VIRTIO_RING_F_EVENT_IDX)),
        ] {
            dev.fe.set_features(f).unwrap();
            flush_request(&d, q, n, n + 1);
        }
        d.assert_idle("after features changed under a running ring");
        // Features never offered are refused.
        let r = dev.fe.set_features(u64::MAX);
        assert_refused(&d, &dev.fe, r, "SET_FEATURES with every bit");
    }
    d.survives();
}

#[test]
fn reset_owner_and_reset_device_on_a_running_queue() {
    let d = Daemon::start(&[]);
    {
        let dev = d.started(&Negotiation::default());
        flush_request(&d, &dev.queues[0], 0, 1);
        // RESET_DEVICE was not offered (no RESET_DEVICE protocol feature).
        let r = dev.fe.reset_device();
        assert_refused(&d, &dev.fe, r, "RESET_DEVICE");
    }
    {
        let mut dev = d.started(&Negotiation::default());
        flush_request(&d, &dev.queues[0], 0, 1);
        // RESET_OWNER, then the whole set-up again on the same connection.
        let _ = dev.fe.set(FrontendReq::RESET_OWNER, &[], &[]);
        dev.queues[0].kick().unwrap();
        let again = dev.negotiate(&Negotiation::default());
        if again.is_ok() {
            dev.set_mem_table().unwrap();
            // RESET_OWNER stopped the ring: rewinding its base and kicking its old eventfd
            // does not have request 0 served a second time (a ring still served while the
            // frontend sets it up again was served half-changed and stopped as broken).
            dev.fe.set_vring_base(0, 0).unwrap();
            dev.queues[0].kick().unwrap();
            assert_eq!(
                dev.queues[0].wait_used(2, Duration::from_millis(300)),
                Err(1),
                "a ring was served after RESET_OWNER:\n{}",
                d.log()
            );
            dev.queues.clear();
            dev.start_queue(0, RingLayout::new(16, 0x8000).unwrap(), 0)
                .unwrap();
            flush_request(&d, &dev.queues[0], 0, 1);
        } else {
            assert!(dev.fe.closed_within(Duration::from_secs(5)));
        }
        d.assert_idle("after RESET_OWNER");
    }
    d.survives();
}

#[test]
fn get_vring_base_on_a_running_queue_then_restart() {
    let d = Daemon::start(&[]);
    {
        let mut dev = d.device(&Negotiation::default());
        dev.set_mem_table().unwrap();
        let layout = RingLayout::new(16, 0).unwrap();
        dev.start_queue(0, layout, 0).unwrap();
        flush_request(&d, &dev.queues[0], 0, 1);
        assert_eq!(dev.fe.get_vring_base(0).unwrap(), 1);
        // Stopped: a request offered now waits for the restart.
        let q = &dev.queues[0];
        let status = q
            .write_request(1, 2, RequestType::Flush, 0, 0, REQS + 64)
            .unwrap();
        q.set_avail_idx(2).unwrap();
        q.kick().unwrap();
        assert_eq!(q.wait_used(2, Duration::from_millis(300)), Err(1));
        // Restarted where it stopped: the waiting request is served.
        dev.queues.clear();
        let q = dev.start_queue(0, layout, 1).unwrap();
        q.kick().unwrap();
        q.wait_used(2, REPLY).unwrap_or_else(|seen| {
            panic!(
                "the restarted ring was not served (used {seen}):\n{}",
                d.log()
            )
        });
        assert_eq!(q.byte(status).unwrap(), S_OK);
        d.assert_idle("after a stop and a restart");
    }
    d.survives();
}

#[test]
fn kicks_without_a_memory_table() {
    let d = Daemon::start(&[]);
    {
        let dev = d.device(&Negotiation::default());
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.fe.set_vring_num(0, 16).unwrap();
        dev.fe.set_vring_base(0, 0).unwrap();
        dev.fe.set_vring_call(0, Some(call.as_raw_fd())).unwrap();
        dev.fe.set_vring_kick(0, Some(kick.as_raw_fd())).unwrap();
        let _ = dev.fe.set_vring_enable(0, true);
        for _ in 0..3 {
            kick.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        d.assert_idle("kicked with no memory");
    }
    d.survives();
}

#[test]
fn frontends_racing_to_connect_are_all_served() {
    let d = Arc::new(Daemon::start(&[]));
    let threads: Vec<_> = (0..6u8)
        .map(|i| {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut c = d.client();
                let q = c.queue(0).unwrap();
                let data = pattern(i, 4096);
                q.write(64 * u64::from(i), &data).unwrap();
                assert_eq!(q.read(64 * u64::from(i), 4096).unwrap(), data);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let d = Arc::try_unwrap(d).unwrap_or_else(|_| panic!("a client still holds the daemon"));
    d.survives();
}

/// How long the daemon gives a connection to send its first message whole.
const FIRST_MESSAGE: Duration = Duration::from_secs(5);

/// A frontend is served at once while `stuck` connections that will never send a whole first
/// message wait (the daemon used to take them one after another, [`FIRST_MESSAGE`] each), and
/// each of them is closed soon after its time is up.
fn served_past(d: &mut Daemon, stuck: &[RawFrontend], what: &str) {
    let connected = Instant::now();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    d.assert_serves();
    let served = t.elapsed();
    eprintln!(
        "served {served:?} after {} frontends that {what}",
        stuck.len()
    );
    assert!(
        served < FIRST_MESSAGE / 2,
        "a frontend waited {served:?} behind {} that {what}:\n{}",
        stuck.len(),
        d.log()
    );
    for s in stuck {
        let left = (connected + FIRST_MESSAGE + Duration::from_secs(2))
            .saturating_duration_since(Instant::now());
        assert!(
            s.closed_within(left),
            "a frontend that {what} was still connected {:?} after connecting:\n{}",
            connected.elapsed(),
            d.log()
        );
    }
}

#[test]
fn half_a_message_does_not_hold_the_daemon() {
    let mut d = Daemon::start(&[]);
    let stuck = d.raw();
    // The first 5 bytes of a GET_FEATURES header, then nothing.
    stuck.send_bytes(&[1, 0, 0, 0, 1]).unwrap();
    served_past(&mut d, &[stuck], "sent half a message");
    d.survives();
}

#[test]
fn silent_frontend_does_not_hold_the_daemon() {
    let mut d = Daemon::start(&[]);
    let silent = d.raw();
    served_past(&mut d, &[silent], "never speak");
    d.survives();
}

#[test]
fn many_stuck_frontends_do_not_hold_the_daemon() {
    let mut d = Daemon::start(&[]);
    // Silent ones, ones with part of a header, and ones with a whole header whose body never
    // comes, ten of each.
    let get_features = [1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let set_features = [2u8, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0];
    let stuck: Vec<RawFrontend> = (0..30)
        .map(|i| {
            let fe = d.raw();
            match i % 3 {
                0 => {}
                1 => fe.send_bytes(&get_features[..7]).unwrap(),
                _ => fe.send_bytes(&set_features).unwrap(),
            }
            fe
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let waiting = open_fds(d.pid()).unwrap();
    served_past(&mut d, &stuck, "never sent a whole message");
    // The daemon holds none of their descriptors once the served client's are released too.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut after = open_fds(d.pid()).unwrap();
    while after + 30 > waiting && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = open_fds(d.pid()).unwrap();
    }
    assert!(
        after + 30 <= waiting,
        "descriptors: {waiting} while 30 connections waited, {after} after they were closed"
    );
    d.survives();
}

#[test]
fn out_of_band_bytes_neither_spin_the_daemon_nor_pass_for_a_whole_message() {
    // An out-of-band byte alone: the waiting connection is not polled again and again. One
    // after 11 bytes of a header, or after all but one byte of a body: read as part of the
    // message, which is then whole (and refused, or served) at once, instead of being served
    // as whole and then waited for.
    let mut d = Daemon::start(&[]);
    let oob = |fe: &RawFrontend| {
        nix::sys::socket::send(
            fe.socket().as_raw_fd(),
            b"x",
            nix::sys::socket::MsgFlags::MSG_OOB,
        )
        .unwrap();
    };
    let alone = d.raw();
    oob(&alone);
    std::thread::sleep(Duration::from_millis(100));
    d.assert_idle("with an out-of-band byte waiting");
    let header = d.raw();
    header
        .send_bytes(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
        .unwrap();
    oob(&header);
    let body = d.raw();
    body.send_bytes(&[2, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    oob(&body);
    served_past(&mut d, &[alone, header, body], "sent out-of-band bytes");
    d.survives();
}

#[test]
fn the_oldest_stuck_frontend_gives_way_to_newer_ones() {
    let mut d = Daemon::start(&[]);
    let stuck: Vec<RawFrontend> = (0..40).map(|_| d.raw()).collect();
    // 32 wait; the first 8 were closed to make room.
    for s in &stuck[..8] {
        assert!(
            s.closed_within(Duration::from_secs(2)),
            "the oldest waiting connection stayed open:\n{}",
            d.log()
        );
    }
    served_past(&mut d, &stuck[8..], "never speak");
    assert!(d.log_count("more than 32 frontends") >= 1, "{}", d.log());
    d.survives();
}

fn maps(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

#[test]
fn repeated_memory_tables_release_their_mappings() {
    let d = Daemon::start(&[]);
    {
        let dev = d.device(&Negotiation::default());
        let files: Vec<File> = (0..8)
            .map(|_| fds::memfd(64 << 10, true).unwrap())
            .collect();
        let table: Vec<MemRegion> = files
            .iter()
            .enumerate()
            .map(|(i, f)| MemRegion {
                guest_phys_addr: (i as u64) << 20,
                memory_size: 64 << 10,
                user_addr: 0x7f00_0000_0000 + ((i as u64) << 20),
                mmap_offset: 0,
                fd: f.as_raw_fd(),
            })
            .collect();
        dev.fe.set_mem_table(&table).unwrap();
        let (fds0, maps0) = (open_fds(d.pid()).unwrap(), maps(d.pid()));
        for _ in 0..300 {
            dev.fe.set_mem_table(&table).unwrap();
        }
        dev.fe.get_features().unwrap();
        let (fds1, maps1) = (open_fds(d.pid()).unwrap(), maps(d.pid()));
        assert!(fds1 <= fds0 + 2, "descriptors {fds0} -> {fds1}");
        assert!(maps1 <= maps0 + 16, "mappings {maps0} -> {maps1}");
        assert_eq!(d.log_count("no room to guard"), 0, "{}", d.log());
    }
    d.survives();
}

#[test]
fn odd_config_space_requests() {
    use vhost::vhost_user::message::VhostUserConfigFlags;
    let d = Daemon::start(&[]);
    // Sizes and offsets at and past the edges: answered (possibly with an empty payload) or
    // refused, never a crash.
    for (offset, size) in [
        (0u32, 0u32),
        (0, 0x1000),
        (0x1000, 0),
        (59, 1),
        (60, 4),
        (0xffc, 4),
    ] {
        let dev = d.device(&Negotiation::default());
        match dev
            .fe
            .get_config(offset, size, VhostUserConfigFlags::empty())
        {
            Ok(b) => assert!(
                b.len() <= size as usize,
                "{offset}+{size}: {} bytes",
                b.len()
            ),
            Err(_) => assert!(dev.fe.closed_within(Duration::from_secs(5))),
        }
    }
    // SET_CONFIG whose size field says more than the payload holds, or whose payload is
    // empty, or at the largest offset.
    for (offset, size, payload) in [
        (32u32, 60u32, vec![0u8]),
        (32, 0, vec![]),
        (u32::MAX, 1, vec![0]),
    ] {
        let dev = d.device(&Negotiation::default());
        let mut body = vhost::vhost_user::message::VhostUserConfig::new(
            offset,
            size,
            VhostUserConfigFlags::WRITABLE,
        )
        .as_slice()
        .to_vec();
        body.extend_from_slice(&payload);
        let _ = dev.fe.set(FrontendReq::SET_CONFIG, &body, &[]);
        let _ = dev.fe.get_features();
    }
    // The write cache stays writeback when CONFIG_WCE was not negotiated.
    {
        let dev = d.device(&Negotiation::default());
        let _ = dev.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0]);
        let wce = dev
            .fe
            .get_config(32, 1, VhostUserConfigFlags::empty())
            .unwrap();
        assert_eq!(wce, [1]);
    }
    d.survives();
}

#[test]
fn descriptors_replaced_again_and_again_are_released() {
    let d = Daemon::start(&[]);
    {
        let how = Negotiation {
            protocol: VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                | VhostUserProtocolFeatures::BACKEND_REQ,
            ..Negotiation::default()
        };
        let dev = d.started(&how);
        flush_request(&d, &dev.queues[0], 0, 1);
        let (fds0, maps0) = (open_fds(d.pid()).unwrap(), maps(d.pid()));
        for _ in 0..200 {
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            dev.fe.set_vring_call(0, Some(call.as_raw_fd())).unwrap();
            let (ours, _theirs) = UnixStream::pair().unwrap();
            dev.fe.set_backend_req_fd(ours.as_raw_fd()).unwrap();
            let _ = dev
                .fe
                .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, 16))
                .unwrap();
        }
        let (fds1, maps1) = (open_fds(d.pid()).unwrap(), maps(d.pid()));
        assert!(fds1 <= fds0 + 4, "descriptors {fds0} -> {fds1}");
        assert!(maps1 <= maps0 + 16, "mappings {maps0} -> {maps1}");
        // The last call eventfd is the one in use.
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.fe.set_vring_call(0, Some(call.as_raw_fd())).unwrap();
        let _ = call.read();
        let q = &dev.queues[0];
        q.set_used_event(1).unwrap();
        flush_request(&d, q, 1, 2);
        assert!(
            call.read().is_ok(),
            "the last call eventfd was not signalled"
        );
    }
    d.survives();
}

/// The daemon's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn large_writes_at_sector_0_of_a_probed_raw_image_take_no_memory() {
    // --format auto decided the image is raw, so writes into its first sector are checked (a
    // guest may not plant a qcow2 header there). The check copies that sector only: a ring of
    // whole-disk writes at sector 0, their data descriptors all on the same 1 MiB of guest
    // memory, may not make the daemon copy each whole write (128 x 4 MiB here).
    use vloop_frontend::blk::{header, HEADER_LEN, S_IOERR};
    use vloop_frontend::ring::{Descriptor, DESC_F_NEXT, DESC_F_WRITE};
    const REQUESTS: u16 = 128;
    const DATA: u64 = 1 << 20;
    const SEGS: u16 = (IMAGE_SIZE / DATA) as u16;
    let d = Daemon::start(&[]);
    {
        let mut dev = d.device(&Negotiation::default());
        dev.set_mem_table().unwrap();
        let layout = RingLayout::new(1024, 0).unwrap();
        dev.start_queue(0, layout, 0).unwrap();
        // The first write plants a qcow2 header: refused.
        let mut data = pattern(7, DATA as usize);
        data[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        dev.mem.write(DATA, &data).unwrap();
        let q = &dev.queues[0];
        let request = |n: u16| {
            let (hdr, status) = (REQS + 32 * u64::from(n), REQS + 32 * u64::from(n) + 16);
            dev.mem.write(hdr, &header(RequestType::Out, 0)).unwrap();
            dev.mem.write(status, &[0xff]).unwrap();
            let base = n * (SEGS + 2);
            let desc = |i: u16, addr: u64, len: u32, flags: u16| {
                let next = if flags & DESC_F_NEXT != 0 {
                    base + i + 1
                } else {
                    0
                };
                q.set_desc(
                    base + i,
                    Descriptor {
                        addr,
                        len,
                        flags,
                        next,
                    },
                )
                .unwrap();
            };
            desc(0, hdr, HEADER_LEN, DESC_F_NEXT);
            for s in 0..SEGS {
                desc(1 + s, DATA, DATA as u32, DESC_F_NEXT);
            }
            desc(SEGS + 1, status, 1, DESC_F_WRITE);
            q.set_avail_entry(n, base).unwrap();
            status
        };
        let refused = request(0);
        q.set_avail_idx(1).unwrap();
        q.kick().unwrap();
        q.wait_used(1, REPLY).unwrap();
        assert_eq!(q.byte(refused).unwrap(), S_IOERR, "the header was written");
        // Ordinary data: every write lands, without a copy of each.
        data[..8].copy_from_slice(&[0x5a; 8]);
        dev.mem.write(DATA, &data).unwrap();
        let before = peak_rss(d.pid());
        let statuses: Vec<u64> = (1..=REQUESTS).map(request).collect();
        q.set_avail_idx(REQUESTS + 1).unwrap();
        q.kick().unwrap();
        q.wait_used(REQUESTS + 1, SERVED)
            .unwrap_or_else(|seen| panic!("used {seen} of {}:\n{}", REQUESTS + 1, d.log()));
        for s in statuses {
            assert_eq!(q.byte(s).unwrap(), S_OK);
        }
        let grew = peak_rss(d.pid()).saturating_sub(before);
        assert!(
            grew < 64 << 20,
            "the daemon's peak memory grew by {} MiB for {REQUESTS} writes of {} MiB",
            grew >> 20,
            IMAGE_SIZE >> 20
        );
        let image = std::fs::read(&d.image).unwrap();
        for chunk in image.chunks(DATA as usize) {
            assert!(chunk == &data[..], "the image does not hold the writes");
        }
    }
    d.survives();
}

#[test]
fn head_indices_past_the_ring_log_within_the_budget() {
    // Every available entry names head 0xfff0: no chain, nothing to complete, and each one
    // reported within the queue's budget of log lines (the queue library, left to itself,
    // logged every one).
    let d = Daemon::start(&[]);
    let lines = d.log_lines();
    {
        let mut dev = d.device(&Negotiation::default());
        dev.set_mem_table().unwrap();
        let q = dev
            .start_queue(0, RingLayout::new(256, 0).unwrap(), 0)
            .unwrap();
        let mut idx = 0u16;
        for _ in 0..20 {
            for _ in 0..128 {
                q.set_avail_entry(idx, 0xfff0).unwrap();
                idx = idx.wrapping_add(1);
            }
            q.set_avail_idx(idx).unwrap();
            q.kick().unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        d.assert_idle("after 2560 heads past the ring");
    }
    let added = d.log_lines() - lines;
    assert!(
        added <= 4 * FEW_LINES,
        "2560 heads past the ring added {added} log lines:\n{}",
        d.log().lines().take(40).collect::<Vec<_>>().join("\n")
    );
    d.survives();
}

#[test]
fn frontends_that_reconnect_in_a_loop_with_a_bad_request_each_log_within_a_budget() {
    // Every connection is new to the daemon: its queue's warnings and its queue's enable had
    // budgets of their own, and a connection that did I/O had its end logged whatever: about
    // five lines each. The process's budget for lines about requests (40 a second), the
    // queue enables' (32 a second) and the connection lines' (5 connections a second, three
    // lines each) bound them now.
    use vloop_frontend::blk::S_UNSUPP;
    const N: usize = 150;
    let d = Daemon::start(&[]);
    let lines = d.log_lines();
    let t = Instant::now();
    for _ in 0..N {
        let dev = d.started(&Negotiation::default());
        let q = &dev.queues[0];
        let status = q
            .write_request(0, 0, RequestType::Other(99), 0, 0, REQS)
            .unwrap();
        q.set_avail_idx(1).unwrap();
        q.kick().unwrap();
        q.wait_used(1, REPLY).unwrap();
        assert_eq!(q.byte(status).unwrap(), S_UNSUPP);
    }
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let added = d.log_lines() - lines;
    let windows = took.as_secs() as usize + 2;
    eprintln!("{N} connections in {took:?} added {added} log lines");
    assert!(
        added <= windows * (40 + 32 + 15),
        "{N} connections in {took:?} added {added} log lines:\n{}",
        d.log().lines().take(40).collect::<Vec<_>>().join("\n")
    );
    d.survives();
}

#[test]
fn frontends_that_connect_and_close_in_a_loop_log_within_a_budget() {
    // Each connection logs a few lines (connected, ended, its counters): 300 of them in a
    // second or two may not add 900.
    let d = Daemon::start(&[]);
    let lines = d.log_lines();
    for i in 0..300 {
        let fe = d.raw();
        if i % 2 == 0 {
            // A message the library refuses: the connection ends with an error.
            let _ = fe.send(FrontendReq::GET_FEATURES, &[0u8; 8], &[]);
        }
        drop(fe);
    }
    // Served in turn: once a well-behaved frontend is, all 300 were.
    let mut c = d.client();
    c.queue(0).unwrap().write(0, &[1u8; 512]).unwrap();
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    let added = d.log_lines() - lines;
    assert!(
        added <= 120,
        "300 connections added {added} log lines:\n{}",
        d.log().lines().take(40).collect::<Vec<_>>().join("\n")
    );
    d.survives();
}
