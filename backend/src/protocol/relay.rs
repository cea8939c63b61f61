//! The relay between a frontend and vhost-user-backend's request handler.
//!
//! vhost-user-backend 0.24 answers GET_INFLIGHT_FD and SET_INFLIGHT_FD with an error and offers
//! no hook for them, cannot send backend requests, and maps or polls whatever descriptors a
//! frontend sends. So every message of a connection passes through this relay, which:
//!
//! - answers GET_INFLIGHT_FD and SET_INFLIGHT_FD itself (installing regions in the
//!   connection's [`Inflight`]), adds INFLIGHT_SHMFD to the GET_PROTOCOL_FEATURES reply and
//!   strips it from SET_PROTOCOL_FEATURES; refuses SET_PROTOCOL_FEATURES with a feature that
//!   was never offered (the library takes any bits, which would let a frontend reach
//!   requests of features the device does not have), and GET/SET_INFLIGHT_FD and
//!   SET_BACKEND_REQ_FD from a frontend that did not negotiate INFLIGHT_SHMFD or BACKEND_REQ;
//! - keeps the backend request channel (SET_BACKEND_REQ_FD) for config-change announcements;
//! - refuses queue sizes that are not powers of two, and any memory table, queue size or ring
//!   address after which a configured ring would not lie wholly inside guest memory, and
//!   regions the library would mistranslate or could not tell apart ([`super::rings`]); a
//!   ring whose region is removed (REM_MEM_REG) is parked: disabled in the library until
//!   memory holds it again, then enabled as the frontend last asked;
//! - checks every descriptor before the library sees it ([`super::fds`]): eventfds for kick,
//!   call and error (made non-blocking), guest memory that covers its regions and cannot
//!   shrink (SET_MEM_TABLE, ADD_MEM_REG), a unix stream socket for the backend channel; the
//!   descriptor REM_MEM_REG may carry (the specification lets old frontends send one) is
//!   closed unused; descriptors on messages that take none, and the dirty-log messages
//!   (LOG_SHMFD is not offered), end the connection;
//! - signals a queue's call eventfd when it is set (as libvhost-user does, so a completion a
//!   previous backend wrote before it died reaches the guest), and kicks a queue once when its
//!   kick eventfd is set on a recovered inflight region, so its worker resubmits what was in
//!   flight even if the guest never kicks again.
//!
//! Either direction ending (a closed socket, a refused message, a send that timed out because
//! the frontend stopped reading) shuts both sockets, which ends the connection. The daemon
//! serves one frontend at a time, and one only once its first message has arrived whole (its
//! lobby closes those that say nothing for [`STALL_TIMEOUT`]); a frontend that sends part of a
//! later message and stops is dropped after [`STALL_TIMEOUT`] instead of keeping the next one
//! waiting for ever; a frontend that is idle between whole messages is never dropped.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserInflight, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserVringAddr, VhostUserVringState,
};
use vm_memory::ByteValued;

use super::backend_channel::BackendChannel;
use super::fds;
use super::rings::{Region, Rings};
use super::wire::{self, Header, Message, WireError};
use crate::inflight::{queue_region_size, Inflight, InflightError, InflightRegion};
use crate::io::RateLimiter;
use crate::LockUnpoisoned;

/// `VHOST_USER_VRING_NOFD_MASK`: the vring message carries no descriptor.
const VRING_NOFD: u64 = 1 << 8;
/// `VHOST_USER_VRING_IDX_MASK`.
const VRING_IDX: u64 = 0xff;
/// How long a send to the frontend may block before the frontend counts as gone (it stopped
/// reading its socket).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a frontend may take to send its first message after connecting, and the rest of
/// any message it has started (QEMU sends its first message at once and every message whole).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the relay ended a connection.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A socket failed or closed mid-message.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A send failed.
    #[error("sending to the {0} failed")]
    Send(&'static str, #[source] io::Error),
    /// The frontend sent nothing after connecting.
    #[error("the frontend sent nothing within {0:?} of connecting")]
    Silent(Duration),
    /// A message was refused.
    #[error("{request:?} refused: {why}")]
    Refused {
        /// The request.
        request: u32,
        /// Why.
        why: String,
    },
}

fn refused(m: &Message, why: impl std::fmt::Display) -> RelayError {
    RelayError::Refused {
        request: m.header.request,
        why: why.to_string(),
    }
}

