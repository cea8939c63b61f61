//! Descriptor chains from a hostile guest, through the daemon's data path.
//!
//! The input describes a batch of virtio-blk requests (direct and indirect chains, loops,
//! nested indirect tables, zero-length and wrong-direction buffers, tiny or missing status
//! descriptors, more segments than `seg_max`, sectors at and past the capacity, lengths that
//! overflow) which are laid out in guest memory with virtio-queue's `MockSplitQueue` and run
//! through `Executor::process_queue`, the function a worker thread of the daemon calls, against
//! small image files on the host.
//!
//! Checked besides "no panic": the image keeps its size; the only image bytes that change are
//! inside the ranges the backend's own parser accepted for writing (writes, discards and
//! write-zeroes); every used element names a chain that was offered; every status byte written
//! is a valid `VIRTIO_BLK_S_*`.

#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vloop_blk::request::{RequestKind, SECTOR_SIZE};
use vloop_blk::{parse, BlockSize, Config, Disk, EngineKind, Executor, GuestMem};
use vm_memory::{Bytes, GuestAddress};

/// Image size: 128 KiB (256 sectors).
const IMAGE_SIZE: u64 = 128 << 10;
/// The ring region: descriptor table, rings and indirect tables.
const RING_BASE: u64 = 0;
const RING_LEN: usize = 0x1_0000;
/// Indirect tables, one 4 KiB page per chain, inside the ring region.
const INDIRECT_BASE: u64 = 0x8000;
/// Request headers, one 64-byte block per chain (header, segments, status).
const HDR_BASE: u64 = 0x2_0000;
const HDR_LEN: usize = 0x1_0000;
const HDR_STRIDE: u64 = 0x400;
/// Data buffers.
const DATA_BASE: u64 = 0x10_0000;
const DATA_LEN: usize = 0x4_0000;
/// The used ring, apart from the mock's rings (MockSplitQueue places its used ring over the
/// end of the available ring for small queues).
const USED_BASE: u64 = 0x4000;
/// Most chains per batch.
const MAX_CHAINS: usize = 16;
/// Most descriptors per chain described by the input.
const MAX_DESCS: usize = 24;

#[derive(Arbitrary, Debug)]
enum DiskSel {
    Rw512,
    Rw4096,
    Ro512,
}

#[derive(Arbitrary, Debug)]
enum Addr {
    /// Offset into this chain's header block.
    Header(u8),
    /// 512-byte aligned offset into the data area.
    Data(u8),
    /// Unaligned offset into the data area.
    DataAt(u16),
    /// The last byte of the data area.
    DataEnd,
    /// Any address (unmapped, in a gap between regions, near u64::MAX).
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Len {
    Bytes(u8),
    Sectors(u8),
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Next {
    /// The following descriptor of the chain.
    Following,
    /// Any index (loops, out of the table).
    Index(u16),
}

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: Addr,
    len: Len,
    write: bool,
    next: Next,
    /// Set INDIRECT on this descriptor (nested indirect inside a table).
    indirect: bool,
    /// Force NEXT on the last descriptor or clear it on another one.
    flip_next: bool,
}

#[derive(Arbitrary, Debug)]
enum ReqType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Sector {
    Near(u8),
    /// Counted back from the capacity.
    FromEnd(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
struct Seg {
    sector: Sector,
    sectors: u32,
    flags: u32,
}

#[derive(Arbitrary, Debug)]
struct Chain {
    req: ReqType,
    sector: Sector,
    segs: Vec<Seg>,
    /// Lay the descriptors out in an indirect table behind one head descriptor.
    indirect: bool,
    /// Length of the indirect descriptor itself, when not the natural one.
    indirect_len: Option<u32>,
    descs: Vec<Desc>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    disk: DiskSel,
    /// Queue size is 2^(1 + log2 % 8).
    log2_size: u8,
    chains: Vec<Chain>,
    /// Extra heads offered in the available ring (may be out of range).
    extra_heads: Vec<u16>,
    /// Bytes written over the data area before the batch.
    data_fill: Vec<u8>,
}

struct Target {
    file: File,
    executor: Executor,
    disk: Arc<Disk>,
    writable: bool,
}

struct Targets {
    _dir: tempfile::TempDir,
    rw512: Mutex<Target>,
    rw4096: Mutex<Target>,
    ro512: Mutex<Target>,
}

fn pattern(offset: u64) -> u8 {
    ((offset / SECTOR_SIZE) as u8) ^ 0xa5 ^ (offset as u8).rotate_left(3)
}

fn image_pattern() -> Vec<u8> {
    (0..IMAGE_SIZE).map(pattern).collect()
}

fn target(dir: &std::path::Path, name: &str, block: BlockSize, read_only: bool) -> Target {
    let path = dir.join(name);
    std::fs::write(&path, image_pattern()).expect("image");
    let mut config = Config::new(&path);
    config.read_only = read_only;
    config.logical_block_size = block;
    // A small queue size gives a small seg_max (queue size - 2) that chains easily exceed.
    config.queue_size = 8;
    config.engine = EngineKind::Auto;
    let disk = Arc::new(Disk::open(&config).expect("open image"));
    let mut executor =
        Executor::new(disk.clone(), 0, config.engine, config.queue_size).expect("engine");
    // Page-cache reads go to the engine's helper thread too, as on a saturated worker.
    executor.always_share();
    Target {
        // A second descriptor to check and restore the content (the locks are advisory).
        file: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("reopen image"),
        executor,
        disk,
        writable: !read_only,
    }
}

fn targets() -> &'static Targets {
    static T: OnceLock<Targets> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        Targets {
            rw512: Mutex::new(target(dir.path(), "rw512.img", BlockSize::B512, false)),
            rw4096: Mutex::new(target(dir.path(), "rw4096.img", BlockSize::B4096, false)),
            ro512: Mutex::new(target(dir.path(), "ro512.img", BlockSize::B512, true)),
            _dir: dir,
        }
    })
}

