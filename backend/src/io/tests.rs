//! Executor and device tests: requests go through `MockSplitQueue` virtqueues over real guest
//! memory and real (temporary, sparse) image files.

use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::config::Config;
use crate::disk::{Disk, DiskError};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const MIB: u64 = 1 << 20;

/// Two adjacent 1 MiB guest memory regions, so buffers can straddle a region boundary.
fn memory() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MIB as usize),
        (GuestAddress(MIB), MIB as usize),
    ])
    .unwrap()
}

struct Rig {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    disk: Arc<Disk>,
    ex: Executor,
    /// The write cache mode the executor reads (a connection's `wce`).
    writeback: Arc<AtomicBool>,
}

fn rig_with(size: u64, tweak: impl FnOnce(&mut Config)) -> Rig {
    rig_in(tempfile::tempdir().unwrap(), size, tweak)
}

fn rig_in(dir: tempfile::TempDir, size: u64, tweak: impl FnOnce(&mut Config)) -> Rig {
    let path = dir.path().join("disk.img");
    let f = fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    let mut cfg = Config::new(&path);
    tweak(&mut cfg);
    let disk = Arc::new(Disk::open(&cfg).unwrap());
    let mut ex = Executor::new(disk.clone(), 0, cfg.engine, cfg.queue_size).unwrap();
    let writeback = Arc::new(AtomicBool::new(true));
    ex.share_write_cache(writeback.clone());
    Rig {
        _dir: dir,
        path,
        disk,
        ex,
        writeback,
    }
}

fn rig(size: u64) -> Rig {
    rig_with(size, |_| {})
}

/// A directory in the workspace's target directory: on a disk file system wherever TMPDIR
/// points (on tmpfs a flush completes at once).
fn dir_on_disk() -> tempfile::TempDir {
    let target = concat!(env!("CARGO_MANIFEST_DIR"), "/../target");
    std::fs::create_dir_all(target).unwrap();
    tempfile::tempdir_in(target).unwrap()
}

/// A rig whose image is in [`dir_on_disk`].
fn rig_on_disk(size: u64) -> Rig {
    rig_in(dir_on_disk(), size, |_| {})
}

/// A [`rig_on_disk`] on the io_uring engine whose first `dirty` bytes were just written with
/// `val` through the page cache (so a flush takes the disk's time to write them), and a kick
/// eventfd for its doorbell.
fn dirty_rig_on_disk(size: u64, dirty: u64, val: u8) -> (Rig, vmm_sys_util::eventfd::EventFd) {
    let r = rig_on_disk(size);
    assert!(matches!(r.ex.engine(), Engine::Uring(_)), "io_uring engine");
    let f = fs::OpenOptions::new().write(true).open(&r.path).unwrap();
    let chunk = vec![val; (16 * MIB).min(dirty) as usize];
    for at in (0..dirty).step_by(chunk.len()) {
        std::os::unix::fs::FileExt::write_all_at(&f, &chunk, at).unwrap();
    }
    let kick = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    (r, kick)
}

/// A rig whose image is on tmpfs where there is one (/dev/shm): its RWF_NOWAIT writes never
/// sleep, so a write completes inline or goes to the ring by its size alone.
fn rig_in_memory(size: u64) -> Rig {
    match tempfile::tempdir_in("/dev/shm") {
        Ok(dir) => rig_in(dir, size, |_| {}),
        Err(_) => rig(size),
    }
}

/// A descriptor: (guest address, length, device-writable).
type D = (u64, u32, bool);

fn header(mem: &GuestMem, at: u64, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// A queue of 64 entries holding `chains` in consecutive descriptor slots.
fn queue_of<'a>(mem: &'a GuestMem, chains: &[&[D]]) -> (MockSplitQueue<'a, GuestMem>, Queue) {
    queue_sized(mem, 64, chains)
}

/// [`queue_of`] with `size` entries.
fn queue_sized<'a>(
    mem: &'a GuestMem,
    size: u16,
    chains: &[&[D]],
) -> (MockSplitQueue<'a, GuestMem>, Queue) {
    let vq = MockSplitQueue::create(mem, GuestAddress(0), size);
    let mut raw = Vec::new();
    for chain in chains {
        let base = raw.len() as u16;
        for (i, (addr, len, w)) in chain.iter().enumerate() {
            let mut flags = if *w { VRING_DESC_F_WRITE as u16 } else { 0 };
            let last = i + 1 == chain.len();
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            raw.push(RawDescriptor::from(Descriptor::new(
                *addr,
                *len,
                flags,
                if last { 0 } else { base + i as u16 + 1 },
            )));
        }
    }
    vq.add_desc_chains(&raw, 0).unwrap();
    let q = vq.create_queue().unwrap();
    (vq, q)
}

/// Put the chains in a queue ([`queue_of`]), run one batch, return (head, used len) per used
/// element added and whether a notification is due.
fn run(rig: &mut Rig, mem: &GuestMem, chains: &[&[D]]) -> (Vec<(u16, u32)>, bool) {
    let (vq, mut q) = queue_of(mem, chains);
    let notify = rig.ex.process_queue(&mut q, mem).unwrap();
    let n = vq.used().idx().load();
    let used = (0..n)
        .map(|i| {
            let e = vq.used().ring().ref_at(i as usize).unwrap().load();
            (e.id() as u16, e.len())
        })
        .collect();
    (used, notify)
}

fn status(mem: &GuestMem, at: u64) -> u8 {
    mem.read_obj(GuestAddress(at)).unwrap()
}

const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const ST: u64 = 0x1_8000;

fn rw(rig: &mut Rig, mem: &GuestMem, t: u32, sector: u64, data: &[D]) -> (u8, u32) {
    header(mem, HDR, t, sector);
    mem.write_obj(0xffu8, GuestAddress(ST)).unwrap();
    let mut chain: Vec<D> = vec![(HDR, 16, false)];
    chain.extend_from_slice(data);
    chain.push((ST, 1, true));
    let (used, _) = run(rig, mem, &[&chain]);
    assert_eq!(used.len(), 1);
    (status(mem, ST), used[0].1)
}

/// Writes one sector at `sector` filled with `val` from `DATA`; returns the status.
fn write_sector(rig: &mut Rig, mem: &GuestMem, sector: u64, val: u8) -> u8 {
    mem.write_slice(&[val; 512], GuestAddress(DATA)).unwrap();
    rw(rig, mem, VIRTIO_BLK_T_OUT, sector, &[(DATA, 512, false)]).0
}

