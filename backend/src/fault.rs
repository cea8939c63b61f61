//! Guest memory that disappears under the daemon.
//!
//! Guest RAM is a file the frontend shares and the daemon maps. A memfd is sealed against
//! shrinking before it is mapped ([`crate::protocol::fds`]), but a file that cannot be sealed
//! (`memory-backend-file` on tmpfs or hugetlbfs, a memfd created without sealing) can be
//! truncated by the frontend at any time, and the daemon's next access to a page past the new
//! end raises SIGBUS, which would kill it. The kernel's own accesses (the I/O engine's reads
//! and writes into guest buffers) fail with EFAULT instead, which the executor reports as
//! IOERR; the daemon's accesses (rings, headers, status bytes) are covered here.
//!
//! Each connection registers the host ranges of its guest memory. A SIGBUS inside a registered
//! range maps an anonymous page over the faulting one, so the access completes (reading zeroes,
//! writing into memory nobody sees), and marks the range as faulted; the connection's workers
//! see it after their batch and end the connection. A SIGBUS anywhere else gets the default
//! action, as if no handler were installed.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};

/// Most ranges registered at once. A connection holds one per mapping of its guest memory:
/// the regions of its table (at most [`crate::protocol::rings::MAX_REGIONS`]) and those
/// removed that a worker's memory map still holds for the rest of its pass; one connection
/// is served at a time, so this leaves room to spare.
const SLOTS: usize = 2048;

#[derive(Debug)]
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    /// The registering owner (0: free).
    owner: AtomicU64,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    owner: AtomicU64::new(0),
    faulted: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);
/// Faults repaired in this process: until the first, no owner has faulted and
/// [`Owner::faulted`] need not look through the table.
static FAULTS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// Install the SIGBUS handler (once per process).
pub fn install() -> io::Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: sigaction with a zeroed struct, a handler with the SA_SIGINFO signature and
        // an empty mask; the handler only touches atomics and calls mmap/signal.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                result = Err(io::Error::last_os_error());
            }
        }
    });
    result
}

/// Page sizes tried, smallest first: a hugetlbfs mapping can only be replaced whole pages at
/// a time.
const PAGES: [usize; 3] = [4096, 2 << 20, 1 << 30];

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &TABLE {
        let start = slot.start.load(Ordering::Acquire);
        let end = slot.end.load(Ordering::Acquire);
        if slot.owner.load(Ordering::Acquire) == 0 || addr < start || addr >= end {
            continue;
        }
        for page in PAGES {
            let base = addr & !(page - 1);
            // SAFETY: the range is inside guest memory this process mapped (registered by its
            // owner until it unmaps it); replacing it with anonymous memory only changes what
            // the daemon reads there. mmap is a plain system call.
            let r = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                FAULTS.fetch_add(1, Ordering::Release);
                return;
            }
        }
    }
    // Not guest memory: the default action, when the access runs again.
    // SAFETY: signal() with SIG_DFL is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// [`Owner::register`] found no room in the table.
#[derive(Debug, thiserror::Error)]
#[error("no room to guard guest memory against truncation ({SLOTS} ranges are guarded already)")]
pub struct NoRoom;

/// The ranges one owner (a connection) registered; unregistered when dropped.
#[derive(Debug)]
pub struct Registration {
    table: &'static [Slot],
    owner: u64,
    slots: Vec<usize>,
    /// The owner's record of a fault in a registration it no longer holds.
    faulted: Arc<AtomicBool>,
}

/// An owner of guest memory ranges.
#[derive(Debug)]
pub struct Owner {
    id: u64,
    /// A fault in a registration since dropped (a memory change replaced it), or one found
    /// already.
    faulted: Arc<AtomicBool>,
    /// [`FAULTS`] when this owner last looked through the table and found none of its own.
    seen: AtomicU64,
}

impl Default for Owner {
    fn default() -> Self {
        Owner {
            id: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            faulted: Arc::new(AtomicBool::new(false)),
            seen: AtomicU64::new(0),
        }
    }
}

