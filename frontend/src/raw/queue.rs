//! One vring as a hostile frontend sees it: its layout in guest memory, its eventfds, and
//! writes of any ring state (available index and entries, descriptors, whole requests) through
//! bounds-checked guest memory writes. It imports [`RawError`] from [`raw`](super), and from
//! the crate's lower layers the request header ([`blk`]), [`GuestMem`] ([`mem`](crate::mem)),
//! the ring layout ([`ring`](crate::ring)) and [`STATUS_UNSET`] ([`client`](crate::client));
//! [`RawDevice`](super::RawDevice) starts queues on it.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::RawError;
use crate::blk::{self, RequestType};
use crate::client::STATUS_UNSET;
use crate::mem::GuestMem;
use crate::ring::{Descriptor, RingLayout, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE};

/// One vring set up by [`RawDevice`](super::RawDevice): its layout in guest memory and its
/// eventfds. Ring state is written through guest memory writes that are checked against the
/// memory's bounds, so a ring whose parts lie outside it can be set up and poked at without
/// touching memory this process does not own.
#[derive(Debug)]
pub struct RawQueue {
    /// Queue index.
    pub index: u8,
    /// Where its parts are, as guest physical addresses (anywhere, for attacks).
    pub layout: RingLayout,
    /// The kick eventfd given to the backend.
    pub kick: EventFd,
    /// The call eventfd given to the backend.
    pub call: EventFd,
    pub(super) mem: Arc<GuestMem>,
}

impl RawQueue {
    /// A view of a ring at `layout` in `mem` that no backend has been told about: to lay out
    /// ring state before the queue is started.
    pub fn detached(mem: Arc<GuestMem>, layout: RingLayout) -> io::Result<RawQueue> {
        Ok(RawQueue {
            index: 0,
            layout,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            mem,
        })
    }

    fn u16_at(&self, gpa: u64) -> Result<u16, RawError> {
        let mut b = [0u8; 2];
        self.mem.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn set_u16(&self, gpa: u64, v: u16) -> Result<(), RawError> {
        Ok(self.mem.write(gpa, &v.to_le_bytes())?)
    }

    /// Writes the available ring's index (any value: far ahead of the used index, behind it).
    pub fn set_avail_idx(&self, idx: u16) -> Result<(), RawError> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.set_u16(self.layout.avail + 2, idx)
    }

    /// Writes available ring entry `slot` (taken modulo the queue size) as `head` (any value).
    pub fn set_avail_entry(&self, slot: u16, head: u16) -> Result<(), RawError> {
        let at = self.layout.avail + 4 + 2 * u64::from(slot % self.layout.size);
        self.set_u16(at, head)
    }

    /// Writes the available ring's `used_event` field (EVENT_IDX).
    pub fn set_used_event(&self, idx: u16) -> Result<(), RawError> {
        let at = self.layout.avail + 4 + 2 * u64::from(self.layout.size);
        self.set_u16(at, idx)
    }

    /// The used ring's index, as the backend last wrote it.
    pub fn used_idx(&self) -> Result<u16, RawError> {
        self.u16_at(self.layout.used + 2)
    }

    /// Used ring element `slot` (taken modulo the queue size): (head id, length).
    pub fn used_elem(&self, slot: u16) -> Result<(u32, u32), RawError> {
        let at = self.layout.used + 4 + 8 * u64::from(slot % self.layout.size);
        let mut b = [0u8; 8];
        self.mem.read(at, &mut b)?;
        let (id, len) = b.split_at(4);
        Ok((
            u32::from_le_bytes(id.try_into().unwrap_or_default()),
            u32::from_le_bytes(len.try_into().unwrap_or_default()),
        ))
    }

    /// The used ring's `avail_event` field (EVENT_IDX), as the backend last wrote it.
    pub fn avail_event(&self) -> Result<u16, RawError> {
        self.u16_at(self.layout.used + 4 + 8 * u64::from(self.layout.size))
    }

