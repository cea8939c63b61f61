//! Inflight I/O tracking: a backend that dies with requests in flight leaves them marked in the
//! shared region, and the next backend resubmits exactly those, once, in order.
//!
//! The queue is virtio-queue's `MockSplitQueue` over guest memory; the image a temporary file;
//! the executor and the region are the daemon's own.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vloop_blk::inflight::{resubmit, Inflight, InflightRegion};
use vloop_blk::{Config, Disk, EngineKind, Executor, GuestMem};
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 16;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;

struct Env {
    dir: tempfile::TempDir,
    image: File,
    executor: Executor,
}

fn executor(path: &std::path::Path) -> Executor {
    let mut config = Config::new(path);
    config.engine = EngineKind::Blocking;
    let disk = Arc::new(Disk::open(&config).unwrap());
    Executor::new(disk, 0, config.engine, QSIZE).unwrap()
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    Env {
        image: File::open(&path).unwrap(),
        executor: executor(&path),
        dir,
    }
}

/// The backend process ends (its image lock goes with it) and a new one opens the image.
fn restart(e: Env) -> Env {
    let Env {
        dir,
        image,
        executor: old,
    } = e;
    drop(old);
    let executor = executor(&dir.path().join("disk.img"));
    Env {
        dir,
        image,
        executor,
    }
}

/// A first backend's inflight tracking, with the memfd of its region (which the frontend
/// keeps).
fn fresh_inflight() -> (Inflight, File) {
    let (region, file) = InflightRegion::create(1, QSIZE).unwrap();
    let inflight = Inflight::new(1, QSIZE);
    inflight.install(region, false);
    (inflight, file)
}

/// A next backend's inflight tracking, on the region the frontend hands back.
fn recovered_inflight(file: &File) -> Inflight {
    let size = file.metadata().unwrap().len();
    let region = InflightRegion::open(file, size, 0, 1, QSIZE).unwrap();
    let inflight = Inflight::new(1, QSIZE);
    inflight.install(region, true);
    inflight
}

fn mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap()
}

/// Request `n`: write one sector of byte `n` at sector `n`, descriptors 3n..3n+2.
fn put_write(mem: &GuestMem, q: &MockSplitQueue<'_, GuestMem>, n: u16) -> u16 {
    let hdr = HDR + 16 * u64::from(n);
    let data = DATA + 512 * u64::from(n);
    let status = STATUS + u64::from(n);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&u64::from(n).to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr)).unwrap();
    mem.write_slice(&[n as u8 + 1; 512], GuestAddress(data))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let head = 3 * n;
    let next = VRING_DESC_F_NEXT as u16;
    let descs = [
        Descriptor::new(hdr, 16, next, head + 1),
        Descriptor::new(data, 512, next, head + 2),
        Descriptor::new(status, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, d) in descs.into_iter().enumerate() {
        q.desc_table()
            .store(head + i as u16, RawDescriptor::from(d))
            .unwrap();
    }
    let idx = q.avail().idx().load();
    q.avail()
        .ring()
        .ref_at(usize::from(idx % QSIZE))
        .unwrap()
        .store(head);
    q.avail().idx().store(idx.wrapping_add(1));
    head
}

fn sector(image: &File, n: u64) -> u8 {
    let mut b = [0u8; 512];
    image.read_exact_at(&mut b, n * 512).unwrap();
    assert!(b.iter().all(|&x| x == b[0]), "sector {n} torn");
    b[0]
}

