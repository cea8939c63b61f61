//! Pure parsing and validation of virtio-blk requests.
//!
//! A descriptor chain from the guest goes in, a typed [`Request`] or a [`Rejected`] comes out.
//! Nothing here touches the image: the only side effect is reading the request header and the
//! discard / write-zeroes segments from guest memory. The guest is untrusted, so every length and
//! every sector range is checked with checked arithmetic, and every failure maps to the status the
//! virtio 1.2 specification asks for (see [`RequestError::status`]).
//!
//! Layout follows the specification's framing-independent rules (VIRTIO_F_VERSION_1 implies
//! ANY_LAYOUT): the device-readable bytes form one stream that starts with the 16-byte header,
//! the device-writable bytes form another whose last byte is the status. Descriptors may split
//! these streams anywhere.

use smallvec::SmallVec;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Size in bytes of a virtio-blk sector: always 512 on the wire, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size in bytes of the request header (`type`, `reserved`, `sector`).
pub const HEADER_SIZE: u64 = 16;
/// Size in bytes of one discard / write-zeroes segment.
pub const SEGMENT_SIZE: u64 = 16;
/// Number of bytes of a GET_ID answer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Everything the parser needs to know about the device to validate a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size in bytes (512 or 4096); requests must be aligned to it.
    pub logical_block_size: u32,
    /// The export is read-only: OUT, DISCARD and WRITE_ZEROES fail.
    pub read_only: bool,
    /// Maximum number of data descriptors in one IN/OUT request (`seg_max`).
    pub seg_max: u32,
    /// Maximum length of one data descriptor (`size_max`).
    pub size_max: u32,
    /// DISCARD is offered to the guest.
    pub discard: bool,
    /// WRITE_ZEROES is offered to the guest.
    pub write_zeroes: bool,
    /// Maximum sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// Maximum discard segments per request.
    pub max_discard_seg: u32,
    /// Maximum sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Maximum write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
}

impl Limits {
    fn sectors_per_block(&self) -> u64 {
        (u64::from(self.logical_block_size) >> SECTOR_SHIFT).max(1)
    }
}

/// One contiguous piece of guest memory (guest physical address and length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    /// Guest physical address of the first byte.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Guest ranges with inline room for the usual chain (header, a few data buffers, status), so
/// parsing a request does not allocate.
pub type GuestRanges = SmallVec<[GuestRange; 4]>;

/// The segments of one discard or write-zeroes request, inline for the one segment a device
/// usually accepts.
pub type Segments = SmallVec<[Segment; 1]>;

/// One discard or write-zeroes segment, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First sector (512-byte units).
    pub sector: u64,
    /// Number of 512-byte sectors.
    pub num_sectors: u32,
    /// The UNMAP flag (write-zeroes only): the range may be deallocated.
    pub unmap: bool,
}

impl Segment {
    /// Byte offset of the segment in the image.
    pub fn offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }

    /// Length of the segment in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.num_sectors) << SECTOR_SHIFT
    }

    /// True when the segment covers no sectors.
    pub fn is_empty(&self) -> bool {
        self.num_sectors == 0
    }
}

/// What a valid request asks the device to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `data` from the image starting at `sector`.
    Read {
        /// First sector.
        sector: u64,
    },
    /// Write `data` to the image starting at `sector`.
    Write {
        /// First sector.
        sector: u64,
    },
    /// Make every completed write durable.
    Flush,
    /// Write the device serial into `data` (at most 20 bytes).
    GetId,
    /// Deallocate the segments.
    Discard(Segments),
    /// Make the segments read as zeroes.
    WriteZeroes(Segments),
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// The data buffers in order (device-writable for reads and GET_ID, device-readable for
    /// writes; empty for the other kinds).
    pub data: GuestRanges,
    /// Total length of `data` in bytes.
    pub data_len: u64,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

impl Request {
    /// Byte offset in the image for reads and writes (0 for the other kinds).
    pub fn offset(&self) -> u64 {
        match self.kind {
            RequestKind::Read { sector } | RequestKind::Write { sector } => sector << SECTOR_SHIFT,
            _ => 0,
        }
    }
}