/// Assert that `len` bytes of the file at `off` all equal `val`, with a short message.
fn assert_file(p: &Path, off: u64, len: usize, val: u8) {
    let b = file_bytes(p, off, len);
    if let Some(i) = b.iter().position(|&x| x != val) {
        panic!(
            "byte {} of the file is {:#x}, expected {val:#x}",
            off + i as u64,
            b[i]
        );
    }
}

fn file_bytes(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&fs::File::open(p).unwrap(), &mut v, off).unwrap();
    v
}

#[test]
fn write_then_read_split_buffers() {
    let mut r = rig(MIB);
    let mem = memory();
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    mem.write_slice(&pattern[..512], GuestAddress(DATA))
        .unwrap();
    mem.write_slice(&pattern[512..], GuestAddress(DATA + 0x1000))
        .unwrap();
    let (s, used) = rw(
        &mut r,
        &mem,
        VIRTIO_BLK_T_OUT,
        4,
        &[(DATA, 512, false), (DATA + 0x1000, 512, false)],
    );
    assert_eq!((s, used), (OK, 1));
    assert_eq!(file_bytes(&r.path, 4 * 512, 1024), pattern);
    // Read it back into a buffer that straddles the two guest memory regions.
    let straddle = MIB - 256;
    let (s, used) = rw(&mut r, &mem, VIRTIO_BLK_T_IN, 4, &[(straddle, 1024, true)]);
    assert_eq!((s, used), (OK, 1025));
    let mut back = vec![0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(straddle)).unwrap();
    assert_eq!(back, pattern);
    assert_eq!(r.ex.stats().bytes_read, 1024);
    assert_eq!(r.ex.stats().bytes_written, 1024);
}

#[test]
fn blocking_engine_roundtrip() {
    let mut r = rig_with(MIB, |c| c.engine = crate::config::EngineKind::Blocking);
    let mem = memory();
    assert_eq!(write_sector(&mut r, &mem, 1, 9), OK);
    assert_file(&r.path, 512, 512, 9);
}

#[test]
fn null_engine_completes_without_touching_the_image() {
    let mut r = rig_with(MIB, |c| c.engine = crate::config::EngineKind::Null);
    let mem = memory();
    assert_eq!(r.ex.engine().name(), "null");
    assert_eq!(write_sector(&mut r, &mem, 1, 9), OK);
    assert_file(&r.path, 512, 512, 0);
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    let (s, used) = rw(&mut r, &mem, VIRTIO_BLK_T_IN, 1, &[(DATA, 512, true)]);
    assert_eq!((s, used), (OK, 513));
    // The guest buffer is left as it was.
    assert_eq!(status(&mem, DATA), 0x5a);
    assert_eq!(rw(&mut r, &mem, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
}

#[test]
fn last_sector_and_one_past() {
    let mut r = rig(64 * 1024);
    let mem = memory();
    let last = 64 * 1024 / 512 - 1;
    mem.write_slice(&[0xabu8; 1024], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_OUT, last, &[(DATA, 512, false)]).0,
        OK
    );
    assert_file(&r.path, last * 512, 512, 0xab);
    // One sector past the end, and a write that starts inside but ends outside.
    assert_eq!(
        rw(
            &mut r,
            &mem,
            VIRTIO_BLK_T_IN,
            last + 1,
            &[(DATA, 512, true)]
        ),
        (IOERR, 1)
    );
    fs::write(&r.path, vec![0u8; 64 * 1024]).unwrap();
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_OUT, last, &[(DATA, 1024, false)]).0,
        IOERR
    );
    assert_file(&r.path, 0, 64 * 1024, 0);
    assert_eq!(fs::metadata(&r.path).unwrap().len(), 64 * 1024);
}

#[test]
fn read_only_export_refuses_writes() {
    let mut r = rig_with(MIB, |c| c.read_only = true);
    let mem = memory();
    assert_eq!(write_sector(&mut r, &mem, 0, 1), IOERR);
    // Discard and write zeroes are not offered on a read-only disk.
    assert_eq!(
        segment_request(&mut r, &mem, VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)]).0,
        UNSUPP
    );
    assert_eq!(
        segment_request(&mut r, &mem, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)]).0,
        UNSUPP
    );
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0,
        OK
    );
    assert_eq!(rw(&mut r, &mem, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    assert_file(&r.path, 0, 512, 0);
    let f = r.disk.fd();
    // SAFETY: fcntl F_GETFL on an fd owned by the disk.
    let flags = unsafe { libc::fcntl(f, libc::F_GETFL) };
    assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
}

#[test]
fn flush_and_get_id() {
    let mut r = rig_with(MIB, |c| c.serial = Some("my-disk".into()));
    let mem = memory();
    assert_eq!(rw(&mut r, &mem, VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    let (done, id) = get_id(&mut r, &mem, 20);
    assert_eq!(done, (OK, 21));
    assert_eq!(&id[..7], b"my-disk");
    assert!(id[7..20].iter().all(|&b| b == 0));
    // A shorter buffer gets a truncated serial.
    let (done, id) = get_id(&mut r, &mem, 4);
    assert_eq!(done, (OK, 5));
    assert_eq!(&id, b"my-d\xee");
}

/// Sends GET_ID with a `len`-byte buffer at `DATA`, which is first filled with 0xee; returns
/// (status, used len) and the buffer followed by the byte after it.
fn get_id(rig: &mut Rig, mem: &GuestMem, len: u32) -> ((u8, u32), Vec<u8>) {
    mem.write_slice(&[0xeeu8; 32], GuestAddress(DATA)).unwrap();
    let done = rw(rig, mem, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, len, true)]);
    let mut id = vec![0u8; len as usize + 1];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    (done, id)
}

#[test]
fn default_serial_is_derived_from_the_image() {
    let a = rig(MIB);
    let b = rig(MIB);
    assert!(a.disk.serial().starts_with(b"vloop-"));
    assert_ne!(a.disk.serial(), b.disk.serial());
}

fn segment(mem: &GuestMem, at: u64, sector: u64, n: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&n.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(at)).unwrap();
}

/// Sends a discard or write-zeroes request (`t`) whose segments, each (sector, sectors,
/// flags), are laid out one after another from `DATA`; returns (status, used len).
fn segment_request(rig: &mut Rig, mem: &GuestMem, t: u32, segs: &[(u64, u32, u32)]) -> (u8, u32) {
    for (i, &(sector, n, flags)) in segs.iter().enumerate() {
        segment(mem, DATA + 16 * i as u64, sector, n, flags);
    }
    rw(rig, mem, t, 0, &[(DATA, 16 * segs.len() as u32, false)])
}

