//! A vhost-user-blk frontend: what a guest driver and QEMU do together, in one process.
//!
//! [`Client::connect`] speaks the vhost-user protocol over a unix socket (through
//! `vhost::vhost_user::Frontend`): it negotiates virtio and protocol features, reads the
//! block config space, shares a memfd as guest memory, lays out one split ring per queue in
//! it and starts the rings. Each [`Queue`] is then driven on its own (one thread per queue):
//! a request API with up to `slots` requests in flight, and a raw API that writes any
//! descriptor chain, however malformed, for protocol-level tests of a backend.
//!
//! Guest memory layout, per queue: the ring (page aligned), one 64-byte header block per
//! slot (request header at +0, discard segment at +16, status byte at +48), the slots' data
//! buffers (each page aligned, so O_DIRECT backends can use them as is), and a scratch area.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blk::{self, BlkConfig, RequestType, CONFIG_LEN, ID_LEN, S_OK};
use crate::mem::{GuestMem, MemError};
use crate::ring::{
    Descriptor, RingError, RingLayout, SplitRing, UsedElem, DESC_F_NEXT, DESC_F_WRITE,
};

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES: u64 = 1 << 30;
const PAGE: u64 = 4096;
/// Bytes of per-slot metadata (header, segment, status).
const SLOT_META: u64 = 64;
const SEG_OFF: u64 = 16;
const STATUS_OFF: u64 = 48;
/// Status byte value written before submission, so an untouched status is visible.
pub const STATUS_UNSET: u8 = 0xff;

