//! Where each vring lies, checked against the memory table before vhost-user-backend sees it.
//!
//! The library translates only the first byte of each ring (SET_VRING_ADDR) and takes any
//! queue size up to the maximum (SET_VRING_NUM), so a frontend could place a ring across the
//! end of guest memory, or resize one that fits into one that does not, or swap in a memory
//! table that leaves a running ring outside it. The worker would then fail to read the ring
//! on every pass. [`Rings`] follows the memory table, each queue's size and each queue's
//! addresses, and refuses any message after which a configured ring would not lie wholly
//! inside one memory region. As the library does, it translates a ring's frontend virtual
//! addresses (SET_VRING_ADDR) into guest addresses once, through the first region that holds
//! each, and keeps the guest addresses: every later change (a new size, a new table, a region
//! added or removed, a stopped ring restarted) is checked in guest addresses. A ring stops
//! being checked when GET_VRING_BASE stops it, or when the device is reset, so a frontend may
//! change memory while its rings are stopped.
//!
//! With CONFIGURE_MEM_SLOTS the table also changes a region at a time (ADD_MEM_REG,
//! REM_MEM_REG). The library appends an added region to the ones it translates ring addresses
//! with, and drops a removed one by its guest address and size; [`Rings`] does the same, and
//! refuses a region the library could not tell apart (empty, wrapping around the address space,
//! overlapping another in guest memory) and more regions than the library offers slots for.
//! QEMU changes a region by removing it and adding the new one, while the rings run, so a
//! removed region may hold part of a configured ring: that ring is *parked* (the relay
//! disables it in the library, so no worker touches it) until the memory table holds it
//! again (an ADD_MEM_REG or SET_MEM_TABLE), when the relay enables it again. A parked ring
//! cannot be resized or moved (SET_VRING_NUM, SET_VRING_ADDR); GET_VRING_BASE and a device
//! reset stop it as any other.

/// Bytes of one descriptor table entry.
const DESC_SIZE: u64 = 16;

/// Why a message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    /// A queue size the split ring format does not allow, or above the device's maximum.
    #[error(
        "queue size {num} is not a power of two from 1 to {max} (--queue-size; a frontend \
         configured for larger queues needs vloop-blk started with a --queue-size as large)"
    )]
    BadSize {
        /// The size asked for.
        num: u32,
        /// The device's largest queue size.
        max: u16,
    },
    /// A part of a ring does not lie wholly inside one memory region.
    #[error(
        "the {part} of queue {queue} ({len} bytes at {space} address {addr:#x}) is not inside \
         one memory region"
    )]
    Outside {
        /// The queue.
        queue: u32,
        /// Which part: descriptor table, available ring or used ring.
        part: &'static str,
        /// Which address: "frontend" (SET_VRING_ADDR) or "guest" (later checks).
        space: &'static str,
        /// Its address.
        addr: u64,
        /// Its length for the queue's size.
        len: u64,
    },
    /// A region of no bytes, or one whose end wraps around an address space.
    #[error("a memory region of {size:#x} bytes at guest address {guest:#x} (frontend address {user:#x}) is empty or wraps around")]
    BadRegion {
        /// Its guest physical address.
        guest: u64,
        /// Its frontend virtual address.
        user: u64,
        /// Its size.
        size: u64,
    },
    /// ADD_MEM_REG with a region whose guest addresses overlap a region's already in the table.
    #[error("the memory region at guest address {guest:#x} overlaps the one at {other:#x}")]
    Overlap {
        /// The new region's guest physical address.
        guest: u64,
        /// The guest physical address of the region it overlaps.
        other: u64,
    },
    /// ADD_MEM_REG past the slots GET_MAX_MEM_SLOTS offers.
    #[error("more than {MAX_REGIONS} memory regions")]
    TooManyRegions,
    /// REM_MEM_REG of a region the table does not hold.
    #[error("no memory region of {size:#x} bytes at guest address {guest:#x}")]
    NoSuchRegion {
        /// The guest physical address asked for.
        guest: u64,
        /// The size asked for.
        size: u64,
    },
    /// REM_MEM_REG of the region that holds part of a configured ring, which cannot be
    /// parked (without protocol features the library cannot disable it).
    #[error("the memory region at guest address {guest:#x} holds the {part} of queue {queue} (stop the ring first: GET_VRING_BASE)")]
    InUse {
        /// The region's guest physical address.
        guest: u64,
        /// The queue.
        queue: u32,
        /// Which part of its ring.
        part: &'static str,
    },
    /// SET_VRING_NUM or SET_VRING_ADDR for a parked ring.
    #[error("queue {0}'s ring lies in memory that was removed (stop it first: GET_VRING_BASE)")]
    Parked(u32),
}