/// What the relay remembers of one connection.
struct Relay {
    outer: UnixStream,
    inner: UnixStream,
    /// Writes to the frontend come from both directions' threads.
    out_lock: Mutex<()>,
    inflight: Arc<Inflight>,
    channel: Arc<BackendChannel>,
    reply_ack: AtomicBool,
    /// The protocol features the frontend acknowledged (SET_PROTOCOL_FEATURES).
    acked: AtomicU64,
    /// The memory table and rings, as the frontend described them (only the forward
    /// direction uses it).
    rings: Mutex<Rings>,
    /// The protocol features the frontend is offered (INFLIGHT_SHMFD included).
    offered: VhostUserProtocolFeatures,
    /// Replies of the library to GET_VRING_BASE messages the relay sent itself.
    dropped_replies: AtomicU32,
    /// The queues (by bit) the frontend enabled at least once on this connection.
    enabled: AtomicU64,
    /// Per queue (by bit): the library's ring is started (a kick eventfd came since it last
    /// stopped; a kick without one leaves it started); the frontend enabled it (SET_VRING_ENABLE,
    /// which the library keeps across RESET_OWNER).
    kicked: AtomicU64,
    enabled_now: AtomicU64,
    /// SET_FEATURES acknowledged VHOST_USER_F_PROTOCOL_FEATURES: rings are enabled by
    /// SET_VRING_ENABLE only (without it the library enables every ring, and refuses
    /// SET_VRING_ENABLE).
    protocol_acked: AtomicBool,
}

/// A running relay: its threads and the sockets to shut down to end it.
#[derive(Debug)]
pub struct RelayHandle {
    threads: Vec<JoinHandle<()>>,
    outer: UnixStream,
    inner: UnixStream,
}

impl RelayHandle {
    /// End the connection now: both sockets are shut down, which unblocks any thread reading
    /// or writing them.
    pub fn shutdown(&self) {
        let _ = self.outer.shutdown(std::net::Shutdown::Both);
        let _ = self.inner.shutdown(std::net::Shutdown::Both);
    }

    /// A second handle on the sockets, to shut them down from another thread.
    pub fn shutdown_handle(&self) -> io::Result<RelayShutdown> {
        Ok(RelayShutdown {
            outer: self.outer.try_clone()?,
            inner: self.inner.try_clone()?,
        })
    }

    /// Wait for both directions to end.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Shuts a relay's sockets down from any thread.
#[derive(Debug)]
pub struct RelayShutdown {
    outer: UnixStream,
    inner: UnixStream,
}

impl RelayShutdown {
    /// End the connection now.
    pub fn shutdown(&self) {
        let _ = self.outer.shutdown(std::net::Shutdown::Both);
        let _ = self.inner.shutdown(std::net::Shutdown::Both);
    }
}

/// Relay `outer` (the frontend) to `inner` (vhost-user-backend's end) until either side
/// closes; both sockets are shut down when it ends. `rings` describes the device's queues,
/// `offered` the protocol features the library offers.
pub fn start(
    outer: UnixStream,
    inner: UnixStream,
    inflight: Arc<Inflight>,
    channel: Arc<BackendChannel>,
    rings: Rings,
    offered: VhostUserProtocolFeatures,
) -> io::Result<RelayHandle> {
    outer.set_write_timeout(Some(SEND_TIMEOUT))?;
    let handle_outer = outer.try_clone()?;
    let handle_inner = inner.try_clone()?;
    let r = Arc::new(Relay {
        outer,
        inner,
        out_lock: Mutex::new(()),
        inflight,
        channel,
        reply_ack: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        rings: Mutex::new(rings),
        offered: offered | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        dropped_replies: AtomicU32::new(0),
        enabled: AtomicU64::new(0),
        kicked: AtomicU64::new(0),
        enabled_now: AtomicU64::new(0),
        protocol_acked: AtomicBool::new(false),
    });
    // One thread per direction; when either ends, both sockets are shut down so the other
    // ends too.
    let spawn = |name: &str, run: fn(&Relay) -> Result<(), RelayError>| {
        let r = r.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Err(e) = run(&r) {
                    match e {
                        RelayError::Refused { .. }
                        | RelayError::Silent(_)
                        | RelayError::Wire(WireError::Stalled(_)) => refusal_warn(&e),
                        _ => debug!("relay ended: {e}"),
                    }
                }
                let _ = r.outer.shutdown(std::net::Shutdown::Both);
                let _ = r.inner.shutdown(std::net::Shutdown::Both);
            })
    };
    let threads = vec![
        spawn("vhost-relay-in", Relay::forward)?,
        spawn("vhost-relay-out", Relay::backward)?,
    ];
    Ok(RelayHandle {
        threads,
        outer: handle_outer,
        inner: handle_inner,
    })
}