#[test]
fn requests_in_flight_at_a_crash_are_resubmitted_once_in_order() {
    let mem = mem();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    let (inflight, file) = fresh_inflight();

    // The first backend completes request 0, then takes requests 1 and 2 and dies before
    // completing them (nothing reaches the image or the used ring).
    let mut e = env();
    let mut queue: Queue = mock.create_queue().unwrap();
    put_write(&mem, &mock, 0);
    let tracker = inflight.tracker(0).unwrap();
    e.executor
        .process_queue_tracked(&mut queue, &mem, Some(&tracker), &mut || {})
        .unwrap();
    assert_eq!(mock.used().idx().load(), 1);
    let track = tracker.state().unwrap();
    let h1 = put_write(&mem, &mock, 1);
    let h2 = put_write(&mem, &mock, 2);
    {
        let mut chains = queue.iter(&mem).unwrap();
        for (c, h) in [(chains.next().unwrap(), h1), (chains.next().unwrap(), h2)] {
            assert_eq!(c.head_index(), h);
            track.take(h, inflight.next_counter());
        }
    }
    assert_eq!(sector(&e.image, 1), 0);
    // The first backend's mapping goes away with it.
    let _ = track;
    drop(tracker);
    drop(inflight);

    // The frontend keeps the region, restarts the ring at the used index (what QEMU does when
    // the backend vanished) and a new backend opens the region.
    let inflight = recovered_inflight(&file);
    let tracker = inflight.tracker(0).unwrap();
    let track = tracker.state().unwrap();
    let mut e = restart(e);
    let mut queue: Queue = mock.create_queue().unwrap();
    queue.set_next_avail(1);
    queue.set_next_used(1);
    let n = resubmit(&mut queue, &mem, &mut e.executor, &track).unwrap();
    assert_eq!(n, 2);
    assert_eq!(sector(&e.image, 1), 2);
    assert_eq!(sector(&e.image, 2), 3);
    assert_eq!(mock.used().idx().load(), 3);
    for (i, h) in [(1usize, h1), (2, h2)] {
        assert_eq!(
            mock.used().ring().ref_at(i).unwrap().load().id(),
            u32::from(h)
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i as u64)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
    }
    // Nothing is left in flight, and the available ring continues after the resubmitted ones:
    // a new request runs, the old ones do not run again.
    assert!(track.recover(3).is_empty());
    put_write(&mem, &mock, 3);
    e.executor
        .process_queue_tracked(&mut queue, &mem, Some(&tracker), &mut || {})
        .unwrap();
    assert_eq!(mock.used().idx().load(), 4);
    assert_eq!(sector(&e.image, 3), 4);
}

#[test]
fn a_stale_vring_base_does_not_serve_completed_requests_again() {
    // A backend that completed requests after its frontend saw it disconnect (the frontend
    // took the used index as it was then, before the last completions) leaves the next
    // backend a SET_VRING_BASE behind the used ring. The ring position comes from the used
    // index and the region, as in libvhost-user: the completed requests do not run again
    // (that would put their heads in the used ring twice, which breaks the guest's driver).
    let mem = mem();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    let (inflight, file) = fresh_inflight();
    let mut e = env();
    let mut queue: Queue = mock.create_queue().unwrap();
    put_write(&mem, &mock, 0);
    put_write(&mem, &mock, 1);
    let tracker = inflight.tracker(0).unwrap();
    e.executor
        .process_queue_tracked(&mut queue, &mem, Some(&tracker), &mut || {})
        .unwrap();
    assert_eq!(mock.used().idx().load(), 2);
    drop(tracker);
    drop(inflight);

    // The frontend restarts the ring at 1: it saw the used index before request 1 completed.
    let inflight = recovered_inflight(&file);
    let tracker = inflight.tracker(0).unwrap();
    let track = tracker.state().unwrap();
    let mut e = restart(e);
    let mut queue: Queue = mock.create_queue().unwrap();
    queue.set_next_avail(1);
    queue.set_next_used(1);
    assert_eq!(
        resubmit(&mut queue, &mem, &mut e.executor, &track).unwrap(),
        0
    );
    assert_eq!((queue.next_avail(), queue.next_used()), (2, 2));
    // Request 1's buffer is reused by the guest: were the request run again, its sector
    // would take the new bytes.
    mem.write_slice(&[0x77; 512], GuestAddress(DATA + 512))
        .unwrap();
    e.executor
        .process_queue_tracked(&mut queue, &mem, Some(&tracker), &mut || {})
        .unwrap();
    assert_eq!(mock.used().idx().load(), 2, "a completed request ran again");
    assert_eq!(sector(&e.image, 1), 2);
    put_write(&mem, &mock, 2);
    e.executor
        .process_queue_tracked(&mut queue, &mem, Some(&tracker), &mut || {})
        .unwrap();
    assert_eq!(mock.used().idx().load(), 3);
    assert_eq!(sector(&e.image, 2), 3);
}