/// Memory slots a frontend may fill with ADD_MEM_REG: what vhost-user-backend answers to
/// GET_MAX_MEM_SLOTS.
pub const MAX_REGIONS: usize = 509;

/// One region of guest memory, as the frontend describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Guest physical address.
    pub guest: u64,
    /// Frontend virtual address (ring addresses are given in these).
    pub user: u64,
    /// Bytes.
    pub size: u64,
}

impl Region {
    /// A region that is not empty and ends inside both address spaces.
    pub fn checked(guest: u64, user: u64, size: u64) -> Result<Region, RingError> {
        let ends = guest.checked_add(size).is_some() && user.checked_add(size).is_some();
        if size == 0 || !ends {
            return Err(RingError::BadRegion { guest, user, size });
        }
        Ok(Region { guest, user, size })
    }

    fn holds(&self, addr: u64) -> bool {
        self.user <= addr && addr - self.user < self.size
    }

    fn holds_guest(&self, gpa: u64) -> bool {
        self.guest <= gpa && gpa - self.guest < self.size
    }

    fn overlaps(&self, other: &Region) -> bool {
        self.guest < other.guest.saturating_add(other.size)
            && other.guest < self.guest.saturating_add(self.size)
    }
}

/// Bytes of the descriptor table, the available ring and the used ring of a split ring of
/// `num` descriptors (virtio 1.2, 2.7), each with its event field.
pub fn ring_lengths(num: u16) -> [u64; 3] {
    let n = u64::from(num);
    [DESC_SIZE * n, 6 + 2 * n, 6 + 8 * n]
}

/// The region of `regions` that translates the frontend address `addr`, when
/// `addr..addr + len` lies wholly inside it: the first one in table order that holds `addr`,
/// as the library translates ring addresses (regions may overlap in the frontend's address
/// space, and a range wholly inside a later one may still cross the end of the one the
/// library picks).
fn translating(regions: &[Region], addr: u64, len: u64) -> Option<&Region> {
    let end = addr.checked_add(len)?;
    regions
        .iter()
        .find(|r| r.holds(addr))
        .filter(|r| end - r.user <= r.size)
}

/// Whether `addr..addr + len` lies wholly inside the region of `regions` that translates
/// `addr`.
pub fn inside(regions: &[Region], addr: u64, len: u64) -> bool {
    translating(regions, addr, len).is_some()
}

/// The addresses of one queue's rings: descriptor table, available ring, used ring.
pub type RingAddrs = [u64; 3];

/// The parts of a ring, in [`RingAddrs`] order.
const PARTS: [&str; 3] = ["descriptor table", "available ring", "used ring"];

/// Whether the guest range `gpa..gpa + len` lies wholly inside one region of `regions`.
pub fn inside_guest(regions: &[Region], gpa: u64, len: u64) -> bool {
    let Some(end) = gpa.checked_add(len) else {
        return false;
    };
    regions
        .iter()
        .any(|r| r.guest <= gpa && end - r.guest <= r.size)
}

/// The guest addresses of the rings of `queue` at the frontend addresses `addrs`, `num`
/// descriptors long, each translated through the region that translates its first byte, which
/// must hold all of it.
pub fn translate(
    regions: &[Region],
    queue: u32,
    num: u16,
    addrs: RingAddrs,
) -> Result<RingAddrs, RingError> {
    let mut guest = [0; 3];
    for (i, ((addr, len), part)) in addrs
        .into_iter()
        .zip(ring_lengths(num))
        .zip(PARTS)
        .enumerate()
    {
        let Some(r) = translating(regions, addr, len) else {
            return Err(RingError::Outside {
                queue,
                part,
                space: "frontend",
                addr,
                len,
            });
        };
        guest[i] = addr - r.user + r.guest;
    }
    Ok(guest)
}