/// True when [off, off+len) is a hole in the file (SEEK_DATA from `off` lands at or past the
/// end of the range).
fn is_hole(p: &Path, off: u64, len: u64) -> bool {
    let f = fs::File::open(p).unwrap();
    // SAFETY: lseek on an fd owned by `f`.
    let data = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    data < 0 || data as u64 >= off + len
}

fn filled(size: u64) -> Rig {
    filled_with(size, |_| {})
}

fn filled_with(size: u64, tweak: impl FnOnce(&mut Config)) -> Rig {
    let r = rig_with(size, tweak);
    fs::write(&r.path, vec![0x5au8; size as usize]).unwrap();
    fs::File::open(&r.path).unwrap().sync_all().unwrap();
    r
}

fn punch_supported(p: &Path) -> bool {
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    let len = f.metadata().unwrap().len();
    // SAFETY: fallocate on an fd owned by `f`; it punches the last 4 KiB, which the callers
    // never look at.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (len - 4096) as libc::off_t,
            4096,
        )
    };
    r == 0
}

/// A filled image, or `None` (reported as skipped, a failure under CI) when the temp file
/// system cannot punch holes.
fn filled_punchable(size: u64) -> Option<Rig> {
    let r = filled(size);
    if punch_supported(&r.path) {
        Some(r)
    } else {
        vloop_frontend::skip::skip("the temp file system cannot punch holes");
        None
    }
}

#[test]
fn discard_punches_holes() {
    let Some(mut r) = filled_punchable(MIB) else {
        return;
    };
    let mem = memory();
    let blocks_before = fs::metadata(&r.path).unwrap().blocks();
    // 64 KiB at 128 KiB and 64 KiB at 512 KiB, one segment per request.
    for hole in [(256, 128, 0), (1024, 128, 0)] {
        assert_eq!(
            segment_request(&mut r, &mem, VIRTIO_BLK_T_DISCARD, &[hole]),
            (OK, 1)
        );
    }
    assert!(is_hole(&r.path, 128 * 1024, 64 * 1024));
    assert!(is_hole(&r.path, 512 * 1024, 64 * 1024));
    assert!(!is_hole(&r.path, 0, 128 * 1024));
    assert!(fs::metadata(&r.path).unwrap().blocks() < blocks_before);
    assert_eq!(fs::metadata(&r.path).unwrap().len(), MIB);
    assert_file(&r.path, 128 * 1024, 65536, 0);
    assert_file(&r.path, 128 * 1024 - 512, 512, 0x5a);
    assert_file(&r.path, 192 * 1024, 512, 0x5a);
    // Two segments in one request: UNSUPP, and nothing changes.
    let two = [(0, 8, 0), (16, 8, 0)];
    assert_eq!(
        segment_request(&mut r, &mem, VIRTIO_BLK_T_DISCARD, &two).0,
        UNSUPP
    );
    assert_file(&r.path, 0, 8192, 0x5a);
}

/// Under write-through (the driver turned the cache off, or cannot flush) discards and
/// write-zeroes are durable before they complete, as writes are: each ends with a sync of the
/// image, which shows as a completed fdatasync in the executor's ring or call.
#[test]
fn write_through_covers_discard_and_write_zeroes() {
    let Some(mut r) = filled_punchable(MIB) else {
        return;
    };
    let mem = memory();
    r.writeback.store(false, Ordering::Relaxed);
    assert!(r.ex.write_through());
    assert_eq!(
        segment_request(&mut r, &mem, VIRTIO_BLK_T_DISCARD, &[(256, 128, 0)]),
        (OK, 1)
    );
    assert!(is_hole(&r.path, 128 * 1024, 64 * 1024));
    assert_eq!(
        segment_request(&mut r, &mem, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 16, 0)]),
        (OK, 1)
    );
    assert_file(&r.path, 0, 8192, 0);
    // The fallocate ops of a write-through driver carry the sync.
    let op = r.ex.fallocate_op_for_test(true);
    assert!(matches!(op.kind, OpKind::Fallocate { sync: true, .. }));
    r.writeback.store(true, Ordering::Relaxed);
    let op = r.ex.fallocate_op_for_test(r.ex.write_through());
    assert!(matches!(op.kind, OpKind::Fallocate { sync: false, .. }));
}

#[test]
fn discard_ignore_leaves_data() {
    let mut r = filled_with(MIB, |c| c.discard = crate::config::DiscardMode::Ignore);
    let mem = memory();
    assert_eq!(
        segment_request(&mut r, &mem, VIRTIO_BLK_T_DISCARD, &[(256, 128, 0)]),
        (OK, 1)
    );
    assert!(!is_hole(&r.path, 128 * 1024, 64 * 1024));
    assert_file(&r.path, 128 * 1024, 512, 0x5a);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let Some(mut r) = filled_punchable(MIB) else {
        return;
    };
    let mem = memory();
    // Without UNMAP: zeroes, still allocated.
    assert_eq!(
        segment_request(&mut r, &mem, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 128, 0)]),
        (OK, 1)
    );
    assert_file(&r.path, 0, 65536, 0);
    assert_file(&r.path, 65536, 512, 0x5a);
    // With UNMAP: zeroes and a hole.
    let unmap = [(256, 128, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)];
    assert_eq!(
        segment_request(&mut r, &mem, VIRTIO_BLK_T_WRITE_ZEROES, &unmap),
        (OK, 1)
    );
    assert_file(&r.path, 128 * 1024, 65536, 0);
    assert!(is_hole(&r.path, 128 * 1024, 64 * 1024));
    // Bad flag bits: UNSUPP and nothing changes.
    assert_eq!(
        segment_request(&mut r, &mem, VIRTIO_BLK_T_WRITE_ZEROES, &[(512, 8, 0x80)]).0,
        UNSUPP
    );
    assert_file(&r.path, 256 * 1024, 4096, 0x5a);
    // Past the end: IOERR and nothing changes.
    assert_eq!(
        segment_request(&mut r, &mem, VIRTIO_BLK_T_WRITE_ZEROES, &[(2036, 16, 0)]).0,
        IOERR
    );
    assert_file(&r.path, 2036 * 512, 2048, 0x5a);
}