fn memory() -> GuestMem {
    GuestMem::from_ranges(&[
        (GuestAddress(RING_BASE), RING_LEN),
        (GuestAddress(HDR_BASE), HDR_LEN),
        (GuestAddress(DATA_BASE), DATA_LEN),
    ])
    .expect("guest memory")
}

fn sector(s: &Sector, capacity: u64) -> u64 {
    match *s {
        Sector::Near(n) => u64::from(n),
        Sector::FromEnd(n) => capacity.wrapping_sub(u64::from(n)),
        Sector::Raw(v) => v,
    }
}

fn req_type(t: &ReqType) -> u32 {
    match *t {
        ReqType::In => VIRTIO_BLK_T_IN,
        ReqType::Out => VIRTIO_BLK_T_OUT,
        ReqType::Flush => VIRTIO_BLK_T_FLUSH,
        ReqType::GetId => VIRTIO_BLK_T_GET_ID,
        ReqType::Discard => VIRTIO_BLK_T_DISCARD,
        ReqType::WriteZeroes => VIRTIO_BLK_T_WRITE_ZEROES,
        ReqType::Raw(v) => v,
    }
}

fn addr(a: &Addr, hdr: u64) -> u64 {
    match *a {
        Addr::Header(off) => hdr + u64::from(off),
        Addr::Data(n) => DATA_BASE + u64::from(n) * SECTOR_SIZE % DATA_LEN as u64,
        Addr::DataAt(off) => DATA_BASE + u64::from(off) % DATA_LEN as u64,
        Addr::DataEnd => DATA_BASE + DATA_LEN as u64 - 1,
        Addr::Raw(v) => v,
    }
}

fn len(l: &Len) -> u32 {
    match *l {
        Len::Bytes(n) => u32::from(n),
        Len::Sectors(n) => u32::from(n) * SECTOR_SIZE as u32,
        Len::Raw(v) => v,
    }
}

/// The descriptors of `descs` as a chain whose entries live at `base`, `base + 1`, ... of a
/// table of `table_len` entries.
fn build(descs: &[Desc], hdr: u64, base: u16, table_len: u16) -> Vec<RawDescriptor> {
    let n = descs.len();
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let last = i + 1 == n;
            let mut flags = 0u16;
            if d.write {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if d.indirect {
                flags |= VRING_DESC_F_INDIRECT as u16;
            }
            if last == d.flip_next {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = match d.next {
                Next::Following => (base + i as u16 + 1) % table_len.max(1),
                Next::Index(v) => v,
            };
            RawDescriptor::from(Descriptor::new(
                addr(&d.addr, hdr),
                len(&d.len),
                flags,
                next,
            ))
        })
        .collect()
}

fn write_header(mem: &GuestMem, hdr: u64, c: &Chain, capacity: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type(&c.req).to_le_bytes());
    h[8..16].copy_from_slice(&sector(&c.sector, capacity).to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr)).expect("header");
    for (i, s) in c.segs.iter().take(8).enumerate() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&sector(&s.sector, capacity).to_le_bytes());
        b[8..12].copy_from_slice(&s.sectors.to_le_bytes());
        b[12..16].copy_from_slice(&s.flags.to_le_bytes());
        mem.write_slice(&b, GuestAddress(hdr + 16 + 16 * i as u64))
            .expect("segment");
    }
}

