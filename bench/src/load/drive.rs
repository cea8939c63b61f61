//! The loop every engine runs on its queue: keep `iodepth` requests in flight from the start
//! of the run to its end (or to the end of a one-pass stream), take each completion's latency
//! and status, and count what the queue did. An engine ([`Engine`]) owns the slots and moves
//! the requests: a vhost-user virtqueue (`vhost`) or an io_uring on the file (`raw`).

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vloop_frontend::client::QueueStats;

use super::result::{LoadError, Part, Ran};
use super::workload::{OffsetGen, Workload};
use crate::hist::LatencyHist;
use crate::procfs;

/// One queue's way of moving requests: its slots, submission and completion.
pub(super) trait Engine {
    /// Request slots (the most requests in flight).
    fn slots(&self) -> usize;
    /// A free slot, if any.
    fn free_slot(&mut self) -> Option<u16>;
    /// Queues a read (else a write) of one block at byte `offset` in `slot`.
    fn submit(&mut self, slot: u16, read: bool, offset: u64) -> Result<(), LoadError>;
    /// Tells the other side about the requests queued since the last call.
    fn kick(&mut self) -> Result<(), LoadError>;
    /// Requests in flight.
    fn in_flight(&self) -> usize;
    /// Waits (a bounded time) for completions and appends each one's slot and whether it
    /// succeeded to `done`; none when the wait ran out.
    fn complete(&mut self, done: &mut Vec<(u16, bool)>) -> Result<(), LoadError>;
    /// Appends the completions there are, without waiting (and hands queued requests to the
    /// other side where `kick` leaves that to `complete`).
    fn poll(&mut self, done: &mut Vec<(u16, bool)>) -> Result<(), LoadError>;
    /// The queue's notification counters (zero where there are none).
    fn stats(&self) -> QueueStats {
        QueueStats::default()
    }
}

/// Runs queue `qi` of workload `w` over `capacity` bytes on `engine` until `end`. With a
/// think time, each completion frees its stream only that long after it arrived; the thread
/// polls for completions meanwhile instead of sleeping.
pub(super) fn drive(
    mut engine: impl Engine,
    w: &Workload,
    qi: u16,
    capacity: u64,
    end: Instant,
) -> Result<Part, LoadError> {
    let mut gen = OffsetGen::new(w, qi, capacity);
    let mut started = vec![Instant::now(); engine.slots()];
    let mut done = Vec::with_capacity(engine.slots());
    let mut part = Part {
        ios: 0,
        errors: 0,
        hist: LatencyHist::new(),
        stats: QueueStats::default(),
    };
    // Streams free to send, and when each thinking one will be.
    let mut free = engine.slots();
    let mut thinking = std::collections::VecDeque::with_capacity(engine.slots());
    loop {
        let now = Instant::now();
        if now < end {
            while thinking.front().is_some_and(|&t| t <= now) {
                thinking.pop_front();
                free += 1;
            }
            let mut sent = false;
            while free > 0 && !gen.done() {
                let Some(slot) = engine.free_slot() else {
                    break;
                };
                let (read, off) = gen.next_io();
                engine.submit(slot, read, off)?;
                started[usize::from(slot)] = now;
                free -= 1;
                sent = true;
            }
            if sent || w.think.is_zero() {
                engine.kick()?;
            }
        }
        if engine.in_flight() == 0 && (thinking.is_empty() || now >= end || gen.done()) {
            break;
        }
        if w.think.is_zero() {
            engine.complete(&mut done)?;
        } else {
            engine.poll(&mut done)?;
        }
        let t = Instant::now();
        for (slot, ok) in done.drain(..) {
            part.hist.record(t - started[usize::from(slot)]);
            part.ios += 1;
            if !ok {
                part.errors += 1;
            }
            if w.think.is_zero() {
                free += 1;
            } else {
                thinking.push_back(t + w.think);
            }
        }
    }
    part.stats = engine.stats();
    Ok(part)
}

/// Runs `queue(input, qi, end)` for each of `inputs` on its own thread (named `{name}{qi}`)
/// until `runtime` from now, and waits for all of them.
pub(super) fn run_queues<T: Send + 'static>(
    name: &str,
    runtime: Duration,
    inputs: Vec<T>,
    queue: impl Fn(T, u16, Instant) -> Result<Part, LoadError> + Copy + Send + 'static,
) -> Result<Ran, LoadError> {
    let me0 = procfs::cpu_time(std::process::id()).ok();
    let start = Instant::now();
    let end = start + runtime;
    let handles: Vec<JoinHandle<Result<Part, LoadError>>> = (0..)
        .zip(inputs)
        .map(|(qi, input)| {
            std::thread::Builder::new()
                .name(format!("{name}{qi}"))
                .spawn(move || queue(input, qi, end))
                .map_err(|_| LoadError::Thread)
        })
        .collect::<Result<_, _>>()?;
    let mut parts = Vec::new();
    for h in handles {
        parts.push(h.join().map_err(|_| LoadError::Thread)??);
    }
    let secs = start.elapsed().as_secs_f64();
    let client_cpu = procfs::cpu_time(std::process::id())
        .ok()
        .zip(me0)
        .map(|(now, then)| now.saturating_sub(then));
    Ok(Ran {
        parts,
        secs,
        client_cpu,
    })
}