#[test]
fn bad_chains_do_not_stop_the_queue() {
    let mut r = rig(MIB);
    let mem = memory();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    header(&mem, HDR + 0x100, 77, 0);
    header(&mem, HDR + 0x200, VIRTIO_BLK_T_IN, 1);
    for a in [ST, ST + 1, ST + 2, ST + 3] {
        mem.write_obj(0xffu8, GuestAddress(a)).unwrap();
    }
    let (used, notify) = run(
        &mut r,
        &mem,
        &[
            // No status byte at all: used with length 0.
            &[(HDR, 16, false)],
            // Unknown type: UNSUPP.
            &[(HDR + 0x100, 16, false), (ST + 1, 1, true)],
            // Buffer outside guest memory: IOERR.
            &[
                (HDR + 0x200, 16, false),
                (0x4000_0000, 512, true),
                (ST + 2, 1, true),
            ],
            // A good read still works in the same batch.
            &[(HDR, 16, false), (DATA, 512, true), (ST + 3, 1, true)],
        ],
    );
    assert!(notify);
    assert_eq!(used, vec![(0, 0), (1, 1), (3, 1), (6, 513)]);
    assert_eq!(status(&mem, ST + 1), UNSUPP);
    assert_eq!(status(&mem, ST + 2), IOERR);
    assert_eq!(status(&mem, ST + 3), OK);
    assert_eq!(r.ex.stats().requests, 4);
    assert_eq!(r.ex.stats().errors, 3);
}

#[test]
fn indirect_chain() {
    let mut r = rig(MIB);
    let mem = memory();
    fs::write(&r.path, vec![0x42u8; MIB as usize]).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 8);
    // An indirect table at 0x3000 with header, data and status.
    let table = [
        Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        Descriptor::new(
            DATA,
            512,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            2,
        ),
        Descriptor::new(ST, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, d) in table.iter().enumerate() {
        mem.write_obj(
            RawDescriptor::from(*d),
            GuestAddress(0x3000 + 16 * i as u64),
        )
        .unwrap();
    }
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    vq.add_desc_chains(
        &[RawDescriptor::from(Descriptor::new(
            0x3000,
            48,
            virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
            0,
        ))],
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(r.ex.process_queue(&mut q, &mem).unwrap());
    assert_eq!(status(&mem, ST), OK);
    let mut b = vec![0u8; 512];
    mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert_eq!(b, vec![0x42u8; 512]);
}

#[test]
fn event_idx_suppresses_notifications() {
    let mut r = rig(MIB);
    let mem = memory();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    vq.add_desc_chains(
        &[
            RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(Descriptor::new(ST, 1, VRING_DESC_F_WRITE as u16, 0)),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    // used_event (after the avail ring) asks for a notification only after used index 5.
    let used_event = vq.avail_addr().unchecked_add(4 + 2 * 16);
    mem.write_obj(5u16.to_le(), used_event).unwrap();
    assert!(!r.ex.process_queue(&mut q, &mem).unwrap());
    assert_eq!(vq.used().idx().load(), 1);
}

#[test]
fn logical_block_size_4096() {
    let mut r = rig_with(MIB + 1000, |c| {
        c.logical_block_size = crate::config::BlockSize::B4096
    });
    assert_eq!(r.disk.size(), MIB);
    let mem = memory();
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_IN, 8, &[(DATA, 4096, true)]).0,
        OK
    );
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_IN, 1, &[(DATA, 4096, true)]).0,
        IOERR
    );
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_IN, 8, &[(DATA, 512, true)]).0,
        IOERR
    );
}

#[test]
fn odd_sizes_round_down_and_tiny_images_fail() {
    let r = rig(MIB + 100);
    assert_eq!(r.disk.size(), MIB);
    assert_eq!(r.disk.capacity(), MIB / 512);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.img");
    fs::write(&p, [0u8; 100]).unwrap();
    assert!(matches!(
        Disk::open(&Config::new(&p)),
        Err(DiskError::TooSmall { .. })
    ));
    assert!(matches!(
        Disk::open(&Config::new(dir.path().join("missing.img"))),
        Err(DiskError::Open { .. })
    ));
}

#[test]
fn second_open_of_a_served_image_fails() {
    let r = rig(MIB);
    let e = Disk::open(&Config::new(&r.path)).unwrap_err();
    assert!(matches!(e, DiskError::Lock { .. }), "{e}");
    let mut ro = Config::new(&r.path);
    ro.read_only = true;
    assert!(Disk::open(&ro).is_err());
}

#[test]
fn writethrough_writes_complete() {
    let mut r = rig(MIB);
    r.writeback.store(false, Ordering::Relaxed);
    let mem = memory();
    assert_eq!(write_sector(&mut r, &mem, 0, 3), OK);
    assert_file(&r.path, 0, 512, 3);
}

#[test]
fn direct_io_with_aligned_and_unaligned_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("direct.img");
    fs::File::create(&path).unwrap().set_len(MIB).unwrap();
    let mut cfg = Config::new(&path);
    cfg.direct = true;
    let disk = match Disk::open(&cfg) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            vloop_frontend::skip::skip(&format!(
                "O_DIRECT is not supported on the temp file system: {e}"
            ));
            return;
        }
    };
    let ex = Executor::new(disk.clone(), 0, cfg.engine, cfg.queue_size).unwrap();
    let mut r = Rig {
        _dir: dir,
        path,
        disk,
        ex,
        writeback: Arc::new(AtomicBool::new(true)),
    };
    let mem = memory();
    mem.write_slice(&[0x11u8; 4096], GuestAddress(DATA))
        .unwrap();
    // Page-aligned buffer: O_DIRECT path.
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_OUT, 0, &[(DATA, 4096, false)]).0,
        OK
    );
    // Buffer at an odd address: served through the buffered descriptor.
    mem.write_slice(&[0x22u8; 512], GuestAddress(DATA + 0x2001))
        .unwrap();
    assert_eq!(
        rw(
            &mut r,
            &mem,
            VIRTIO_BLK_T_OUT,
            8,
            &[(DATA + 0x2001, 512, false)]
        )
        .0,
        OK
    );
    assert_file(&r.path, 0, 4096, 0x11);
    assert_file(&r.path, 4096, 512, 0x22);
    assert_eq!(
        rw(
            &mut r,
            &mem,
            VIRTIO_BLK_T_IN,
            8,
            &[(DATA + 0x3003, 512, true)]
        )
        .0,
        OK
    );
    let mut b = [0u8; 512];
    mem.read_slice(&mut b, GuestAddress(DATA + 0x3003)).unwrap();
    assert!(b.iter().all(|&x| x == 0x22));
    // The unaligned write went through the page cache: once a flush failed, no later one may
    // say it is on disk, O_DIRECT or not.
    assert_eq!(rw(&mut r, &mem, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    r.disk
        .poison_flush(&std::io::Error::from_raw_os_error(libc::EIO));
    assert_eq!(rw(&mut r, &mem, VIRTIO_BLK_T_FLUSH, 0, &[]).0, IOERR);
}

#[test]
fn size_max_and_seg_max_bind_only_a_driver_that_negotiated_them() {
    // queue size 8: seg_max 6; size_max is 1 MiB.
    let mut r = rig_with(4 * MIB, |c| c.queue_size = 8);
    let mem = memory();
    let big = (MIB + MIB / 2) as u32;
    mem.write_slice(&vec![0x5au8; big as usize], GuestAddress(DATA))
        .unwrap();
    let seven: Vec<D> = (0..7).map(|i| (DATA + i * 4096, 512, false)).collect();
    // Until the driver says otherwise, every offered feature binds it.
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_OUT, 0, &[(DATA, big, false)]).0,
        IOERR
    );
    assert_eq!(rw(&mut r, &mem, VIRTIO_BLK_T_OUT, 0, &seven).0, IOERR);
    // A driver that negotiated neither (UEFI's VirtioBlkDxe puts a whole transfer in one
    // descriptor) is served whatever the descriptor length and count.
    let offered = r.ex.features();
    r.ex.set_features(offered & !(1 << VIRTIO_BLK_F_SIZE_MAX) & !(1 << VIRTIO_BLK_F_SEG_MAX));
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_OUT, 0, &[(DATA, big, false)]),
        (OK, 1)
    );
    assert_file(&r.path, 0, big as usize, 0x5a);
    mem.write_slice(&vec![0u8; big as usize], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_IN, 0, &[(DATA, big, true)]),
        (OK, big + 1)
    );
    let mut back = vec![0u8; big as usize];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
    assert_eq!(rw(&mut r, &mem, VIRTIO_BLK_T_OUT, 0, &seven).0, OK);
}