    /// Kicks the backend (writes the kick eventfd).
    pub fn kick(&self) -> io::Result<()> {
        self.kick.write(1)
    }

    /// Writes descriptor `index` (taken modulo the queue size) as given.
    pub fn set_desc(&self, index: u16, d: Descriptor) -> Result<(), RawError> {
        let at = self.layout.desc + DESC_SIZE * u64::from(index % self.layout.size);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&d.next.to_le_bytes());
        Ok(self.mem.write(at, &raw)?)
    }

    /// Lays out a well-formed request at guest address `at` (the 16-byte header, then `len`
    /// data bytes unless 0, then the status byte, set to [`STATUS_UNSET`]) in descriptors
    /// `head`, `head + 1` (and `head + 2`), and writes `head` in available ring entry
    /// `slot`. Nothing is published: see [`Self::set_avail_idx`]. Returns the status byte's
    /// address.
    pub fn write_request(
        &self,
        slot: u16,
        head: u16,
        kind: RequestType,
        sector: u64,
        len: u32,
        at: u64,
    ) -> Result<u64, RawError> {
        self.write_request_mapped(slot, head, (kind, sector, len), (at, at))
    }

    /// [`Self::write_request`] for memory the backend sees at other guest addresses than this
    /// view's offsets: the request `(kind, sector, len)` is written at offset `off` of the
    /// memory and its descriptors point at guest address `gpa`. Returns the status byte's
    /// offset.
    pub fn write_request_mapped(
        &self,
        slot: u16,
        head: u16,
        (kind, sector, len): (RequestType, u64, u32),
        (gpa, off): (u64, u64),
    ) -> Result<u64, RawError> {
        let size = self.layout.size;
        let data = u64::from(blk::HEADER_LEN);
        let status = data + u64::from(len);
        self.mem.write(off, &blk::header(kind, sector))?;
        self.mem.write(off + status, &[STATUS_UNSET])?;
        let next = |i: u16| (head.wrapping_add(i)) % size;
        self.set_desc(
            head,
            Descriptor {
                addr: gpa,
                len: blk::HEADER_LEN,
                flags: DESC_F_NEXT,
                next: next(1),
            },
        )?;
        let mut last = 1;
        if len > 0 {
            let flags = if kind.device_writes() {
                DESC_F_WRITE
            } else {
                0
            };
            self.set_desc(
                next(1),
                Descriptor {
                    addr: gpa + data,
                    len,
                    flags: flags | DESC_F_NEXT,
                    next: next(2),
                },
            )?;
            last = 2;
        }
        self.set_desc(
            next(last),
            Descriptor {
                addr: gpa + status,
                len: 1,
                flags: DESC_F_WRITE,
                next: 0,
            },
        )?;
        self.set_avail_entry(slot, head)?;
        Ok(off + status)
    }

    /// Waits until the used index is `idx`; returns the index last seen on time-out.
    pub fn wait_used(&self, idx: u16, timeout: Duration) -> Result<(), u16> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.used_idx().unwrap_or(0);
            if now == idx {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(now);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Reads one byte of guest memory (a request's status byte).
    pub fn byte(&self, gpa: u64) -> Result<u8, RawError> {
        let mut b = [0u8];
        self.mem.read(gpa, &mut b)?;
        Ok(b[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_state_is_written_within_guest_memory_only() {
        let mem = Arc::new(GuestMem::new(64 << 10).unwrap());
        let layout = RingLayout::new(16, 0x1000).unwrap();
        let q = RawQueue {
            index: 0,
            layout,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            mem: mem.clone(),
        };
        q.set_avail_idx(300).unwrap();
        let mut b = [0u8; 2];
        mem.read(layout.avail + 2, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 300);
        // A ring past the end: writes fail instead of touching other memory.
        let off = RawQueue {
            layout: RingLayout::new(16, mem.len() - 16).unwrap(),
            ..q
        };
        assert!(off.set_avail_idx(1).is_err());
    }
}