fn run(input: Input) {
    let t = targets();
    let lock = match input.disk {
        DiskSel::Rw512 => &t.rw512,
        DiskSel::Rw4096 => &t.rw4096,
        DiskSel::Ro512 => &t.ro512,
    };
    let mut target = lock.lock().unwrap_or_else(|p| p.into_inner());
    let capacity = target.disk.capacity();
    let qsize: u16 = 1 << (1 + input.log2_size % 8);

    let mem = memory();
    if !input.data_fill.is_empty() {
        let n = input.data_fill.len().min(DATA_LEN);
        mem.write_slice(&input.data_fill[..n], GuestAddress(DATA_BASE))
            .expect("fill");
    }
    let mock = MockSplitQueue::create(&mem, GuestAddress(RING_BASE), qsize);
    let mut heads = Vec::new();
    let mut next_desc: u16 = 0;
    for (ci, c) in input.chains.iter().take(MAX_CHAINS).enumerate() {
        let hdr = HDR_BASE + ci as u64 * HDR_STRIDE;
        write_header(&mem, hdr, c, capacity);
        let descs = &c.descs[..c.descs.len().min(MAX_DESCS)];
        if c.indirect {
            if next_desc >= qsize {
                break;
            }
            let table = INDIRECT_BASE + ci as u64 * 0x100 % 0x8000;
            let n = descs.len().min(16) as u16;
            let raw = build(&descs[..usize::from(n)], hdr, 0, n);
            for (i, d) in raw.iter().enumerate() {
                mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
                    .expect("indirect table");
            }
            let l = c.indirect_len.unwrap_or(u32::from(n) * 16);
            let head = Descriptor::new(table, l, VRING_DESC_F_INDIRECT as u16, 0);
            mock.desc_table()
                .store(next_desc, RawDescriptor::from(head))
                .expect("desc");
            heads.push(next_desc);
            next_desc += 1;
        } else {
            let room = usize::from(qsize - next_desc.min(qsize));
            if room == 0 || descs.is_empty() {
                break;
            }
            let descs = &descs[..descs.len().min(room)];
            for (i, d) in build(descs, hdr, next_desc, qsize).into_iter().enumerate() {
                mock.desc_table()
                    .store(next_desc + i as u16, d)
                    .expect("desc");
            }
            heads.push(next_desc);
            next_desc += descs.len() as u16;
        }
    }
    heads.extend(input.extra_heads.iter().take(4));
    let offered = heads.len().min(usize::from(qsize));
    for (i, h) in heads.iter().take(offered).enumerate() {
        mock.avail().ring().ref_at(i).expect("avail").store(*h);
    }
    mock.avail().idx().store(offered as u16);

    // What the parser allows to change in the image.
    let mut allowed: Vec<(u64, u64)> = Vec::new();
    let make_queue = || {
        let mut q: Queue = mock.create_queue().expect("queue");
        q.set_used_ring_address(Some(USED_BASE as u32), Some(0));
        q
    };
    let mut pre = make_queue();
    let limits = *target.disk.limits();
    if let Ok(iter) = pre.iter(&mem) {
        for chain in iter {
            if let Ok(req) = parse(chain, &mem, &limits) {
                match req.kind {
                    RequestKind::Write { .. } => allowed.push((req.offset(), req.data_len)),
                    RequestKind::Discard(segs) | RequestKind::WriteZeroes(segs) => {
                        allowed.extend(segs.iter().map(|s| (s.offset(), s.len())))
                    }
                    _ => {}
                }
            }
        }
    }

    let mut queue = make_queue();
    let _ = target.executor.process_queue(&mut queue, &mem);

    // Used ring: only offered heads.
    let used_idx: u16 = mem.read_obj(GuestAddress(USED_BASE + 2)).expect("used idx");
    assert!(
        usize::from(used_idx) <= offered,
        "{used_idx} used elements for {offered} offered heads {:?}",
        &heads[..offered]
    );
    for i in 0..u64::from(used_idx) {
        let id: u32 = mem
            .read_obj(GuestAddress(USED_BASE + 4 + 8 * i))
            .expect("used element");
        assert!(
            heads[..offered].iter().any(|&h| u32::from(h) == id),
            "used id {id} never offered"
        );
    }

    // The image: same size, untouched outside the allowed ranges.
    let size = target.file.metadata().expect("stat").len();
    assert_eq!(size, IMAGE_SIZE, "the image changed size");
    let mut now = vec![0u8; IMAGE_SIZE as usize];
    target.file.read_exact_at(&mut now, 0).expect("read image");
    let inside = |off: u64| allowed.iter().any(|&(s, l)| off >= s && off - s < l);
    let mut dirty = false;
    for (off, b) in now.iter().enumerate() {
        let off = off as u64;
        if *b != pattern(off) {
            assert!(
                target.writable && inside(off),
                "image byte {off} changed outside every accepted write range {allowed:?}"
            );
            dirty = true;
        }
    }
    if dirty {
        target
            .file
            .write_all_at(&image_pattern(), 0)
            .expect("restore image");
    }
}

fuzz_target!(|input: Input| run(input));