#[test]
fn read_partly_in_the_page_cache_reports_its_full_length() {
    use std::os::unix::fs::FileExt;
    let mut r = rig(4 * MIB);
    let len = 256 * 1024u32;
    // The data is on disk, out of the page cache, except for its first page: a non-blocking
    // read copies that page and stops, the ring reads the rest.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&r.path)
        .unwrap();
    f.write_all_at(&vec![0x42u8; len as usize], 0).unwrap();
    f.sync_all().unwrap();
    // SAFETY: posix_fadvise only takes an open fd and integers.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
    // A whole-page write caches the first page without reading ahead.
    f.write_all_at(&[0x42u8; 4096], 0).unwrap();
    let mem = memory();
    mem.write_slice(&vec![0xeeu8; len as usize], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_IN, 0, &[(DATA, len, true)]),
        (OK, len + 1)
    );
    assert_eq!(r.ex.stats().bytes_read, u64::from(len));
    let mut back = vec![0u8; len as usize];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 0x42));
}

#[test]
fn a_driver_without_flush_gets_write_through() {
    let mut r = rig(MIB);
    let offered = r.ex.features();
    let no_flush = offered & !(1 << VIRTIO_BLK_F_FLUSH);
    assert!(!r.ex.write_through());
    r.ex.set_features(no_flush);
    assert!(r.ex.write_through());
    // The guest's write cache setting stays what it was.
    assert!(r.writeback.load(Ordering::Relaxed));
    let mem = memory();
    assert_eq!(write_sector(&mut r, &mem, 0, 9), OK);
    assert_file(&r.path, 0, 512, 9);
    r.ex.set_features(offered);
    assert!(!r.ex.write_through());
    r.writeback.store(false, Ordering::Relaxed);
    assert!(r.ex.write_through());
}

#[test]
fn a_head_index_past_the_ring_does_not_lose_the_rest_of_the_batch() {
    let mut r = rig(MIB);
    let mem = memory();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    mem.write_obj(0xffu8, GuestAddress(ST)).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 64);
    let good = [
        RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(Descriptor::new(
            DATA,
            512,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            2,
        )),
        RawDescriptor::from(Descriptor::new(ST, 1, VRING_DESC_F_WRITE as u16, 0)),
    ];
    vq.add_desc_chains(&good, 0).unwrap();
    // Two requests offered: a head index past the 64-entry ring first, then the good chain.
    vq.avail().ring().ref_at(0).unwrap().store(u16::to_le(200));
    vq.avail().ring().ref_at(1).unwrap().store(u16::to_le(0));
    vq.avail().idx().store(u16::to_le(2));
    let mut q: Queue = vq.create_queue().unwrap();
    r.ex.process_queue(&mut q, &mem).unwrap();
    assert_eq!(vq.used().idx().load(), 1);
    let e = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!((e.id(), e.len()), (0, 513));
    assert_eq!(status(&mem, ST), OK);
}

/// Many page-cache reads in one batch, part of them copied by the engine's helper thread:
/// every request gets its own sector's data, and the used ring has each head once.
#[test]
fn shared_reads_return_their_own_data() {
    let mut r = rig(MIB);
    {
        let mut f = fs::OpenOptions::new().write(true).open(&r.path).unwrap();
        let mut image = vec![0u8; MIB as usize];
        for (i, sector) in image.chunks_mut(512).enumerate() {
            sector.fill((i % 251) as u8 + 1);
        }
        std::io::Write::write_all(&mut f, &image).unwrap();
    }
    r.ex.always_share();
    let mem = memory();
    const N: u64 = 20;
    // Request i reads sector 3 * i + 1 into its own 512-byte buffer.
    let chains: Vec<Vec<D>> = (0..N)
        .map(|i| {
            header(&mem, HDR + 16 * i, VIRTIO_BLK_T_IN, 3 * i + 1);
            vec![
                (HDR + 16 * i, 16, false),
                (DATA + 512 * i, 512, true),
                (ST + i, 1, true),
            ]
        })
        .collect();
    let refs: Vec<&[D]> = chains.iter().map(|c| c.as_slice()).collect();
    for round in 0..3 {
        mem.write_slice(&[0u8; 512 * N as usize], GuestAddress(DATA))
            .unwrap();
        let (used, _) = run(&mut r, &mem, &refs);
        let mut heads: Vec<u16> = used.iter().map(|u| u.0).collect();
        heads.sort_unstable();
        assert_eq!(heads, (0..N as u16).map(|i| i * 3).collect::<Vec<_>>());
        assert!(used.iter().all(|u| u.1 == 513), "round {round}: {used:?}");
        for i in 0..N {
            assert_eq!(status(&mem, ST + i), OK);
            let mut buf = [0u8; 512];
            mem.read_slice(&mut buf, GuestAddress(DATA + 512 * i))
                .unwrap();
            let want = ((3 * i + 1) % 251) as u8 + 1;
            assert!(buf.iter().all(|&b| b == want), "round {round}, request {i}");
        }
    }
    assert_eq!(r.ex.stats().requests, 3 * N);
    assert_eq!(r.ex.stats().errors, 0);
    if let Engine::Uring(_) = r.ex.engine() {
        assert!(
            r.ex.engine().helper_in_flight() == 0,
            "nothing may stay in flight after process_queue returns"
        );
    }
}

