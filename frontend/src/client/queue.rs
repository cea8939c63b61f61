//! One started virtqueue, driven by one thread: the request API (up to `slots` block
//! requests in flight, their data in the slots' buffers) and the raw API (any descriptor
//! chain, however malformed, for protocol-level tests of a backend).
//!
//! Guest memory layout of a queue: the ring (page aligned), one 64-byte header block per
//! slot (request header at +0, discard segment at +16, status byte at +48), the slots' data
//! buffers (each page aligned, so O_DIRECT backends can use them as is), and a scratch area.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ClientError, ClientOptions};
use crate::blk::{self, RequestType, ID_LEN, S_OK};
use crate::mem::GuestMem;
use crate::ring::{Descriptor, RingLayout, SplitRing, UsedElem, DESC_F_NEXT, DESC_F_WRITE};

const PAGE: u64 = 4096;
/// Bytes of per-slot metadata (header, segment, status).
const SLOT_META: u64 = 64;
const SEG_OFF: u64 = 16;
const STATUS_OFF: u64 = 48;
/// Status byte value written before submission, so an untouched status is visible.
pub const STATUS_UNSET: u8 = 0xff;

/// Where a queue's pieces lie in its share of guest memory (each page aligned).
#[derive(Debug, Clone, Copy)]
pub(super) struct QueueLayout {
    ring_len: u64,
    meta_len: u64,
    data_len: u64,
    slots: u64,
    scratch_len: u64,
}

impl QueueLayout {
    /// The layout `opts` ask for.
    pub(super) fn new(opts: &ClientOptions) -> Result<Self, ClientError> {
        let slots = u64::from(opts.slots);
        Ok(Self {
            ring_len: RingLayout::new(opts.queue_size, 0)?
                .len
                .next_multiple_of(PAGE),
            meta_len: (slots * SLOT_META).next_multiple_of(PAGE),
            data_len: u64::from(opts.slot_data_size).next_multiple_of(PAGE),
            slots,
            scratch_len: opts.scratch_size.next_multiple_of(PAGE),
        })
    }

    /// Bytes of guest memory per queue.
    pub(super) fn per_queue(&self) -> u64 {
        self.ring_len + self.meta_len + self.slots * self.data_len + self.scratch_len
    }
}

/// Counters of one queue.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct QueueStats {
    /// Requests submitted.
    pub submitted: u64,
    /// Kicks written to the kick eventfd.
    pub kicks: u64,
    /// Times the queue slept on its call eventfd.
    pub waits: u64,
    /// Calls consumed from the call eventfd.
    pub calls: u64,
}

/// One block request for the request API. Data moves through the slot's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `sector` into the slot buffer.
    Read {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Write `len` bytes of the slot buffer at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Flush the write cache.
    Flush,
    /// Read the 20-byte serial into the slot buffer.
    GetId,
    /// Discard `sectors` sectors at `sector`.
    Discard {
        /// First sector.
        sector: u64,
        /// Sector count.
        sectors: u32,
    },
    /// Zero `sectors` sectors at `sector`, with UNMAP when `unmap`.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Sector count.
        sectors: u32,
        /// Allow unmapping.
        unmap: bool,
    },
}

impl Request {
    /// The request type on the wire.
    pub fn kind(&self) -> RequestType {
        match self {
            Self::Read { .. } => RequestType::In,
            Self::Write { .. } => RequestType::Out,
            Self::Flush => RequestType::Flush,
            Self::GetId => RequestType::GetId,
            Self::Discard { .. } => RequestType::Discard,
            Self::WriteZeroes { .. } => RequestType::WriteZeroes,
        }
    }
}

/// A completed request of the request API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The slot the request used.
    pub slot: u16,
    /// Request type.
    pub kind: RequestType,
    /// Status byte the device wrote ([`STATUS_UNSET`] if it wrote none).
    pub status: u8,
    /// Bytes the device reported as written.
    pub used_len: u32,
}

/// One started virtqueue with its kick and call eventfds.
#[derive(Debug)]
pub struct Queue {
    index: usize,
    mem: Arc<GuestMem>,
    ring: SplitRing,
    kick: EventFd,
    call: EventFd,
    slots: u16,
    meta: u64,
    data: u64,
    data_len: u64,
    scratch: u64,
    scratch_len: u64,
    /// Request type in flight per slot.
    kinds: Vec<Option<RequestType>>,
    free: Vec<u16>,
    /// Used elements that belong to no in-flight slot (raw chains, bogus ids).
    stray: Vec<UsedElem>,
    timeout: Duration,
    stats: QueueStats,
}

