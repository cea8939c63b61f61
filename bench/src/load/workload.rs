//! A workload and where its requests go: the access pattern, block size, depth, queue count
//! and duration of a run ([`Workload`], named as the tables name it, and read from the command
//! line's words by [`WorkloadWords`]), and for each queue the offset and direction of every
//! request ([`OffsetGen`] over a seedable [`Rng`]). Pure: the engines in `vhost` and `raw`
//! move the data.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use vloop_frontend::blk::SECTOR_SIZE;
use vloop_guest::io::size_name;
use vloop_images::size::{parse_bytes, SizeError};

/// Errors of reading a workload from the command line's words.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The pattern is none of the known ones.
    #[error("{0}")]
    Pattern(String),
    /// The block size is not a size.
    #[error(transparent)]
    Size(#[from] SizeError),
    /// The block size is not a multiple of 512 up to 64 MiB.
    #[error("--bs {0} must be a multiple of 512 up to 64M")]
    BlockSize(String),
    /// The depth is 0 or above 4096.
    #[error("--iodepth must be between 1 and 4096")]
    Depth,
    /// No queue.
    #[error("--queues must be at least 1")]
    Queues,
    /// The workload does not fit the device or file it runs on.
    #[error("{0}")]
    Unfit(String),
}

/// The largest block size a workload takes.
const MAX_BS: u64 = 64 << 20;

/// A workload as the command line words it.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadWords<'a> {
    /// `-w`: read, write, randread, randwrite or mixed.
    pub pattern: &'a str,
    /// `--rwmixread`: the percentage of reads of the mixed pattern.
    pub rwmixread: u8,
    /// `--bs`: bytes per request, with k/M suffixes.
    pub bs: &'a str,
    /// `--iodepth`: requests in flight per queue.
    pub iodepth: u16,
    /// `--queues`: queues, one thread each.
    pub queues: u16,
}

impl WorkloadWords<'_> {
    /// The workload these words say, run for `runtime`.
    pub fn workload(&self, runtime: Duration) -> Result<Workload, WorkloadError> {
        let mut pattern: Pattern = self.pattern.parse().map_err(WorkloadError::Pattern)?;
        if let Pattern::Mixed { read_pct } = &mut pattern {
            *read_pct = self.rwmixread;
        }
        let bs = parse_bytes(self.bs)?;
        let bs = u32::try_from(bs)
            .ok()
            .filter(|&b| b != 0 && b % 512 == 0 && u64::from(b) <= MAX_BS)
            .ok_or_else(|| WorkloadError::BlockSize(self.bs.to_string()))?;
        if self.iodepth == 0 || self.iodepth > 4096 {
            return Err(WorkloadError::Depth);
        }
        if self.queues == 0 {
            return Err(WorkloadError::Queues);
        }
        Ok(Workload {
            pattern,
            bs,
            iodepth: self.iodepth,
            queues: self.queues,
            runtime,
            one_pass: false,
            think: Duration::ZERO,
        })
    }
}

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Uniform random reads.
    RandRead,
    /// Uniform random writes.
    RandWrite,
    /// Uniform random, `read_pct` percent reads.
    Mixed {
        /// Percentage of reads (0..=100).
        read_pct: u8,
    },
}

impl Pattern {
    pub(super) fn sequential(self) -> bool {
        matches!(self, Self::Read | Self::Write)
    }

    /// Whether any request writes.
    pub fn writes(self) -> bool {
        match self {
            Self::Write | Self::RandWrite => true,
            Self::Mixed { read_pct } => read_pct < 100,
            Self::Read | Self::RandRead => false,
        }
    }

    fn name(self) -> String {
        match self {
            Self::Read => "read".into(),
            Self::Write => "write".into(),
            Self::RandRead => "randread".into(),
            Self::RandWrite => "randwrite".into(),
            Self::Mixed { read_pct } => format!("mixed{read_pct}"),
        }
    }
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Self::Read),
            "write" => Ok(Self::Write),
            "randread" => Ok(Self::RandRead),
            "randwrite" => Ok(Self::RandWrite),
            "mixed" | "randrw" => Ok(Self::Mixed { read_pct: 70 }),
            _ => Err(format!(
                "unknown workload '{s}': use read, write, randread, randwrite or mixed"
            )),
        }
    }
}

