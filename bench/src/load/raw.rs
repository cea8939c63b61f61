//! The workload straight on the image file with io_uring (the ceiling for any backend): one
//! ring per queue of the workload over page-aligned buffers (so O_DIRECT works), each driven by
//! the loop of `drive`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use io_uring::{opcode, types, IoUring};
use vloop_frontend::mem::GuestMem;

use super::drive::{drive, run_queues, Engine};
use super::result::{LoadError, RunResult};
use super::workload::Workload;

/// Runs `w` on the file `image` itself with io_uring (the ceiling for any backend).
pub fn run_raw(image: &Path, w: &Workload, direct: bool) -> Result<RunResult, LoadError> {
    let open_err = |source| LoadError::Open {
        path: image.to_owned(),
        source,
    };
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(w.pattern.writes());
    if direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    let file = oo.open(image).map_err(open_err)?;
    let capacity = file.metadata().map_err(open_err)?.len();
    w.check(capacity)?;
    let files = (0..w.queues)
        .map(|_| file.try_clone().map_err(open_err))
        .collect::<Result<Vec<File>, _>>()?;
    let wl = *w;
    let ran = run_queues("raw-q", w.runtime, files, move |file, qi, end| {
        drive(UringEngine::new(&file, &wl)?, &wl, qi, capacity, end)
    })?;
    Ok(RunResult::build(ran, w.bs, None))
}

/// An io_uring on the file as an [`Engine`], a buffer per slot.
struct UringEngine {
    ring: IoUring,
    fd: types::Fd,
    /// The slots' buffers, one of `stride` bytes each.
    bufs: GuestMem,
    stride: u64,
    /// Bytes per request.
    bs: u32,
    /// Slots not in flight.
    free: Vec<u16>,
    /// Slots in all.
    slots: u16,
}

impl UringEngine {
    /// The engine of workload `w` on `file`; its buffers hold a fill pattern.
    fn new(file: &File, w: &Workload) -> Result<Self, LoadError> {
        let uerr = |op| move |source| LoadError::Uring { op, source };
        let depth = u32::from(w.iodepth).next_power_of_two();
        let ring = IoUring::new(depth).map_err(uerr("setup"))?;
        let stride = u64::from(w.bs).next_multiple_of(4096);
        // Page-aligned buffers, so O_DIRECT works.
        let bufs = GuestMem::new(stride * u64::from(w.iodepth))?;
        bufs.fill(0, bufs.len(), 0xa5)?;
        Ok(Self {
            ring,
            fd: types::Fd(file.as_raw_fd()),
            bufs,
            stride,
            bs: w.bs,
            free: (0..w.iodepth).collect(),
            slots: w.iodepth,
        })
    }
}

impl Engine for UringEngine {
    fn slots(&self) -> usize {
        usize::from(self.slots)
    }

    fn free_slot(&mut self) -> Option<u16> {
        self.free.pop()
    }

    fn submit(&mut self, slot: u16, read: bool, offset: u64) -> Result<(), LoadError> {
        let buf = self
            .bufs
            .host_ptr(u64::from(slot) * self.stride, u64::from(self.bs))?;
        let sqe = if read {
            opcode::Read::new(self.fd, buf, self.bs)
                .offset(offset)
                .build()
        } else {
            opcode::Write::new(self.fd, buf, self.bs)
                .offset(offset)
                .build()
        }
        .user_data(u64::from(slot));
        // SAFETY: the buffer stays valid (owned by `bufs`) and unused by anything else until
        // the completion for this slot is reaped in `complete`; the ring has room because it
        // is at least `iodepth` deep and at most `iodepth` are queued.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| LoadError::Workload("submission queue full".into()))
    }

    /// Nothing: `complete` submits what is queued as it waits.
    fn kick(&mut self) -> Result<(), LoadError> {
        Ok(())
    }

    fn in_flight(&self) -> usize {
        usize::from(self.slots) - self.free.len()
    }

    fn complete(&mut self, done: &mut Vec<(u16, bool)>) -> Result<(), LoadError> {
        self.ring
            .submit_and_wait(1)
            .map_err(|source| LoadError::Uring {
                op: "submit",
                source,
            })?;
        self.reap(done);
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<(u16, bool)>) -> Result<(), LoadError> {
        if !self.ring.submission().is_empty() {
            self.ring.submit().map_err(|source| LoadError::Uring {
                op: "submit",
                source,
            })?;
        }
        self.reap(done);
        Ok(())
    }
}

impl UringEngine {
    /// Hands on the completions in the ring and frees their slots.
    fn reap(&mut self, done: &mut Vec<(u16, bool)>) {
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as u16;
            done.push((slot, cqe.result() == self.bs as i32));
            self.free.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::load::workload::Pattern;

    /// `pattern` on two queues at depth 4, 4k requests for `runtime`.
    fn wl(pattern: Pattern, runtime: Duration) -> Workload {
        Workload {
            pattern,
            bs: 4096,
            iodepth: 4,
            queues: 2,
            runtime,
            one_pass: false,
            think: Duration::ZERO,
        }
    }

    #[test]
    fn a_one_pass_run_writes_the_file_once_and_ends_early() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("f");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let w = Workload {
            bs: 64 << 10,
            one_pass: true,
            ..wl(Pattern::Write, Duration::from_secs(30))
        };
        let t = Instant::now();
        let r = run_raw(&img, &w, false).unwrap();
        assert_eq!(r.ios, 64, "4 MiB in 64 KiB writes");
        assert_eq!(r.errors, 0);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0xa5));
    }

    #[test]
    fn raw_engine_reads_and_writes_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("f");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let w = wl(Pattern::RandWrite, Duration::from_millis(100));
        let r = run_raw(&img, &w, false).unwrap();
        assert!(r.ios > 0);
        assert_eq!(r.errors, 0);
        assert!(r.latency.p50_us > 0.0);
        // The writes landed: the file now holds the 0xa5 fill somewhere.
        assert!(std::fs::read(&img).unwrap().contains(&0xa5));
    }

    #[test]
    fn streams_that_think_send_once_per_think_time_each() {
        // 4 streams on each of 2 queues, each waiting 20 ms after a completion: at most
        // 8 x (300 ms / 20 ms + 1) requests in 300 ms, and far more without the think time.
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("f");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let think = Duration::from_millis(20);
        let w = Workload {
            think,
            ..wl(Pattern::RandRead, Duration::from_millis(300))
        };
        let r = run_raw(&img, &w, false).unwrap();
        assert_eq!(r.errors, 0);
        assert!(r.ios >= 8, "{} requests", r.ios);
        assert!(
            r.ios <= 8 * 16,
            "{} requests: the streams did not think",
            r.ios
        );
        // A request's latency counts from when it was sent, not the think time before.
        assert!(
            r.latency.p50_us < think.as_micros() as f64 / 2.0,
            "p50 {} us",
            r.latency.p50_us
        );
        assert!(w.to_string().ends_with("think 20000 us"), "{w}");
    }
}