/// Errors of the frontend client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The unix socket could not be connected.
    #[error(
        "cannot connect to vhost-user socket {path}: is the backend running and listening there?"
    )]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The vhost-user error.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// A vhost-user request failed or the backend rejected it.
    #[error("vhost-user {op} failed")]
    Vhost {
        /// The request that failed.
        op: &'static str,
        /// The vhost error.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks a feature the client needs.
    #[error("the backend does not offer {0}, which this client requires")]
    MissingFeature(&'static str),
    /// The options ask for something impossible.
    #[error("invalid client options: {0}")]
    Options(String),
    /// Guest memory could not be created or accessed.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// A ring could not be laid out.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// An eventfd operation failed.
    #[error("eventfd {op} failed")]
    EventFd {
        /// What was done with the eventfd.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Every request slot of the queue is in flight.
    #[error("all {0} request slots of the queue are in flight")]
    NoFreeSlot(u16),
    /// A request needs more data than a slot buffer holds.
    #[error("request of {len} bytes exceeds the slot buffer of {cap} bytes")]
    TooLarge {
        /// Requested length.
        len: u64,
        /// Slot buffer size.
        cap: u64,
    },
    /// The backend did not complete in time.
    #[error("no completion from the backend within {0:?}")]
    Timeout(Duration),
    /// The backend completed a request with a status other than OK.
    #[error("{kind:?} request completed with status {status}")]
    Status {
        /// Request type.
        kind: RequestType,
        /// The status byte.
        status: u8,
    },
}

/// How the client sets up the device.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Queues to start; `None` starts every queue the device has.
    pub queues: Option<u16>,
    /// Descriptors per ring (a power of two).
    pub queue_size: u16,
    /// Requests in flight per queue (needs 3 descriptors each).
    pub slots: u16,
    /// Data buffer bytes per slot.
    pub slot_data_size: u32,
    /// Scratch bytes per queue for raw chains.
    pub scratch_size: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered.
    pub event_idx: bool,
    /// Ask for REPLY_ACK on every setting message when offered.
    pub reply_ack: bool,
    /// Negotiate INFLIGHT_SHMFD when offered and share an inflight region, as QEMU does.
    pub inflight: bool,
    /// Time-out of synchronous requests.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            queues: None,
            queue_size: 256,
            slots: 32,
            slot_data_size: 128 << 10,
            scratch_size: 64 << 10,
            event_idx: true,
            reply_ack: true,
            inflight: true,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Virtio feature bits this client acknowledges when offered (besides VERSION_1 and
/// EVENT_IDX, which are handled on their own).
const WANTED_BLK_FEATURES: [u32; 10] = [
    vb::VIRTIO_BLK_F_SIZE_MAX,
    vb::VIRTIO_BLK_F_SEG_MAX,
    vb::VIRTIO_BLK_F_BLK_SIZE,
    vb::VIRTIO_BLK_F_TOPOLOGY,
    vb::VIRTIO_BLK_F_FLUSH,
    vb::VIRTIO_BLK_F_MQ,
    vb::VIRTIO_BLK_F_DISCARD,
    vb::VIRTIO_BLK_F_WRITE_ZEROES,
    vb::VIRTIO_BLK_F_RO,
    vb::VIRTIO_BLK_F_CONFIG_WCE,
];

/// A connected, started vhost-user-blk device.
pub struct Client {
    frontend: Frontend,
    mem: Arc<GuestMem>,
    config: BlkConfig,
    offered: u64,
    acked: u64,
    protocol: VhostUserProtocolFeatures,
    max_queues: u64,
    queues: Vec<Option<Queue>>,
    inflight: Option<(VhostUserInflight, std::fs::File)>,
    opts: ClientOptions,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("protocol", &self.protocol)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

fn vh(op: &'static str) -> impl FnOnce(vhost::Error) -> ClientError {
    move |source| ClientError::Vhost { op, source }
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

impl Client {
    /// Connects to `path`, negotiates, shares memory and starts the queues.
    pub fn connect(path: &Path, opts: &ClientOptions) -> Result<Self, ClientError> {
        let frontend = Frontend::connect(path, 1).map_err(|e| match e {
            vhost::Error::VhostUserProtocol(source) => ClientError::Connect {
                path: path.to_owned(),
                source,
            },
            other => ClientError::Vhost {
                op: "connect",
                source: other,
            },
        })?;
        Self::start(frontend, opts)
    }

    /// Runs the whole start-up sequence on an already connected frontend.
    pub fn start(mut fe: Frontend, opts: &ClientOptions) -> Result<Self, ClientError> {
        let slots_desc = u32::from(opts.slots) * 3;
        if opts.slots == 0 || slots_desc > u32::from(opts.queue_size) {
            return Err(ClientError::Options(format!(
                "{} slots need {slots_desc} descriptors but the queue has {}; raise the queue size or lower the depth",
                opts.slots, opts.queue_size
            )));
        }
        fe.set_owner().map_err(vh("SET_OWNER"))?;
        let offered = fe.get_features().map_err(vh("GET_FEATURES"))?;
        if offered & PROTOCOL_FEATURES == 0 {
            return Err(ClientError::MissingFeature(
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ));
        }
        if offered & bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(ClientError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let pf_offered = fe
            .get_protocol_features()
            .map_err(vh("GET_PROTOCOL_FEATURES"))?;
        let mut want = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ;
        if opts.reply_ack {
            want |= VhostUserProtocolFeatures::REPLY_ACK;
        }
        if opts.inflight {
            want |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        let protocol = pf_offered & want;
        if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(ClientError::MissingFeature(
                "VHOST_USER_PROTOCOL_F_CONFIG (needed to read the capacity)",
            ));
        }
        fe.set_protocol_features(protocol)
            .map_err(vh("SET_PROTOCOL_FEATURES"))?;
        let max_queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(vh("GET_QUEUE_NUM"))?
        } else {
            1
        };
        let (_, raw) = fe
            .get_config(
                0,
                CONFIG_LEN,
                VhostUserConfigFlags::empty(),
                &[0u8; CONFIG_LEN as usize],
            )
            .map_err(vh("GET_CONFIG"))?;
        let config = BlkConfig::parse(&raw);

        let mut acked = bit(VIRTIO_F_VERSION_1) | PROTOCOL_FEATURES;
        for f in WANTED_BLK_FEATURES {
            acked |= offered & bit(f);
        }
        if opts.event_idx {
            acked |= offered & bit(VIRTIO_RING_F_EVENT_IDX);
        }
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        fe.set_features(acked).map_err(vh("SET_FEATURES"))?;

        let device_queues = if acked & bit(vb::VIRTIO_BLK_F_MQ) != 0 {
            u64::from(config.num_queues.max(1)).min(max_queues.max(1))
        } else {
            1
        };
        let nq = match opts.queues {
            Some(n) if n == 0 || u64::from(n) > device_queues => {
                return Err(ClientError::Options(format!(
                    "{n} queues requested but the device has {device_queues}; start the backend with more queues or ask for fewer"
                )))
            }
            Some(n) => u64::from(n),
            None => device_queues,
        };

        // Like QEMU: get the backend's inflight region and hand it back before the rings start.
        let inflight = if protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            let ask = VhostUserInflight::new(0, 0, nq as u16, opts.queue_size);
            let (region, file) = fe.get_inflight_fd(&ask).map_err(vh("GET_INFLIGHT_FD"))?;
            fe.set_inflight_fd(&region, file.as_raw_fd())
                .map_err(vh("SET_INFLIGHT_FD"))?;
            Some((region, file))
        } else {
            None
        };

        let ring_len = RingLayout::new(opts.queue_size, 0)?
            .len
            .next_multiple_of(PAGE);
        let slots = u64::from(opts.slots);
        let data_len = u64::from(opts.slot_data_size).next_multiple_of(PAGE);
        let meta_len = (slots * SLOT_META).next_multiple_of(PAGE);
        let scratch_len = opts.scratch_size.next_multiple_of(PAGE);
        let per_queue = ring_len + meta_len + slots * data_len + scratch_len;
        let mem = Arc::new(GuestMem::new(per_queue * nq)?);

        let region = mem.region_info();
        fe.set_mem_table(&[region]).map_err(vh("SET_MEM_TABLE"))?;

        let event_idx = acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::new();
        for q in 0..nq {
            let base = q * per_queue;
            let layout = RingLayout::new(opts.queue_size, base)?;
            let host = mem.host_ptr(base, layout.len)?;
            // SAFETY: `host` maps `layout.len` bytes of `mem` (checked by host_ptr), page
            // aligned; `mem` is kept alive by the queue's Arc and no other queue overlaps.
            let ring = unsafe { SplitRing::new(layout, host, event_idx) };
            let efd = |op| {
                EventFd::new(EFD_NONBLOCK).map_err(|source| ClientError::EventFd { op, source })
            };
            let kick = efd("create (kick)")?;
            let call = efd("create (call)")?;
            let qi = q as usize;
            let host_addr = |gpa: u64| mem.host_base() as u64 + gpa;
            fe.set_vring_num(qi, opts.queue_size)
                .map_err(vh("SET_VRING_NUM"))?;
            fe.set_vring_base(qi, 0).map_err(vh("SET_VRING_BASE"))?;
            fe.set_vring_addr(
                qi,
                &VringConfigData {
                    queue_max_size: opts.queue_size,
                    queue_size: opts.queue_size,
                    flags: 0,
                    desc_table_addr: host_addr(layout.desc),
                    used_ring_addr: host_addr(layout.used),
                    avail_ring_addr: host_addr(layout.avail),
                    log_addr: None,
                },
            )
            .map_err(vh("SET_VRING_ADDR"))?;
            fe.set_vring_call(qi, &call).map_err(vh("SET_VRING_CALL"))?;
            fe.set_vring_kick(qi, &kick).map_err(vh("SET_VRING_KICK"))?;
            fe.set_vring_enable(qi, true)
                .map_err(vh("SET_VRING_ENABLE"))?;
            let meta = base + ring_len;
            let data = meta + meta_len;
            let queue = Queue {
                index: qi,
                mem: Arc::clone(&mem),
                ring,
                kick,
                call,
                slots: opts.slots,
                meta,
                data,
                data_len,
                scratch: data + slots * data_len,
                scratch_len,
                kinds: vec![None; opts.slots as usize],
                free: (0..opts.slots).rev().collect(),
                stray: Vec::new(),
                timeout: opts.timeout,
                stats: QueueStats::default(),
            };
            queues.push(Some(queue));
        }
        tracing::debug!(
            offered,
            acked,
            ?protocol,
            queues = nq,
            "vhost-user-blk device started"
        );
        Ok(Self {
            frontend: fe,
            mem,
            config,
            offered,
            acked,
            protocol,
            max_queues,
            queues,
            inflight,
            opts: opts.clone(),
        })
    }

    /// Connect again to a backend at `path` (a restarted one) and resume the device as QEMU
    /// does after a backend crash (`-chardev socket,reconnect=...`): the same features, the
    /// inflight region kept from the first connection, the same guest memory, and every
    /// ring resumed at its used index with the same kick and call eventfds. Nothing is
    /// kicked: what was pending reaches the backend through the inflight region and the
    /// available ring. Every queue must still be in the client (not taken).
    pub fn reconnect(&mut self, path: &Path) -> Result<(), ClientError> {
        let mut fe = Frontend::connect(path, 1).map_err(|e| match e {
            vhost::Error::VhostUserProtocol(source) => ClientError::Connect {
                path: path.to_owned(),
                source,
            },
            other => ClientError::Vhost {
                op: "connect",
                source: other,
            },
        })?;
        fe.set_owner().map_err(vh("SET_OWNER"))?;
        let offered = fe.get_features().map_err(vh("GET_FEATURES"))?;
        if offered & self.acked != self.acked {
            return Err(ClientError::MissingFeature(
                "a feature the first backend offered (the restarted backend offers fewer)",
            ));
        }
        let pf = fe
            .get_protocol_features()
            .map_err(vh("GET_PROTOCOL_FEATURES"))?;
        if !pf.contains(self.protocol) {
            return Err(ClientError::MissingFeature(
                "a protocol feature the first backend offered",
            ));
        }
        fe.set_protocol_features(self.protocol)
            .map_err(vh("SET_PROTOCOL_FEATURES"))?;
        if self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(vh("GET_QUEUE_NUM"))?;
        }
        if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        fe.set_features(self.acked).map_err(vh("SET_FEATURES"))?;
        if let Some((region, file)) = &self.inflight {
            fe.set_inflight_fd(region, file.as_raw_fd())
                .map_err(vh("SET_INFLIGHT_FD"))?;
        }
        fe.set_mem_table(&[self.mem.region_info()])
            .map_err(vh("SET_MEM_TABLE"))?;
        let size = self.opts.queue_size;
        for q in self.queues.iter() {
            let q = q.as_ref().ok_or_else(|| {
                ClientError::Options("a queue was taken out of the client".into())
            })?;
            let i = q.index;
            let layout = q.ring.layout();
            let host_addr = |gpa: u64| self.mem.host_base() as u64 + gpa;
            fe.set_vring_num(i, size).map_err(vh("SET_VRING_NUM"))?;
            fe.set_vring_base(i, q.ring.used_idx())
                .map_err(vh("SET_VRING_BASE"))?;
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: size,
                    queue_size: size,
                    flags: 0,
                    desc_table_addr: host_addr(layout.desc),
                    used_ring_addr: host_addr(layout.used),
                    avail_ring_addr: host_addr(layout.avail),
                    log_addr: None,
                },
            )
            .map_err(vh("SET_VRING_ADDR"))?;
            fe.set_vring_call(i, &q.call)
                .map_err(vh("SET_VRING_CALL"))?;
            fe.set_vring_kick(i, &q.kick)
                .map_err(vh("SET_VRING_KICK"))?;
            fe.set_vring_enable(i, true)
                .map_err(vh("SET_VRING_ENABLE"))?;
        }
        self.frontend = fe;
        Ok(())
    }

    /// The block config space read at start-up.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Virtio features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Virtio features acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Whether the acknowledged features contain virtio feature bit `b`.
    pub fn has_feature(&self, b: u32) -> bool {
        self.acked & bit(b) != 0
    }

    /// Protocol features negotiated.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Queue count the backend announced with GET_QUEUE_NUM (1 without MQ).
    pub fn max_queues(&self) -> u64 {
        self.max_queues
    }

    /// The inflight region the backend shared (INFLIGHT_SHMFD), if negotiated.
    pub fn inflight_file(&self) -> Option<&std::fs::File> {
        self.inflight.as_ref().map(|(_, f)| f)
    }

    /// Number of started queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The shared guest memory.
    pub fn mem(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// Queue `i`, unless it was taken.
    pub fn queue(&mut self, i: usize) -> Option<&mut Queue> {
        self.queues.get_mut(i).and_then(Option::as_mut)
    }

    /// Takes every remaining queue out, to drive them from other threads.
    pub fn take_queues(&mut self) -> Vec<Queue> {
        self.queues.iter_mut().filter_map(Option::take).collect()
    }

    /// The vhost-user connection, for sending further messages (in any order).
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Shuts the socket down in both directions, as a crashing frontend would, while the
    /// guest memory stays mapped.
    pub fn shutdown_socket(&self) {
        let _ =
            nix::sys::socket::shutdown(self.frontend.as_raw_fd(), nix::sys::socket::Shutdown::Both);
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