/// Why a request is refused. Each maps to the status QEMU's virtio-blk device gives for it
/// ([`RequestError::status`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain has no device-writable byte for the status.
    #[error("the descriptor chain has no device-writable status byte")]
    MissingStatus,
    /// The status byte is not in guest memory.
    #[error("the status byte at {0:#x} is outside guest memory")]
    StatusOutOfMemory(u64),
    /// A device-readable descriptor follows a device-writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor address plus length overflows.
    #[error("descriptor at {addr:#x} with length {len} wraps around the address space")]
    DescriptorOverflow {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Fewer than 16 device-readable bytes: no complete header.
    #[error("the request header is {0} bytes, 16 are required")]
    HeaderTooShort(u64),
    /// Guest memory could not be read.
    #[error("guest memory at {0:#x} could not be accessed")]
    GuestMemory(u64),
    /// The request type is not implemented.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A read carries device-readable data, or a write device-writable data.
    #[error("request type {0} has data buffers in the wrong direction")]
    WrongDirection(u32),
    /// The data length is not a multiple of 512 or of the logical block size.
    #[error("data length {len} is not a multiple of {unit}")]
    UnalignedLength {
        /// Length in bytes.
        len: u64,
        /// Required unit.
        unit: u64,
    },
    /// The start sector is not aligned to the logical block size.
    #[error("sector {sector} is not aligned to the {block}-byte logical block size")]
    UnalignedSector {
        /// Start sector.
        sector: u64,
        /// Logical block size.
        block: u32,
    },
    /// The sector range goes past the end of the disk (or overflows).
    #[error("sectors {sector}+{count} go past the capacity of {capacity} sectors")]
    OutOfRange {
        /// Start sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// Capacity.
        capacity: u64,
    },
    /// A write-type request on a read-only export.
    #[error("request type {0} on a read-only disk")]
    ReadOnly(u32),
    /// More data descriptors than `seg_max`.
    #[error("{count} data segments exceed seg_max {max}")]
    TooManySegments {
        /// Segments in the request.
        count: u64,
        /// Advertised maximum.
        max: u32,
    },
    /// A data descriptor longer than `size_max`.
    #[error("a data segment of {len} bytes exceeds size_max {max}")]
    SegmentTooLarge {
        /// Descriptor length.
        len: u32,
        /// Advertised maximum.
        max: u32,
    },
    /// More data than [`REQUEST_DATA_MAX`] in one read or write.
    #[error("{len} bytes of data exceed the {REQUEST_DATA_MAX} bytes one request may move")]
    RequestTooLarge {
        /// The request's data length.
        len: u64,
    },
    /// GET_ID without room for the answer.
    #[error("GET_ID without a data buffer")]
    MissingIdBuffer,
    /// Discard / write-zeroes payload is empty or not a whole number of segments.
    #[error("discard/write-zeroes payload of {0} bytes is not a non-zero multiple of 16")]
    BadSegmentPayload(u64),
    /// Discard / write-zeroes with more segments than advertised (UNSUPP, as QEMU gives).
    #[error("{count} discard/write-zeroes segments exceed the maximum {max}")]
    TooManyDwzSegments {
        /// Segments in the request.
        count: u64,
        /// Advertised maximum.
        max: u32,
    },
    /// Discard / write-zeroes segment longer than advertised.
    #[error("a discard/write-zeroes segment of {count} sectors exceeds the maximum {max}")]
    DwzSegmentTooLarge {
        /// Sectors in the segment.
        count: u32,
        /// Advertised maximum.
        max: u32,
    },
    /// Unknown flag bits in a segment, or UNMAP on a discard.
    #[error("segment flags {0:#x} are not supported for this request")]
    UnsupportedFlags(u32),
}

impl RequestError {
    /// The `VIRTIO_BLK_S_*` status the guest gets for this error.
    pub fn status(&self) -> u8 {
        let s = match self {
            RequestError::Unsupported(_)
            | RequestError::UnsupportedFlags(_)
            | RequestError::TooManyDwzSegments { .. } => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        // The status constants are 0..=2 and fit a byte.
        s as u8
    }
}

/// A refused request: the error, and where to put the status if the chain has a usable one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Why it was refused.
    pub error: RequestError,
    /// Guest address of the status byte, when the chain has one inside guest memory.
    pub status: Option<GuestAddress>,
}

