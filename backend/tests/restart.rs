//! A backend killed at the worst moments and restarted on the same socket: the frontend (the
//! project's client acting as QEMU does with `-chardev socket,reconnect=...`: same memory,
//! rings, eventfds and inflight region) sees every completion without kicking again.
//!
//! - Completed but not signalled: the completion is in the used ring, the notification is
//!   gone (consumed, as if the backend died before it wrote the call eventfd); the new backend
//!   signals the call eventfd as soon as the frontend sets it.
//! - Made available but never taken: the backend is stopped (SIGSTOP) before it can see the
//!   requests, killed, and the kick consumed; the new backend takes them from the available
//!   ring (its relay kicks the queue once it recovers a region from a previous backend) and
//!   completes them.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vloop_frontend::backend::{BackendProcess, BackendSpec, Export, Program};
use vloop_frontend::blk::S_OK;
use vloop_frontend::{Client, ClientOptions, Completion, Request};
use vmm_sys_util::eventfd::EventFd;

const WAIT: Duration = Duration::from_secs(10);

fn start(dir: &Path, n: u32) -> BackendProcess {
    let spec = BackendSpec::new(
        Program::Vloop(env!("CARGO_BIN_EXE_vloop-blk").into()),
        Export::new(dir.join("disk.img"), dir.join("blk.sock")),
    );
    BackendProcess::spawn(&spec, &dir.join(format!("blk{n}.log")), WAIT).unwrap()
}

/// A backend serving a sparse image of `size` bytes in a fresh directory (its socket), and a
/// client of it with 8 slots of `slot` bytes on a queue of 64.
fn served(size: u64, slot: u32) -> (tempfile::TempDir, PathBuf, BackendProcess, Client) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(size)
        .unwrap();
    let sock = dir.path().join("blk.sock");
    let backend = start(dir.path(), 0);
    let opts = ClientOptions {
        queue_size: 64,
        slots: 8,
        slot_data_size: slot,
        ..ClientOptions::default()
    };
    let c = Client::connect(&sock, &opts).unwrap();
    (dir, sock, backend, c)
}

