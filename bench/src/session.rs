//! The frame of every comparison run: it starts by reading when, on what machine and at what
//! load it runs (with a warning when the machine is not idle), starts no round that would
//! pass the time budget, turns the order of the targets from one turn to the next so drift
//! spreads over them, and ends with the load after. Progress goes to stderr.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::machine::{self, LoadAvg, LoadSpan, Machine, MachineError};
use crate::target::Target;

/// A comparison run from its start.
#[derive(Debug, Clone)]
pub struct Session {
    /// When it started (monotonic).
    started: Instant,
    /// When it started (RFC 3339, UTC).
    pub started_at: String,
    /// The machine.
    pub machine: Machine,
    /// The load average at the start.
    pub load_before: LoadAvg,
}

impl Session {
    /// Starts now: reads the machine (with the version of the qemu-storage-daemon at
    /// `qsd_bin`) and its load average, and prints them.
    pub fn start(qsd_bin: &Path) -> Result<Session, MachineError> {
        let started = Instant::now();
        let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let machine = machine::machine(qsd_bin);
        let load_before = machine::loadavg()?;
        eprintln!("machine: {}", machine.describe());
        eprintln!("load average before: {load_before}");
        if load_before.busy() {
            eprintln!(
                "warning: the 1-minute load average is {:.2}: the machine is not idle, figures will be noisy",
                load_before.one
            );
        }
        Ok(Session {
            started,
            started_at,
            machine,
            load_before,
        })
    }

    /// Seconds since the start.
    pub fn wall_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Reads and prints the load average now: the span from the start to now.
    pub fn load_span(&self) -> Result<LoadSpan, MachineError> {
        let after = machine::loadavg()?;
        eprintln!("load average after: {after}");
        Ok(LoadSpan::new(self.load_before, after))
    }

    /// The numbers (from 0) of `count` rounds that start from now on, as long as each fits
    /// within `budget` of wall time from the session's start.
    pub fn rounds(&self, count: u32, budget: Option<Duration>) -> Rounds {
        Rounds {
            started: self.started,
            rounds_started: Instant::now(),
            budget,
            count,
            next: 0,
        }
    }
}

/// The rounds of a session: their numbers from 0, while they fit the time budget.
#[derive(Debug, Clone)]
pub struct Rounds {
    /// When the session started.
    started: Instant,
    /// When the first round started.
    rounds_started: Instant,
    /// The wall time no round may end after.
    budget: Option<Duration>,
    /// Rounds asked for.
    count: u32,
    /// The next round's number: the rounds started so far.
    next: u32,
}

impl Rounds {
    /// The rounds started so far.
    pub fn started(&self) -> u32 {
        self.next
    }

    /// Whether round `round` may start: the first always, a later one when another round as
    /// long as the mean of those done would end within the budget. Prints why not.
    fn fits(&self, round: u32) -> bool {
        let Some(budget) = self.budget else {
            return true;
        };
        let per_round = self.rounds_started.elapsed() / round.max(1);
        if round > 0 && self.started.elapsed() + per_round > budget {
            eprintln!(
                "stopping after {round} rounds: another would pass the {budget:?} time budget"
            );
            return false;
        }
        true
    }
}

impl Iterator for Rounds {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let round = self.next;
        if round >= self.count || !self.fits(round) {
            return None;
        }
        self.next += 1;
        Some(round)
    }
}

/// `targets` turned left by `turn` (modulo their count): the order of one turn, so that drift
/// (page cache, writeback, other load on the machine) spreads evenly over the targets.
pub fn turn_order(targets: &[Target], turn: usize) -> Vec<Target> {
    let mut order = targets.to_vec();
    order.rotate_left(turn % targets.len().max(1));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_turns_and_the_budget_holds_rounds_back() {
        use Target::*;
        let t = [Vloop, Qsd, Raw];
        assert_eq!(turn_order(&t, 0), t);
        assert_eq!(turn_order(&t, 4), [Qsd, Raw, Vloop]);
        assert!(turn_order(&[], 3).is_empty());
        let s = Session::start(Path::new("/nonexistent/qemu-storage-daemon")).unwrap();
        assert!(s.started_at.ends_with('Z'), "{}", s.started_at);
        assert!(s.machine.qsd_version.is_none());
        assert_eq!(s.rounds(3, None).collect::<Vec<_>>(), [0, 1, 2]);
        let mut all = s.rounds(1000, None);
        assert_eq!(all.by_ref().count(), 1000);
        assert_eq!(all.started(), 1000);
        let mut none = s.rounds(5, Some(Duration::ZERO));
        assert_eq!(none.next(), Some(0), "the first round always runs");
        assert_eq!((none.next(), none.started()), (None, 1));
        assert_eq!(s.rounds(2, Some(Duration::from_secs(3600))).count(), 2);
        assert!(s.load_span().unwrap().after.one >= 0.0);
        assert!(s.wall_secs() >= 0.0);
    }
}