/// Serve `chains` (the status byte of chain `i` at `st + i`) from a queue of `size` entries in
/// one pass; every request completes OK. Returns how often the guest was notified.
fn publications<const L: usize>(
    r: &mut Rig,
    mem: &GuestMem,
    size: u16,
    chains: &[[D; L]],
    st: u64,
) -> usize {
    let chains: Vec<&[D]> = chains.iter().map(|c| &c[..]).collect();
    let (vq, mut q) = queue_sized(mem, size, &chains);
    let mut publishes = 0;
    r.ex.process_queue_tracked(&mut q, mem, None, &mut || publishes += 1)
        .unwrap();
    let n = chains.len() as u16;
    assert_eq!(vq.used().idx().load(), n);
    for i in 0..n {
        assert_eq!(status(mem, st + u64::from(i)), OK);
    }
    publishes
}

#[test]
fn a_long_wave_of_page_cache_reads_is_published_in_parts() {
    // 32 reads of cached sectors, all available at once: without a helper CPU they complete
    // inline, and the driver hears of the first ones while the rest still run.
    let mut r = filled(MIB);
    let mem = memory();
    const N: u16 = 32;
    let (hdr, data, st) = (0x10000u64, 0x20000u64, 0x30000u64);
    let chains: Vec<[D; 3]> = (0..N)
        .map(|i| {
            let at = |base: u64, size: u64| base + size * u64::from(i);
            header(&mem, at(hdr, 16), VIRTIO_BLK_T_IN, u64::from(i));
            mem.write_obj(0xffu8, GuestAddress(at(st, 1))).unwrap();
            [
                (at(hdr, 16), 16, false),
                (at(data, 512), 512, true),
                (at(st, 1), 1, true),
            ]
        })
        .collect();
    let publishes = publications(&mut r, &mem, 128, &chains, st);
    assert!(
        publishes >= usize::from(N) / super::executor::PUBLISH_EVERY,
        "{publishes} publications for {N} inline completions"
    );
}

#[test]
fn a_wave_of_large_writes_is_published_every_8_mib() {
    // Buffered writes up to 4 MiB are copied inline one after the other: the driver hears of
    // the first ones before the whole wave is copied (here after 4 of 8 writes of 2 MiB,
    // where the count of completions alone would publish only after all 8).
    let mut r = rig_in_memory(32 * MIB);
    fs::write(&r.path, vec![0u8; 32 * MIB as usize]).unwrap();
    let mem = memory();
    mem.write_slice(&vec![0x5a; MIB as usize], GuestAddress(MIB))
        .unwrap();
    const N: u16 = 8;
    let (hdr, st) = (0x10000u64, 0x30000u64);
    let chains: Vec<[D; 4]> = (0..N)
        .map(|i| {
            let (h, s) = (hdr + 16 * u64::from(i), st + u64::from(i));
            header(&mem, h, VIRTIO_BLK_T_OUT, 2048 + 4096 * u64::from(i));
            mem.write_obj(0xffu8, GuestAddress(s)).unwrap();
            [
                (h, 16, false),
                (MIB, MIB as u32, false),
                (MIB, MIB as u32, false),
                (s, 1, true),
            ]
        })
        .collect();
    let publishes = publications(&mut r, &mem, 64, &chains, st);
    assert!(
        publishes >= 2,
        "{publishes} publications for 16 MiB of writes"
    );
    assert_file(&r.path, MIB, 16 * MIB as usize, 0x5a);
}

#[test]
fn a_queue_takes_no_more_requests_while_128_mib_of_data_are_in_flight() {
    // Three reads of 64 MiB, all available at once: the first wave stops after the second
    // (128 MiB taken), and the third is taken only once data completed. What is in flight
    // bounds how long a stopping connection waits for its queues.
    let mut r = rig_in_memory(192 * MIB);
    let mem = memory();
    const N: u16 = 3;
    let (hdr, st) = (0x10000u64, 0x30000u64);
    let chains: Vec<[D; 66]> = (0..N)
        .map(|i| {
            let (h, s) = (hdr + 16 * u64::from(i), st + u64::from(i));
            header(&mem, h, VIRTIO_BLK_T_IN, 64 * 2048 * u64::from(i));
            mem.write_obj(0xffu8, GuestAddress(s)).unwrap();
            let mut c = [(MIB, MIB as u32, true); 66];
            c[0] = (h, 16, false);
            c[65] = (s, 1, true);
            c
        })
        .collect();
    let before = r.ex.stats().batches;
    publications(&mut r, &mem, 256, &chains, st);
    assert_eq!(
        r.ex.stats().batches - before,
        2,
        "waves: two requests, then the third"
    );
}