/// A list of guest ranges seen as one byte stream.
fn split_stream(ranges: &[GuestRange], at: u64) -> (GuestRanges, GuestRanges) {
    let mut head = GuestRanges::new();
    let mut tail = GuestRanges::new();
    let mut pos = 0u64;
    for r in ranges {
        let len = u64::from(r.len);
        let end = pos + len;
        if end <= at {
            head.push(*r);
        } else if pos >= at {
            tail.push(*r);
        } else {
            // at is inside this range: pos < at < end, so the cut fits in u32.
            let cut = (at - pos) as u32;
            head.push(GuestRange {
                addr: r.addr,
                len: cut,
            });
            tail.push(GuestRange {
                addr: r.addr.unchecked_add(u64::from(cut)),
                len: r.len - cut,
            });
        }
        pos = end;
    }
    (head, tail)
}

fn total_len(ranges: &[GuestRange]) -> u64 {
    ranges.iter().map(|r| u64::from(r.len)).sum()
}

/// Copy `buf.len()` bytes from the start of a stream of ranges.
fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    ranges: &[GuestRange],
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0usize;
    for r in ranges {
        if done == buf.len() {
            break;
        }
        let n = (r.len as usize).min(buf.len() - done);
        let part = &mut buf[done..done + n];
        // One region lookup when the piece lies in one region (the usual header), the general
        // copy otherwise.
        let fast = mem
            .physical_memory()
            .and_then(|pm| vm_memory::GuestMemoryBackend::get_slice(pm, r.addr, n).ok());
        let copied = match fast {
            Some(s) => s.copy_to(part) == n,
            None => mem.read_slice(part, r.addr).is_ok(),
        };
        if !copied {
            return Err(RequestError::GuestMemory(r.addr.raw_value()));
        }
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(RequestError::HeaderTooShort(done as u64))
    }
}