fn readable(fd: &EventFd, timeout: Duration) -> bool {
    // SAFETY: the eventfd stays open for this call.
    let b = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    let mut p = [PollFd::new(b, PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    matches!(poll(&mut p, PollTimeout::from(ms)), Ok(1))
}

/// The restarted backend's socket accepts connections again.
fn reconnect(c: &mut Client, sock: &Path) {
    let deadline = Instant::now() + WAIT;
    loop {
        match c.reconnect(sock) {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("cannot reconnect: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn kill_hard(b: &mut BackendProcess) {
    let _ = kill(Pid::from_raw(b.pid() as i32), Signal::SIGKILL);
    b.wait_timeout(WAIT).expect("the backend did not die");
}

#[test]
fn completions_reach_the_frontend_after_restarts_without_a_new_kick() {
    let (dir, sock, mut backend, mut c) = served(4 << 20, 4096);
    assert!(c.inflight_file().is_some(), "INFLIGHT_SHMFD negotiated");

    // 1. Completed, notification lost.
    {
        let q = c.queue(0).unwrap();
        q.fill_slot(0, &[0x11; 4096]).unwrap();
        q.submit_in(
            0,
            Request::Write {
                sector: 0,
                len: 4096,
            },
        )
        .unwrap();
        q.publish();
        q.kick_now().unwrap();
        let deadline = Instant::now() + WAIT;
        while q.ring_pending() == 0 {
            assert!(Instant::now() < deadline, "the write never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The notification is consumed, as if the backend died before writing it.
        assert!(readable(q.call_fd(), WAIT));
        q.call_fd().read().unwrap();
    }
    kill_hard(&mut backend);
    let mut backend = start(dir.path(), 1);
    reconnect(&mut c, &sock);
    let q = c.queue(0).unwrap();
    assert!(
        readable(q.call_fd(), WAIT),
        "the restarted backend did not signal the call eventfd"
    );
    let mut done: Vec<Completion> = Vec::new();
    q.reap(&mut done);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, S_OK);

    // 2. Made available while the backend was stopped, never taken; the kick is consumed.
    kill(Pid::from_raw(backend.pid() as i32), Signal::SIGSTOP).unwrap();
    for slot in 0..4u16 {
        q.fill_slot(slot, &[0x20 + slot as u8; 4096]).unwrap();
        q.submit_in(
            slot,
            Request::Write {
                sector: 8 * u64::from(slot + 1),
                len: 4096,
            },
        )
        .unwrap();
    }
    q.publish();
    q.kick_now().unwrap();
    kill_hard(&mut backend);
    while q.kick_fd().read().is_ok() {}
    let _ = q.call_fd().read();
    let mut backend = start(dir.path(), 2);
    reconnect(&mut c, &sock);
    let q = c.queue(0).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut done = Vec::new();
    while done.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "{} of 4 requests completed after the restart",
            done.len()
        );
        if readable(q.call_fd(), Duration::from_millis(100)) {
            let _ = q.call_fd().read();
        }
        q.reap(&mut done);
    }
    assert!(done.iter().all(|d| d.status == S_OK), "{done:?}");
    // The data is on the image.
    let img = std::fs::read(dir.path().join("disk.img")).unwrap();
    assert!(img[..4096].iter().all(|&b| b == 0x11));
    for slot in 0..4usize {
        let at = 8 * 512 * (slot + 1);
        assert!(img[at..at + 4096].iter().all(|&b| b == 0x20 + slot as u8));
    }
    // The frontend keeps working on the restarted backend.
    let q = c.queue(0).unwrap();
    q.write(100, &[0x77; 4096]).unwrap();
    assert_eq!(q.read(100, 4096).unwrap(), vec![0x77; 4096]);
    let st = backend.stop(WAIT).unwrap();
    assert!(st.success(), "{st}: {}", backend.log_tail(20));
}

#[test]
fn sigterm_puts_what_was_taken_in_the_used_ring_before_the_socket_closes() {
    // A frontend that sees the socket close takes the used index as the ring's position
    // (QEMU's GET_VRING_BASE fails): a request completed after that would be in the used ring
    // behind its back, and QEMU, restarting the ring before it, would have the next backend
    // serve it again. So a daemon told to stop finishes what it took before it closes the
    // socket. The request here is a flush behind 256 MiB of dirty page cache.
    let (_dir, _sock, mut backend, mut c) = served(512 << 20, 1 << 20);
    let fd = c.frontend().as_raw_fd();
    let q = c.queue(0).unwrap();
    let data = vec![0x5a; 1 << 20];
    for i in 0..256u64 {
        q.write(i * 2048, &data).unwrap();
    }
    q.submit(Request::Flush).unwrap();
    q.publish();
    q.kick_now().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    kill(Pid::from_raw(backend.pid() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "the socket never closed");
        // SAFETY: the client keeps its socket open for this whole test.
        let b = unsafe { BorrowedFd::borrow_raw(fd) };
        let mut p = [PollFd::new(b, PollFlags::POLLIN)];
        let closed = matches!(poll(&mut p, PollTimeout::ZERO), Ok(1));
        // (Readable: the daemon sends nothing unasked on this socket, so it is the end.)
        // Read after the socket's state: with the completion first, it is there by now.
        let completed = q.ring_pending() > 0;
        if closed {
            assert!(
                completed,
                "the socket closed with the flush still in flight:\n{}",
                std::fs::read_to_string(backend.log()).unwrap_or_default()
            );
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let status = backend
        .wait_timeout(WAIT)
        .expect("the backend did not exit");
    assert!(status.success(), "{status:?}");
    let mut done: Vec<Completion> = Vec::new();
    q.reap(&mut done);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, S_OK);
}
