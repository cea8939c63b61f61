//! The driver side of a virtio split virtqueue (virtio 1.2, section 2.7).
//!
//! [`RingLayout`] places the three parts of a split ring (descriptor table, available ring,
//! used ring) in guest memory; [`SplitRing`] is the driver's view of one ring through a host
//! pointer to that memory: it writes descriptors, publishes heads in the available ring,
//! decides whether the device needs a kick (honouring `VIRTIO_RING_F_EVENT_IDX`), and
//! consumes the used ring. The device is another process that shares the memory, so every
//! index that crosses the boundary is accessed atomically with the ordering the spec asks for.

use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};

/// Size in bytes of one descriptor table entry.
pub const DESC_SIZE: u64 = 16;
/// Size in bytes of one used ring element.
pub const USED_ELEM_SIZE: u64 = 8;
/// Largest queue size the split ring format allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// `VRING_DESC_F_NEXT`: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`: the buffer holds an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = 4;
/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver asks not to be notified.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VRING_USED_F_NO_NOTIFY`: the device asks not to be kicked.
const USED_F_NO_NOTIFY: u16 = 1;

/// Errors of the ring layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    /// The queue size is zero, not a power of two, or above 32768.
    #[error("queue size {0} is invalid: it must be a power of two between 1 and 32768")]
    InvalidSize(u16),
    /// The ring base address is not 16-byte aligned.
    #[error("ring base address {0:#x} is not 16-byte aligned")]
    Misaligned(u64),
}

/// Where the parts of one split ring live, as guest physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of descriptors (queue size).
    pub size: u16,
    /// Descriptor table address (16-byte aligned).
    pub desc: u64,
    /// Available ring address (2-byte aligned).
    pub avail: u64,
    /// Used ring address (4-byte aligned).
    pub used: u64,
    /// Bytes from `desc` to the end of the used ring.
    pub len: u64,
}

impl RingLayout {
    /// Lays out a ring of `size` descriptors starting at `base`: the descriptor table, then
    /// the available ring (flags, idx, ring\[size\], used_event), then, 4-byte aligned, the
    /// used ring (flags, idx, ring\[size\], avail_event).
    pub fn new(size: u16, base: u64) -> Result<Self, RingError> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(RingError::InvalidSize(size));
        }
        if !base.is_multiple_of(16) {
            return Err(RingError::Misaligned(base));
        }
        let n = u64::from(size);
        let avail = base + DESC_SIZE * n;
        let avail_len = 6 + 2 * n;
        let used = (avail + avail_len).next_multiple_of(4);
        let used_len = 6 + USED_ELEM_SIZE * n;
        Ok(Self {
            size,
            desc: base,
            avail,
            used,
            len: used + used_len - base,
        })
    }
}

/// One descriptor table entry, as the driver writes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// `DESC_F_*` flags.
    pub flags: u16,
    /// Index of the next descriptor when `DESC_F_NEXT` is set.
    pub next: u16,
}

/// One used ring element, as the device writes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsedElem {
    /// Head index of the completed chain.
    pub id: u32,
    /// Bytes the device wrote into the chain.
    pub len: u32,
}

/// `vring_need_event` from the spec: true when `event` lies in `(old, new]`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The driver side of one split ring, through a host mapping of its guest memory.
#[derive(Debug)]
pub struct SplitRing {
    layout: RingLayout,
    /// Host address of `layout.desc`.
    host: *mut u8,
    event_idx: bool,
    /// Next free slot of the available ring (not yet visible to the device).
    avail_idx: u16,
    /// `avail.idx` as last published to the device.
    published: u16,
    /// Next used ring slot to consume.
    last_used: u16,
}

// SAFETY: a `SplitRing` only holds a pointer into shared memory whose owner outlives it (the
// constructor's contract), and all accesses go through `&mut self` or atomics.
unsafe impl Send for SplitRing {}

impl SplitRing {
    /// Creates the driver view of a ring and zeroes its available and used rings.
    ///
    /// # Safety
    /// `host` must point to `layout.len` writable bytes (the host mapping of guest address
    /// `layout.desc`), 16-byte aligned, that stay mapped for the life of the ring and are not
    /// accessed by anyone but this ring and the device.
    pub unsafe fn new(layout: RingLayout, host: *mut u8, event_idx: bool) -> Self {
        // SAFETY: the caller guarantees `layout.len` writable bytes at `host`.
        unsafe { std::ptr::write_bytes(host, 0, layout.len as usize) };
        Self {
            layout,
            host,
            event_idx,
            avail_idx: 0,
            published: 0,
            last_used: 0,
        }
    }

    /// The ring's layout.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    fn ptr(&self, gpa: u64) -> *mut u8 {
        let off = gpa - self.layout.desc;
        debug_assert!(off < self.layout.len);
        // SAFETY: `off` is within the `layout.len` bytes the constructor was given.
        unsafe { self.host.add(off as usize) }
    }

    fn u16_at(&self, gpa: u64) -> &AtomicU16 {
        // SAFETY: every caller passes a 2-byte aligned field address inside the ring, which
        // stays mapped for the life of `self`; AtomicU16 has the layout of u16.
        unsafe { &*(self.ptr(gpa) as *const AtomicU16) }
    }

    fn u32_at(&self, gpa: u64) -> &AtomicU32 {
        // SAFETY: as in `u16_at`, for a 4-byte aligned field of the used ring.
        unsafe { &*(self.ptr(gpa) as *const AtomicU32) }
    }

    fn avail_ring(&self, slot: u16) -> u64 {
        self.layout.avail + 4 + 2 * u64::from(slot)
    }

    fn used_event(&self) -> u64 {
        self.avail_ring(self.layout.size)
    }

    fn avail_event(&self) -> u64 {
        self.layout.used + 4 + USED_ELEM_SIZE * u64::from(self.layout.size)
    }

    /// Writes descriptor `index` (taken modulo the queue size).
    pub fn write_desc(&mut self, index: u16, desc: Descriptor) {
        let at = self.layout.desc + DESC_SIZE * u64::from(index % self.layout.size);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&desc.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&desc.len.to_le_bytes());
        raw[12..14].copy_from_slice(&desc.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&desc.next.to_le_bytes());
        // SAFETY: the 16 bytes at `at` are inside the descriptor table.
        unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr(), self.ptr(at), 16) };
    }

    /// Reads descriptor `index` back (taken modulo the queue size).
    pub fn read_desc(&self, index: u16) -> Descriptor {
        let at = self.layout.desc + DESC_SIZE * u64::from(index % self.layout.size);
        let mut raw = [0u8; 16];
        // SAFETY: the 16 bytes at `at` are inside the descriptor table.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(at), raw.as_mut_ptr(), 16) };
        Descriptor {
            addr: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
            len: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
            flags: u16::from_le_bytes(raw[12..14].try_into().unwrap_or_default()),
            next: u16::from_le_bytes(raw[14..16].try_into().unwrap_or_default()),
        }
    }

    /// Puts `head` in the next available ring slot; the device sees it after [`Self::publish`].
    /// Any value is accepted, so tests can offer out-of-range heads.
    pub fn push(&mut self, head: u16) {
        let slot = self.avail_idx % self.layout.size;
        self.u16_at(self.avail_ring(slot))
            .store(head, Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Heads pushed but not yet published.
    pub fn unpublished(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.published)
    }

    /// Makes every pushed head visible to the device; returns whether the device wants a
    /// kick for them (its `avail_event` with EVENT_IDX, its NO_NOTIFY flag without).
    pub fn publish(&mut self) -> bool {
        let old = self.published;
        let new = self.avail_idx;
        if old == new {
            return false;
        }
        // The ring entries and descriptors must be visible before the index.
        self.u16_at(self.layout.avail + 2)
            .store(new, Ordering::Release);
        self.published = new;
        // The index store must be ordered before reading the device's suppression state.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = self.u16_at(self.avail_event()).load(Ordering::Relaxed);
            need_event(event, new, old)
        } else {
            self.u16_at(self.layout.used).load(Ordering::Relaxed) & USED_F_NO_NOTIFY == 0
        }
    }

    /// Takes the next used element, if the device has returned one.
    pub fn pop_used(&mut self) -> Option<UsedElem> {
        let idx = self.u16_at(self.layout.used + 2).load(Ordering::Acquire);
        if idx == self.last_used {
            return None;
        }
        let at =
            self.layout.used + 4 + USED_ELEM_SIZE * u64::from(self.last_used % self.layout.size);
        let id = self.u32_at(at).load(Ordering::Relaxed);
        let len = self.u32_at(at + 4).load(Ordering::Relaxed);
        self.last_used = self.last_used.wrapping_add(1);
        Some(UsedElem { id, len })
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.u16_at(self.layout.used + 2).load(Ordering::Acquire)
    }

    /// Used elements the device has returned and the driver has not consumed.
    pub fn pending_used(&self) -> u16 {
        self.u16_at(self.layout.used + 2)
            .load(Ordering::Acquire)
            .wrapping_sub(self.last_used)
    }

    /// Asks the device for a call on its next completion (used_event = next element with
    /// EVENT_IDX, clears NO_INTERRUPT without); returns true when completions are already
    /// pending, so the caller must not sleep.
    pub fn enable_notifications(&mut self) -> bool {
        if self.event_idx {
            self.u16_at(self.used_event())
                .store(self.last_used, Ordering::Relaxed);
        } else {
            self.u16_at(self.layout.avail).store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        self.pending_used() != 0
    }

    /// Asks the device not to call (sets NO_INTERRUPT; with EVENT_IDX the stale used_event
    /// already has that effect).
    pub fn disable_notifications(&mut self) {
        if !self.event_idx {
            self.u16_at(self.layout.avail)
                .store(AVAIL_F_NO_INTERRUPT, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16-byte aligned heap buffer standing in for guest memory.
    fn buffer(len: u64) -> Vec<u128> {
        vec![0u128; (len as usize).div_ceil(16)]
    }

    /// The device side, reduced to what the tests need: read an avail head, write a used elem.
    struct Device<'a> {
        ring: &'a SplitRing,
        next_avail: u16,
        used_idx: u16,
    }

    impl Device<'_> {
        fn pop_avail(&mut self) -> Option<u16> {
            let l = self.ring.layout;
            let idx = self.ring.u16_at(l.avail + 2).load(Ordering::Acquire);
            if idx == self.next_avail {
                return None;
            }
            let head = self
                .ring
                .u16_at(self.ring.avail_ring(self.next_avail % l.size))
                .load(Ordering::Relaxed);
            self.next_avail = self.next_avail.wrapping_add(1);
            Some(head)
        }

        fn complete(&mut self, id: u32, len: u32) {
            let l = self.ring.layout;
            let at = l.used + 4 + 8 * u64::from(self.used_idx % l.size);
            self.ring.u32_at(at).store(id, Ordering::Relaxed);
            self.ring.u32_at(at + 4).store(len, Ordering::Relaxed);
            self.used_idx = self.used_idx.wrapping_add(1);
            self.ring
                .u16_at(l.used + 2)
                .store(self.used_idx, Ordering::Release);
        }
    }

    #[test]
    fn layout_matches_the_spec_formulas() {
        let l = RingLayout::new(256, 0x1000).unwrap();
        assert_eq!(l.desc, 0x1000);
        assert_eq!(l.avail, 0x1000 + 16 * 256);
        // avail: 2 + 2 + 2*256 + 2 = 518 bytes, then round up to 4.
        assert_eq!(l.used, (l.avail + 518).next_multiple_of(4));
        assert_eq!(l.len, l.used + 6 + 8 * 256 - 0x1000);
        let odd = RingLayout::new(1, 0).unwrap();
        assert_eq!(odd.avail, 16);
        assert_eq!(odd.used, 24);
        assert_eq!(odd.used % 4, 0);
    }

    #[test]
    fn layout_rejects_bad_sizes_and_alignment() {
        assert_eq!(RingLayout::new(0, 0), Err(RingError::InvalidSize(0)));
        assert_eq!(RingLayout::new(3, 0), Err(RingError::InvalidSize(3)));
        assert_eq!(
            RingLayout::new(65535, 0),
            Err(RingError::InvalidSize(65535))
        );
        assert_eq!(RingLayout::new(8, 8), Err(RingError::Misaligned(8)));
    }

    #[test]
    fn need_event_follows_vring_need_event() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(4, 8, 3));
        assert!(!need_event(2, 8, 3));
        // Across the 16-bit wrap.
        assert!(need_event(65535, 2, 65534));
        assert!(!need_event(65533, 2, 65534));
    }

    #[test]
    fn descriptors_round_trip_in_little_endian() {
        let l = RingLayout::new(4, 0).unwrap();
        let mut mem = buffer(l.len);
        // SAFETY: `mem` is 16-byte aligned, `l.len` bytes long and outlives `ring`.
        let mut ring = unsafe { SplitRing::new(l, mem.as_mut_ptr().cast(), false) };
        let d = Descriptor {
            addr: 0x1122_3344_5566_7788,
            len: 0x99aa_bbcc,
            flags: DESC_F_NEXT | DESC_F_WRITE,
            next: 3,
        };
        ring.write_desc(5, d); // 5 % 4 == 1
        assert_eq!(ring.read_desc(1), d);
        let bytes: Vec<u8> = mem.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&bytes[16..24], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&bytes[28..30], &3u16.to_le_bytes());
    }

    #[test]
    fn publish_pop_and_wrap_without_event_idx() {
        let l = RingLayout::new(4, 0).unwrap();
        let mut mem = buffer(l.len);
        // SAFETY: `mem` is 16-byte aligned, `l.len` bytes long and outlives `ring`.
        let mut ring = unsafe { SplitRing::new(l, mem.as_mut_ptr().cast(), false) };
        let mut dev_avail = 0u16;
        let mut dev_used = 0u16;
        // Many more rounds than the ring has slots, so indices wrap the ring.
        for round in 0..40u16 {
            ring.push(round % 4);
            ring.push((round + 1) % 4);
            assert_eq!(ring.unpublished(), 2);
            assert!(ring.publish(), "no NO_NOTIFY flag: every publish kicks");
            assert_eq!(ring.unpublished(), 0);
            assert!(!ring.publish(), "nothing new: no kick");
            assert!(ring.pop_used().is_none());
            let mut dev = Device {
                ring: &ring,
                next_avail: dev_avail,
                used_idx: dev_used,
            };
            let a = dev.pop_avail().unwrap();
            let b = dev.pop_avail().unwrap();
            assert_eq!((a, b), (round % 4, (round + 1) % 4));
            assert!(dev.pop_avail().is_none());
            dev.complete(u32::from(b), 7);
            dev.complete(u32::from(a), 9);
            (dev_avail, dev_used) = (dev.next_avail, dev.used_idx);
            assert_eq!(ring.pending_used(), 2);
            assert_eq!(
                ring.pop_used(),
                Some(UsedElem {
                    id: u32::from(b),
                    len: 7
                })
            );
            assert_eq!(ring.pop_used().unwrap().len, 9);
            assert!(ring.pop_used().is_none());
        }
    }

    #[test]
    fn event_idx_suppresses_kicks_and_calls() {
        let l = RingLayout::new(8, 0).unwrap();
        let mut mem = buffer(l.len);
        // SAFETY: `mem` is 16-byte aligned, `l.len` bytes long and outlives `ring`.
        let mut ring = unsafe { SplitRing::new(l, mem.as_mut_ptr().cast(), true) };
        // avail_event = 0: the device wants a kick when index 0 is published.
        ring.push(0);
        assert!(ring.publish());
        // The device moves avail_event to 5: publishing 1..=4 needs no kick.
        ring.u16_at(ring.avail_event()).store(5, Ordering::Relaxed);
        ring.push(1);
        ring.push(2);
        assert!(!ring.publish());
        ring.push(3);
        ring.push(4);
        ring.push(5);
        assert!(ring.publish(), "index 5 crosses avail_event");
        // enable_notifications writes used_event = last_used.
        assert!(!ring.enable_notifications());
        assert_eq!(ring.u16_at(ring.used_event()).load(Ordering::Relaxed), 0);
        let mut dev = Device {
            ring: &ring,
            next_avail: 0,
            used_idx: 0,
        };
        dev.complete(0, 0);
        assert!(ring.enable_notifications(), "a completion is pending");
        ring.pop_used().unwrap();
        assert!(!ring.enable_notifications());
        assert_eq!(ring.u16_at(ring.used_event()).load(Ordering::Relaxed), 1);
    }

    #[test]
    fn no_interrupt_flag_without_event_idx() {
        let l = RingLayout::new(2, 0).unwrap();
        let mut mem = buffer(l.len);
        // SAFETY: `mem` is 16-byte aligned, `l.len` bytes long and outlives `ring`.
        let mut ring = unsafe { SplitRing::new(l, mem.as_mut_ptr().cast(), false) };
        ring.disable_notifications();
        assert_eq!(ring.u16_at(l.avail).load(Ordering::Relaxed), 1);
        ring.enable_notifications();
        assert_eq!(ring.u16_at(l.avail).load(Ordering::Relaxed), 0);
        // The device sets NO_NOTIFY: publishing asks for no kick.
        ring.u16_at(l.used).store(1, Ordering::Relaxed);
        ring.push(0);
        assert!(!ring.publish());
    }
}
