//! The agent's I/O tool, `/init io PLAN`: runs the phases of a [`IoPlan`] on a block device
//! opened with O_DIRECT, io_uring keeping each phase's queue depth of requests in flight (one
//! `io_uring_enter` per completion at depth 1, as fio's io_uring engine does), and prints an
//! [`IoLine`] per event on stdout. It runs as a command under `exec`, never as pid 1.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use vloop_guest::io::{percentile, IoEvent, IoLine, IoPhase, IoPlan, PhaseResult};
use vloop_guest::ContentStream;

use super::Res;

/// A page: request buffers are made of these, so they are aligned for any logical block size
/// O_DIRECT may ask for.
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; 4096]);

/// Latencies kept per phase at most; the percentiles are over the first this many requests.
const MAX_SAMPLES: usize = 1 << 22;

/// Runs the tool on its arguments (the PLAN); returns the exit status.
pub fn main(args: &[String]) -> i32 {
    let plan = match args {
        [arg] => IoPlan::from_arg(arg),
        _ => Err("usage: /init io PLAN (the plan as one JSON argument)".to_string()),
    };
    let r = plan.and_then(|p| run(&p));
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vloop-guest io: {e}");
            1
        }
    }
}

/// Prints `event` stamped with the time since `t0` and flushes it, so the host sees it at once.
fn say(t0: Instant, event: IoEvent) {
    let line = IoLine {
        t_us: u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
        event,
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line.to_line());
    let _ = out.flush();
}

fn run(plan: &IoPlan) -> Res<()> {
    let t0 = Instant::now();
    let mut f = OpenOptions::new()
        .read(true)
        .write(plan.writes())
        .custom_flags(libc::O_DIRECT)
        .open(&plan.dev)
        .map_err(|e| format!("open {} with O_DIRECT: {e}", plan.dev))?;
    let bytes = f
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("size of {}: {e}", plan.dev))?;
    say(
        t0,
        IoEvent::Device {
            dev: plan.dev.clone(),
            bytes,
        },
    );
    let gap = Duration::from_millis(plan.gap_ms);
    for (i, phase) in plan.phases.iter().enumerate() {
        say(t0, IoEvent::Begin { phase: i });
        std::thread::sleep(gap);
        match run_phase(&f, bytes, phase, plan.seed.wrapping_add(i as u64)) {
            Ok(result) => {
                std::thread::sleep(gap);
                say(t0, IoEvent::End { phase: i, result });
            }
            Err(error) => {
                say(
                    t0,
                    IoEvent::Failed {
                        phase: i,
                        error: error.clone(),
                    },
                );
                return Err(format!("phase {i} ({}): {error}", phase.name()));
            }
        }
    }
    Ok(())
}

/// The offsets of a phase's requests, in request-size units of the device.
struct Offsets {
    random: bool,
    bs: u64,
    blocks: u64,
    next: u64,
    rng: u64,
}

impl Offsets {
    fn new(phase: &IoPhase, dev_bytes: u64, seed: u64) -> Res<Offsets> {
        let bs = u64::from(phase.bs);
        let blocks = dev_bytes / bs;
        if blocks == 0 {
            return Err(format!(
                "the device ({dev_bytes} bytes) is smaller than one request of {bs} bytes"
            ));
        }
        Ok(Offsets {
            random: phase.pattern.random(),
            bs,
            blocks,
            next: 0,
            rng: seed,
        })
    }

    /// The byte offset of the next request.
    fn next(&mut self) -> u64 {
        let block = if self.random {
            // SplitMix64; the modulo's bias is below 2^-40 for any device this tool sees.
            self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % self.blocks
        } else {
            let b = self.next;
            self.next = (b + 1) % self.blocks;
            b
        };
        block * self.bs
    }
}

/// One slot of the queue: its buffer and when its request started.
struct Slot {
    buf: Vec<Page>,
    started: Instant,
}

