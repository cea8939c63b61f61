//! The request-level checks every vhost-user-blk backend must pass; each test file runs
//! them against one backend.

/// One `#[test]` per case of this suite, run against the named backend
/// (`common::backend(NAME)`; skipped with a message when it is absent).
macro_rules! tests_against {
    ($backend:literal) => {
        tests_against!(@ $backend;
            config_reports_capacity_and_queues,
            reads_return_image_data,
            write_read_back_flush_and_file_content,
            many_requests_in_flight,
            get_id_discard_write_zeroes,
            unknown_type_is_unsupported,
            reads_past_the_end_fail,
            second_client_after_disconnect,
            works_without_event_idx_and_reply_ack,
            verified_random_io_on_two_queues,
        );
    };
    (@ $backend:literal; $($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let Some(b) = common::backend($backend) else { return };
            suite::$name(b);
        }
    )*};
}

use std::time::Duration;

use vloop_frontend::backend::Program as Backend;
use vloop_frontend::blk::{SECTOR_SIZE, S_OK, S_UNSUPP};
use vloop_frontend::client::STATUS_UNSET;
use vloop_frontend::{Client, ClientOptions, Request};

use crate::common::{connect, export, pattern, IMAGE_SIZE};

pub fn config_reports_capacity_and_queues(b: Backend) {
    let e = export(b, 2);
    let c = connect(e.daemon.socket(), None);
    assert_eq!(c.config().capacity, IMAGE_SIZE / SECTOR_SIZE);
    assert_eq!(c.num_queues(), 2, "config: {:?}", c.config());
    assert!(c.has_feature(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1));
    let inflight = vhost::vhost_user::VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    eprintln!(
        "protocol features {:?}, inflight region: {:?}",
        c.protocol_features(),
        c.inflight_file().map(|f| f.metadata().map(|m| m.len()))
    );
    assert_eq!(
        c.protocol_features().contains(inflight),
        c.inflight_file().is_some()
    );
}

pub fn reads_return_image_data(b: Backend) {
    let e = export(b, 1);
    let mut c = connect(e.daemon.socket(), None);
    let q = c.queue(0).unwrap();
    for sector in [0u64, 1, 77, IMAGE_SIZE / SECTOR_SIZE - 8] {
        let data = q.read(sector, 4096).unwrap();
        for (i, s) in data.chunks(512).enumerate() {
            assert_eq!(
                &s[..8],
                &(sector + i as u64).to_le_bytes(),
                "sector {sector}+{i}"
            );
        }
    }
}

pub fn write_read_back_flush_and_file_content(b: Backend) {
    let e = export(b, 2);
    let mut c = connect(e.daemon.socket(), None);
    for qi in 0..2 {
        let q = c.queue(qi).unwrap();
        let data = pattern(qi as u8 + 1, 64 << 10);
        let sector = 1000 + 200 * qi as u64;
        q.write(sector, &data).unwrap();
        assert_eq!(q.read(sector, data.len() as u32).unwrap(), data);
        q.flush().unwrap();
    }
    drop(c);
    let file = std::fs::read(&e.image).unwrap();
    let off = 1000 * 512;
    assert_eq!(&file[off..off + (64 << 10)], &pattern(1, 64 << 10)[..]);
}

pub fn many_requests_in_flight(b: Backend) {
    let e = export(b, 1);
    let mut c = connect(e.daemon.socket(), None);
    let q = c.queue(0).unwrap();
    let n = q.slots();
    for i in 0..n {
        let slot = q.next_free_slot().unwrap();
        q.fill_slot(slot, &pattern(i as u8, 4096)).unwrap();
        q.submit_in(
            slot,
            Request::Write {
                sector: 8 * u64::from(i),
                len: 4096,
            },
        )
        .unwrap();
    }
    assert_eq!(q.in_flight(), usize::from(n));
    assert!(q.submit(Request::Flush).is_err(), "every slot is busy");
    q.kick().unwrap();
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while done.len() < usize::from(n) {
        if q.reap(&mut done) == 0 {
            q.wait(deadline).unwrap();
        }
    }
    assert!(done.iter().all(|c| c.status == S_OK), "{done:?}");
    for i in 0..n {
        assert_eq!(
            q.read(8 * u64::from(i), 4096).unwrap(),
            pattern(i as u8, 4096)
        );
    }
}