impl Queue {
    /// Queue `index` over `ring` in `mem`, its share of memory starting at `base` as `layout`
    /// lays it out, with new kick and call eventfds.
    pub(super) fn new(
        index: usize,
        mem: Arc<GuestMem>,
        ring: SplitRing,
        layout: &QueueLayout,
        base: u64,
        opts: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let efd =
            |op| EventFd::new(EFD_NONBLOCK).map_err(|source| ClientError::EventFd { op, source });
        let meta = base + layout.ring_len;
        let data = meta + layout.meta_len;
        Ok(Queue {
            index,
            mem,
            ring,
            kick: efd("create (kick)")?,
            call: efd("create (call)")?,
            slots: opts.slots,
            meta,
            data,
            data_len: layout.data_len,
            scratch: data + layout.slots * layout.data_len,
            scratch_len: layout.scratch_len,
            kinds: vec![None; opts.slots as usize],
            free: (0..opts.slots).rev().collect(),
            stray: Vec::new(),
            timeout: opts.timeout,
            stats: QueueStats::default(),
        })
    }

    /// The ring's used index: where a reconnected backend resumes.
    pub(super) fn used_idx(&self) -> u16 {
        self.ring.used_idx()
    }

    /// Queue index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Number of request slots.
    pub fn slots(&self) -> u16 {
        self.slots
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        usize::from(self.slots) - self.free.len()
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The shared guest memory.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// The ring's layout in guest memory.
    pub fn layout(&self) -> RingLayout {
        self.ring.layout()
    }

    /// Guest address of slot `slot`'s data buffer.
    pub fn slot_data_gpa(&self, slot: u16) -> u64 {
        self.data + u64::from(slot) * self.data_len
    }

    /// Size of each slot's data buffer.
    pub fn slot_data_len(&self) -> u64 {
        self.data_len
    }

    fn hdr_gpa(&self, slot: u16) -> u64 {
        self.meta + u64::from(slot) * SLOT_META
    }

    /// Guest address of slot `slot`'s status byte.
    pub fn status_gpa(&self, slot: u16) -> u64 {
        self.hdr_gpa(slot) + STATUS_OFF
    }

    /// Guest range reserved for raw chains: (address, length).
    pub fn scratch(&self) -> (u64, u64) {
        (self.scratch, self.scratch_len)
    }

    /// First descriptor index the request API never uses.
    pub fn raw_desc_base(&self) -> u16 {
        self.slots * 3
    }

    /// Copies `data` into slot `slot`'s buffer.
    pub fn fill_slot(&self, slot: u16, data: &[u8]) -> Result<(), ClientError> {
        self.check_len(data.len() as u64)?;
        Ok(self.mem.write(self.slot_data_gpa(slot), data)?)
    }

    /// Copies the first `out.len()` bytes of slot `slot`'s buffer into `out`.
    pub fn slot_bytes(&self, slot: u16, out: &mut [u8]) -> Result<(), ClientError> {
        self.check_len(out.len() as u64)?;
        Ok(self.mem.read(self.slot_data_gpa(slot), out)?)
    }

    fn check_len(&self, len: u64) -> Result<(), ClientError> {
        if len > self.data_len {
            return Err(ClientError::TooLarge {
                len,
                cap: self.data_len,
            });
        }
        Ok(())
    }

    /// A free slot for the next [`Self::submit_in`], if any.
    pub fn next_free_slot(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Queues `req` in the next free slot (not visible to the device before [`Self::kick`]);
    /// returns the slot.
    pub fn submit(&mut self, req: Request) -> Result<u16, ClientError> {
        let slot = self
            .next_free_slot()
            .ok_or(ClientError::NoFreeSlot(self.slots))?;
        self.submit_in(slot, req)?;
        Ok(slot)
    }

    /// Queues `req` in free slot `slot`.
    pub fn submit_in(&mut self, slot: u16, req: Request) -> Result<(), ClientError> {
        let pos = self
            .free
            .iter()
            .rposition(|&s| s == slot)
            .ok_or(ClientError::NoFreeSlot(self.slots))?;
        let hdr = self.hdr_gpa(slot);
        let status = hdr + STATUS_OFF;
        let head = slot * 3;
        let kind = req.kind();
        let (sector, data) = match req {
            Request::Read { sector, len } | Request::Write { sector, len } => {
                self.check_len(u64::from(len))?;
                (sector, Some((self.slot_data_gpa(slot), len)))
            }
            Request::Flush => (0, None),
            Request::GetId => (0, Some((self.slot_data_gpa(slot), ID_LEN))),
            Request::Discard { sector, sectors } => {
                self.mem
                    .write(hdr + SEG_OFF, &blk::segment(sector, sectors, 0))?;
                (0, Some((hdr + SEG_OFF, blk::SEGMENT_LEN)))
            }
            Request::WriteZeroes {
                sector,
                sectors,
                unmap,
            } => {
                self.mem.write(
                    hdr + SEG_OFF,
                    &blk::segment(sector, sectors, u32::from(unmap)),
                )?;
                (0, Some((hdr + SEG_OFF, blk::SEGMENT_LEN)))
            }
        };
        self.mem.write(hdr, &blk::header(kind, sector))?;
        self.mem.write(status, &[STATUS_UNSET])?;
        self.ring.write_desc(
            head,
            Descriptor {
                addr: hdr,
                len: blk::HEADER_LEN,
                flags: DESC_F_NEXT,
                next: head + 1,
            },
        );
        let status_idx = match data {
            Some((addr, len)) => {
                let flags = if kind.device_writes() {
                    DESC_F_WRITE
                } else {
                    0
                };
                self.ring.write_desc(
                    head + 1,
                    Descriptor {
                        addr,
                        len,
                        flags: flags | DESC_F_NEXT,
                        next: head + 2,
                    },
                );
                head + 2
            }
            None => head + 1,
        };
        self.ring.write_desc(
            status_idx,
            Descriptor {
                addr: status,
                len: 1,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        self.free.swap_remove(pos);
        self.kinds[usize::from(slot)] = Some(kind);
        self.ring.push(head);
        self.stats.submitted += 1;
        Ok(())
    }

    /// Used elements the device returned that are not reaped yet.
    pub fn ring_pending(&self) -> u16 {
        self.ring.pending_used()
    }

    /// Makes queued requests visible to the device without kicking it.
    pub fn publish(&mut self) {
        self.ring.publish();
    }

    /// The queue's kick eventfd (the driver writes it).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The queue's call eventfd (the device writes it).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Makes queued requests visible and kicks the device if it asks for it.
    pub fn kick(&mut self) -> Result<(), ClientError> {
        if self.ring.publish() {
            self.kick_now()?;
        }
        Ok(())
    }

    /// Writes the kick eventfd unconditionally.
    pub fn kick_now(&mut self) -> Result<(), ClientError> {
        self.stats.kicks += 1;
        self.kick.write(1).map_err(|source| ClientError::EventFd {
            op: "write (kick)",
            source,
        })
    }

    /// Moves every completion the device has returned into `out`; returns how many.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut n = 0;
        while let Some(used) = self.ring.pop_used() {
            let slot = used.id / 3;
            let ours = used.id % 3 == 0 && slot < u32::from(self.slots);
            let kind = if ours {
                self.kinds[slot as usize].take()
            } else {
                None
            };
            let Some(kind) = kind else {
                self.stray.push(used);
                continue;
            };
            let slot = slot as u16;
            let mut status = [STATUS_UNSET];
            // The status address is inside guest memory by construction.
            let _ = self.mem.read(self.status_gpa(slot), &mut status);
            self.free.push(slot);
            out.push(Completion {
                slot,
                kind,
                status: status[0],
                used_len: used.len,
            });
            n += 1;
        }
        n
    }

    /// Sleeps until the device calls or `deadline` passes; returns at once when completions
    /// are already pending.
    pub fn wait(&mut self, deadline: Instant) -> Result<(), ClientError> {
        if self.ring.enable_notifications() {
            return Ok(());
        }
        self.stats.waits += 1;
        let fd = self.call.as_raw_fd();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(self.timeout));
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            // SAFETY: the call eventfd is owned by `self` and open for this whole call.
            let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
            let mut pfd = [PollFd::new(bfd, PollFlags::POLLIN)];
            match poll(&mut pfd, PollTimeout::from(ms)) {
                Ok(0) | Err(nix::Error::EINTR) => {
                    if self.ring.pending_used() != 0 {
                        break;
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    return Err(ClientError::EventFd {
                        op: "poll (call)",
                        source: e.into(),
                    })
                }
            }
        }
        if self.call.read().is_ok() {
            self.stats.calls += 1;
        }
        self.ring.disable_notifications();
        Ok(())
    }

    /// Submits `req`, kicks and waits for its completion (other completions that arrive
    /// meanwhile are dropped, so use it on an otherwise idle queue).
    pub fn execute(&mut self, req: Request) -> Result<Completion, ClientError> {
        let slot = self.submit(req)?;
        self.kick()?;
        let deadline = Instant::now() + self.timeout;
        let mut done = Vec::new();
        loop {
            self.reap(&mut done);
            if let Some(c) = done.iter().find(|c| c.slot == slot) {
                return Ok(*c);
            }
            self.wait(deadline)?;
        }
    }

    fn execute_ok(&mut self, req: Request) -> Result<Completion, ClientError> {
        let c = self.execute(req)?;
        if c.status != S_OK {
            return Err(ClientError::Status {
                kind: c.kind,
                status: c.status,
            });
        }
        Ok(c)
    }

    /// Reads `len` bytes at `sector`.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        let c = self.execute_ok(Request::Read { sector, len })?;
        let mut out = vec![0u8; len as usize];
        self.slot_bytes(c.slot, &mut out)?;
        Ok(out)
    }

    /// Writes `data` at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), ClientError> {
        let slot = self
            .next_free_slot()
            .ok_or(ClientError::NoFreeSlot(self.slots))?;
        self.fill_slot(slot, data)?;
        self.execute_ok(Request::Write {
            sector,
            len: data.len() as u32,
        })?;
        Ok(())
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.execute_ok(Request::Flush).map(drop)
    }