/// Refusals are logged with a budget shared by all connections: a frontend that reconnects
/// and misbehaves in a loop cannot flood the log.
fn refusal_warn(e: &RelayError) {
    static LIMITER: Mutex<Option<RateLimiter>> = Mutex::new(None);
    let mut l = LIMITER.lock_unpoisoned();
    let allowed = l
        .get_or_insert_with(|| RateLimiter::alone(crate::io::WARNINGS_PER_SECOND))
        .allow();
    if let Some(suppressed) = allowed {
        if suppressed > 0 {
            warn!("{suppressed} similar messages suppressed");
        }
        warn!("connection closed: {e}");
    }
}

/// Queues per second whose first enable on a connection is logged, for the whole process: a
/// frontend that reconnects in a loop would log each time.
const LOGGED_ENABLES_PER_SECOND: u32 = 32;

fn enable_logged() -> bool {
    static LIMITER: Mutex<Option<RateLimiter>> = Mutex::new(None);
    let mut l = LIMITER.lock_unpoisoned();
    l.get_or_insert_with(|| RateLimiter::alone(LOGGED_ENABLES_PER_SECOND))
        .allow()
        .is_some()
}

/// Queue `index`'s bit in the relay's per-queue bitmaps; none for an index past 63 (the
/// library refuses such queues).
fn queue_bit(index: u32) -> u64 {
    1u64.checked_shl(index).unwrap_or(0)
}

/// VHOST_USER_F_PROTOCOL_FEATURES, in SET_FEATURES.
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

/// A SET_VRING_ENABLE of the relay's own, with no reply asked.
fn enable_message(queue: u16, on: bool) -> Message {
    let body = VhostUserVringState::new(u32::from(queue), u32::from(on));
    Message::new(
        Header::request(
            FrontendReq::SET_VRING_ENABLE as u32,
            VhostUserHeaderFlag::empty(),
            0,
        ),
        body.as_slice().to_vec(),
        Vec::new(),
    )
}

/// Write 1 to an eventfd (non-blocking: a counter at its maximum is already signalled).
fn signal(fd: &OwnedFd) {
    let _ = nix::unistd::write(fd.as_fd(), &1u64.to_ne_bytes());
}

impl Relay {
    fn to_frontend(&self, m: &Message) -> Result<(), RelayError> {
        let _g = self.out_lock.lock_unpoisoned();
        wire::send(&self.outer, m).map_err(|e| RelayError::Send("frontend", e))
    }

    fn to_library(&self, m: &Message) -> Result<(), RelayError> {
        wire::send(&self.inner, m).map_err(|e| RelayError::Send("library", e))
    }

    /// Before RESET_OWNER: stops every configured ring in the library as GET_VRING_BASE does
    /// (its replies are dropped). The library forgets only the negotiated features at
    /// RESET_OWNER and would go on serving the rings, so a frontend setting a ring up again
    /// (new addresses, then a new base) could have it served half-changed, and stopped as
    /// broken for good.
    fn stop_rings(&self) -> Result<(), RelayError> {
        for index in self.rings.lock_unpoisoned().configured() {
            let body = VhostUserVringState::new(index, 0);
            let m = Message::new(
                Header::request(
                    FrontendReq::GET_VRING_BASE as u32,
                    VhostUserHeaderFlag::empty(),
                    0,
                ),
                body.as_slice().to_vec(),
                Vec::new(),
            );
            self.dropped_replies.fetch_add(1, Ordering::Relaxed);
            self.to_library(&m)?;
        }
        Ok(())
    }

    /// Parked rings that memory holds again: enabled in the library again, those the frontend
    /// has enabled (a kick that came meanwhile is still pending on the kick eventfd).
    fn unpark(&self, queues: Vec<u32>) -> Result<(), RelayError> {
        for q in queues {
            debug!("queue {q} unparked: memory holds its ring again");
            self.restore_enable(q)?;
        }
        Ok(())
    }