pub fn get_id_discard_write_zeroes(b: Backend) {
    let e = export(b, 1);
    let mut c = connect(e.daemon.socket(), None);
    let discard = c.has_feature(virtio_bindings::virtio_blk::VIRTIO_BLK_F_DISCARD);
    let wz = c.has_feature(virtio_bindings::virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES);
    let q = c.queue(0).unwrap();
    let id = q.get_id().unwrap();
    eprintln!("serial: {:?}", String::from_utf8_lossy(&id));
    if discard {
        q.write(64, &pattern(9, 8192)).unwrap();
        q.discard(64, 16).unwrap();
    } else {
        eprintln!("backend does not offer DISCARD; discard not checked");
    }
    if wz {
        q.write(128, &pattern(7, 8192)).unwrap();
        q.write_zeroes(128, 16, false).unwrap();
        assert_eq!(q.read(128, 8192).unwrap(), vec![0u8; 8192]);
        // Outside the zeroed range data is untouched.
        assert_eq!(&q.read(144, 512).unwrap()[..8], &144u64.to_le_bytes());
    } else {
        eprintln!("backend does not offer WRITE_ZEROES; write-zeroes not checked");
    }
}

pub fn unknown_type_is_unsupported(b: Backend) {
    let e = export(b, 1);
    let mut c = connect(e.daemon.socket(), None);
    let q = c.queue(0).unwrap();
    let (scratch, _) = q.scratch();
    let hdr = vloop_frontend::blk::header(vloop_frontend::RequestType::Other(0x7777), 0);
    q.mem().write(scratch, &hdr).unwrap();
    q.mem().write(scratch + 64, &[STATUS_UNSET]).unwrap();
    let first = q.raw_desc_base();
    let head = q.push_chain(first, &[(scratch, 16, false), (scratch + 64, 1, true)]);
    q.kick().unwrap();
    let used = q.next_used(Duration::from_secs(10)).unwrap();
    assert_eq!(used.id, u32::from(head));
    assert_eq!(q.read_byte(scratch + 64).unwrap(), S_UNSUPP);
    // The queue keeps serving.
    assert_eq!(&q.read(3, 512).unwrap()[..8], &3u64.to_le_bytes());
}

pub fn reads_past_the_end_fail(b: Backend) {
    let e = export(b, 1);
    let mut c = connect(e.daemon.socket(), None);
    let q = c.queue(0).unwrap();
    let last = IMAGE_SIZE / SECTOR_SIZE;
    let done = q
        .execute(Request::Read {
            sector: last - 1,
            len: 4096,
        })
        .unwrap();
    assert_ne!(done.status, S_OK, "read across the end must fail");
    assert_ne!(done.status, STATUS_UNSET, "status byte must be written");
}

pub fn second_client_after_disconnect(b: Backend) {
    let e = export(b, 1);
    {
        let mut c = connect(e.daemon.socket(), None);
        c.queue(0).unwrap().write(5, &pattern(3, 512)).unwrap();
    }
    // The backend must accept a new frontend once the first one is gone.
    let mut ok = None;
    for _ in 0..50 {
        match Client::connect(e.daemon.socket(), &ClientOptions::default()) {
            Ok(c) => {
                ok = Some(c);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let mut c = ok.expect("reconnect");
    assert_eq!(c.queue(0).unwrap().read(5, 512).unwrap(), pattern(3, 512));
}

pub fn works_without_event_idx_and_reply_ack(b: Backend) {
    let e = export(b, 1);
    let opts = ClientOptions {
        event_idx: false,
        reply_ack: false,
        slots: 8,
        ..ClientOptions::default()
    };
    let mut c = Client::connect(e.daemon.socket(), &opts).unwrap();
    assert!(!c.has_feature(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX));
    let q = c.queue(0).unwrap();
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Several rounds of a full queue: kicks and calls follow the flags, not event indices.
    for round in 0..20u64 {
        for i in 0..8 {
            q.submit(Request::Read {
                sector: round * 64 + i * 8,
                len: 4096,
            })
            .unwrap();
        }
        q.kick().unwrap();
        done.clear();
        while done.len() < 8 {
            if q.reap(&mut done) == 0 {
                q.wait(deadline).unwrap();
            }
        }
        assert!(done.iter().all(|c| c.status == S_OK));
    }
    assert!(q.stats().kicks > 0);
}

pub fn verified_random_io_on_two_queues(b: Backend) {
    let e = export(b, 2);
    let w = vloop_bench::load::Workload {
        pattern: vloop_bench::load::Pattern::Mixed { read_pct: 50 },
        bs: 4096,
        iodepth: 8,
        queues: 2,
        runtime: Duration::from_millis(700),
        one_pass: false,
        think: Duration::ZERO,
    };
    let r = vloop_bench::verify::run_verify(e.daemon.socket(), &w).unwrap();
    eprintln!("{r:?}");
    assert_eq!(r.mismatches, 0);
    assert_eq!(r.errors, 0);
    assert!(r.writes > 50 && r.verified_reads > 10, "{r:?}");
}