/// Check that the rings of `queue` at the guest addresses `addrs`, `num` descriptors long,
/// lie inside `regions`.
pub fn check(regions: &[Region], queue: u32, num: u16, addrs: RingAddrs) -> Result<(), RingError> {
    for ((addr, len), part) in addrs.into_iter().zip(ring_lengths(num)).zip(PARTS) {
        if !inside_guest(regions, addr, len) {
            return Err(RingError::Outside {
                queue,
                part,
                space: "guest",
                addr,
                len,
            });
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, Default)]
struct Queue {
    /// Size from SET_VRING_NUM, once sent.
    num: Option<u16>,
    /// Guest addresses from SET_VRING_ADDR, while the ring is configured.
    addrs: Option<RingAddrs>,
    /// Guest addresses of a stopped ring (GET_VRING_BASE), which the library keeps: a kick
    /// eventfd given without new addresses restarts the ring at them.
    stopped: Option<RingAddrs>,
    /// The configured ring is not wholly inside the memory table (a region holding it was
    /// removed): disabled in the library until it is.
    parked: bool,
}

/// The memory table and the rings of one connection, as the frontend described them.
#[derive(Debug)]
pub struct Rings {
    /// Regions of the memory table, in the order the library translates with.
    table: Vec<Region>,
    queues: Vec<Queue>,
    max_size: u16,
}

impl Rings {
    /// A device with `num_queues` queues of at most `max_size` descriptors (the size a queue
    /// has before SET_VRING_NUM).
    pub fn new(num_queues: u16, max_size: u16) -> Rings {
        Rings {
            table: Vec::new(),
            queues: vec![Queue::default(); usize::from(num_queues)],
            max_size,
        }
    }

    fn size(&self, q: &Queue) -> u16 {
        q.num.unwrap_or(self.max_size)
    }

    /// SET_MEM_TABLE with `regions`: every configured ring that is not parked must lie inside
    /// the new table. Returns the parked rings the new table holds again (no longer parked).
    pub fn set_table(&mut self, regions: Vec<Region>) -> Result<Vec<u32>, RingError> {
        for (i, q) in self.queues.iter().enumerate() {
            if let (Some(addrs), false) = (q.addrs, q.parked) {
                check(&regions, i as u32, self.size(q), addrs)?;
            }
        }
        self.table = regions;
        Ok(self.unpark())
    }

    /// The parked rings the table holds again, no longer parked.
    fn unpark(&mut self) -> Vec<u32> {
        let mut back = Vec::new();
        for i in 0..self.queues.len() {
            let q = self.queues[i];
            if let (Some(addrs), true) = (q.addrs, q.parked) {
                if check(&self.table, i as u32, self.size(&q), addrs).is_ok() {
                    self.queues[i].parked = false;
                    back.push(i as u32);
                }
            }
        }
        back
    }

    /// ADD_MEM_REG: a free slot, and guest addresses no other region has. Returns the parked
    /// rings the table holds again (no longer parked).
    pub fn add(&mut self, region: Region) -> Result<Vec<u32>, RingError> {
        if self.table.len() >= MAX_REGIONS {
            return Err(RingError::TooManyRegions);
        }
        if let Some(other) = self.table.iter().find(|r| r.overlaps(&region)) {
            return Err(RingError::Overlap {
                guest: region.guest,
                other: other.guest,
            });
        }
        self.table.push(region);
        Ok(self.unpark())
    }

    /// REM_MEM_REG of the region at guest address `guest` of `size` bytes (the library picks
    /// it by these two). Configured rings it holds part of are parked when `park` allows it
    /// (returned, newly parked), refused otherwise.
    pub fn remove(&mut self, guest: u64, size: u64, park: bool) -> Result<Vec<u32>, RingError> {
        let i = self
            .table
            .iter()
            .position(|r| r.guest == guest && r.size == size)
            .ok_or(RingError::NoSuchRegion { guest, size })?;
        let r = self.table[i];
        let mut held = Vec::new();
        for (queue, q) in self.queues.iter().enumerate() {
            let (Some(addrs), false) = (q.addrs, q.parked) else {
                continue;
            };
            let part = addrs
                .into_iter()
                .zip(PARTS)
                .find(|&(addr, _)| r.holds_guest(addr));
            if let Some((_, part)) = part {
                if !park {
                    return Err(RingError::InUse {
                        guest,
                        queue: queue as u32,
                        part,
                    });
                }
                held.push(queue as u32);
            }
        }
        for &q in &held {
            self.queues[q as usize].parked = true;
        }
        self.table.remove(i);
        Ok(held)
    }

    /// Whether any ring is parked.
    pub fn any_parked(&self) -> bool {
        self.queues.iter().any(|q| q.parked)
    }

    /// Whether queue `queue`'s ring is parked.
    pub fn is_parked(&self, queue: u32) -> bool {
        self.queues.get(queue as usize).is_some_and(|q| q.parked)
    }

    /// SET_VRING_NUM: a power of two up to the maximum, which a configured ring must still
    /// fit with. Queues the device does not have are left to the library (which refuses
    /// them).
    pub fn set_num(&mut self, queue: u32, num: u32) -> Result<(), RingError> {
        let size = u16::try_from(num)
            .ok()
            .filter(|&n| n.is_power_of_two() && n <= self.max_size)
            .ok_or(RingError::BadSize {
                num,
                max: self.max_size,
            })?;
        let Some(q) = self.queues.get_mut(queue as usize) else {
            return Ok(());
        };
        if q.parked {
            return Err(RingError::Parked(queue));
        }
        if let Some(addrs) = q.addrs {
            check(&self.table, queue, size, addrs)?;
        }
        q.num = Some(size);
        Ok(())
    }

    /// SET_VRING_ADDR: each ring must lie inside the memory table, and is kept at the guest
    /// addresses its frontend addresses translate to. Without a table the library refuses the
    /// message itself.
    pub fn set_addrs(&mut self, queue: u32, addrs: RingAddrs) -> Result<(), RingError> {
        let Some(q) = self.queues.get(queue as usize).copied() else {
            return Ok(());
        };
        if q.parked {
            return Err(RingError::Parked(queue));
        }
        if self.table.is_empty() {
            return Ok(());
        }
        let guest = translate(&self.table, queue, self.size(&q), addrs)?;
        let q = &mut self.queues[queue as usize];
        q.addrs = Some(guest);
        q.stopped = None;
        Ok(())
    }

    /// SET_VRING_KICK with an eventfd: a stopped ring restarts at the guest addresses it had,
    /// which must lie inside the memory table as it is now (it may have changed while the ring
    /// was stopped).
    pub fn restart(&mut self, queue: u32) -> Result<(), RingError> {
        let Some(q) = self.queues.get(queue as usize).copied() else {
            return Ok(());
        };
        if let Some(addrs) = q.stopped {
            check(&self.table, queue, self.size(&q), addrs)?;
            let q = &mut self.queues[queue as usize];
            q.addrs = q.stopped.take();
        }
        Ok(())
    }

    /// GET_VRING_BASE: the ring is stopped, and checked again only when it restarts. Returns
    /// whether it was parked.
    pub fn stop(&mut self, queue: u32) -> bool {
        let Some(q) = self.queues.get_mut(queue as usize) else {
            return false;
        };
        if let Some(a) = q.addrs.take() {
            q.stopped = Some(a);
        }
        std::mem::take(&mut q.parked)
    }

    /// The queues whose ring is configured (SET_VRING_ADDR, and no GET_VRING_BASE since).
    pub fn configured(&self) -> Vec<u32> {
        (0..self.queues.len() as u32)
            .filter(|&i| self.queues[i as usize].addrs.is_some())
            .collect()
    }

    /// RESET_OWNER: every ring is stopped, and keeps its size and addresses in the library
    /// (a kick restarts it there). Returns the rings that were parked.
    pub fn reset(&mut self) -> Vec<u32> {
        (0..self.queues.len() as u32)
            .filter(|&i| self.stop(i))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A region at the same guest and frontend address.
    fn at(addr: u64, size: u64) -> Region {
        Region::checked(addr, addr, size).unwrap()
    }

    #[test]
    fn lengths_follow_the_spec() {
        assert_eq!(ring_lengths(256), [4096, 518, 2054]);
        assert_eq!(ring_lengths(1), [16, 8, 14]);
    }

    #[test]
    fn a_range_must_fit_one_region() {
        let r = [
            at(0x1000, 0x1000),
            at(0x2000, 0x1000),
            at(u64::MAX - 16, 16),
        ];
        assert!(inside(&r, 0x1000, 0x1000));
        assert!(inside(&r, 0x1ff0, 0x10));
        // Adjacent regions do not make one: the library maps them apart.
        assert!(!inside(&r, 0x1ff0, 0x20));
        assert!(!inside(&r, 0xfff, 2));
        assert!(!inside(&r, u64::MAX - 1, 4));
        assert!(inside(&r, u64::MAX - 16, 16));
        assert!(!inside(&[], 0, 0));
        // Overlapping regions: the first that holds the start translates it, so the range
        // must fit that one, even where a later one holds all of it.
        let o = [at(0x1000, 0x1000), at(0x1800, 0x1000)];
        assert!(inside(&o, 0x1800, 0x800));
        assert!(
            !inside(&o, 0x1f00, 0x200),
            "crosses the end of the first region"
        );
        assert!(inside(&o, 0x2000, 0x800));
    }

    #[test]
    fn rings_straddling_the_end_are_refused_at_every_step() {
        let base = 0x7f00_0000_0000u64;
        let mut r = Rings::new(2, 256);
        // No table yet: left to the library.
        r.set_addrs(0, [0, 0, 0]).unwrap();
        r.set_table(vec![at(base, 2 * MIB)]).unwrap();
        // Before SET_VRING_NUM a queue has the maximum size.
        let end = base + 2 * MIB;
        let ok = [base, base + 0x1000, base + 0x2000];
        r.set_addrs(0, ok).unwrap();
        let straddle = [base, end - 4, base + 0x2000];
        assert!(matches!(
            r.set_addrs(1, straddle),
            Err(RingError::Outside {
                queue: 1,
                part: "available ring",
                ..
            })
        ));
        r.set_num(1, 1).unwrap();
        assert!(r.set_addrs(1, straddle).is_err(), "6 bytes past end - 4");
        // Growing a configured ring past the end.
        let tight = [end - 16 * 16, base, base + 0x1000];
        r.set_num(1, 16).unwrap();
        r.set_addrs(1, tight).unwrap();
        assert!(r.set_num(1, 32).is_err());
        r.set_num(1, 8).unwrap();
        // A table that no longer holds a configured ring, until that ring is stopped.
        assert!(r.set_table(vec![at(base, MIB)]).is_err());
        r.stop(1);
        r.set_table(vec![at(base, MIB)]).unwrap();
        // A kick restarts it at the addresses it had: inside the table as it is now.
        assert!(matches!(
            r.restart(1),
            Err(RingError::Outside { queue: 1, .. })
        ));
        r.restart(0).unwrap();
        r.set_table(vec![at(base, 2 * MIB)]).unwrap();
        r.restart(1).unwrap();
        assert_eq!(r.configured(), [0, 1]);
        assert!(r.set_table(vec![at(base, MIB)]).is_err(), "checked again");
        // New addresses replace the stopped ones.
        r.stop(1);
        r.set_addrs(1, ok).unwrap();
        r.set_table(vec![at(base, MIB)]).unwrap();
        r.restart(1).unwrap();
        r.reset();
        r.set_table(vec![at(0, 4096)]).unwrap();
    }

    #[test]
    fn sizes_are_powers_of_two_up_to_the_maximum() {
        let mut r = Rings::new(1, 256);
        for bad in [0u32, 3, 100, 512, 65536, u32::MAX] {
            assert_eq!(
                r.set_num(0, bad),
                Err(RingError::BadSize { num: bad, max: 256 })
            );
        }
        for good in [1u32, 2, 128, 256] {
            r.set_num(0, good).unwrap();
        }
        // A queue the device does not have is the library's to refuse.
        r.set_num(7, 16).unwrap();
        r.set_addrs(7, [0, 0, 0]).unwrap();
    }

    #[test]
    fn regions_come_and_go_one_at_a_time() {
        let base = 0x7f00_0000_0000u64;
        let mut r = Rings::new(2, 256);
        // Regions the library could not tell apart or translate.
        for (guest, user, size) in [(0, base, 0), (u64::MAX, base, 2), (0, u64::MAX - 1, 4)] {
            assert!(matches!(
                Region::checked(guest, user, size),
                Err(RingError::BadRegion { .. })
            ));
        }
        let low = Region::checked(0, base, 2 * MIB).unwrap();
        let high = Region::checked(4 * MIB, base + 4 * MIB, 2 * MIB).unwrap();
        r.add(low).unwrap();
        // Guest addresses are the library's key: no overlap there, whatever the frontend
        // addresses.
        let clash = Region::checked(MIB, base + 64 * MIB, 2 * MIB).unwrap();
        assert_eq!(
            r.add(clash),
            Err(RingError::Overlap {
                guest: MIB,
                other: 0
            })
        );
        r.add(high).unwrap();
        // A ring in each region.
        r.set_addrs(0, [base, base + 0x1000, base + 0x2000])
            .unwrap();
        r.set_addrs(1, [base + 4 * MIB, base + 4 * MIB + 0x1000, base + 0x3000])
            .unwrap();
        // Removing a region picks it by guest address and size.
        assert_eq!(
            r.remove(4 * MIB, MIB, false),
            Err(RingError::NoSuchRegion {
                guest: 4 * MIB,
                size: MIB
            })
        );
        assert_eq!(
            r.remove(4 * MIB, 2 * MIB, false),
            Err(RingError::InUse {
                guest: 4 * MIB,
                queue: 1,
                part: "descriptor table"
            })
        );
        assert!(matches!(
            r.remove(0, 2 * MIB, false),
            Err(RingError::InUse { queue: 0, .. })
        ));
        // A stopped ring does not hold its region; restarting it checks the table as it is.
        r.stop(1);
        r.remove(4 * MIB, 2 * MIB, false).unwrap();
        assert!(matches!(
            r.restart(1),
            Err(RingError::Outside { queue: 1, .. })
        ));
        // The library keeps the ring's guest addresses: a region added again at the same
        // frontend addresses but other guest addresses does not hold it, one at the same
        // guest addresses does, wherever the frontend has it.
        r.add(Region::checked(8 * MIB, base + 4 * MIB, 2 * MIB).unwrap())
            .unwrap();
        assert!(matches!(
            r.restart(1),
            Err(RingError::Outside {
                space: "guest",
                addr: 0x40_0000,
                ..
            })
        ));
        r.add(Region::checked(4 * MIB, base + 64 * MIB, 2 * MIB).unwrap())
            .unwrap();
        r.restart(1).unwrap();
        assert!(matches!(
            r.remove(4 * MIB, 2 * MIB, false),
            Err(RingError::InUse { queue: 1, .. })
        ));
        r.remove(8 * MIB, 2 * MIB, false).unwrap();
        // An overlap in frontend addresses: the earlier region translates, so the later one
        // may go.
        let alias = Region::checked(16 * MIB, base, 2 * MIB).unwrap();
        r.add(alias).unwrap();
        r.remove(16 * MIB, 2 * MIB, false).unwrap();
        // The slots run out where GET_MAX_MEM_SLOTS says.
        let mut r = Rings::new(1, 256);
        for i in 0..MAX_REGIONS as u64 {
            r.add(Region::checked(i * MIB, base + i * MIB, MIB).unwrap())
                .unwrap();
        }
        let one_more = Region::checked(1 << 40, base, MIB).unwrap();
        assert_eq!(r.add(one_more), Err(RingError::TooManyRegions));
        r.remove(0, MIB, false).unwrap();
        r.add(one_more).unwrap();
    }

    #[test]
    fn a_ring_whose_region_goes_is_parked_until_memory_holds_it_again() {
        let base = 0x7f00_0000_0000u64;
        let mut r = Rings::new(2, 256);
        let small = Region::checked(0, base, MIB).unwrap();
        let data = Region::checked(4 * MIB, base + 4 * MIB, MIB).unwrap();
        r.add(small).unwrap();
        r.add(data).unwrap();
        r.set_addrs(0, [base, base + 0x1000, base + 0x2000])
            .unwrap();
        r.set_addrs(1, [base + 0x4000, base + 0x5000, base + 0x6000])
            .unwrap();
        // Removing a region no ring lies in parks nothing.
        assert_eq!(r.remove(4 * MIB, MIB, true), Ok(vec![]));
        // QEMU grows a region: the old one goes, the rings in it are parked.
        assert_eq!(r.remove(0, MIB, true), Ok(vec![0, 1]));
        assert!(r.is_parked(0) && r.is_parked(1) && r.any_parked());
        // A parked ring cannot be moved or resized.
        assert_eq!(r.set_num(1, 16), Err(RingError::Parked(1)));
        assert_eq!(r.set_addrs(0, [base; 3]), Err(RingError::Parked(0)));
        // A region elsewhere leaves them parked; the grown one brings them back.
        assert_eq!(r.add(data), Ok(vec![]));
        assert_eq!(
            r.add(Region::checked(0, base, 2 * MIB).unwrap()),
            Ok(vec![0, 1])
        );
        assert!(!r.is_parked(0));
        // A table that does not hold a parked ring is taken; one that holds it unparks it.
        assert_eq!(r.remove(0, 2 * MIB, true), Ok(vec![0, 1]));
        assert_eq!(r.set_table(vec![data]), Ok(vec![]));
        assert_eq!(r.set_table(vec![at(0, MIB)]), Ok(vec![0, 1]));
        // Stopping a parked ring says so; a reset lists those parked.
        assert_eq!(r.remove(0, MIB, true), Ok(vec![0, 1]));
        assert!(r.stop(1));
        assert!(!r.stop(1));
        assert_eq!(r.reset(), vec![0]);
        assert!(!r.is_parked(0) && !r.any_parked());
    }
}