    /// The library's enable state of queue `q` back to the frontend's (after the relay
    /// disabled it to park it).
    fn restore_enable(&self, q: u32) -> Result<(), RelayError> {
        if self.enabled_now.load(Ordering::Relaxed) & queue_bit(q) != 0 {
            self.to_library(&enable_message(q as u16, true))?;
        }
        Ok(())
    }

    /// The refusal of `req` for `why`: acknowledged as failed first when the frontend asked
    /// for an acknowledgement (an error sending that is the error then).
    fn refuse(&self, req: &Message, why: impl std::fmt::Display) -> RelayError {
        match self.ack(req, false) {
            Ok(()) => refused(req, why),
            Err(e) => e,
        }
    }

    fn ack(&self, req: &Message, ok: bool) -> Result<(), RelayError> {
        if req.header.needs_reply() && self.reply_ack.load(Ordering::Relaxed) {
            self.to_frontend(&Message::ack(req.header.request, ok))?;
        }
        Ok(())
    }

    /// The next message from the frontend: the first one within [`STALL_TIMEOUT`] of
    /// connecting, and each one whole within [`STALL_TIMEOUT`] of its first byte.
    fn next_message(&self, first: bool) -> Result<Option<Message>, RelayError> {
        if first {
            self.outer
                .set_read_timeout(Some(STALL_TIMEOUT))
                .map_err(|e| RelayError::Wire(WireError::Io(e)))?;
        }
        let m = match wire::recv_within(&self.outer, Some(STALL_TIMEOUT)) {
            Err(e) if first && wire::is_timeout(&e) => {
                return Err(RelayError::Silent(STALL_TIMEOUT))
            }
            m => m?,
        };
        if first {
            self.outer
                .set_read_timeout(None)
                .map_err(|e| RelayError::Wire(WireError::Io(e)))?;
        }
        Ok(m)
    }