impl Owner {
    /// Register `ranges` (host address, length) as guest memory of this owner; none when the
    /// table has no room for all of them (none stays registered then: memory that cannot be
    /// guarded must not be used).
    pub fn register(
        &self,
        ranges: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Registration, NoRoom> {
        self.register_in(&TABLE, ranges)
    }

    fn register_in(
        &self,
        table: &'static [Slot],
        ranges: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Registration, NoRoom> {
        let mut reg = Registration {
            table,
            owner: self.id,
            slots: Vec::new(),
            faulted: self.faulted.clone(),
        };
        // Slots before the last one taken were full: one pass over the table in all.
        let mut from = 0;
        for (start, len) in ranges {
            let i = from
                + table[from..]
                    .iter()
                    .position(|s| {
                        s.owner
                            .compare_exchange(0, u64::MAX, Ordering::AcqRel, Ordering::Relaxed)
                            .is_ok()
                    })
                    .ok_or(NoRoom)?;
            let s = &table[i];
            s.faulted.store(false, Ordering::Relaxed);
            s.start.store(start, Ordering::Relaxed);
            s.end.store(start.saturating_add(len), Ordering::Relaxed);
            s.owner.store(self.id, Ordering::Release);
            reg.slots.push(i);
            from = i + 1;
        }
        Ok(reg)
    }

    /// Whether an access to this owner's memory faulted since it was created (in any of its
    /// registrations, held or dropped). Looks through the table only when a fault happened
    /// in the process since it last looked.
    pub fn faulted(&self) -> bool {
        if self.faulted.load(Ordering::Acquire) {
            return true;
        }
        let faults = FAULTS.load(Ordering::Acquire);
        if faults == self.seen.load(Ordering::Relaxed) {
            return false;
        }
        // A fault counted in `faults` marked its slot before it was counted.
        let mine = TABLE.iter().any(|s| {
            s.owner.load(Ordering::Acquire) == self.id && s.faulted.load(Ordering::Acquire)
        });
        if mine {
            self.faulted.store(true, Ordering::Release);
        } else {
            self.seen.store(faults, Ordering::Relaxed);
        }
        mine || self.faulted.load(Ordering::Acquire)
    }
}

#[cfg(test)]
impl Owner {
    /// Slots this owner holds.
    pub(crate) fn held(&self) -> usize {
        TABLE
            .iter()
            .filter(|s| s.owner.load(Ordering::Acquire) == self.id)
            .count()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        for &i in &self.slots {
            let s = &self.table[i];
            if s.owner.load(Ordering::Acquire) == self.owner {
                if s.faulted.load(Ordering::Acquire) {
                    self.faulted.store(true, Ordering::Release);
                }
                s.end.store(0, Ordering::Release);
                s.start.store(0, Ordering::Release);
                s.owner.store(0, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    use super::*;

    /// A file of `len` bytes this test owns, mapped shared (the caller unmaps it), with the
    /// handler installed.
    fn shared_mapping(len: usize) -> (File, *mut libc::c_void) {
        install().unwrap();
        let f: File = tempfile::tempfile().unwrap();
        f.set_len(len as u64).unwrap();
        // SAFETY: a fresh shared mapping of a file this test owns, at an address the kernel
        // picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        (f, p)
    }

    #[test]
    fn a_truncated_mapping_reads_zeroes_and_is_reported() {
        let (f, p) = shared_mapping(8192);
        let owner = Owner::default();
        let reg = owner.register([(p as usize, 8192)]).unwrap();
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_volatile(p.cast::<u8>().add(4096), 7) };
        f.set_len(0).unwrap();
        // The page is gone: this access would raise SIGBUS.
        // SAFETY: inside the mapping, which the guard repairs.
        let v = unsafe { std::ptr::read_volatile(p.cast::<u8>().add(4096)) };
        assert_eq!(v, 0);
        assert!(owner.faulted());
        assert!(!Owner::default().faulted());
        drop(reg);
        assert!(
            owner.faulted(),
            "a fault is remembered for the owner's life"
        );
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, 8192) };
    }

    #[test]
    fn a_registration_that_does_not_fit_takes_no_slot() {
        // A table of its own: the process-wide one is shared with tests running alongside.
        let table: &'static [Slot] = Box::leak((0..4).map(|_| FREE).collect::<Box<[Slot]>>());
        let owner = Owner::default();
        let two = owner.register_in(table, [(0, 1), (8, 1)]).unwrap();
        assert!(owner
            .register_in(table, [(16, 1), (24, 1), (32, 1)])
            .is_err());
        let held = |t: &[Slot]| {
            t.iter()
                .filter(|s| s.owner.load(Ordering::Acquire) != 0)
                .count()
        };
        assert_eq!(held(table), 2, "a registration that did not fit kept slots");
        let more = owner.register_in(table, [(16, 1), (24, 1)]).unwrap();
        assert_eq!(held(table), 4);
        drop(two);
        drop(more);
        assert_eq!(held(table), 0);
    }

    #[test]
    fn a_fault_outlives_the_registration_it_happened_in() {
        let (f, p) = shared_mapping(4096);
        let owner = Owner::default();
        let first = owner.register([(p as usize, 4096)]).unwrap();
        f.set_len(0).unwrap();
        // SAFETY: inside the mapping, which the guard repairs.
        let _ = unsafe { std::ptr::read_volatile(p.cast::<u8>()) };
        // A memory change: the new registration comes first, the old one goes.
        let second = owner.register([(p as usize, 4096)]).unwrap();
        drop(first);
        assert!(
            owner.faulted(),
            "the fault was forgotten with its registration"
        );
        drop(second);
        assert!(owner.faulted());
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, 4096) };
    }
}