/// One workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    /// Access pattern.
    pub pattern: Pattern,
    /// Bytes per request (a multiple of 512).
    pub bs: u32,
    /// Requests in flight per queue.
    pub iodepth: u16,
    /// Queues (threads).
    pub queues: u16,
    /// Measured duration.
    #[serde(serialize_with = "ser_secs")]
    pub runtime: Duration,
    /// Sequential patterns: go over each queue's stripe once, the run ending at its end when
    /// that comes before the runtime, instead of wrapping around (so on an empty image every
    /// write allocates). Random patterns ignore it.
    pub one_pass: bool,
    /// How long each of a queue's `iodepth` streams waits after a completion before it
    /// sends its next request (a process that computes between its I/Os); zero: at once.
    #[serde(serialize_with = "ser_secs")]
    pub think: Duration,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} QD{}",
            size_name(u64::from(self.bs)),
            self.pattern.name(),
            self.iodepth
        )?;
        if self.queues > 1 {
            write!(f, " x{}q", self.queues)?;
        }
        if !self.think.is_zero() {
            write!(f, " think {} us", self.think.as_micros())?;
        }
        Ok(())
    }
}

impl Workload {
    pub(super) fn check(&self, capacity: u64) -> Result<(), WorkloadError> {
        let bad = |m: String| Err(WorkloadError::Unfit(m));
        if self.bs == 0 || u64::from(self.bs) % SECTOR_SIZE != 0 {
            return bad(format!("block size {} is not a multiple of 512", self.bs));
        }
        if self.iodepth == 0 || self.queues == 0 {
            return bad("iodepth and queues must be at least 1".into());
        }
        if capacity < u64::from(self.bs) * u64::from(self.queues) {
            return bad(format!(
                "the device ({capacity} bytes) is smaller than one block per queue"
            ));
        }
        Ok(())
    }
}

/// xorshift64*: a fast, seedable generator for offsets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Chooses the offset and direction of each request for one queue.
#[derive(Debug, Clone)]
pub struct OffsetGen {
    pattern: Pattern,
    bs: u64,
    /// Sequential streams: this queue's stripe of the device, in blocks.
    first: u64,
    blocks: u64,
    pos: u64,
    /// One-pass sequential streams: requests left.
    left: Option<u64>,
    rng: Rng,
}

impl OffsetGen {
    /// The generator of queue `q` of `queues` over `capacity` bytes.
    pub fn new(w: &Workload, q: u16, capacity: u64) -> Self {
        let bs = u64::from(w.bs);
        let total = capacity / bs;
        let (first, blocks) = if w.pattern.sequential() {
            let stripe = total / u64::from(w.queues);
            (stripe * u64::from(q), stripe)
        } else {
            (0, total)
        };
        let blocks = blocks.max(1);
        Self {
            pattern: w.pattern,
            bs,
            first,
            blocks,
            pos: 0,
            left: (w.one_pass && w.pattern.sequential()).then_some(blocks),
            rng: Rng::new(0x5eed ^ (u64::from(q) << 32)),
        }
    }

    /// Whether a one-pass stream has issued its last request.
    pub fn done(&self) -> bool {
        self.left == Some(0)
    }

