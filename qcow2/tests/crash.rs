//! Crash safety by fault injection: every write and sync of the top image goes through a
//! recording storage; for each sync the image a power cut right after it could leave is
//! rebuilt (all writes up to that sync, plus none, all, or random sector subsets of the writes
//! before the next sync) and checked: `qemu-img check` finds no corruption (leaks allowed) and
//! every write completed before the last finished flush reads back.

mod common;

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use vloop_qcow2::{Backing, Chain, Extent, OpenOptions, Storage, WritePath};

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Sync,
}

struct Recorder {
    file: File,
    log: Mutex<Vec<Op>>,
}

impl Recorder {
    fn push(&self, op: Op) {
        self.log.lock().unwrap().push(op);
    }
    fn syncs(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|o| matches!(o, Op::Sync))
            .count()
    }
}

/// The storage the chain sees: a shared recorder.
struct Rec(Arc<Recorder>);

impl Storage for Rec {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        Storage::read_at(&self.0.file, buf, off)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<usize> {
        Storage::read_vectored_at(&self.0.file, bufs, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.push(Op::Write(off, buf.to_vec()));
        Storage::write_at(&self.0.file, buf, off)
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], off: u64) -> io::Result<()> {
        let data: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.write_at(&data, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.push(Op::Sync);
        self.0.file.sync_data()
    }
    fn file_size(&self) -> io::Result<u64> {
        self.0.file.file_size()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.push(Op::SetLen(len));
        self.0.file.set_len(len)
    }
    fn fd(&self) -> RawFd {
        Storage::fd(&self.0.file)
    }
    fn identity(&self) -> io::Result<(u64, u64)> {
        self.0.file.identity()
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a guest op did to the disk, for the contents check.
#[derive(Clone, Debug)]
enum Effect {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

fn apply(disk: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(off, data) => {
            let end = *off as usize + data.len();
            if disk.len() < end {
                disk.resize(end, 0);
            }
            disk[*off as usize..end].copy_from_slice(data);
        }
        Op::SetLen(len) => disk.resize(*len as usize, 0),
        Op::Sync => {}
    }
}

/// One workload: random writes (direct and slow), discards, write-zeroes and flushes.
fn workload(dir: &Path, compat: &str, cs: u64, backed: bool, seed: u64) {
    let size = 2u64 << 20;
    let img = dir.join(format!("crash-{compat}-{cs}-{backed}.qcow2"));
    let opts = format!("cluster_size={cs},compat={compat}");
    if backed {
        let base = dir.join(format!("base-{compat}-{cs}.raw"));
        std::fs::write(&base, pattern(seed, size as usize)).unwrap();
        qemu_create(&img, &size.to_string(), &opts, Some((p(&base), "raw")));
    } else {
        qemu_create(&img, &size.to_string(), &opts, None);
    }
    // Some data allocated by QEMU first.
    qemu_io(
        &img,
        "qcow2",
        &[
            &format!("write -P 0x3c 0 {}", 4 * cs),
            &format!("write -z {} {}", 8 * cs, 2 * cs),
        ],
    );
    let initial = std::fs::read(&img).unwrap();
    let mut model = qemu_raw(&img);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let rec = Arc::new(Recorder {
        file,
        log: Mutex::new(Vec::new()),
    });
    let chain = Chain::open_storage(
        Box::new(Rec(rec.clone())),
        &img,
        &OpenOptions {
            format: Some(vloop_qcow2::Format::Qcow2),
            backing: Backing::FromImage,
            ..OpenOptions::default()
        },
        &mut ro_opener,
    )
    .unwrap();
    // Snapshots of the model at each finished flush, and the effects since each.
    let mut flushed: Vec<(usize, Vec<u8>)> = vec![(0, model.clone())];
    let mut effects: Vec<Vec<Effect>> = vec![Vec::new()];
    let mut rng = Rng(seed | 1);
    let discard_keeps = compat == "0.10" && backed;
    for step in 0..70 {
        let off = rng.below(size / 512) * 512;
        let len = ((rng.below(4 * cs / 512) + 1) * 512).min(size - off);
        match rng.below(10) {
            0..=5 => {
                let data = pattern(seed * 1000 + step, len as usize);
                let mut ext = Vec::new();
                match chain.map_write(off, len, &mut ext).unwrap() {
                    WritePath::Direct => {
                        let mut pos = 0;
                        for e in ext {
                            let Extent::Data { host, len, .. } = e else {
                                unreachable!()
                            };
                            rec.push(Op::Write(host, data[pos..pos + len as usize].to_vec()));
                            Storage::write_at(&rec.file, &data[pos..pos + len as usize], host)
                                .unwrap();
                            pos += len as usize;
                        }
                    }
                    WritePath::Slow => chain.write_slow(off, &[IoSlice::new(&data)]).unwrap(),
                }
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                effects.last_mut().unwrap().push(Effect::Data(off, data));
            }
            6 => {
                chain.discard(off, len).unwrap();
                if !discard_keeps {
                    let mut c = off.div_ceil(cs) * cs;
                    while c + cs <= off + len {
                        model[c as usize..(c + cs) as usize].fill(0);
                        effects.last_mut().unwrap().push(Effect::Zero(c, cs));
                        c += cs;
                    }
                }
            }
            7 => {
                chain.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                effects.last_mut().unwrap().push(Effect::Zero(off, len));
            }
            _ => {
                chain.flush().unwrap();
                let n = rec.syncs();
                flushed.push((n, model.clone()));
                effects.push(Vec::new());
            }
        }
    }
    let log = rec.log.lock().unwrap().clone();
    drop(chain);
    let sync_at: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, Op::Sync))
        .map(|(i, _)| i)
        .collect();
    assert!(
        sync_at.len() > 10,
        "too few syncs to test: {}",
        sync_at.len()
    );
    let crash = dir.join("crash-image.qcow2");
    let mut checked = 0;
    for (k, &at) in sync_at.iter().enumerate() {
        let mut durable = initial.clone();
        for op in &log[..=at] {
            apply(&mut durable, op);
        }
        let next = sync_at.get(k + 1).copied().unwrap_or(log.len());
        let later: Vec<&Op> = log[at + 1..next].iter().collect();
        // The newest flush whose syncs all happened by this crash point.
        let f = flushed.iter().rposition(|(n, _)| *n <= k + 1).unwrap();
        let mut variants: Vec<(String, Vec<u8>)> =
            vec![("none of the later writes".into(), durable.clone())];
        let mut all = durable.clone();
        for op in &later {
            apply(&mut all, op);
        }
        variants.push(("all of the later writes".into(), all));
        for v in 0..3 {
            let mut d = durable.clone();
            for op in &later {
                match op {
                    Op::Write(off, data) => {
                        for (i, chunk) in data.chunks(512).enumerate() {
                            if rng.below(2) == 0 {
                                apply(&mut d, &Op::Write(off + 512 * i as u64, chunk.to_vec()));
                            }
                        }
                    }
                    other if rng.below(2) == 0 => apply(&mut d, other),
                    _ => {}
                }
            }
            variants.push((format!("random subset {v}"), d));
        }
        for (name, bytes) in variants {
            std::fs::write(&crash, &bytes).unwrap();
            let (code, out) = qemu_check(&crash);
            assert!(code == 0 || code == 3, "crash after sync {k} ({name}), {compat} cluster {cs}: qemu-img check exit {code}: {out}");
            let got = qemu_raw(&crash);
            let (_, want) = &flushed[f];
            let later_effects: Vec<&Effect> = effects[f..].iter().flatten().collect();
            for s in 0..(size / 512) as usize {
                let r = s * 512..(s + 1) * 512;
                if got[r.clone()] == want[r.clone()] {
                    continue;
                }
                let explained = later_effects.iter().any(|e| match e {
                    Effect::Data(o, d) => {
                        let (o, e) = (*o as usize, *o as usize + d.len());
                        o <= r.start && r.end <= e && got[r.clone()] == d[r.start - o..r.end - o]
                    }
                    Effect::Zero(o, l) => {
                        (*o as usize) <= r.start
                            && r.end <= (*o + *l) as usize
                            && got[r.clone()].iter().all(|&b| b == 0)
                    }
                });
                assert!(explained, "crash after sync {k} ({name}), {compat} cluster {cs}: sector {s} holds data neither flushed nor written later");
            }
            checked += 1;
        }
    }
    eprintln!(
        "{compat} cluster {cs} backed={backed}: {} syncs, {checked} crash images checked",
        sync_at.len()
    );
}

#[test]
fn power_cut_after_any_sync_leaves_a_consistent_image() {
    if !have_qemu("power_cut_after_any_sync_leaves_a_consistent_image") {
        return;
    }
    let dir = tempdir();
    workload(dir.path(), "1.1", 4096, true, 11);
    // Small clusters: new L2 tables and refcount blocks during the workload.
    workload(dir.path(), "1.1", 512, true, 14);
    workload(dir.path(), "0.10", 512, false, 15);
    workload(dir.path(), "1.1", 65536, false, 12);
    workload(dir.path(), "0.10", 65536, true, 13);
}

/// What a killed process leaves: the chain is dropped without its close (which would write
/// back what it holds), as SIGKILL drops it; what its writes put in the page cache stays.
fn die(chain: Chain) {
    std::mem::forget(chain);
}

/// One step of a test on a chain and the model of its disk.
type Step<'a> = dyn Fn(&Chain, &mut Vec<u8>) + 'a;

#[test]
fn every_completed_write_survives_the_death_of_the_process() {
    if !have_qemu("every_completed_write_survives_the_death_of_the_process") {
        return;
    }
    let dir = tempdir();
    let base = path_in(&dir, "base.raw");
    let base_bytes = pattern(7, 8 << 20);
    std::fs::write(&base, &base_bytes).unwrap();
    let img = path_in(&dir, "top.qcow2");
    qemu_create(&img, "8M", "cluster_size=65536", Some(("base.raw", "raw")));
    let mut model = base_bytes.clone();
    let put = |model: &mut Vec<u8>, off: u64, data: &[u8]| {
        model[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    // Each step, then a death without a flush: every write completed before it must read back
    // in the next process, and the image must stay free of corruption.
    let steps: [&Step<'_>; 6] = [
        // A partial write into an unallocated cluster: copy-on-write from the base.
        &|c, m| {
            let d = pattern(1, 4096);
            write_mapped(c, 70_000, &d);
            put(m, 70_000, &d);
        },
        // Whole clusters, and one in a second L2 table's range (a new table).
        &|c, m| {
            let d = pattern(2, 3 << 16);
            write_mapped(c, 1 << 20, &d);
            put(m, 1 << 20, &d);
        },
        // Into an allocated cluster (the fast path).
        &|c, m| {
            let d = pattern(3, 512);
            write_mapped(c, 70_000 + 8192, &d);
            put(m, 70_000 + 8192, &d);
        },
        // Write zeroes over whole clusters and a partial one.
        &|c, m| {
            c.write_zeroes(1 << 20, (2 << 16) + 4096, true).unwrap();
            m[1 << 20..(1 << 20) + (2 << 16) + 4096].fill(0);
        },
        // Discard of a whole cluster of base data: zeroes, never the base's bytes again.
        &|c, m| {
            c.discard(4 << 20, 1 << 16).unwrap();
            m[4 << 20..(4 << 20) + (1 << 16)].fill(0);
        },
        // Many small allocating writes, across a new reservation.
        &|c, m| {
            for i in 0..64u64 {
                let d = pattern(100 + i, 1024);
                let off = (5 << 20) + i * 40_000;
                write_mapped(c, off, &d);
                put(m, off, &d);
            }
        },
    ];
    for (i, step) in steps.iter().enumerate() {
        let chain = open_chain(&img, false);
        step(&chain, &mut model);
        die(chain);
        let chain = open_chain(&img, true);
        let got = read_all(&chain, 1 << 20);
        drop(chain);
        assert!(
            got == model,
            "after step {i} and a death, first difference at byte {:?}",
            first_diff(&got, &model)
        );
        let (code, out) = qemu_check(&img);
        assert!(code == 0 || code == 3, "step {i}: qemu-img check: {out}");
    }
}
