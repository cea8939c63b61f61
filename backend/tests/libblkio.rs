//! `vloop-blk` served to libblkio's `virtio-blk-vhost-user` driver (the `blkio` crate, the
//! pure-Rust libblkio), as qemu-storage-daemon's and QEMU's `virtio-blk-vhost-user` block
//! driver use it. That driver sets guest memory up with ADD_MEM_REG only (it needs
//! CONFIGURE_MEM_SLOTS), maps and unmaps its buffers while the queues run, and uses
//! read, write (with FUA), flush, write zeroes and discard.

mod common;

use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use common::pattern;

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 16 * MIB;
/// Bytes of one request.
const CHUNK: usize = 64 << 10;

/// A started libblkio instance on `socket` with `queues` queues.
fn connect(socket: &Path, queues: i32) -> (Blkio, Vec<Blkioq>) {
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("the virtio-blk-vhost-user driver");
    b.set_str("path", socket.to_str().unwrap()).unwrap();
    b.connect()
        .unwrap_or_else(|e| panic!("libblkio did not connect: {}", e.message()));
    assert_eq!(b.get_u64("capacity").unwrap(), IMAGE_SIZE);
    b.set_i32("num-queues", queues).unwrap();
    let started = b
        .start()
        .unwrap_or_else(|e| panic!("libblkio did not start: {}", e.message()));
    assert_eq!(started.queues.len(), queues as usize);
    (b, started.queues)
}

/// A buffer region of `len` bytes, mapped for I/O (ADD_MEM_REG).
fn buffers(b: &mut Blkio, len: usize) -> MemoryRegion {
    let align = b.get_u64("mem-region-alignment").unwrap() as usize;
    let r = b.alloc_mem_region(len.next_multiple_of(align)).unwrap();
    b.map_mem_region(&r)
        .unwrap_or_else(|e| panic!("map_mem_region: {}", e.message()));
    r
}

/// A copy of `len` bytes of `r` at `off`.
fn bytes(r: &MemoryRegion, off: usize, len: usize) -> Vec<u8> {
    assert!(off + len <= r.len);
    // SAFETY: inside the region, which stays mapped in this process while the test uses it;
    // no request is in flight on these bytes.
    unsafe { std::slice::from_raw_parts((r.addr + off) as *const u8, len) }.to_vec()
}

/// Copies `data` into `r` at `off`.
fn fill(r: &MemoryRegion, off: usize, data: &[u8]) {
    assert!(off + data.len() <= r.len);
    // SAFETY: as in `bytes`.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (r.addr + off) as *mut u8, data.len()) }
}

/// Waits for the one request in flight on `q` and checks that it succeeded.
fn complete(q: &mut Blkioq, what: &str) {
    let mut done: [MaybeUninit<Completion>; 1] = std::array::from_fn(|_| MaybeUninit::uninit());
    let mut timeout = Duration::from_secs(20);
    let n = q
        .do_io(&mut done, 1, Some(&mut timeout), None)
        .unwrap_or_else(|e| panic!("{what}: do_io: {}", e.message()));
    assert_eq!(n, 1, "{what}: not completed within 20 s");
    // SAFETY: do_io initialised the first `n` completions.
    let c = unsafe { done[0].assume_init_read() };
    assert_eq!(c.ret, 0, "{what} failed: errno {}", -c.ret);
}

fn read(q: &mut Blkioq, r: &MemoryRegion, off: usize, start: u64, len: usize) {
    q.read(start, (r.addr + off) as *mut u8, len, 0, ReqFlags::empty());
    complete(q, "read");
}

fn write(q: &mut Blkioq, r: &MemoryRegion, off: usize, start: u64, len: usize, f: ReqFlags) {
    q.write(start, (r.addr + off) as *const u8, len, 0, f);
    complete(q, "write");
}

