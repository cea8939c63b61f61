//! What a parsed request turns into: ops on the image for the engine (one for a raw image,
//! one per extent of a qcow2 mapping), work for the slow path, or a completion at once.
//! This is the format layer of the data path: a format maps the guest's byte range to
//! extents of files, and the ops carry iovecs that point straight into guest memory.

use std::os::fd::RawFd;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{used_len, Executor, Parsed, MAX_OPS, STATUS_IOERR, STATUS_OK};
use crate::config::DiscardMode;
use crate::disk::{Layout, Qcow2Files};
use crate::io::op::{self, Iovecs, Op, OpKind, Unsupported};
use crate::io::slow::{GuestBuffers, Work};
use crate::io::store::{Ops, Req, Stage, Transfer};
use crate::io::{Causes, GuestMem};
use crate::request::{GuestRange, Request, RequestKind, Segment, ID_BYTES};

impl Executor {
    /// What a valid request turns into.
    pub(super) fn plan(
        &mut self,
        mem: &GuestMem,
        head: u16,
        pos: u32,
        r: Request,
        write_through: bool,
    ) -> Parsed {
        let null = self.engine.is_null();
        let offset = r.offset();
        let req = |stage| Req {
            head,
            pos,
            status: r.status,
            data_len: 0,
            transfer: Transfer::None,
            offset,
            stage,
        };
        let disk = self.disk.clone();
        let qcow = match disk.layout() {
            Layout::Qcow2(q) => Some(q),
            Layout::Raw { .. } => None,
        };
        let probed_raw = matches!(disk.layout(), Layout::Raw { probed: true });
        if disk.failed() && !matches!(r.kind, RequestKind::GetId) {
            self.guest_warn(
                head,
                format_args!("refused: a request failed inside the daemon before (see above)"),
            );
            return self.done(mem, head, r.status, STATUS_IOERR, 1);
        }
        let ops: Ops = match &r.kind {
            RequestKind::Read { .. } | RequestKind::Write { .. } if r.data_len == 0 || null => {
                Ops::new()
            }
            RequestKind::Read { .. } | RequestKind::Write { .. } => {
                let write = matches!(r.kind, RequestKind::Write { .. });
                let Some(iov) = guest_iovecs(mem, &r.data) else {
                    self.guest_warn(
                        head,
                        format_args!("request buffers are not in guest memory"),
                    );
                    return self.done(mem, head, r.status, STATUS_IOERR, 1);
                };
                let mut req = req(Stage::Slow);
                req.data_len = r.data_len;
                req.transfer = if write {
                    Transfer::Write
                } else {
                    Transfer::Read
                };
                if write && probed_raw && offset < vloop_qcow2::format::PROBE_BYTES as u64 {
                    return self.guarded_first_sector(mem, head, req, iov, write_through);
                }
                match qcow {
                    None => {
                        req.stage = Stage::Parsed(smallvec::smallvec![self.rw_op(
                            iov,
                            write,
                            offset,
                            r.data_len,
                            write_through
                        )]);
                        return Parsed::Op(req);
                    }
                    Some(q) => {
                        match self.qcow2_ops(q, iov, write, offset, r.data_len, write_through) {
                            Ok(Mapped::Ops(ops)) => {
                                req.stage = Stage::Parsed(ops);
                                return Parsed::Op(req);
                            }
                            Ok(Mapped::Done) => {
                                return self.done(
                                    mem,
                                    head,
                                    r.status,
                                    STATUS_OK,
                                    used_len(write, r.data_len),
                                );
                            }
                            Ok(Mapped::Slow(iov)) => {
                                let chain = q.chain.clone();
                                let mut bufs = GuestBuffers(iov);
                                let work: Work = if write {
                                    Box::new(move || {
                                        // SAFETY: the request is in flight until this work's
                                        // completion is collected; only this thread uses them.
                                        let s = unsafe { bufs.as_slices() };
                                        chain
                                            .write_slow(offset, &s)
                                            .map_err(std::io::Error::other)?;
                                        if write_through {
                                            chain.flush().map_err(std::io::Error::other)?;
                                        }
                                        Ok(())
                                    })
                                } else {
                                    Box::new(move || {
                                        // SAFETY: as above.
                                        let mut s = unsafe { bufs.as_mut_slices() };
                                        chain
                                            .read_slow(offset, &mut s)
                                            .map_err(std::io::Error::other)
                                    })
                                };
                                return Parsed::Slow(req, work);
                            }
                            Err(e) => {
                                self.guest_warn(
                                    head,
                                    format_args!(
                                        "mapping {} bytes at {offset} failed: {}",
                                        r.data_len,
                                        Causes(&e)
                                    ),
                                );
                                return self.done(mem, head, r.status, STATUS_IOERR, 1);
                            }
                        }
                    }
                }
            }
            RequestKind::GetId => {
                let used = self.write_id(mem, &r.data) + 1;
                return self.done(mem, head, r.status, STATUS_OK, used);
            }
            RequestKind::Flush if null || disk.limits().read_only => Ops::new(),
            RequestKind::Flush => {
                if let Err(e) = disk.flush_poisoned() {
                    self.guest_warn(head, format_args!("flush refused: {e}"));
                    return self.done(mem, head, r.status, STATUS_IOERR, 1);
                }
                if qcow.is_some() {
                    let d = disk.clone();
                    return Parsed::Slow(req(Stage::Slow), Box::new(move || d.flush()));
                }
                smallvec::smallvec![Op::sync(disk.fd())]
            }
            RequestKind::Discard(segs) | RequestKind::WriteZeroes(segs) => {
                let discard = matches!(r.kind, RequestKind::Discard(_));
                match segs.as_slice() {
                    [] => Ops::new(),
                    [s] if s.is_empty() || null => Ops::new(),
                    [_] if discard && disk.discard_mode() == DiscardMode::Ignore => Ops::new(),
                    [s] => match qcow {
                        None => smallvec::smallvec![self.fallocate_op(s, discard, write_through)],
                        Some(q) => {
                            let chain = q.chain.clone();
                            let (off, len) = (s.offset(), s.len());
                            let unmap = s.unmap && disk.discard_mode() == DiscardMode::Unmap;
                            let work: Work = Box::new(move || {
                                if discard {
                                    chain.discard(off, len)
                                } else {
                                    chain.write_zeroes(off, len, unmap)
                                }
                                .map_err(std::io::Error::other)?;
                                if write_through {
                                    chain.flush().map_err(std::io::Error::other)?;
                                }
                                Ok(())
                            });
                            return Parsed::Slow(req(Stage::Slow), work);
                        }
                    },
                    _ => {
                        // The device advertises one segment, and parse refuses more.
                        let n = segs.len();
                        self.guest_warn(head, format_args!("{n} segments in one request"));
                        return self.done(mem, head, r.status, STATUS_IOERR, 1);
                    }
                }
            }
        };
        if ops.is_empty() {
            let write = matches!(r.kind, RequestKind::Write { .. });
            let used = match r.kind {
                RequestKind::Read { .. } | RequestKind::Write { .. } => used_len(write, r.data_len),
                _ => 1,
            };
            return self.done(mem, head, r.status, STATUS_OK, used);
        }
        Parsed::Op(req(Stage::Parsed(ops)))
    }