    /// Frontend to library.
    fn forward(&self) -> Result<(), RelayError> {
        let mut first = true;
        while let Some(m) = self.next_message(first)? {
            first = false;
            let Some(req) = m.header.frontend_req() else {
                // Unknown code: the library answers it (it fails the connection).
                if !m.fds.is_empty() {
                    return Err(refused(&m, "descriptors on an unknown request"));
                }
                self.to_library(&m)?;
                continue;
            };
            let needs = match req {
                FrontendReq::GET_INFLIGHT_FD | FrontendReq::SET_INFLIGHT_FD => {
                    Some(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
                }
                FrontendReq::SET_BACKEND_REQ_FD => Some(VhostUserProtocolFeatures::BACKEND_REQ),
                FrontendReq::GET_MAX_MEM_SLOTS
                | FrontendReq::ADD_MEM_REG
                | FrontendReq::REM_MEM_REG => Some(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
                _ => None,
            };
            if let Some(f) = needs {
                if self.acked.load(Ordering::Relaxed) & f.bits() == 0 {
                    return Err(self.refuse(
                        &m,
                        format!("{req:?} without the protocol feature {f:?} negotiated"),
                    ));
                }
            }
            match req {
                FrontendReq::GET_INFLIGHT_FD => self.get_inflight(&m)?,
                FrontendReq::SET_INFLIGHT_FD => self.set_inflight(m)?,
                FrontendReq::SET_BACKEND_REQ_FD => self.set_backend_req(m)?,
                FrontendReq::SET_PROTOCOL_FEATURES => self.set_protocol_features(m)?,
                FrontendReq::SET_FEATURES if m.fds.is_empty() => {
                    let acked = m.u64_body().is_some_and(|f| f & PROTOCOL_FEATURES_BIT != 0);
                    if !acked && self.rings.lock_unpoisoned().any_parked() {
                        // Without protocol features the library enables every ring, parked
                        // ones too, and could not be told to disable them again.
                        return Err(self.refuse(
                            &m,
                            "protocol features dropped while a ring's memory is removed",
                        ));
                    }
                    self.protocol_acked.store(acked, Ordering::Relaxed);
                    self.to_library(&m)?
                }
                FrontendReq::SET_VRING_KICK
                | FrontendReq::SET_VRING_CALL
                | FrontendReq::SET_VRING_ERR => self.vring_fd(req, m)?,
                FrontendReq::SET_MEM_TABLE => self.mem_table(m)?,
                FrontendReq::SET_VRING_NUM | FrontendReq::SET_VRING_ADDR if !m.fds.is_empty() => {
                    return Err(refused(&m, "descriptors on a request that takes none"))
                }
                FrontendReq::SET_VRING_NUM => self.vring_num(m)?,
                FrontendReq::SET_VRING_ADDR => self.vring_addr(m)?,
                FrontendReq::GET_VRING_BASE if m.fds.is_empty() => {
                    let mut parked = None;
                    if let Some(s) = m.body_as::<VhostUserVringState>() {
                        if self.rings.lock_unpoisoned().stop(s.index) {
                            parked = Some(s.index);
                        }
                        // The library drops the ring's kick.
                        let bit = queue_bit(s.index);
                        self.kicked.fetch_and(!bit, Ordering::Relaxed);
                    }
                    self.to_library(&m)?;
                    // Stopped, a parked ring is enabled as the frontend left it.
                    if let Some(q) = parked {
                        self.restore_enable(q)?;
                    }
                }
                FrontendReq::RESET_OWNER if m.fds.is_empty() => {
                    self.stop_rings()?;
                    // The library stops the rings (above) and forgets the negotiated
                    // features and protocol features, but keeps each ring's size, addresses
                    // and enabled state: parked rings get the frontend's back while
                    // SET_VRING_ENABLE is still allowed.
                    let parked = self.rings.lock_unpoisoned().reset();
                    for q in parked {
                        self.restore_enable(q)?;
                    }
                    self.kicked.store(0, Ordering::Relaxed);
                    self.protocol_acked.store(false, Ordering::Relaxed);
                    self.acked.store(0, Ordering::Relaxed);
                    self.reply_ack.store(false, Ordering::Relaxed);
                    self.to_library(&m)?
                }
                FrontendReq::ADD_MEM_REG => self.add_mem_reg(m)?,
                FrontendReq::REM_MEM_REG => self.rem_mem_reg(m)?,
                FrontendReq::SET_LOG_BASE | FrontendReq::SET_LOG_FD => {
                    return Err(refused(&m, "dirty-page logging is not offered"))
                }
                _ if !m.fds.is_empty() => {
                    return Err(refused(&m, "descriptors on a request that takes none"))
                }
                FrontendReq::SET_VRING_ENABLE => {
                    let state = m.body_as::<VhostUserVringState>();
                    let parked = |v: &VhostUserVringState| {
                        v.num <= 1 && self.rings.lock_unpoisoned().is_parked(v.index)
                    };
                    if let Some(v) = state.filter(parked) {
                        // Kept disabled in the library until memory holds the ring again,
                        // which then enables it as the frontend last asked. The library
                        // still gets the message (as a disable) and answers it, so replies
                        // keep their order.
                        let bit = queue_bit(v.index);
                        if v.num == 1 {
                            self.enabled_now.fetch_or(bit, Ordering::Relaxed);
                        } else {
                            self.enabled_now.fetch_and(!bit, Ordering::Relaxed);
                        }
                        let off = VhostUserVringState::new(v.index, 0);
                        self.to_library(&Message::new(
                            m.header,
                            off.as_slice().to_vec(),
                            Vec::new(),
                        ))?;
                        continue;
                    }
                    self.to_library(&m)?;
                    // The last step of QEMU's device start: from here on the frontend
                    // serves the guest through this backend (crash tests wait for it).
                    if let Some(v) = m.body_as::<vhost::vhost_user::message::VhostUserVringState>()
                    {
                        let (index, num) = (v.index, v.num);
                        // Once per queue and connection: a frontend that toggles a queue
                        // again and again does not flood the log.
                        let bit = queue_bit(index);
                        if num == 1 {
                            self.enabled_now.fetch_or(bit, Ordering::Relaxed);
                        } else {
                            self.enabled_now.fetch_and(!bit, Ordering::Relaxed);
                        }
                        let first = num == 1
                            && bit != 0
                            && self.enabled.fetch_or(bit, Ordering::Relaxed) & bit == 0;
                        if first && enable_logged() {
                            info!("frontend enabled queue {index}");
                        } else if first {
                            debug!(
                                "frontend enabled queue {index} (not logged: too many a second)"
                            );
                        } else if num == 1 {
                            debug!("queue {index} enabled again");
                        }
                    }
                }
                _ => self.to_library(&m)?,
            }
        }
        Ok(())
    }

    /// Library to frontend; GET_PROTOCOL_FEATURES replies gain INFLIGHT_SHMFD.
    fn backward(&self) -> Result<(), RelayError> {
        while let Some(mut m) = wire::recv(&self.inner)? {
            if m.header.frontend_req() == Some(FrontendReq::GET_PROTOCOL_FEATURES)
                && m.header.is_reply()
            {
                if let Some(f) = m.u64_body() {
                    let f = f | VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
                    m.set_body(f.to_le_bytes().to_vec());
                }
            }
            if m.header.frontend_req() == Some(FrontendReq::GET_VRING_BASE)
                && m.header.is_reply()
                && self
                    .dropped_replies
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            {
                continue;
            }
            self.to_frontend(&m)?;
        }
        Ok(())
    }

    fn set_protocol_features(&self, mut m: Message) -> Result<(), RelayError> {
        let f = m.u64_body().unwrap_or(0);
        let unknown = f & !self.offered.bits();
        if unknown != 0 {
            return Err(self.refuse(
                &m,
                format!("protocol features {unknown:#x} were never offered"),
            ));
        }
        self.reply_ack.store(
            f & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0,
            Ordering::Relaxed,
        );
        self.acked.store(f, Ordering::Relaxed);
        if m.body.len() >= 8 {
            let stripped = f & !VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
            let mut b = m.body.clone();
            b[..8].copy_from_slice(&stripped.to_le_bytes());
            m.set_body(b);
        }
        self.to_library(&m)
    }

    fn get_inflight(&self, m: &Message) -> Result<(), RelayError> {
        let ask: VhostUserInflight = m
            .body_as()
            .ok_or_else(|| refused(m, "GET_INFLIGHT_FD without a body"))?;
        let (nq, qs) = (ask.num_queues, ask.queue_size);
        if let Some(why) = self.inflight.misfit(nq, qs) {
            return Err(refused(m, why));
        }
        let (region, file) = InflightRegion::create(nq, qs).map_err(|e| refused(m, e))?;
        let size = queue_region_size(qs) * u64::from(nq);
        self.inflight.install(region, false);
        let reply = VhostUserInflight::new(size, 0, nq, qs);
        self.to_frontend(&Message::reply(
            m.header.request,
            reply.as_slice().to_vec(),
            vec![file.into()],
        ))
    }

    fn set_inflight(&self, mut m: Message) -> Result<(), RelayError> {
        let region: Option<VhostUserInflight> = m.body_as();
        let opened = match (region, m.fds.pop(), m.fds.is_empty()) {
            (Some(r), Some(fd), true) => {
                let (nq, qs) = (r.num_queues, r.queue_size);
                if self.inflight.fits(nq, qs) {
                    InflightRegion::open(&File::from(fd), r.mmap_size, r.mmap_offset, nq, qs)
                } else {
                    Err(InflightError::BadSize {
                        size: r.mmap_size,
                        queues: nq,
                        queue_size: qs,
                    })
                }
            }
            _ => {
                return Err(refused(
                    &m,
                    "SET_INFLIGHT_FD needs a region and one descriptor",
                ))
            }
        };
        match opened {
            Ok(region) => {
                debug!("inflight region installed");
                self.inflight.install(region, true);
                self.ack(&m, true)
            }
            Err(e) => Err(self.refuse(&m, e)),
        }
    }

    fn set_backend_req(&self, mut m: Message) -> Result<(), RelayError> {
        let (Some(fd), true) = (m.fds.pop(), m.fds.is_empty()) else {
            return Err(refused(&m, "SET_BACKEND_REQ_FD needs one descriptor"));
        };
        fds::unix_stream(fd.as_fd()).map_err(|e| self.refuse(&m, e))?;
        let reply_ack = self.reply_ack.load(Ordering::Relaxed);
        match self.channel.set(UnixStream::from(fd), reply_ack) {
            Ok(()) => {
                debug!("backend request channel set up");
                self.ack(&m, true)
            }
            Err(e) => Err(self.refuse(&m, e)),
        }
    }

    /// SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR: an eventfd, or none with the NOFD flag.
    fn vring_fd(&self, req: FrontendReq, m: Message) -> Result<(), RelayError> {
        let v = m.u64_body().ok_or_else(|| refused(&m, "no vring index"))?;
        let queue = (v & VRING_IDX) as u16;
        let what = match req {
            FrontendReq::SET_VRING_KICK => "kick",
            FrontendReq::SET_VRING_CALL => "call",
            _ => "error",
        };
        let fd = match (v & VRING_NOFD != 0, m.fds.len()) {
            (true, 0) => None,
            (false, 1) => Some(&m.fds[0]),
            (nofd, n) => {
                return Err(refused(
                    &m,
                    format!(
                        "{n} descriptors with the NOFD flag {}",
                        if nofd { "set" } else { "clear" }
                    ),
                ))
            }
        };
        let kept = match fd {
            Some(fd) => {
                fds::eventfd(fd.as_fd(), what).map_err(|e| refused(&m, e))?;
                fd.try_clone().ok()
            }
            None => None,
        };
        if req == FrontendReq::SET_VRING_KICK && fd.is_some() {
            // The library restarts a stopped ring at the addresses it had.
            let checked = self.rings.lock_unpoisoned().restart(u32::from(queue));
            checked.map_err(|e| self.refuse(&m, e))?;
        }
        let bit = queue_bit(u32::from(queue));
        if req == FrontendReq::SET_VRING_KICK {
            let running = self.kicked.load(Ordering::Relaxed) & bit != 0;
            // A parked ring stays disabled in the library whatever the frontend enabled.
            let enabled = self.enabled_now.load(Ordering::Relaxed) & bit != 0
                && !self.rings.lock_unpoisoned().is_parked(u32::from(queue));
            if running && !self.protocol_acked.load(Ordering::Relaxed) {
                // The library would go on watching the old kick, and cannot be told to stop
                // (SET_VRING_ENABLE needs protocol features).
                return Err(self.refuse(
                    &m,
                    "a new kick for a running ring without protocol features (stop the ring \
                     first: GET_VRING_BASE)",
                ));
            }
            if running && enabled {
                // A new kick (or none) for a running ring: the library would go on watching
                // the old one, and the queue's worker would end at the next kick it reads from
                // the new, empty one, or spin on the old one. Disabled around the change, the
                // ring is watched anew.
                self.to_library(&enable_message(queue, false))?;
                self.to_library(&m)?;
                self.to_library(&enable_message(queue, true))?;
            } else {
                // A disabled ring's kick is not watched; enabling it watches the new one.
                self.to_library(&m)?;
            }
            if fd.is_some() {
                self.kicked.fetch_or(bit, Ordering::Relaxed);
            }
        } else {
            self.to_library(&m)?;
        }
        match (req, kept) {
            // As libvhost-user: in case of an I/O hang after reconnecting, a completion the
            // previous backend wrote before it died reaches the guest now.
            (FrontendReq::SET_VRING_CALL, Some(call)) => signal(&call),
            // The worker recovers the queue on its first event.
            (FrontendReq::SET_VRING_KICK, Some(kick)) if self.inflight.needs_recovery(queue) => {
                signal(&kick)
            }
            _ => {}
        }
        Ok(())
    }

    /// SET_VRING_NUM: a size the ring format allows, that a configured ring still fits with.
    fn vring_num(&self, m: Message) -> Result<(), RelayError> {
        // A short body is the library's to refuse.
        if let Some(s) = m.body_as::<VhostUserVringState>() {
            let checked = self.rings.lock_unpoisoned().set_num(s.index, s.num);
            checked.map_err(|e| self.refuse(&m, e))?;
        }
        self.to_library(&m)
    }

    /// SET_VRING_ADDR: rings wholly inside guest memory.
    fn vring_addr(&self, m: Message) -> Result<(), RelayError> {
        if let Some(a) = m.body_as::<VhostUserVringAddr>() {
            let (index, addrs) = (a.index, [a.descriptor, a.available, a.used]);
            let checked = self.rings.lock_unpoisoned().set_addrs(index, addrs);
            checked.map_err(|e| self.refuse(&m, e))?;
        }
        self.to_library(&m)
    }

    /// SET_MEM_TABLE: one descriptor per region, each able to back its region.
    fn mem_table(&self, m: Message) -> Result<(), RelayError> {
        let hdr: VhostUserMemory = m.body_as().ok_or_else(|| refused(&m, "no memory table"))?;
        let n = hdr.num_regions as usize;
        let size = std::mem::size_of::<VhostUserMemoryRegion>();
        let start = std::mem::size_of::<VhostUserMemory>();
        if n == 0 || n > wire::MAX_FDS || m.fds.len() != n || m.body.len() != start + n * size {
            return Err(refused(
                &m,
                format!("{n} regions with {} descriptors", m.fds.len()),
            ));
        }
        let mut table = Vec::with_capacity(n);
        for (i, fd) in m.fds.iter().enumerate() {
            let off = start + i * size;
            let r = VhostUserMemoryRegion::from_slice(&m.body[off..off + size])
                .copied()
                .ok_or_else(|| refused(&m, "short region"))?;
            let region = Region::checked(r.guest_phys_addr, r.user_addr, r.memory_size)
                .map_err(|e| refused(&m, format!("region {i}: {e}")))?;
            // A descriptor borrowed as a File, without taking it from the message.
            let file = File::from(fd.try_clone().map_err(|e| refused(&m, e))?);
            fds::guest_memory(&file, r.mmap_offset, r.memory_size)
                .map_err(|e| refused(&m, format!("region {i}: {e}")))?;
            table.push(region);
        }
        let checked = self.rings.lock_unpoisoned().set_table(table);
        let back = checked.map_err(|e| self.refuse(&m, e))?;
        self.to_library(&m)?;
        self.unpark(back)
    }

    /// ADD_MEM_REG: one descriptor, able to back the region, and a region the table has room
    /// for.
    fn add_mem_reg(&self, m: Message) -> Result<(), RelayError> {
        if m.fds.len() != 1 {
            return Err(refused(
                &m,
                format!("ADD_MEM_REG with {} descriptors", m.fds.len()),
            ));
        }
        let (r, region) = single_region(&m)?;
        let file = File::from(m.fds[0].try_clone().map_err(|e| refused(&m, e))?);
        fds::guest_memory(&file, r.mmap_offset, r.memory_size).map_err(|e| refused(&m, e))?;
        let checked = self.rings.lock_unpoisoned().add(region);
        let back = checked.map_err(|e| self.refuse(&m, e))?;
        debug!(
            "memory region added: {:#x} bytes at guest address {:#x}",
            region.size, region.guest
        );
        self.to_library(&m)?;
        self.unpark(back)
    }

    /// REM_MEM_REG: a region of the table; rings it holds part of are parked (disabled in the
    /// library before it goes). A descriptor sent with it is closed unused.
    fn rem_mem_reg(&self, mut m: Message) -> Result<(), RelayError> {
        if m.fds.len() > 1 {
            return Err(refused(
                &m,
                format!("REM_MEM_REG with {} descriptors", m.fds.len()),
            ));
        }
        m.fds.clear();
        let (_, region) = single_region(&m)?;
        // Parking needs SET_VRING_ENABLE, which needs protocol features.
        let park = self.protocol_acked.load(Ordering::Relaxed);
        let checked = self
            .rings
            .lock_unpoisoned()
            .remove(region.guest, region.size, park);
        let parked = checked.map_err(|e| self.refuse(&m, e))?;
        debug!(
            "memory region removed: {:#x} bytes at guest address {:#x}",
            region.size, region.guest
        );
        // Disabled before the library drops the region: no worker reads the ring after.
        for q in parked {
            debug!("queue {q} parked: its ring lies in the removed region");
            self.to_library(&enable_message(q as u16, false))?;
        }
        self.to_library(&m)
    }
}

/// The region of an ADD_MEM_REG or REM_MEM_REG body (a u64 of padding, then the region).
fn single_region(m: &Message) -> Result<(VhostUserMemoryRegion, Region), RelayError> {
    const PAD: usize = std::mem::size_of::<u64>();
    let size = std::mem::size_of::<VhostUserMemoryRegion>();
    let r = (m.body.len() == PAD + size)
        .then(|| VhostUserMemoryRegion::from_slice(&m.body[PAD..]).copied())
        .flatten()
        .ok_or_else(|| refused(m, format!("a body of {} bytes", m.body.len())))?;
    let region = Region::checked(r.guest_phys_addr, r.user_addr, r.memory_size)
        .map_err(|e| refused(m, e))?;
    Ok((r, region))
}