fn run_phase(f: &File, dev_bytes: u64, phase: &IoPhase, seed: u64) -> Res<PhaseResult> {
    let mut offsets = Offsets::new(phase, dev_bytes, seed)?;
    let qd = usize::try_from(phase.qd).map_err(|_| "queue depth too large".to_string())?;
    let bs = usize::try_from(phase.bs).map_err(|_| "request size too large".to_string())?;
    let writes = phase.pattern.writes();
    let now = Instant::now();
    let mut slots: Vec<Slot> = (0..qd)
        .map(|_| Slot {
            buf: vec![Page([0; 4096]); bs.div_ceil(4096)],
            started: now,
        })
        .collect();
    if writes {
        let mut data = ContentStream::new(seed);
        for s in &mut slots {
            for p in &mut s.buf {
                data.fill(&mut p.0);
            }
        }
    }
    let entries = phase.qd.next_power_of_two();
    let mut ring = IoUring::new(entries).map_err(|e| format!("io_uring_setup({entries}): {e}"))?;
    let fd = types::Fd(f.as_raw_fd());
    let mut res = PhaseResult::default();
    let mut lat: Vec<u32> = Vec::new();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_millis(phase.runtime_ms);
    let mut last = t0;
    let mut inflight = 0usize;
    let push = |ring: &mut IoUring, slot: usize, s: &mut Slot, off: u64| -> Res<()> {
        let ptr = s.buf.as_mut_ptr().cast::<u8>();
        let len = phase.bs;
        let e = if writes {
            opcode::Write::new(fd, ptr.cast_const(), len)
                .offset(off)
                .build()
        } else {
            opcode::Read::new(fd, ptr, len).offset(off).build()
        }
        .user_data(slot as u64);
        s.started = Instant::now();
        // SAFETY: the buffer is `bs` bytes (or more) of this slot, which is neither moved nor
        // dropped nor handed to another request until this request's completion is reaped
        // below; the fd stays open for the whole phase.
        unsafe { ring.submission().push(&e) }.map_err(|_| "the submission queue is full".into())
    };
    for (i, s) in slots.iter_mut().enumerate() {
        push(&mut ring, i, s, offsets.next())?;
        inflight += 1;
    }
    while inflight > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(format!("io_uring_enter: {e}")),
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let now = Instant::now();
        for (slot, r) in done {
            let i = usize::try_from(slot)
                .ok()
                .filter(|&i| i < slots.len())
                .ok_or_else(|| format!("a completion for unknown slot {slot}"))?;
            inflight -= 1;
            res.ios += 1;
            if usize::try_from(r).is_ok_and(|n| n == bs) {
                res.bytes += u64::from(phase.bs);
            } else {
                res.errors += 1;
            }
            if lat.len() < MAX_SAMPLES {
                let us = now.saturating_duration_since(slots[i].started).as_micros();
                lat.push(u32::try_from(us).unwrap_or(u32::MAX));
            }
            last = now;
            if now < deadline {
                push(&mut ring, i, &mut slots[i], offsets.next())?;
                inflight += 1;
            }
        }
    }
    res.secs = last.saturating_duration_since(t0).as_secs_f64();
    lat.sort_unstable();
    res.p50_us = percentile(&lat, 50.0);
    res.p99_us = percentile(&lat, 99.0);
    res.max_us = lat.last().map_or(0.0, |&m| f64::from(m));
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vloop_guest::io::Pattern;

    fn phase(pattern: Pattern, bs: u32, qd: u32) -> IoPhase {
        IoPhase::new(pattern, bs, qd, 100)
    }

    #[test]
    fn sequential_offsets_wrap_and_random_ones_stay_aligned_inside() {
        let mut s = Offsets::new(&phase(Pattern::Read, 4096, 1), 3 * 4096 + 100, 1).unwrap();
        let got: Vec<u64> = (0..5).map(|_| s.next()).collect();
        assert_eq!(got, [0, 4096, 8192, 0, 4096]);
        let mut r = Offsets::new(&phase(Pattern::RandWrite, 4096, 1), 1 << 20, 9).unwrap();
        let offs: Vec<u64> = (0..1000).map(|_| r.next()).collect();
        assert!(offs.iter().all(|o| o % 4096 == 0 && o + 4096 <= 1 << 20));
        let distinct: std::collections::BTreeSet<_> = offs.iter().collect();
        assert!(distinct.len() > 200, "{}", distinct.len());
        assert!(Offsets::new(&phase(Pattern::Read, 1 << 20, 1), 4096, 1).is_err());
    }

    #[test]
    fn a_phase_runs_on_a_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("disk.img");
        std::fs::write(&p, vec![1u8; 1 << 20]).unwrap();
        // O_DIRECT may be refused by the file system the tests run on (tmpfs): then plain I/O.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .or_else(|_| OpenOptions::new().read(true).write(true).open(&p))
            .unwrap();
        let w = run_phase(&f, 1 << 20, &phase(Pattern::RandWrite, 4096, 4), 3);
        let Ok(w) = w else {
            vloop_frontend::skip::skip(&format!("io_uring unavailable here: {}", w.unwrap_err()));
            return;
        };
        assert!(w.ios > 0 && w.errors == 0, "{w:?}");
        assert_eq!(w.bytes, w.ios * 4096);
        assert!(w.secs > 0.0 && w.p50_us <= w.p99_us && w.p99_us <= w.max_us);
        let r = run_phase(&f, 1 << 20, &phase(Pattern::Read, 65536, 1), 3).unwrap();
        assert!(
            r.ios > 0 && r.errors == 0 && r.bytes == r.ios * 65536,
            "{r:?}"
        );
        let data = std::fs::read(&p).unwrap();
        assert!(
            data.chunks(4096).any(|c| c.iter().any(|&b| b != 1)),
            "the writes reached the file"
        );
    }
}