    /// Reads the device serial (up to 20 bytes, NUL padded).
    pub fn get_id(&mut self) -> Result<[u8; ID_LEN as usize], ClientError> {
        let c = self.execute_ok(Request::GetId)?;
        let mut id = [0u8; ID_LEN as usize];
        self.slot_bytes(c.slot, &mut id)?;
        Ok(id)
    }

    /// Discards `sectors` sectors at `sector`.
    pub fn discard(&mut self, sector: u64, sectors: u32) -> Result<(), ClientError> {
        self.execute_ok(Request::Discard { sector, sectors })
            .map(drop)
    }

    /// Zeroes `sectors` sectors at `sector`.
    pub fn write_zeroes(
        &mut self,
        sector: u64,
        sectors: u32,
        unmap: bool,
    ) -> Result<(), ClientError> {
        self.execute_ok(Request::WriteZeroes {
            sector,
            sectors,
            unmap,
        })
        .map(drop)
    }

    // ---- raw API ----

    /// Writes descriptor `index` as given, valid or not.
    pub fn set_desc(&mut self, index: u16, desc: Descriptor) {
        self.ring.write_desc(index, desc);
    }

    /// Offers `head` in the available ring (any value, even out of range).
    pub fn push_avail(&mut self, head: u16) {
        self.ring.push(head);
    }

