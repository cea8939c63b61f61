//! Malformed descriptor chains and abrupt frontends against the vloop-blk binary: the daemon
//! must answer or drop each bad chain, keep serving, and never die.

mod common;

use std::time::Duration;

use vloop_frontend::blk::{header, RequestType, S_OK};
use vloop_frontend::client::STATUS_UNSET;
use vloop_frontend::ring::{Descriptor, DESC_F_NEXT, DESC_F_WRITE};
use vloop_frontend::{Client, ClientOptions, Queue, Request};

const WAIT: Duration = Duration::from_secs(5);

fn setup() -> Option<(common::Export, Client)> {
    let b = common::backend("vloop")?;
    let e = common::export(b, 1);
    let c = common::connect(e.daemon.socket(), None);
    Some((e, c))
}

/// A well-formed read still works (the queue was not wedged).
fn still_serves(q: &mut Queue) {
    assert_eq!(&q.read(9, 512).unwrap()[..8], &9u64.to_le_bytes());
}

/// Writes a read header and an unset status byte into scratch; returns their addresses.
fn scratch_request(q: &Queue) -> (u64, u64, u64) {
    let (s, _) = q.scratch();
    q.mem().write(s, &header(RequestType::In, 0)).unwrap();
    q.mem().write(s + 64, &[STATUS_UNSET]).unwrap();
    (s, s + 64, s + 1024)
}

/// Pushes the chain `chain(queue, header, status, data)` of (address, length, writable)
/// descriptors, built around a read request in scratch memory; the backend must answer it
/// with an error status it wrote, keep serving the queue and stay alive.
fn a_bad_chain_is_answered_with_an_error(
    chain: impl Fn(&Queue, u64, u64, u64) -> Vec<(u64, u32, bool)>,
) {
    let Some((mut e, mut c)) = setup() else {
        return;
    };
    let q = c.queue(0).unwrap();
    let (hdr, status, data) = scratch_request(q);
    let base = q.raw_desc_base();
    let head = q.push_chain(base, &chain(q, hdr, status, data));
    q.kick().unwrap();
    let used = q.next_used(WAIT).unwrap();
    assert_eq!(used.id, u32::from(head));
    let st = q.read_byte(status).unwrap();
    assert!(st != S_OK && st != STATUS_UNSET, "status {st}");
    still_serves(q);
    assert!(e.daemon.is_running());
}

#[test]
fn data_buffer_outside_guest_memory_is_an_ioerr() {
    a_bad_chain_is_answered_with_an_error(|q, hdr, status, _| {
        let beyond = q.mem().len() + (1 << 30);
        vec![(hdr, 16, false), (beyond, 4096, true), (status, 1, true)]
    });
}

#[test]
fn short_header_is_rejected_with_a_status() {
    a_bad_chain_is_answered_with_an_error(|_, hdr, status, data| {
        vec![(hdr, 8, false), (data, 512, true), (status, 1, true)]
    });
}

#[test]
fn descriptor_loop_does_not_hang_the_queue() {
    let Some((mut e, mut c)) = setup() else {
        return;
    };
    let q = c.queue(0).unwrap();
    let (hdr, _, _) = scratch_request(q);
    let base = q.raw_desc_base();
    // base -> base+1 -> base -> ... forever.
    q.set_desc(
        base,
        Descriptor {
            addr: hdr,
            len: 16,
            flags: DESC_F_NEXT,
            next: base + 1,
        },
    );
    q.set_desc(
        base + 1,
        Descriptor {
            addr: hdr + 512,
            len: 16,
            flags: DESC_F_NEXT | DESC_F_WRITE,
            next: base,
        },
    );
    q.push_avail(base);
    q.kick().unwrap();
    // Whether the loop is answered or dropped, the next request must complete.
    let done = q
        .execute(Request::Read {
            sector: 9,
            len: 512,
        })
        .unwrap();
    assert_eq!(done.status, S_OK);
    assert!(e.daemon.is_running());
}

#[test]
fn head_index_out_of_range_leaves_the_daemon_alive() {
    let Some((mut e, mut c)) = setup() else {
        return;
    };
    let q = c.queue(0).unwrap();
    let size = q.layout().size;
    q.push_avail(size + 3);
    q.kick().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(e.daemon.is_running(), "{}", e.daemon.log_tail(20));
    drop(c);
    // A new frontend gets a working device.
    let mut c2 = reconnect(&e);
    still_serves(c2.queue(0).unwrap());
}

fn reconnect(e: &common::Export) -> Client {
    for _ in 0..50 {
        if let Ok(c) = Client::connect(e.daemon.socket(), &ClientOptions::default()) {
            return c;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot reconnect; log:\n{}", e.daemon.log_tail(20));
}

#[test]
fn disconnect_with_requests_in_flight_then_reconnect() {
    let Some((mut e, mut c)) = setup() else {
        return;
    };
    let q = c.queue(0).unwrap();
    for i in 0..q.slots() {
        q.submit(Request::Read {
            sector: u64::from(i) * 8,
            len: 64 << 10,
        })
        .unwrap();
    }
    q.kick().unwrap();
    c.shutdown_socket();
    drop(c);
    let mut c2 = reconnect(&e);
    let q2 = c2.queue(0).unwrap();
    let data = common::pattern(5, 4096);
    q2.write(100, &data).unwrap();
    assert_eq!(q2.read(100, 4096).unwrap(), data);
    assert!(e.daemon.is_running());
}
