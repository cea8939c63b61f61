//! A verifying random read/write workload: every block written carries its block number and
//! a generation in each 8-byte word, and every read is checked against the last completed
//! write of that block. Each queue owns a stripe of the device and never has two requests on
//! one block in flight, so the expected content is always defined while queues and requests
//! still run concurrently.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::load::{client_options, LoadError, Rng, Workload};
use vloop_frontend::blk::{SECTOR_SIZE, S_OK};
use vloop_frontend::client::{Client, Queue, Request};

/// Outcome of a verifying run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyResult {
    /// Writes completed.
    pub writes: u64,
    /// Reads checked against a known generation.
    pub verified_reads: u64,
    /// Reads whose data differed from the last completed write.
    pub mismatches: u64,
    /// Requests completed with a non-OK status.
    pub errors: u64,
}

impl VerifyResult {
    /// What a verifying run of `w` found, in one line for a terminal.
    pub fn text(&self, w: &Workload) -> String {
        format!(
            "verify {w}: {} writes, {} reads checked, {} mismatches, {} errors\n",
            self.writes, self.verified_reads, self.mismatches, self.errors
        )
    }

    /// Why the run failed, when a read found other data than written or a request failed.
    pub fn failure(&self) -> Option<String> {
        (self.mismatches > 0 || self.errors > 0).then(|| {
            format!(
                "data verification failed: {} mismatches, {} failed requests",
                self.mismatches, self.errors
            )
        })
    }
}

/// The 8-byte word every word of a block holds: block number and generation.
pub fn tag(block: u64, generation: u32) -> u64 {
    (block << 32) | u64::from(generation)
}

/// Runs `w` (its pattern is ignored: half reads, half writes) with data verification.
pub fn run_verify(socket: &Path, w: &Workload) -> Result<VerifyResult, LoadError> {
    let mut client = Client::connect(socket, &client_options(w))?;
    let capacity = client.config().capacity_bytes();
    let blocks = capacity / u64::from(w.bs);
    let per_queue = blocks / u64::from(w.queues);
    if per_queue < u64::from(w.iodepth) * 2 {
        return Err(LoadError::Workload(format!(
            "the device has too few blocks ({blocks}) for {} queues at depth {}",
            w.queues, w.iodepth
        )));
    }
    let end = Instant::now() + w.runtime;
    let handles: Vec<_> = client
        .take_queues()
        .into_iter()
        .enumerate()
        .map(|(qi, q)| {
            let w = *w;
            let first = qi as u64 * per_queue;
            std::thread::spawn(move || verify_queue(q, &w, first, per_queue, end))
        })
        .collect();
    let mut total = VerifyResult::default();
    for h in handles {
        let r = h.join().map_err(|_| LoadError::Thread)??;
        total.writes += r.writes;
        total.verified_reads += r.verified_reads;
        total.mismatches += r.mismatches;
        total.errors += r.errors;
    }
    Ok(total)
}

fn verify_queue(
    mut q: Queue,
    w: &Workload,
    first: u64,
    blocks: u64,
    end: Instant,
) -> Result<VerifyResult, LoadError> {
    let bs = w.bs as usize;
    // Generation of the last completed write per block; 0 = never written in this run.
    let mut generation = vec![0u32; blocks as usize];
    let mut busy = vec![false; blocks as usize];
    // Per slot: (block, write generation or 0 for a read).
    let mut slot_op = vec![(0u64, 0u32); usize::from(q.slots())];
    let mut rng = Rng::new(first ^ 0x7e57);
    let mut next_gen = 1u32;
    let mut res = VerifyResult::default();
    let mut buf = vec![0u8; bs];
    let mut done = Vec::new();
    loop {
        if Instant::now() < end {
            while let Some(slot) = q.next_free_slot() {
                let b = loop {
                    let b = rng.below(blocks);
                    if !busy[b as usize] {
                        break b;
                    }
                };
                busy[b as usize] = true;
                let sector = (first + b) * u64::from(w.bs) / SECTOR_SIZE;
                if rng.below(2) == 0 {
                    let t = tag(first + b, next_gen).to_le_bytes();
                    for word in buf.chunks_mut(8) {
                        word.copy_from_slice(&t[..word.len()]);
                    }
                    q.fill_slot(slot, &buf)?;
                    q.submit_in(slot, Request::Write { sector, len: w.bs })?;
                    slot_op[usize::from(slot)] = (b, next_gen);
                    next_gen = next_gen.wrapping_add(1).max(1);
                } else {
                    q.submit_in(slot, Request::Read { sector, len: w.bs })?;
                    slot_op[usize::from(slot)] = (b, 0);
                }
            }
            q.kick()?;
        }
        if q.in_flight() == 0 {
            break;
        }
        done.clear();
        if q.reap(&mut done) == 0 {
            q.wait(Instant::now() + Duration::from_secs(10))?;
            continue;
        }
        for c in &done {
            let (b, g) = slot_op[usize::from(c.slot)];
            busy[b as usize] = false;
            if c.status != S_OK {
                res.errors += 1;
                continue;
            }
            if g != 0 {
                generation[b as usize] = g;
                res.writes += 1;
                continue;
            }
            let expect = generation[b as usize];
            if expect == 0 {
                continue;
            }
            q.slot_bytes(c.slot, &mut buf)?;
            let t = tag(first + b, expect).to_le_bytes();
            res.verified_reads += 1;
            if buf.chunks(8).any(|word| word != &t[..word.len()]) {
                res.mismatches += 1;
                if res.mismatches <= 5 {
                    tracing::error!(block = first + b, generation = expect, "read-back mismatch");
                }
            }
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_with_a_mismatch_or_an_error_fails() {
        let ok = VerifyResult {
            writes: 3,
            verified_reads: 2,
            ..VerifyResult::default()
        };
        assert_eq!(ok.failure(), None);
        let w = Workload {
            pattern: crate::load::Pattern::RandRead,
            bs: 4096,
            iodepth: 2,
            queues: 1,
            runtime: Duration::from_secs(1),
            one_pass: false,
            think: Duration::ZERO,
        };
        assert_eq!(
            ok.text(&w),
            "verify 4k randread QD2: 3 writes, 2 reads checked, 0 mismatches, 0 errors\n"
        );
        let bad = VerifyResult {
            mismatches: 1,
            errors: 2,
            ..ok
        };
        assert_eq!(
            bad.failure().as_deref(),
            Some("data verification failed: 1 mismatches, 2 failed requests")
        );
    }

    #[test]
    fn tags_separate_blocks_and_generations() {
        assert_ne!(tag(1, 2), tag(2, 1));
        assert_eq!(tag(3, 4) >> 32, 3);
        assert_eq!(tag(3, 4) as u32, 4);
    }
}