#[test]
fn waits_count_image_io_and_not_page_cache_hits() {
    // Polling follows only passes that did not wait (device.rs): the count must tell a pass
    // served from the page cache from one that slept until the kernel finished its I/O.
    let mut r = rig(MIB);
    let mem = memory();
    assert!(matches!(r.ex.engine(), Engine::Uring(_)), "io_uring engine");
    assert_eq!(write_sector(&mut r, &mem, 3, 0x5a), OK);
    let before = r.ex.stats().waits;
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_IN, 3, &[(DATA, 512, true)]),
        (OK, 513)
    );
    assert_eq!(
        r.ex.stats().waits,
        before,
        "a read of a cached page completes inline"
    );
    assert_eq!(rw(&mut r, &mem, VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    assert_eq!(
        r.ex.stats().waits,
        before + 1,
        "a flush waits for its fsync on the ring"
    );
}

#[test]
fn buffered_writes_up_to_four_mib_are_copied_by_the_worker_itself() {
    // uring.rs INLINE_WRITE_MAX: a buffered write of up to 4 MiB completes inline, without a
    // wait on the ring (an io-wq worker would copy it); a larger one goes to the ring.
    let mut r = rig_in_memory(8 * MIB);
    let mem = memory();
    assert!(matches!(r.ex.engine(), Engine::Uring(_)), "io_uring engine");
    // In the page cache: where the file system has RWF_NOWAIT writes (tmpfs), one that must
    // allocate goes to the ring instead.
    fs::write(&r.path, vec![0u8; 8 * MIB as usize]).unwrap();
    mem.write_slice(&vec![0x3c; MIB as usize], GuestAddress(MIB))
        .unwrap();
    let before = r.ex.stats().waits;
    let one: &[D] = &[(MIB, MIB as u32, false)];
    // Past the first sectors, whose writes a probed raw image checks on their own path.
    assert_eq!(rw(&mut r, &mem, VIRTIO_BLK_T_OUT, 2048, one), (OK, 1));
    assert_eq!(
        r.ex.stats().waits,
        before,
        "a 1 MiB buffered write completes inline"
    );
    let four = [(MIB, MIB as u32, false); 4];
    assert_eq!(rw(&mut r, &mem, VIRTIO_BLK_T_OUT, 4096, &four), (OK, 1));
    assert_eq!(r.ex.stats().waits, before, "so does a 4 MiB one");
    let five = [(MIB, MIB as u32, false); 5];
    assert_eq!(rw(&mut r, &mem, VIRTIO_BLK_T_OUT, 4096, &five), (OK, 1));
    assert_eq!(
        r.ex.stats().waits,
        before + 1,
        "a 5 MiB one waits for the ring"
    );
    assert_file(&r.path, MIB, 6 * MIB as usize, 0x3c);
}

#[test]
fn a_kick_during_a_wait_ends_it_and_stays_for_its_reader() {
    // vhost-user-backend reads a kick it was told of after the pass, and fails the queue when
    // the kick is gone: a pass that watches the doorbell must leave its kicks there.
    // Dirty page cache, so that the flush below stays in flight while the read is published.
    let (mut r, kick) = dirty_rig_on_disk(32 * MIB, 16 * MIB, 0x11);
    let mem = memory();
    kick.write(1).unwrap();

    // A read served from the page cache and a flush: the read is published while the flush
    // waits, so the driver may refill the ring and the wait watches the doorbell, which rings
    // at once (the kick above, as a kick arriving during the wait would).
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    header(&mem, HDR + 16, VIRTIO_BLK_T_FLUSH, 0);
    let read: &[D] = &[(HDR, 16, false), (DATA, 512, true), (ST, 1, true)];
    let flush: &[D] = &[(HDR + 16, 16, false), (ST + 1, 1, true)];
    let (vq, mut q) = queue_of(&mem, &[read, flush]);
    r.ex.set_doorbell(Some(kick.as_raw_fd()));
    r.ex.process_queue(&mut q, &mem).unwrap();
    r.ex.set_doorbell(None);
    assert_eq!((status(&mem, ST), status(&mem, ST + 1)), (OK, OK));
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(
        r.ex.stats().doorbells,
        1,
        "the doorbell ended the flush's wait"
    );
    assert_eq!(
        kick.read()
            .expect("a kick is left for the library's reader"),
        1
    );
}

#[test]
fn a_read_queued_behind_a_long_flush_completes_before_it() {
    // The driver heard of no completion since the flush was popped, yet queues a read while
    // the flush runs (a guest's fsync with other readers): the worker must not sit in the
    // flush's wait until the disk is done.
    // 128 MiB of dirty page cache: the flush takes the disk's time to write them.
    let (mut r, kick) = dirty_rig_on_disk(128 * MIB, 128 * MIB, 0x5a);
    let mem = memory();

    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    header(&mem, HDR + 16, VIRTIO_BLK_T_IN, 0);
    mem.write_obj(0xffu8, GuestAddress(ST)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(ST + 1)).unwrap();
    let flush: &[D] = &[(HDR, 16, false), (ST, 1, true)];
    let read: &[D] = &[(HDR + 16, 16, false), (DATA, 4096, true), (ST + 1, 1, true)];
    let (vq, mut q) = queue_of(&mem, &[flush, read]);
    // Only the flush is available when the pass starts.
    vq.avail().idx().store(u16::to_le(1));
    let avail_idx = vq.avail_addr().unchecked_add(2);
    let driver = {
        let (mem, kick) = (mem.clone(), kick.try_clone().unwrap());
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(10));
            mem.store(u16::to_le(2), avail_idx, Ordering::Release)
                .unwrap();
            kick.write(1).unwrap();
            std::time::Instant::now()
        })
    };
    r.ex.set_doorbell(Some(kick.as_raw_fd()));
    r.ex.process_queue(&mut q, &mem).unwrap();
    let done = std::time::Instant::now();
    r.ex.set_doorbell(None);
    let queued = driver.join().unwrap();
    assert_eq!(
        vq.used().idx().load(),
        2,
        "the flush took under 10 ms: the read was queued after the pass"
    );
    assert_eq!((status(&mem, ST), status(&mem, ST + 1)), (OK, OK));
    assert_eq!(
        (r.ex.stats().batches, r.ex.stats().doorbells),
        (2, 1),
        "the read was popped in a wave of its own, after its kick ended the flush's wait"
    );
    let first = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!(
        first.id(),
        2,
        "the read waited for the flush: the pass ended {:?} after the read was queued",
        done.saturating_duration_since(queued)
    );
    let mut data = [0u8; 4096];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
}

#[test]
fn reads_leave_the_image_access_time_alone() {
    // Served images are opened O_NOATIME (the test owns its image): a read that updated the
    // atime would also read the clock and check the inode each time (disk/atime.rs).
    // A file server updates the atime itself whatever the descriptor says.
    let remote = nix::sys::statfs::statfs(dir_on_disk().path()).is_ok_and(|s| {
        matches!(
            s.filesystem_type().0 as u64,
            0x6969 | 0x6573_5546 | 0x0102_1997 | 0xff53_4d42 | 0xfe53_4d42
        )
    });
    for direct in [false, true] {
        let dir = dir_on_disk();
        if direct {
            let probe = dir.path().join("probe");
            fs::File::create(&probe).unwrap();
            if let Err(e) = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&probe)
            {
                vloop_frontend::skip::skip(&format!(
                    "O_DIRECT is not supported under target/: {e}"
                ));
                continue;
            }
        }
        let mut r = rig_in(dir, MIB, |c| c.direct = direct);
        for fd in [r.disk.fd(), r.disk.buffered_fd()] {
            assert!(
                crate::disk::is_no_atime(fd),
                "direct {direct}: fd {fd} updates atime"
            );
        }
        let mem = memory();
        assert_eq!(write_sector(&mut r, &mem, 8, 0x5a), OK);
        // An atime two days old, before the last write: a relatime mount updates it on the
        // next read through a descriptor without O_NOATIME.
        let meta = fs::metadata(&r.path).unwrap();
        let old = nix::sys::time::TimeSpec::new(meta.mtime() - 2 * 86400, 0);
        let mtime = nix::sys::time::TimeSpec::new(meta.mtime(), meta.mtime_nsec());
        nix::sys::stat::utimensat(
            None,
            &r.path,
            &old,
            &mtime,
            nix::sys::stat::UtimensatFlags::FollowSymlink,
        )
        .unwrap();
        // An aligned buffer goes to the O_DIRECT descriptor, an unaligned one to the
        // buffered one.
        for (at, len) in [(DATA, 4096), (DATA + 1, 512)] {
            let (st, _) = rw(&mut r, &mem, VIRTIO_BLK_T_IN, 8, &[(at, len, true)]);
            assert_eq!(st, OK);
        }
        if !remote {
            assert_eq!(
                fs::metadata(&r.path).unwrap().atime(),
                old.tv_sec(),
                "direct {direct}: a read updated the image's atime"
            );
        }
    }
}