    /// (is_read, byte offset) of the next request (once [`OffsetGen::done`], the pass starts
    /// over).
    pub fn next_io(&mut self) -> (bool, u64) {
        let blocks = self.blocks;
        if let Some(n) = &mut self.left {
            *n = n.checked_sub(1).unwrap_or(blocks - 1);
        }
        let block = if self.pattern.sequential() {
            let b = self.pos;
            self.pos = (self.pos + 1) % self.blocks;
            b
        } else {
            self.rng.below(self.blocks)
        };
        let read = match self.pattern {
            Pattern::Read | Pattern::RandRead => true,
            Pattern::Write | Pattern::RandWrite => false,
            Pattern::Mixed { read_pct } => self.rng.below(100) < u64::from(read_pct),
        };
        (read, (self.first + block) * self.bs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wl(pattern: Pattern, queues: u16) -> Workload {
        Workload {
            pattern,
            bs: 4096,
            iodepth: 4,
            queues,
            runtime: Duration::from_secs(1),
            one_pass: false,
            think: Duration::ZERO,
        }
    }

    #[test]
    fn the_command_lines_words_make_a_workload_or_say_what_is_wrong() {
        let words = WorkloadWords {
            pattern: "mixed",
            rwmixread: 30,
            bs: "8k",
            iodepth: 4,
            queues: 2,
        };
        let w = words.workload(Duration::from_secs(5)).unwrap();
        assert_eq!(w.to_string(), "8k mixed30 QD4 x2q");
        assert_eq!((w.runtime, w.one_pass), (Duration::from_secs(5), false));
        let bad = |w: WorkloadWords| w.workload(Duration::from_secs(1)).unwrap_err().to_string();
        for (words, why) in [
            (
                WorkloadWords {
                    pattern: "seq",
                    ..words
                },
                "unknown workload 'seq': use read, write, randread, randwrite or mixed",
            ),
            (
                WorkloadWords {
                    bs: "1000",
                    ..words
                },
                "--bs 1000 must be a multiple of 512 up to 64M",
            ),
            (
                WorkloadWords { bs: "0", ..words },
                "--bs 0 must be a multiple of 512 up to 64M",
            ),
            (
                WorkloadWords {
                    bs: "128M",
                    ..words
                },
                "--bs 128M must be a multiple of 512 up to 64M",
            ),
            (
                WorkloadWords { bs: "64G", ..words },
                "--bs 64G must be a multiple of 512 up to 64M",
            ),
            (
                WorkloadWords {
                    iodepth: 0,
                    ..words
                },
                "--iodepth must be between 1 and 4096",
            ),
            (
                WorkloadWords {
                    iodepth: 4097,
                    ..words
                },
                "--iodepth must be between 1 and 4096",
            ),
            (
                WorkloadWords { queues: 0, ..words },
                "--queues must be at least 1",
            ),
        ] {
            assert_eq!(bad(words), why);
        }
        assert!(bad(WorkloadWords { bs: "x", ..words }).contains("'x'"));
        let max = WorkloadWords { bs: "64M", ..words };
        assert_eq!(max.workload(Duration::from_secs(1)).unwrap().bs, 64 << 20);
    }

    #[test]
    fn workload_names() {
        assert_eq!(wl(Pattern::RandRead, 2).to_string(), "4k randread QD4 x2q");
        let mut w = wl(Pattern::Write, 1);
        w.bs = 1 << 20;
        assert_eq!(w.to_string(), "1M write QD4");
    }

    #[test]
    fn sequential_offsets_walk_their_stripe_and_wrap() {
        let w = wl(Pattern::Read, 2);
        let cap = 8 * 4096;
        let mut g = OffsetGen::new(&w, 1, cap);
        let offs: Vec<u64> = (0..6).map(|_| g.next_io().1).collect();
        assert_eq!(offs, [16384, 20480, 24576, 28672, 16384, 20480]);
        assert!(!g.done());
    }

    #[test]
    fn one_pass_streams_end_at_their_stripe_end() {
        let w = Workload {
            one_pass: true,
            think: Duration::ZERO,
            ..wl(Pattern::Write, 2)
        };
        let mut g = OffsetGen::new(&w, 1, 8 * 4096);
        let mut offs = Vec::new();
        while !g.done() {
            offs.push(g.next_io().1);
        }
        assert_eq!(offs, [16384, 20480, 24576, 28672]);
        // Random patterns never end.
        let r = Workload {
            one_pass: true,
            think: Duration::ZERO,
            ..wl(Pattern::RandWrite, 1)
        };
        let mut g = OffsetGen::new(&r, 0, 8 * 4096);
        for _ in 0..100 {
            g.next_io();
        }
        assert!(!g.done());
    }

    #[test]
    fn random_offsets_are_aligned_in_range_and_spread() {
        let w = wl(Pattern::Mixed { read_pct: 70 }, 1);
        let cap = 1 << 30;
        let mut g = OffsetGen::new(&w, 0, cap);
        let mut reads = 0;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let (r, off) = g.next_io();
            assert_eq!(off % 4096, 0);
            assert!(off + 4096 <= cap);
            reads += u32::from(r);
            seen.insert(off);
        }
        assert!((6500..7500).contains(&reads), "{reads} reads of 10000");
        // Birthday bound: 10000 draws from 262144 blocks repeat about 190 times.
        assert!(
            seen.len() > 9700,
            "offsets repeat too often: {}",
            seen.len()
        );
    }
}