    /// A write into the first sector of a raw image whose format `--format auto` decided: it
    /// may not make the image look like another format. The first sector is copied first and
    /// the copy checked and written, so the guest cannot change it between the check and the
    /// write; the rest of the write goes from guest memory as any other (a copy of all of it
    /// would let a ring of large writes at sector 0 take the daemon's memory).
    fn guarded_first_sector(
        &mut self,
        mem: &GuestMem,
        head: u16,
        req: Req,
        iov: Iovecs,
        write_through: bool,
    ) -> Parsed {
        let probe = vloop_qcow2::format::PROBE_BYTES;
        let mut first = vec![0u8; probe.min(usize::try_from(req.data_len).unwrap_or(probe))];
        let mut at = 0;
        for v in &iov {
            let n = v.iov_len.min(first.len() - at);
            // SAFETY: each iovec covers mapped guest memory (guest_iovecs), read for this copy.
            let src = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), n) };
            first[at..at + n].copy_from_slice(src);
            at += n;
            if at == first.len() {
                break;
            }
        }
        if let Err(e) = vloop_qcow2::probed_raw_write(req.offset, &first) {
            self.guest_warn(head, format_args!("write refused: {e}"));
            return self.done(mem, head, req.status, STATUS_IOERR, 1);
        }
        let rest = GuestBuffers(op::advance(&iov, first.len() as u64));
        let fd = self.disk.buffered_fd();
        let offset = req.offset;
        let work: Work = Box::new(move || {
            use std::os::unix::fs::FileExt;
            // SAFETY: the image's buffered descriptor stays open while the disk lives, which is
            // longer than any request; ManuallyDrop keeps this File from closing it.
            let f = std::mem::ManuallyDrop::new(unsafe {
                <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
            });
            f.write_all_at(&first, offset)?;
            let mut at = offset + first.len() as u64;
            // SAFETY: the request is in flight until this work's completion is collected; only
            // this thread uses its buffers.
            for s in unsafe { rest.as_slices() } {
                f.write_all_at(&s, at)?;
                at += s.len() as u64;
            }
            if write_through {
                f.sync_data()?;
            }
            Ok(())
        });
        Parsed::Slow(req, work)
    }

    /// The ops of a qcow2 read or write: one per data extent (zero extents of a read are
    /// filled at once), or the slow path.
    fn qcow2_ops(
        &mut self,
        q: &Qcow2Files,
        iov: Iovecs,
        write: bool,
        offset: u64,
        len: u64,
        write_through: bool,
    ) -> Result<Mapped, vloop_qcow2::Error> {
        let mut extents = std::mem::take(&mut self.extents);
        extents.clear();
        let slow = if write {
            q.chain.map_write(offset, len, &mut extents)? == vloop_qcow2::WritePath::Slow
        } else {
            q.chain.map_read(offset, len, &mut extents)?;
            extents
                .iter()
                .any(|e| matches!(e, vloop_qcow2::Extent::Slow { .. }))
        };
        let data = extents
            .iter()
            .filter(|e| matches!(e, vloop_qcow2::Extent::Data { .. }))
            .count();
        let mapped = if slow || data > MAX_OPS {
            Mapped::Slow(iov)
        } else {
            let mut ops = Ops::new();
            let mut at = 0u64;
            for e in &extents {
                let part = slice_iovecs(&iov, at, e.len());
                match *e {
                    vloop_qcow2::Extent::Data {
                        layer, host, len, ..
                    } => {
                        let direct = self
                            .disk
                            .is_direct()
                            .then(|| q.data_fds.get(layer).copied())
                            .flatten();
                        let buffered = q.buffered_fds.get(layer).copied().unwrap_or(-1);
                        ops.push(data_op(
                            part,
                            write,
                            write_through,
                            host,
                            len,
                            direct,
                            buffered,
                        ));
                    }
                    vloop_qcow2::Extent::Zero { .. } => {
                        for v in &part {
                            // SAFETY: the iovec covers mapped guest memory the device may write
                            // (a read's buffers), in flight for this request.
                            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                        }
                    }
                    vloop_qcow2::Extent::Slow { .. } => {}
                }
                at += e.len();
            }
            if ops.is_empty() {
                Mapped::Done
            } else {
                Mapped::Ops(ops)
            }
        };
        self.extents = extents;
        Ok(mapped)
    }

    pub(super) fn done(
        &mut self,
        mem: &GuestMem,
        head: u16,
        status_addr: GuestAddress,
        status: u8,
        used: u32,
    ) -> Parsed {
        Parsed::Done(self.complete(mem, head, Some(status_addr), status, used))
    }

    /// The read or write of `iov` at `offset` on the raw image.
    fn rw_op(&self, iov: Iovecs, write: bool, offset: u64, len: u64, write_through: bool) -> Op {
        let direct = self.disk.is_direct().then(|| self.disk.fd());
        let buffered = self.disk.buffered_fd();
        data_op(iov, write, write_through, offset, len, direct, buffered)
    }

    /// The fallocate of a discard or write-zeroes segment: a discard punches a hole (on a
    /// block device: discards the range), a write-zeroes zeroes the range, or punches a hole
    /// when the driver allows unmapping and discards are not ignored. Written through like
    /// writes.
    fn fallocate_op(&self, s: &Segment, discard: bool, write_through: bool) -> Op {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let (mode, unsupported) = if discard {
            let mode = if self.disk.is_block_device() {
                punch | op::FALLOC_FL_NO_HIDE_STALE
            } else {
                punch
            };
            (mode, Unsupported::Ignore)
        } else if s.unmap && self.disk.discard_mode() == DiscardMode::Unmap {
            (punch, Unsupported::WriteZeroes)
        } else {
            (
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                Unsupported::WriteZeroes,
            )
        };
        Op {
            kind: OpKind::Fallocate {
                mode,
                sync: write_through,
                unsupported,
            },
            fd: self.disk.fd(),
            fallback_fd: self.disk.buffered_fd(),
            offset: s.offset(),
            len: s.len(),
            iov: Iovecs::new(),
            buffered: false,
        }
    }

    /// The op of a one-block discard, as `plan` builds it (tests check its durability flag).
    #[cfg(test)]
    pub(in crate::io) fn fallocate_op_for_test(&self, write_through: bool) -> Op {
        let s = Segment {
            sector: 0,
            num_sectors: 1,
            unmap: false,
        };
        self.fallocate_op(&s, true, write_through)
    }

    /// Write the device serial into `data`; returns the bytes written.
    fn write_id(&self, mem: &GuestMem, data: &[GuestRange]) -> u32 {
        let serial = *self.disk.serial();
        let mut written = 0usize;
        for r in data {
            if written == ID_BYTES {
                break;
            }
            let n = (r.len as usize).min(ID_BYTES - written);
            if mem
                .write_slice(&serial[written..written + n], r.addr)
                .is_err()
            {
                break;
            }
            written += n;
        }
        written as u32
    }
}

