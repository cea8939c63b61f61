//! A vhost-user-blk frontend: what a guest driver and QEMU do together, in one process.
//!
//! [`Client::connect`] speaks the vhost-user protocol over a unix socket (through
//! `vhost::vhost_user::Frontend`): it negotiates virtio and protocol features, reads the
//! block config space, shares a memfd as guest memory, lays out one split ring per queue in
//! it and starts the rings. Each [`Queue`] is then driven on its own (one thread per queue,
//! see the `queue` module).

mod queue;

pub use self::queue::{Completion, Queue, QueueStats, Request, STATUS_UNSET};

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use self::queue::QueueLayout;
use crate::blk::{BlkConfig, RequestType, CONFIG_LEN};
use crate::mem::{GuestMem, MemError};
use crate::ring::{RingError, RingLayout, SplitRing};

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES: u64 = 1 << 30;

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
    /// Negotiate VIRTIO_BLK_F_FLUSH and CONFIG_WCE when offered; without them the device
    /// completes a write only once it is on stable storage (a driver without a write cache).
    pub flush: bool,
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
            flush: true,
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
        let frontend = dial(path)?;
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
            let cache = f == vb::VIRTIO_BLK_F_FLUSH || f == vb::VIRTIO_BLK_F_CONFIG_WCE;
            if opts.flush || !cache {
                acked |= offered & bit(f);
            }
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

        let layout = QueueLayout::new(opts)?;
        let mem = Arc::new(GuestMem::new(layout.per_queue() * nq)?);

        let region = mem.region_info();
        fe.set_mem_table(&[region]).map_err(vh("SET_MEM_TABLE"))?;

        let event_idx = acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::new();
        for q in 0..nq {
            let base = q * layout.per_queue();
            let ring_layout = RingLayout::new(opts.queue_size, base)?;
            let host = mem.host_ptr(base, ring_layout.len)?;
            // SAFETY: `host` maps `ring_layout.len` bytes of `mem` (checked by host_ptr), page
            // aligned; `mem` is kept alive by the queue's Arc and no other queue overlaps.
            let ring = unsafe { SplitRing::new(ring_layout, host, event_idx) };
            let queue = Queue::new(q as usize, Arc::clone(&mem), ring, &layout, base, opts)?;
            start_vring(&mut fe, &mem, &queue, opts.queue_size, 0)?;
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
        let mut fe = dial(path)?;
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
        for q in self.queues.iter() {
            let q = q.as_ref().ok_or_else(|| {
                ClientError::Options("a queue was taken out of the client".into())
            })?;
            start_vring(&mut fe, &self.mem, q, self.opts.queue_size, q.used_idx())?;
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

/// Connect a frontend to the socket at `path`.
fn dial(path: &Path) -> Result<Frontend, ClientError> {
    Frontend::connect(path, 1).map_err(|e| match e {
        vhost::Error::VhostUserProtocol(source) => ClientError::Connect {
            path: path.to_owned(),
            source,
        },
        other => ClientError::Vhost {
            op: "connect",
            source: other,
        },
    })
}

/// Hand queue `q`'s ring of `size` entries to the backend, resumed at ring index `base`, with
/// its kick and call eventfds, and enable it.
fn start_vring(
    fe: &mut Frontend,
    mem: &GuestMem,
    q: &Queue,
    size: u16,
    base: u16,
) -> Result<(), ClientError> {
    let i = q.index();
    let layout = q.layout();
    let host_addr = |gpa: u64| mem.host_base() as u64 + gpa;
    fe.set_vring_num(i, size).map_err(vh("SET_VRING_NUM"))?;
    fe.set_vring_base(i, base).map_err(vh("SET_VRING_BASE"))?;
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
    fe.set_vring_call(i, q.call_fd())
        .map_err(vh("SET_VRING_CALL"))?;
    fe.set_vring_kick(i, q.kick_fd())
        .map_err(vh("SET_VRING_KICK"))?;
    fe.set_vring_enable(i, true).map_err(vh("SET_VRING_ENABLE"))
}