    /// Submits a chain laid out in consecutive descriptors from `first`: each entry is
    /// (address, length, device-writable); NEXT flags are set for all but the last. Returns
    /// the head index (not kicked yet).
    pub fn push_chain(&mut self, first: u16, parts: &[(u64, u32, bool)]) -> u16 {
        for (i, &(addr, len, write)) in parts.iter().enumerate() {
            let idx = first.wrapping_add(i as u16);
            let last = i + 1 == parts.len();
            let mut flags = if write { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            self.ring.write_desc(
                idx,
                Descriptor {
                    addr,
                    len,
                    flags,
                    next: if last {
                        0
                    } else {
                        idx.wrapping_add(1) % self.ring.size()
                    },
                },
            );
        }
        self.ring.push(first);
        first
    }

    /// Waits for the next used element that belongs to no request slot (a raw chain).
    pub fn next_used(&mut self, timeout: Duration) -> Result<UsedElem, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut sink = Vec::new();
        loop {
            self.reap(&mut sink);
            if !self.stray.is_empty() {
                return Ok(self.stray.remove(0));
            }
            self.wait(deadline).map_err(|e| match e {
                ClientError::Timeout(_) => ClientError::Timeout(timeout),
                other => other,
            })?;
        }
    }

    /// Reads one byte of guest memory (a raw chain's status byte).
    pub fn read_byte(&self, gpa: u64) -> Result<u8, ClientError> {
        let mut b = [0u8];
        self.mem.read(gpa, &mut b)?;
        Ok(b[0])
    }
}