/// Parse a descriptor chain (given as its descriptors, in chain order) into a request.
///
/// `descriptors` is usually a `virtio_queue::DescriptorChain`; any iterator of descriptors
/// works, which keeps this function easy to fuzz. `mem` is only read.
pub fn parse<M, I>(descriptors: I, mem: &M, limits: &Limits) -> Result<Request, Rejected>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut readable = GuestRanges::new();
    let mut writable = GuestRanges::new();
    let mut layout_error = None;
    for desc in descriptors {
        let range = GuestRange {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.addr().checked_add(u64::from(desc.len())).is_none() {
            layout_error.get_or_insert(RequestError::DescriptorOverflow {
                addr: desc.addr().raw_value(),
                len: desc.len(),
            });
        }
        if desc.is_write_only() {
            writable.push(range);
        } else {
            if !writable.is_empty() {
                layout_error.get_or_insert(RequestError::ReadableAfterWritable);
            }
            readable.push(range);
        }
    }
    // The status is the last device-writable byte.
    writable.retain(|r| r.len > 0);
    let Some(last) = writable.last().copied() else {
        return Err(Rejected {
            error: layout_error.unwrap_or(RequestError::MissingStatus),
            status: None,
        });
    };
    let status = last
        .addr
        .checked_add(u64::from(last.len) - 1)
        .filter(|a| mem.check_range(*a, 1, vm_memory::Permissions::Write));
    let Some(status) = status else {
        return Err(Rejected {
            error: layout_error.unwrap_or(RequestError::StatusOutOfMemory(
                last.addr.raw_value().wrapping_add(u64::from(last.len) - 1),
            )),
            status: None,
        });
    };
    let reject = |error| Rejected {
        error,
        status: Some(status),
    };
    if let Some(e) = layout_error {
        return Err(reject(e));
    }
    let writable_len = total_len(&writable);
    let (out_data, _) = split_stream(&writable, writable_len - 1);

    let readable_len = total_len(&readable);
    if readable_len < HEADER_SIZE {
        return Err(reject(RequestError::HeaderTooShort(readable_len)));
    }
    let (header_ranges, in_data) = split_stream(&readable, HEADER_SIZE);
    let mut header = [0u8; HEADER_SIZE as usize];
    read_stream(mem, &header_ranges, &mut header).map_err(reject)?;
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    // header[4..8] is `reserved` (ioprio in legacy drivers): ignored.
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let in_len = total_len(&in_data);
    let out_len = total_len(&out_data);

    let kind = match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = req_type == VIRTIO_BLK_T_OUT;
            if write && limits.read_only {
                return Err(reject(RequestError::ReadOnly(req_type)));
            }
            let (data, wrong) = if write {
                (in_data, out_len)
            } else {
                (out_data, in_len)
            };
            if wrong != 0 {
                return Err(reject(RequestError::WrongDirection(req_type)));
            }
            check_data_segments(&data, limits).map_err(reject)?;
            let len = total_len(&data);
            if len > REQUEST_DATA_MAX {
                return Err(reject(RequestError::RequestTooLarge { len }));
            }
            check_rw_range(sector, len, limits).map_err(reject)?;
            let kind = if write {
                RequestKind::Write { sector }
            } else {
                RequestKind::Read { sector }
            };
            return Ok(Request {
                kind,
                data,
                data_len: len,
                status,
            });
        }
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => {
            if in_len != 0 {
                return Err(reject(RequestError::WrongDirection(req_type)));
            }
            if out_len == 0 {
                return Err(reject(RequestError::MissingIdBuffer));
            }
            return Ok(Request {
                kind: RequestKind::GetId,
                data_len: out_len,
                data: out_data,
                status,
            });
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let (offered, max_seg, max_sectors) = if discard {
                (
                    limits.discard,
                    limits.max_discard_seg,
                    limits.max_discard_sectors,
                )
            } else {
                (
                    limits.write_zeroes,
                    limits.max_write_zeroes_seg,
                    limits.max_write_zeroes_sectors,
                )
            };
            if !offered {
                return Err(reject(RequestError::Unsupported(req_type)));
            }
            if limits.read_only {
                return Err(reject(RequestError::ReadOnly(req_type)));
            }
            if out_len != 0 {
                return Err(reject(RequestError::WrongDirection(req_type)));
            }
            // More payload than the advertised segments is UNSUPP (QEMU: "unsupported if
            // the request contains more than one segment"), a partial segment IOERR.
            if in_len > u64::from(max_seg) * SEGMENT_SIZE {
                return Err(reject(RequestError::TooManyDwzSegments {
                    count: in_len.div_ceil(SEGMENT_SIZE),
                    max: max_seg,
                }));
            }
            if in_len == 0 || !in_len.is_multiple_of(SEGMENT_SIZE) {
                return Err(reject(RequestError::BadSegmentPayload(in_len)));
            }
            // count <= max_seg (a u32), so the payload is small.
            let mut payload = vec![0u8; in_len as usize];
            read_stream(mem, &in_data, &mut payload).map_err(reject)?;
            let mut segs = Segments::new();
            for raw in payload.chunks_exact(SEGMENT_SIZE as usize) {
                let mut s = [0u8; 8];
                s.copy_from_slice(&raw[0..8]);
                let seg_sector = u64::from_le_bytes(s);
                let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
                let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
                // In QEMU's order: the size, then the range (IOERR), then the flags: "The
                // device MUST set the status byte to VIRTIO_BLK_S_UNSUPP for discard and write
                // zeroes commands if any unknown flag is set", and for discard commands if the
                // unmap flag is set.
                if num_sectors > max_sectors {
                    return Err(reject(RequestError::DwzSegmentTooLarge {
                        count: num_sectors,
                        max: max_sectors,
                    }));
                }
                check_rw_range(seg_sector, u64::from(num_sectors) << SECTOR_SHIFT, limits)
                    .map_err(reject)?;
                let allowed = if discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(reject(RequestError::UnsupportedFlags(flags)));
                }
                segs.push(Segment {
                    sector: seg_sector,
                    num_sectors,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                });
            }
            if discard {
                RequestKind::Discard(segs)
            } else {
                RequestKind::WriteZeroes(segs)
            }
        }
        other => return Err(reject(RequestError::Unsupported(other))),
    };
    Ok(Request {
        kind,
        data: GuestRanges::new(),
        data_len: 0,
        status,
    })
}

/// Most data one read or write may move, whatever the driver negotiated: 1 GiB, the most
/// OVMF's virtio-blk driver sends in one request (it negotiates neither `seg_max` nor
/// `size_max`, and reads a large file's clusters in one go). A driver that negotiates
/// neither may otherwise send requests of up to 4 GiB, each of which a queue must finish
/// before a stop or the next frontend can go on.
pub const REQUEST_DATA_MAX: u64 = 1 << 30;

fn check_data_segments(data: &[GuestRange], limits: &Limits) -> Result<(), RequestError> {
    let count = data.len() as u64;
    if count > u64::from(limits.seg_max) {
        return Err(RequestError::TooManySegments {
            count,
            max: limits.seg_max,
        });
    }
    if let Some(r) = data.iter().find(|r| r.len > limits.size_max) {
        return Err(RequestError::SegmentTooLarge {
            len: r.len,
            max: limits.size_max,
        });
    }
    Ok(())
}