/// What a qcow2 mapping turned a read or write into.
enum Mapped {
    /// Ops on the chain's files.
    Ops(Ops),
    /// Nothing to do: a read of zeroes only (already filled).
    Done,
    /// The slow path, with the request's buffers.
    Slow(Iovecs),
}

/// The part of `iov` that covers bytes `at..at + len` of the buffers seen as one stream.
fn slice_iovecs(iov: &[libc::iovec], at: u64, len: u64) -> Iovecs {
    let mut out = Iovecs::new();
    let mut pos = 0u64;
    let end = at + len;
    for v in iov {
        let (start, stop) = (pos, pos + v.iov_len as u64);
        pos = stop;
        if stop <= at || start >= end {
            continue;
        }
        let from = at.max(start);
        let to = end.min(stop);
        out.push(libc::iovec {
            // from - start < iov_len: the pointer stays inside the buffer.
            iov_base: v
                .iov_base
                .cast::<u8>()
                .wrapping_add((from - start) as usize)
                .cast(),
            iov_len: (to - from) as usize,
        });
    }
    out
}

/// iovecs covering `data`, split where guest memory regions end; `None` when any byte is not
/// in guest memory.
fn guest_iovecs(mem: &GuestMem, data: &[GuestRange]) -> Option<Iovecs> {
    let mut iov = Iovecs::with_capacity(data.len());
    for r in data {
        // Most buffers lie in one region: one lookup.
        if let Ok(slice) = mem.get_slice(r.addr, r.len as usize) {
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            continue;
        }
        for slice in mem.get_slices(r.addr, r.len as usize) {
            let slice = slice.ok()?;
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(iov)
}

/// The read or write of `iov` at `offset` of one image file: through `direct` (its O_DIRECT
/// fd, where the image is opened so) when every buffer is 512-byte aligned, else through
/// `buffered`, which is also the fallback where the file refuses O_DIRECT.
fn data_op(
    iov: Iovecs,
    write: bool,
    write_through: bool,
    offset: u64,
    len: u64,
    direct: Option<RawFd>,
    buffered: RawFd,
) -> Op {
    let aligned = iov
        .iter()
        .all(|v| (v.iov_base as usize).is_multiple_of(512) && v.iov_len.is_multiple_of(512));
    let direct = direct.filter(|_| aligned);
    Op {
        kind: if write {
            OpKind::Write {
                dsync: write_through,
            }
        } else {
            OpKind::Read
        },
        fd: direct.unwrap_or(buffered),
        fallback_fd: buffered,
        offset,
        iov,
        len,
        buffered: direct.is_none(),
    }
}