#[test]
fn libblkio_reads_writes_flushes_zeroes_and_discards_over_two_queues() {
    let dir = tempfile::tempdir().unwrap();
    let image = common::image(dir.path(), IMAGE_SIZE);
    let before = pattern(9, 4 * MIB as usize);
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .write_all_at(&before, 0)
        .unwrap();
    let socket = dir.path().join("vloop.sock");
    let mut d = common::start(&image, &socket, &["--num-queues", "2"]);
    {
        let (mut b, mut qs) = connect(&socket, 2);
        let r = buffers(&mut b, 4 * CHUNK);
        // What the image held, on each queue.
        for (i, q) in qs.iter_mut().enumerate() {
            let at = i as u64 * MIB;
            read(q, &r, 0, at, CHUNK);
            let want = &before[at as usize..at as usize + CHUNK];
            assert!(bytes(&r, 0, CHUNK) == want, "queue {i} read other data");
        }
        // A write on queue 1 with FUA, one on queue 0 and a flush, zeroes and a discard.
        let (one, two) = (pattern(1, CHUNK), pattern(2, CHUNK));
        fill(&r, CHUNK, &one);
        fill(&r, 2 * CHUNK, &two);
        write(&mut qs[1], &r, CHUNK, 5 * MIB, CHUNK, ReqFlags::FUA);
        write(&mut qs[0], &r, 2 * CHUNK, 6 * MIB, CHUNK, ReqFlags::empty());
        qs[0].flush(0, ReqFlags::empty());
        complete(&mut qs[0], "flush");
        qs[1].write_zeroes(MIB, CHUNK as u64, 0, ReqFlags::empty());
        complete(&mut qs[1], "write zeroes");
        qs[0].discard(2 * MIB, CHUNK as u64, 0, ReqFlags::empty());
        complete(&mut qs[0], "discard");
        // Read back on the other queue.
        read(&mut qs[0], &r, 3 * CHUNK, 5 * MIB, CHUNK);
        assert!(bytes(&r, 3 * CHUNK, CHUNK) == one);
        read(&mut qs[1], &r, 3 * CHUNK, 6 * MIB, CHUNK);
        assert!(bytes(&r, 3 * CHUNK, CHUNK) == two);
        read(&mut qs[1], &r, 3 * CHUNK, MIB, CHUNK);
        assert!(bytes(&r, 3 * CHUNK, CHUNK).iter().all(|&b| b == 0));

        // The buffers go (REM_MEM_REG) while the queues run, and new ones come (ADD_MEM_REG).
        b.unmap_mem_region(&r);
        b.free_mem_region(&r);
        let s = buffers(&mut b, 2 * CHUNK);
        read(&mut qs[1], &s, 0, 5 * MIB, CHUNK);
        assert!(bytes(&s, 0, CHUNK) == one);
        fill(&s, CHUNK, &two);
        write(&mut qs[0], &s, CHUNK, 7 * MIB, CHUNK, ReqFlags::FUA);
    }
    // The host sees what the driver wrote, and the daemon serves the next frontend.
    let mut got = vec![0u8; CHUNK];
    let f = std::fs::File::open(&image).unwrap();
    for (at, want) in [
        (5 * MIB, pattern(1, CHUNK)),
        (6 * MIB, pattern(2, CHUNK)),
        (7 * MIB, pattern(2, CHUNK)),
        (MIB, vec![0; CHUNK]),
        (0, before[..CHUNK].to_vec()),
    ] {
        f.read_exact_at(&mut got, at).unwrap();
        assert!(got == want, "the image at {at:#x} holds other data");
    }
    {
        let (mut b, mut qs) = connect(&socket, 1);
        let r = buffers(&mut b, CHUNK);
        read(&mut qs[0], &r, 0, 7 * MIB, CHUNK);
        assert!(bytes(&r, 0, CHUNK) == pattern(2, CHUNK));
    }
    let status = common::terminate(&mut d);
    let log = common::log(&d);
    assert!(status.success(), "vloop-blk exited {status}:\n{log}");
    assert!(!log.contains("panicked"), "a panic in the log:\n{log}");
    assert!(!log.contains("refused"), "a message was refused:\n{log}");
}