#[test]
fn a_stopping_connection_takes_no_more_requests() {
    // Set when the connection ends (SIGTERM): a pass takes nothing more from the ring, and
    // takes it all again once the flag is clear (a driver keeping its ring full cannot hold
    // a pass for WAVES_PER_CALL waves).
    let mut r = rig(MIB);
    let mem = memory();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    header(&mem, HDR + 16, VIRTIO_BLK_T_FLUSH, 0);
    let flush = |h: u64, st: u64| -> Vec<D> { vec![(h, 16, false), (st, 1, true)] };
    let (a, b) = (flush(HDR, ST), flush(HDR + 16, ST + 1));
    let (vq, mut q) = queue_of(&mem, &[&a, &b]);
    let stop = Arc::new(AtomicBool::new(true));
    r.ex.stop_on(stop.clone());
    r.ex.process_queue(&mut q, &mem).unwrap();
    assert_eq!(vq.used().idx().load(), 0, "a stopping pass took requests");
    stop.store(false, Ordering::Relaxed);
    r.ex.process_queue(&mut q, &mem).unwrap();
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!((status(&mem, ST), status(&mem, ST + 1)), (OK, OK));
}

#[test]
fn refused_flushes_log_within_the_queue_budget() {
    // After a flush failed, every later one is refused (the data it was to make durable may
    // be lost): a guest looping on FLUSH gets IOERR each time and a log line within the
    // queue's budget, not one per request.
    let mut r = rig(MIB);
    r.disk
        .poison_flush(&std::io::Error::from_raw_os_error(libc::EIO));
    let mem = memory();
    let n = 64u64;
    let chains: Vec<Vec<D>> = (0..n)
        .map(|i| {
            header(&mem, HDR + 16 * i, VIRTIO_BLK_T_FLUSH, 0);
            vec![(HDR + 16 * i, 16, false), (ST + i, 1, true)]
        })
        .collect();
    let refs: Vec<&[D]> = chains.iter().map(|c| c.as_slice()).collect();
    let (vq, mut q) = queue_sized(&mem, 128, &refs);
    let t = std::time::Instant::now();
    r.ex.process_queue(&mut q, &mem).unwrap();
    let windows = t.elapsed().as_secs() + 2;
    assert_eq!(u64::from(vq.used().idx().load()), n);
    assert!((0..n).all(|i| status(&mem, ST + i) == VIRTIO_BLK_S_IOERR as u8));
    // One budget per one-second window the run touched.
    let logged = n - r.ex.limiter().dropped();
    assert!(
        logged <= windows * u64::from(super::WARNINGS_PER_SECOND),
        "{logged} of {n} refused flushes were logged"
    );
}

#[test]
fn a_failed_image_refuses_every_request_but_get_id() {
    // After the work of a request panicked (a bug), the image's metadata may be half
    // updated: nothing more is read, written or flushed.
    let mut r = rig(MIB);
    let mem = memory();
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_IN, 0, &[(DATA, 4096, true)]).0,
        OK
    );
    r.disk.fail();
    for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        assert_eq!(
            rw(&mut r, &mem, t, 0, &[(DATA, 4096, t == VIRTIO_BLK_T_IN)]).0,
            VIRTIO_BLK_S_IOERR as u8
        );
    }
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let flush: &[D] = &[(HDR, 16, false), (ST, 1, true)];
    let (_vq, mut q) = queue_of(&mem, &[flush]);
    r.ex.process_queue(&mut q, &mem).unwrap();
    assert_eq!(status(&mem, ST), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn seg_max_fits_the_ring_a_frontend_uses_by_default() {
    // Read before the ring size is set: a driver without indirect descriptors must fit a
    // request of seg_max segments in QEMU's default 128-entry ring.
    assert_eq!(rig(MIB).disk.limits().seg_max, 126);
    assert_eq!(rig_with(MIB, |c| c.queue_size = 8).disk.limits().seg_max, 6);
}

#[test]
fn a_lone_large_page_cache_read_is_copied_inline_and_two_go_to_io_wq() {
    // uring.rs RING_READ_MIN: a cached 1 MiB read that is the queue's only work completes
    // inline, without a wait on the ring; two at once go to io-wq, side by side.
    let mut r = filled(4 * MIB);
    let mem = memory();
    assert!(matches!(r.ex.engine(), Engine::Uring(_)), "io_uring engine");
    let want = file_bytes(&r.path, 2 * MIB, MIB as usize);
    let before = r.ex.stats().waits;
    let one: &[D] = &[(MIB, MIB as u32, true)];
    assert_eq!(
        rw(&mut r, &mem, VIRTIO_BLK_T_IN, 4096, one),
        (OK, MIB as u32 + 1)
    );
    assert_eq!(
        r.ex.stats().waits,
        before,
        "a lone 1 MiB read completes inline"
    );
    let mut got = vec![0u8; MIB as usize];
    mem.read_slice(&mut got, GuestAddress(MIB)).unwrap();
    assert!(got == want, "the lone read's data");
    // Two in one batch (into the same buffer: both read the same sectors).
    let (st0, st1) = (ST, ST + 1);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 4096);
    header(&mem, HDR + 16, VIRTIO_BLK_T_IN, 4096);
    mem.write_slice(&vec![0u8; MIB as usize], GuestAddress(MIB))
        .unwrap();
    let a: &[D] = &[(HDR, 16, false), (MIB, MIB as u32, true), (st0, 1, true)];
    let b: &[D] = &[
        (HDR + 16, 16, false),
        (MIB, MIB as u32, true),
        (st1, 1, true),
    ];
    let (used, _) = run(&mut r, &mem, &[a, b]);
    assert_eq!(used.len(), 2);
    assert_eq!((status(&mem, st0), status(&mem, st1)), (OK, OK));
    assert!(
        r.ex.stats().waits > before,
        "two 1 MiB reads at once wait for the ring"
    );
    mem.read_slice(&mut got, GuestAddress(MIB)).unwrap();
    assert!(got == want, "the two reads' data");
}