/// Check that `len` bytes starting at `sector` are aligned and inside the disk.
fn check_rw_range(sector: u64, len: u64, limits: &Limits) -> Result<(), RequestError> {
    let unit = u64::from(limits.logical_block_size).max(SECTOR_SIZE);
    if !len.is_multiple_of(unit) {
        return Err(RequestError::UnalignedLength { len, unit });
    }
    if !sector.is_multiple_of(limits.sectors_per_block()) {
        return Err(RequestError::UnalignedSector {
            sector,
            block: limits.logical_block_size,
        });
    }
    let count = len >> SECTOR_SHIFT;
    match sector.checked_add(count) {
        Some(end) if end <= limits.capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            count,
            capacity: limits.capacity,
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    /// Limits of a small read-write test disk with every feature on, one discard /
    /// write-zeroes segment per request, as the device advertises.
    pub(crate) fn limits_for(capacity: u64) -> Limits {
        Limits {
            capacity,
            logical_block_size: 512,
            read_only: false,
            seg_max: 254,
            size_max: 1 << 20,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 1,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 1,
        }
    }

    fn limits() -> Limits {
        limits_for(16)
    }

    #[test]
    fn read_is_parsed() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 2);
        let r = parse(
            [d(0x1000, 16, 0), d(0x2000, 1024, W), d(0x3000, 1, W)],
            &m,
            &limits(),
        )
        .unwrap();
        assert_eq!(r.kind, RequestKind::Read { sector: 2 });
        assert_eq!(r.data_len, 1024);
        assert_eq!(r.status, GuestAddress(0x3000));
        assert_eq!(r.offset(), 1024);
    }

    #[test]
    fn any_layout_header_split_and_status_merged() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 1);
        // Header split over two descriptors; data and status in one writable descriptor.
        let r = parse(
            [d(0x1000, 5, 0), d(0x1005, 11, 0), d(0x2000, 513, W)],
            &m,
            &limits(),
        )
        .unwrap();
        assert_eq!(r.kind, RequestKind::Read { sector: 1 });
        assert_eq!(
            r.data.as_slice(),
            [GuestRange {
                addr: GuestAddress(0x2000),
                len: 512
            }]
        );
        assert_eq!(r.status, GuestAddress(0x2200));
    }

    #[test]
    fn write_data_in_header_descriptor() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let r = parse([d(0x1000, 16 + 512, 0), d(0x3000, 1, W)], &m, &limits()).unwrap();
        assert_eq!(r.kind, RequestKind::Write { sector: 0 });
        assert_eq!(
            r.data.as_slice(),
            [GuestRange {
                addr: GuestAddress(0x1010),
                len: 512
            }]
        );
    }

    fn err(descs: &[Descriptor], m: &GuestMemoryMmap, l: &Limits) -> Rejected {
        parse(descs.iter().copied(), m, l).unwrap_err()
    }

    #[test]
    fn bad_inputs_get_the_right_status() {
        let m = mem();
        let l = limits();
        let st = d(0x3000, 1, W);
        // No status at all.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let r = err(&[d(0x1000, 16, 0)], &m, &l);
        assert_eq!(r.status, None);
        assert_eq!(r.error, RequestError::MissingStatus);
        // Status outside guest memory.
        let r = err(&[d(0x1000, 16, 0), d(0x20_0000, 1, W)], &m, &l);
        assert_eq!(r.status, None);
        // Header too short.
        let r = err(&[d(0x1000, 8, 0), st], &m, &l);
        assert_eq!(r.error, RequestError::HeaderTooShort(8));
        assert_eq!(r.status, Some(GuestAddress(0x3000)));
        assert_eq!(r.error.status(), VIRTIO_BLK_S_IOERR as u8);
        // Readable after writable.
        let r = err(
            &[d(0x1000, 16, 0), d(0x2000, 512, W), d(0x2400, 512, 0), st],
            &m,
            &l,
        );
        assert_eq!(r.error, RequestError::ReadableAfterWritable);
        // Read with readable data.
        let r = err(&[d(0x1000, 16, 0), d(0x2000, 512, 0), st], &m, &l);
        assert_eq!(r.error, RequestError::WrongDirection(VIRTIO_BLK_T_IN));
        // Length not a multiple of 512.
        let r = err(&[d(0x1000, 16, 0), d(0x2000, 511, W), st], &m, &l);
        assert!(matches!(r.error, RequestError::UnalignedLength { .. }));
        // Last sector ok, one past not.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 15);
        assert!(parse([d(0x1000, 16, 0), d(0x2000, 512, W), st], &m, &l).is_ok());
        let r = err(&[d(0x1000, 16, 0), d(0x2000, 1024, W), st], &m, &l);
        assert!(matches!(r.error, RequestError::OutOfRange { .. }));
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 16);
        let r = err(&[d(0x1000, 16, 0), d(0x2000, 512, W), st], &m, &l);
        assert!(matches!(r.error, RequestError::OutOfRange { .. }));
        // Sector overflow.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, u64::MAX);
        let r = err(&[d(0x1000, 16, 0), d(0x2000, 512, W), st], &m, &l);
        assert!(matches!(r.error, RequestError::OutOfRange { .. }));
        // Unknown type.
        header(&m, 0x1000, 99, 0);
        let r = err(&[d(0x1000, 16, 0), st], &m, &l);
        assert_eq!(r.error, RequestError::Unsupported(99));
        assert_eq!(r.error.status(), VIRTIO_BLK_S_UNSUPP as u8);
        // Descriptor address overflow.
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let r = err(&[d(0x1000, 16, 0), d(u64::MAX - 10, 512, 0), st], &m, &l);
        assert!(matches!(r.error, RequestError::DescriptorOverflow { .. }));
        // Too many segments.
        let mut l2 = l;
        l2.seg_max = 1;
        let r = err(
            &[d(0x1000, 16, 0), d(0x2000, 512, 0), d(0x2400, 512, 0), st],
            &m,
            &l2,
        );
        assert!(matches!(r.error, RequestError::TooManySegments { .. }));
        // Segment larger than size_max.
        l2.seg_max = 8;
        l2.size_max = 512;
        let r = err(&[d(0x1000, 16, 0), d(0x2000, 1024, 0), st], &m, &l2);
        assert!(matches!(r.error, RequestError::SegmentTooLarge { .. }));
        // More data than one request may move, with neither limit negotiated (the segments
        // overlap in the 1 MiB of memory, as a hostile driver's may).
        l2.seg_max = u32::MAX;
        l2.size_max = u32::MAX;
        l2.capacity = 1 << 22;
        let mut chain = vec![d(0x1000, 16, 0)];
        chain.extend((0..1024).map(|_| d(0, 1 << 20, 0)));
        chain.push(st);
        let most = parse(chain.clone(), &m, &l2);
        assert!(
            most.as_ref().is_ok_and(|r| r.data_len == REQUEST_DATA_MAX),
            "{most:?}"
        );
        chain.insert(1, d(0, 512, 0));
        let r = err(&chain, &m, &l2);
        assert_eq!(
            r.error,
            RequestError::RequestTooLarge {
                len: REQUEST_DATA_MAX + 512
            }
        );
        assert_eq!(r.error.status(), IOERR);
        // Write on a read-only disk.
        let mut ro = l;
        ro.read_only = true;
        let r = err(&[d(0x1000, 16, 0), d(0x2000, 512, 0), st], &m, &ro);
        assert_eq!(r.error, RequestError::ReadOnly(VIRTIO_BLK_T_OUT));
        // Header in unmapped memory.
        let r = err(&[d(0x20_0000, 16, 0), st], &m, &l);
        assert!(matches!(r.error, RequestError::GuestMemory(_)));
    }

    #[test]
    fn logical_block_size_alignment() {
        let m = mem();
        let mut l = limits();
        l.logical_block_size = 4096;
        let st = d(0x3000, 1, W);
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 8);
        assert!(parse([d(0x1000, 16, 0), d(0x4000, 4096, W), st], &m, &l).is_ok());
        let r = err(&[d(0x1000, 16, 0), d(0x4000, 512, W), st], &m, &l);
        assert!(matches!(r.error, RequestError::UnalignedLength { .. }));
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 1);
        let r = err(&[d(0x1000, 16, 0), d(0x4000, 4096, W), st], &m, &l);
        assert!(matches!(r.error, RequestError::UnalignedSector { .. }));
    }

    fn seg(m: &GuestMemoryMmap, at: u64, sector: u64, n: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&s, GuestAddress(at)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let m = mem();
        let l = limits();
        let st = d(0x3000, 1, W);
        let one = [d(0x1000, 16, 0), d(0x2000, 16, 0), st];
        header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        seg(&m, 0x2000, 2, 4, 0);
        let r = parse(one, &m, &l).unwrap();
        assert_eq!(
            r.kind,
            RequestKind::Discard(smallvec::smallvec![Segment {
                sector: 2,
                num_sectors: 4,
                unmap: false
            }])
        );
        // Segments split over two descriptors are one stream.
        let r = parse(
            [d(0x1000, 16, 0), d(0x2000, 5, 0), d(0x2005, 11, 0), st],
            &m,
            &l,
        );
        assert!(r.is_ok());
        // UNMAP on write zeroes: fine.
        header(&m, 0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        seg(&m, 0x2000, 2, 4, 1);
        let r = parse(one, &m, &l).unwrap();
        assert!(matches!(&r.kind, RequestKind::WriteZeroes(s) if s[0].unmap));
        for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let status = |descs: &[Descriptor], l: &Limits| err(descs, &m, l).error.status();
            header(&m, 0x1000, t, 0);
            // More than the one advertised segment, or more payload than one: UNSUPP.
            seg(&m, 0x2000, 0, 1, 0);
            seg(&m, 0x2010, 1, 1, 0);
            let two = [d(0x1000, 16, 0), d(0x2000, 32, 0), st];
            assert_eq!(status(&two, &l), UNSUPP, "type {t}, two segments");
            assert!(matches!(
                err(&two, &m, &l).error,
                RequestError::TooManyDwzSegments { count: 2, max: 1 }
            ));
            assert_eq!(
                status(&[d(0x1000, 16, 0), d(0x2000, 20, 0), st], &l),
                UNSUPP
            );
            // A partial segment or none: IOERR.
            let r = err(&[d(0x1000, 16, 0), d(0x2000, 15, 0), st], &m, &l);
            assert_eq!(r.error, RequestError::BadSegmentPayload(15));
            assert_eq!(r.error.status(), IOERR);
            let r = err(&[d(0x1000, 16, 0), st], &m, &l);
            assert_eq!(r.error, RequestError::BadSegmentPayload(0));
            // A sector count over the maximum: IOERR.
            seg(&m, 0x2000, 0, u32::MAX, 0);
            assert!(matches!(
                err(&one, &m, &l).error,
                RequestError::DwzSegmentTooLarge { .. }
            ));
            assert_eq!(status(&one, &l), IOERR);
            // Past the capacity: IOERR.
            seg(&m, 0x2000, 12, 5, 0);
            assert!(matches!(
                err(&one, &m, &l).error,
                RequestError::OutOfRange { .. }
            ));
            seg(&m, 0x2000, 17, 1, 0);
            assert_eq!(status(&one, &l), IOERR);
            // Unknown flags: UNSUPP.
            seg(&m, 0x2000, 2, 4, !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
            assert_eq!(
                err(&one, &m, &l).error,
                RequestError::UnsupportedFlags(!VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
            );
            assert_eq!(status(&one, &l), UNSUPP);
            // Not offered: UNSUPP; read-only: IOERR.
            seg(&m, 0x2000, 2, 4, 0);
            let mut off = l;
            off.discard = false;
            off.write_zeroes = false;
            assert_eq!(status(&one, &off), UNSUPP);
            let mut ro = l;
            ro.read_only = true;
            assert_eq!(status(&one, &ro), IOERR);
        }
        // UNMAP on discard: UNSUPP.
        header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        seg(&m, 0x2000, 2, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let r = err(&one, &m, &l);
        assert_eq!(r.error, RequestError::UnsupportedFlags(1));
        assert_eq!(r.error.status(), UNSUPP);
        // A sector count at the maximum is fine when it fits the disk.
        let mut big = limits_for(u64::from(l.max_discard_sectors) + 8);
        big.max_discard_seg = 1;
        seg(&m, 0x2000, 8, big.max_discard_sectors, 0);
        assert!(parse(one, &m, &big).is_ok());
    }

    #[test]
    fn get_id_and_flush() {
        let m = mem();
        let l = limits();
        header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let r = parse(
            [d(0x1000, 16, 0), d(0x2000, 20, W), d(0x3000, 1, W)],
            &m,
            &l,
        )
        .unwrap();
        assert_eq!(r.kind, RequestKind::GetId);
        assert_eq!(r.data_len, 20);
        let r = err(&[d(0x1000, 16, 0), d(0x3000, 1, W)], &m, &l);
        assert_eq!(r.error, RequestError::MissingIdBuffer);
        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let r = parse([d(0x1000, 16, 0), d(0x3000, 1, W)], &m, &l).unwrap();
        assert_eq!(r.kind, RequestKind::Flush);
        let mut ro = l;
        ro.read_only = true;
        assert!(parse([d(0x1000, 16, 0), d(0x3000, 1, W)], &m, &ro).is_ok());
    }

    #[test]
    fn status_is_the_last_writable_byte_and_layout_checks() {
        let m = mem();
        let l = limits();
        // A status descriptor longer than one byte: the status is its last byte.
        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let r = parse([d(0x1000, 16, 0), d(0x3000, 4, W)], &m, &l).unwrap();
        assert_eq!(r.status, GuestAddress(0x3003));
        // Zero-length writable descriptors are skipped when looking for the status.
        let r = parse([d(0x1000, 16, 0), d(0x3000, 1, W), d(0x4000, 0, W)], &m, &l).unwrap();
        assert_eq!(r.status, GuestAddress(0x3000));
        // GET_ID with device-readable data: IOERR.
        header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let r = err(
            &[d(0x1000, 32, 0), d(0x2000, 20, W), d(0x3000, 1, W)],
            &m,
            &l,
        );
        assert_eq!(r.error, RequestError::WrongDirection(VIRTIO_BLK_T_GET_ID));
        // A write with a device-writable data buffer: IOERR.
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let r = err(
            &[d(0x1000, 16, 0), d(0x2000, 512, W), d(0x3000, 1, W)],
            &m,
            &l,
        );
        assert_eq!(r.error, RequestError::WrongDirection(VIRTIO_BLK_T_OUT));
        // A zero-length read is valid and does nothing.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 3);
        let r = parse([d(0x1000, 16, 0), d(0x3000, 1, W)], &m, &l).unwrap();
        assert_eq!(r.data_len, 0);
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        fn arb_desc() -> impl Strategy<Value = (u64, u32, bool)> {
            (
                prop_oneof![0u64..0x11_0000, Just(u64::MAX - 8), 0x1000u64..0x1100],
                prop_oneof![0u32..64, Just(16), Just(512), Just(1024), 0u32..0x2_0000],
                any::<bool>(),
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Whatever the chain and the header, parsing never panics, and an accepted
            /// request stays inside the disk and inside its own buffers.
            #[test]
            fn parse_is_total_and_accepted_requests_are_in_range(
                descs in proptest::collection::vec(arb_desc(), 0..8),
                t in prop_oneof![0u32..16, any::<u32>()],
                sector in prop_oneof![0u64..40, any::<u64>()],
                segs in proptest::collection::vec((0u64..40, 0u32..40, 0u32..4), 0..4),
                capacity in 1u64..64,
                ro in any::<bool>(),
            ) {
                let m = mem();
                header(&m, 0x1000, t, sector);
                for (i, (s, n, f)) in segs.iter().enumerate() {
                    let mut raw = [0u8; 16];
                    raw[0..8].copy_from_slice(&s.to_le_bytes());
                    raw[8..12].copy_from_slice(&n.to_le_bytes());
                    raw[12..16].copy_from_slice(&f.to_le_bytes());
                    m.write_slice(&raw, GuestAddress(0x1010 + 16 * i as u64)).unwrap();
                }
                let mut l = limits_for(capacity);
                l.read_only = ro;
                let chain: Vec<Descriptor> =
                    descs.iter().map(|(a, n, w)| d(*a, *n, if *w { W } else { 0 })).collect();
                match parse(chain, &m, &l) {
                    Ok(r) => {
                        let sum: u64 = r.data.iter().map(|g| u64::from(g.len)).sum();
                        prop_assert_eq!(sum, r.data_len);
                        match &r.kind {
                            RequestKind::Read { sector } | RequestKind::Write { sector } => {
                                prop_assert_eq!(r.data_len % 512, 0);
                                prop_assert!(sector + r.data_len / 512 <= capacity);
                                if matches!(r.kind, RequestKind::Write { .. }) {
                                    prop_assert!(!ro);
                                }
                            }
                            RequestKind::Discard(s) | RequestKind::WriteZeroes(s) => {
                                prop_assert!(!ro);
                                for seg in s {
                                    prop_assert!(seg.sector + u64::from(seg.num_sectors) <= capacity);
                                }
                            }
                            RequestKind::Flush | RequestKind::GetId => {}
                        }
                    }
                    Err(rej) => {
                        let st = rej.error.status();
                        prop_assert!(st == 1 || st == 2);
                    }
                }
            }
        }
    }
}
