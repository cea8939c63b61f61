//! A vhost-user frontend that sends anything, for attacks on a backend.
//!
//! [`Client`](crate::Client) behaves like QEMU; [`RawFrontend`] does what a hostile client
//! that can connect to the socket does: any request code, flags, size field and body bytes,
//! half messages, and any number of descriptors of any kind (more than the protocol's 32,
//! blocking eventfds, pipes, sockets, memfds shorter than the region they claim to back, files
//! on tmpfs), with every reply read under a time-out so a backend that stops answering fails
//! the caller instead of hanging it. Bodies are the `vhost` crate's message structs
//! ([`vhost::vhost_user::message`]) as bytes; the crate keeps its header type private, so the
//! 12-byte header is framed here.
//!
//! On top of it, [`RawDevice`] sets a device up step by step (features, protocol features with
//! or without REPLY_ACK and EVENT_IDX, a memory table from a memfd or a file, each vring's
//! size, base, addresses and eventfds), each step a public function, so a test can stop
//! anywhere or put a ring into any state: [`RawQueue`] writes the available and used rings
//! through bounds-checked guest memory writes, whatever the ring's addresses (an available
//! index far ahead of the used one, rings at addresses the backend cannot read).
//!
//! [`fds`] makes the odd descriptors such tests send.
//!
//! Parts, bottom up (each imports only from the ones before it, and from the crate's lower
//! layers: [`blk`](crate::blk), [`mem`](crate::mem), [`ring`](crate::ring),
//! [`client`](crate::client)):
//! - [`fds`]: the odd descriptors; it imports nothing from its siblings;
//! - the module itself: the errors ([`RawError`]), the message framing ([`Header`], [`Reply`],
//!   [`MemRegion`], [`VringAddrs`]) and the connection ([`RawFrontend`]);
//! - `queue`: one vring's state in guest memory ([`RawQueue`]), with [`RawError`] from here;
//! - `device`: the step-by-step set-up ([`Negotiation`], [`RawDevice`]) over a [`RawFrontend`]
//!   and its [`RawQueue`]s.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight,
    VhostUserMemory, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion,
    VhostUserU64, VhostUserVringAddr, VhostUserVringAddrFlags, VhostUserVringState,
};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::mem::{GuestMem, MemError};
use crate::ring::RingError;

mod device;
pub mod fds;
mod queue;

pub use device::{Negotiation, RawDevice};
pub use queue::RawQueue;

/// The protocol version carried in every header's flags.
pub const VERSION: u32 = 0x1;
/// Bytes of a message header (request, flags, size).
pub const HEADER_SIZE: usize = std::mem::size_of::<Header>();
/// `VHOST_USER_VRING_NOFD_MASK`: a vring eventfd message that carries no descriptor (the
/// `vhost` crate has no constant for it).
pub const VRING_NOFD: u64 = 1 << 8;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Most descriptors the kernel passes in one SCM_RIGHTS message (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;
/// Time-out of replies and sends unless [`RawFrontend::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the raw frontend.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// The socket failed (or a send timed out because the backend stopped reading).
    #[error("vhost-user socket error")]
    Io(#[from] io::Error),
    /// No complete reply arrived in time.
    #[error("no reply from the backend within {0:?}")]
    Timeout(Duration),
    /// The backend closed the connection.
    #[error("the backend closed the connection")]
    Closed,
    /// The reply is for another request than the one sent.
    #[error("reply with code {got} to request {sent}")]
    WrongReply {
        /// Request code sent.
        sent: u32,
        /// Request code of the reply.
        got: u32,
    },
    /// The reply's body is too short for what it must hold.
    #[error("reply to request {request} has {len} body bytes, {want} expected")]
    ShortReply {
        /// Request code.
        request: u32,
        /// Bytes received.
        len: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The backend acknowledged a request with a failure (REPLY_ACK value not 0).
    #[error("the backend refused request {request} (ack value {value})")]
    Refused {
        /// Request code.
        request: u32,
        /// The value of its acknowledgement.
        value: u64,
    },
    /// A reply that must carry a descriptor carried none.
    #[error("reply to request {0} carries no descriptor")]
    NoFd(u32),
    /// Guest memory could not be written.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// A ring could not be laid out.
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// A message header, as on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Flags: version, REPLY, NEED_REPLY, and whatever else a test sets.
    pub flags: u32,
    /// Body size in bytes (whatever the body really is).
    pub size: u32,
}

// SAFETY: three u32 fields, no padding: every byte pattern is a valid value.
unsafe impl ByteValued for Header {}

impl Header {
    /// Whether the REPLY flag is set.
    pub fn is_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::REPLY.bits() != 0
    }
}

/// A message received from the backend.
#[derive(Debug)]
pub struct Reply {
    /// Its header.
    pub header: Header,
    /// Its body (`header.size` bytes).
    pub body: Vec<u8>,
    /// The descriptors sent with it.
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    /// The body read as `T`, when it is long enough.
    pub fn body_as<T: ByteValued>(&self) -> Result<T, RawError> {
        let want = std::mem::size_of::<T>();
        self.body
            .get(..want)
            .and_then(|b| T::from_slice(b).copied())
            .ok_or(RawError::ShortReply {
                request: self.header.request,
                len: self.body.len(),
                want,
            })
    }

    /// The body as a `VhostUserU64` value.
    pub fn u64(&self) -> Result<u64, RawError> {
        self.body_as::<VhostUserU64>().map(|v| v.value)
    }
}

/// One region of a memory table: where it sits in guest physical and frontend virtual
/// address space, and the descriptor (and offset in it) that is said to back it.
#[derive(Clone, Copy, Debug)]
pub struct MemRegion {
    /// Guest physical address.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub memory_size: u64,
    /// Frontend virtual address (what vring addresses are given in).
    pub user_addr: u64,
    /// Offset of the region in the descriptor.
    pub mmap_offset: u64,
    /// The descriptor sent with it.
    pub fd: RawFd,
}

impl MemRegion {
    /// All of `mem` at guest address 0, at its host address in this process.
    pub fn of(mem: &GuestMem) -> MemRegion {
        MemRegion {
            guest_phys_addr: 0,
            memory_size: mem.len(),
            user_addr: mem.host_base() as u64,
            mmap_offset: 0,
            fd: mem.raw_fd(),
        }
    }

    fn wire(&self) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(
            self.guest_phys_addr,
            self.memory_size,
            self.user_addr,
            self.mmap_offset,
        )
    }

    /// The body of ADD_MEM_REG and REM_MEM_REG for this region.
    pub fn single(&self) -> VhostUserSingleMemoryRegion {
        VhostUserSingleMemoryRegion::new(
            self.guest_phys_addr,
            self.memory_size,
            self.user_addr,
            self.mmap_offset,
        )
    }
}

/// The three ring addresses of a vring, in frontend virtual addresses, plus its flags and
/// log address.
#[derive(Clone, Copy, Debug, Default)]
pub struct VringAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Used ring.
    pub used: u64,
    /// Available ring.
    pub avail: u64,
    /// Dirty-log address.
    pub log: u64,
    /// `VhostUserVringAddrFlags` bits (any value).
    pub flags: u32,
}

/// A connection to a vhost-user backend on which anything can be sent.
#[derive(Debug)]
pub struct RawFrontend {
    sock: UnixStream,
    /// REPLY_ACK was negotiated: setting requests ask for an acknowledgement and wait for it.
    reply_ack: bool,
    timeout: Duration,
}

impl RawFrontend {
    /// Connects to the backend listening at `path`.
    pub fn connect(path: &Path) -> io::Result<RawFrontend> {
        UnixStream::connect(path).and_then(RawFrontend::from_stream)
    }

    /// Connects, retrying while the backend is not listening yet or still busy with a previous
    /// connection, for up to `limit`.
    pub fn connect_retry(path: &Path, limit: Duration) -> io::Result<RawFrontend> {
        let deadline = Instant::now() + limit;
        loop {
            match RawFrontend::connect(path) {
                Ok(f) => return Ok(f),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Uses an already connected socket.
    pub fn from_stream(sock: UnixStream) -> io::Result<RawFrontend> {
        sock.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(RawFrontend {
            sock,
            reply_ack: false,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The socket.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Time-out of every reply and of every send (a send blocks while the backend does not
    /// read).
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.sock.set_write_timeout(Some(timeout))?;
        self.timeout = timeout;
        Ok(())
    }

    /// Whether setting requests ask for an acknowledgement (NEED_REPLY) and wait for it; set by
    /// [`Self::set_protocol_features`] from whether REPLY_ACK is in the features sent.
    pub fn set_reply_ack(&mut self, on: bool) {
        self.reply_ack = on;
    }

    /// Whether setting requests wait for an acknowledgement.
    pub fn reply_ack(&self) -> bool {
        self.reply_ack
    }

    /// Sends one message exactly as given: `header`, then `body` (whatever `header.size`
    /// says), with `fds` attached to its first byte (any number the kernel takes, up to
    /// [`SCM_MAX_FD`]; each is duplicated into the receiver).
    pub fn send_message(&self, header: Header, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut bytes = header.as_slice().to_vec();
        bytes.extend_from_slice(body);
        self.send_bytes_with_fds(&bytes, fds)
    }

    /// Sends raw bytes (half a message, two messages at once, garbage) with `fds` attached to
    /// the first byte. A stream socket carries descriptors only with data: descriptors with
    /// no bytes are an error.
    pub fn send_bytes_with_fds(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        if bytes.is_empty() && !fds.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptors need at least one byte to travel with",
            ));
        }
        let mut sent = 0;
        let cmsg = [ControlMessage::ScmRights(fds)];
        while sent < bytes.len() {
            let iov = [io::IoSlice::new(&bytes[sent..])];
            let c: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
                &cmsg
            } else {
                &[]
            };
            match sendmsg::<()>(self.sock.as_raw_fd(), &iov, c, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(n) => sent += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Writes raw bytes with no descriptors.
    pub fn send_bytes(&self, bytes: &[u8]) -> io::Result<()> {
        (&self.sock).write_all(bytes)
    }

    /// Sends request `req` with `body` and `fds`; NEED_REPLY is set when REPLY_ACK is on.
    pub fn send(&self, req: FrontendReq, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let flags = if self.reply_ack {
            VhostUserHeaderFlag::NEED_REPLY.bits()
        } else {
            0
        };
        self.send_message(
            Header {
                request: req.into(),
                flags: VERSION | flags,
                size: body.len() as u32,
            },
            body,
            fds,
        )
    }

    /// Receives the next message, waiting at most the time-out.
    pub fn recv(&self) -> Result<Reply, RawError> {
        self.recv_timeout(self.timeout)
    }

    /// Receives the next message, waiting at most `timeout` for all of it.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Reply, RawError> {
        let deadline = Instant::now() + timeout;
        let mut header = Header::default();
        let mut fds = Vec::new();
        self.read_full(header.as_mut_slice(), &mut fds, deadline, timeout)?;
        let mut body = vec![0u8; header.size as usize];
        self.read_full(&mut body, &mut fds, deadline, timeout)?;
        Ok(Reply { header, body, fds })
    }

    /// Whether the backend closes the connection within `timeout`, reading and dropping the
    /// messages it sends meanwhile: true on end of file or a socket error.
    pub fn closed_within(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(_) => continue,
                Err(RawError::Timeout(_)) => return false,
                Err(_) => return true,
            }
        }
    }

    fn read_full(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), RawError> {
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RawError::Timeout(timeout));
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut pfd = [PollFd::new(
                std::os::fd::AsFd::as_fd(&self.sock),
                PollFlags::POLLIN,
            )];
            match poll(&mut pfd, PollTimeout::from(ms)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(RawError::Io(e.into())),
            }
            let mut raw = [-1; SCM_MAX_FD];
            let mut iov = [libc::iovec {
                iov_base: buf[got..].as_mut_ptr().cast(),
                iov_len: buf.len() - got,
            }];
            // SAFETY: the one iovec covers the unread part of `buf`, which this call may write.
            let (n, count) = unsafe { self.sock.recv_with_fds(&mut iov, &mut raw) }
                .map_err(|e| RawError::Io(io::Error::from_raw_os_error(e.errno())))?;
            // SAFETY: the first `count` entries are descriptors the kernel just installed in
            // this process, owned by nothing else.
            fds.extend(
                raw[..count]
                    .iter()
                    .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
            if n == 0 {
                return Err(RawError::Closed);
            }
            got += n;
        }
        Ok(())
    }

    /// Sends `req` and returns its reply, checking that it answers `req`.
    pub fn call(&self, req: FrontendReq, body: &[u8], fds: &[RawFd]) -> Result<Reply, RawError> {
        // A request with a reply of its own needs no REPLY_ACK.
        self.send_message(
            Header {
                request: req.into(),
                flags: VERSION,
                size: body.len() as u32,
            },
            body,
            fds,
        )?;
        let r = self.recv_reply(req)?;
        Ok(r)
    }

    /// Receives the next message, checking that it answers `req`.
    fn recv_reply(&self, req: FrontendReq) -> Result<Reply, RawError> {
        let r = self.recv()?;
        let sent: u32 = req.into();
        if r.header.request != sent {
            return Err(RawError::WrongReply {
                sent,
                got: r.header.request,
            });
        }
        Ok(r)
    }

    /// Sends a setting request; with REPLY_ACK, waits for its acknowledgement and fails when
    /// the backend refused it.
    pub fn set(&self, req: FrontendReq, body: &[u8], fds: &[RawFd]) -> Result<(), RawError> {
        self.send(req, body, fds)?;
        if !self.reply_ack {
            return Ok(());
        }
        let r = self.recv_reply(req)?;
        match r.u64()? {
            0 => Ok(()),
            value => Err(RawError::Refused {
                request: req.into(),
                value,
            }),
        }
    }

    // ---- the requests, one function each ----

    /// SET_OWNER.
    pub fn set_owner(&self) -> Result<(), RawError> {
        self.set(FrontendReq::SET_OWNER, &[], &[])
    }

    /// GET_FEATURES.
    pub fn get_features(&self) -> Result<u64, RawError> {
        self.call(FrontendReq::GET_FEATURES, &[], &[])?.u64()
    }

    /// SET_FEATURES.
    pub fn set_features(&self, features: u64) -> Result<(), RawError> {
        self.set(
            FrontendReq::SET_FEATURES,
            VhostUserU64::new(features).as_slice(),
            &[],
        )
    }

    /// GET_PROTOCOL_FEATURES (every bit the backend sets, known to the crate or not).
    pub fn get_protocol_features(&self) -> Result<VhostUserProtocolFeatures, RawError> {
        let v = self
            .call(FrontendReq::GET_PROTOCOL_FEATURES, &[], &[])?
            .u64()?;
        Ok(VhostUserProtocolFeatures::from_bits_retain(v))
    }

    /// SET_PROTOCOL_FEATURES; from now on setting requests wait for an acknowledgement when
    /// `features` has REPLY_ACK. The message itself is never acknowledged (REPLY_ACK is not
    /// in force before it).
    pub fn set_protocol_features(
        &mut self,
        features: VhostUserProtocolFeatures,
    ) -> Result<(), RawError> {
        self.reply_ack = false;
        self.set(
            FrontendReq::SET_PROTOCOL_FEATURES,
            VhostUserU64::new(features.bits()).as_slice(),
            &[],
        )?;
        self.reply_ack = features.contains(VhostUserProtocolFeatures::REPLY_ACK);
        Ok(())
    }

    /// GET_QUEUE_NUM.
    pub fn get_queue_num(&self) -> Result<u64, RawError> {
        self.call(FrontendReq::GET_QUEUE_NUM, &[], &[])?.u64()
    }

    /// The body of SET_MEM_TABLE for `regions`.
    pub fn mem_table_body(regions: &[MemRegion]) -> Vec<u8> {
        let mut body = VhostUserMemory::new(regions.len() as u32)
            .as_slice()
            .to_vec();
        for r in regions {
            body.extend_from_slice(r.wire().as_slice());
        }
        body
    }

    /// SET_MEM_TABLE with one descriptor per region.
    pub fn set_mem_table(&self, regions: &[MemRegion]) -> Result<(), RawError> {
        let fds: Vec<RawFd> = regions.iter().map(|r| r.fd).collect();
        self.set(
            FrontendReq::SET_MEM_TABLE,
            &Self::mem_table_body(regions),
            &fds,
        )
    }

    /// ADD_MEM_REG.
    pub fn add_mem_reg(&self, region: &MemRegion) -> Result<(), RawError> {
        let r = region.single();
        self.set(FrontendReq::ADD_MEM_REG, r.as_slice(), &[region.fd])
    }

    /// REM_MEM_REG of `region` (its descriptor is not sent), with `fd` as some older frontends
    /// send one.
    pub fn rem_mem_reg(&self, region: &MemRegion, fd: Option<RawFd>) -> Result<(), RawError> {
        let r = region.single();
        let fds: Vec<RawFd> = fd.into_iter().collect();
        self.set(FrontendReq::REM_MEM_REG, r.as_slice(), &fds)
    }

    /// GET_MAX_MEM_SLOTS.
    pub fn get_max_mem_slots(&self) -> Result<u64, RawError> {
        self.call(FrontendReq::GET_MAX_MEM_SLOTS, &[], &[])?.u64()
    }

    fn vring_state(&self, req: FrontendReq, queue: u32, num: u32) -> Result<(), RawError> {
        self.set(req, VhostUserVringState::new(queue, num).as_slice(), &[])
    }

    /// SET_VRING_NUM (any value).
    pub fn set_vring_num(&self, queue: u32, num: u32) -> Result<(), RawError> {
        self.vring_state(FrontendReq::SET_VRING_NUM, queue, num)
    }

    /// SET_VRING_BASE (any value).
    pub fn set_vring_base(&self, queue: u32, base: u32) -> Result<(), RawError> {
        self.vring_state(FrontendReq::SET_VRING_BASE, queue, base)
    }

    /// SET_VRING_ENABLE.
    pub fn set_vring_enable(&self, queue: u32, on: bool) -> Result<(), RawError> {
        self.vring_state(FrontendReq::SET_VRING_ENABLE, queue, u32::from(on))
    }

    /// GET_VRING_BASE: stops the vring and returns its next available index.
    pub fn get_vring_base(&self, queue: u32) -> Result<u32, RawError> {
        let r = self.call(
            FrontendReq::GET_VRING_BASE,
            VhostUserVringState::new(queue, 0).as_slice(),
            &[],
        )?;
        Ok(r.body_as::<VhostUserVringState>()?.num)
    }

    /// SET_VRING_ADDR with any addresses and flags.
    pub fn set_vring_addr(&self, queue: u32, a: &VringAddrs) -> Result<(), RawError> {
        let mut v = VhostUserVringAddr::new(
            queue,
            VhostUserVringAddrFlags::empty(),
            a.desc,
            a.used,
            a.avail,
            a.log,
        );
        v.flags = a.flags;
        self.set(FrontendReq::SET_VRING_ADDR, v.as_slice(), &[])
    }

    fn vring_fd(&self, req: FrontendReq, queue: u8, fd: Option<RawFd>) -> Result<(), RawError> {
        let (v, fds) = match fd {
            Some(fd) => (u64::from(queue), vec![fd]),
            None => (u64::from(queue) | VRING_NOFD, Vec::new()),
        };
        self.set(req, VhostUserU64::new(v).as_slice(), &fds)
    }

    /// SET_VRING_KICK with any descriptor (or none: the NOFD flag).
    pub fn set_vring_kick(&self, queue: u8, fd: Option<RawFd>) -> Result<(), RawError> {
        self.vring_fd(FrontendReq::SET_VRING_KICK, queue, fd)
    }

    /// SET_VRING_CALL with any descriptor (or none).
    pub fn set_vring_call(&self, queue: u8, fd: Option<RawFd>) -> Result<(), RawError> {
        self.vring_fd(FrontendReq::SET_VRING_CALL, queue, fd)
    }

    /// SET_VRING_ERR with any descriptor (or none).
    pub fn set_vring_err(&self, queue: u8, fd: Option<RawFd>) -> Result<(), RawError> {
        self.vring_fd(FrontendReq::SET_VRING_ERR, queue, fd)
    }

    /// GET_CONFIG of `size` bytes at `offset` (any values); returns the payload of the reply.
    pub fn get_config(
        &self,
        offset: u32,
        size: u32,
        flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>, RawError> {
        let mut body = VhostUserConfig::new(offset, size, flags)
            .as_slice()
            .to_vec();
        body.resize(body.len() + size.min(0x1000) as usize, 0);
        let r = self.call(FrontendReq::GET_CONFIG, &body, &[])?;
        let hdr = std::mem::size_of::<VhostUserConfig>();
        Ok(r.body.get(hdr..).unwrap_or_default().to_vec())
    }

    /// SET_CONFIG of `payload` at `offset`; the size field is the payload's length.
    pub fn set_config(
        &self,
        offset: u32,
        flags: VhostUserConfigFlags,
        payload: &[u8],
    ) -> Result<(), RawError> {
        let mut body = VhostUserConfig::new(offset, payload.len() as u32, flags)
            .as_slice()
            .to_vec();
        body.extend_from_slice(payload);
        self.set(FrontendReq::SET_CONFIG, &body, &[])
    }

    /// GET_INFLIGHT_FD: the region the backend describes and the descriptor it sent.
    pub fn get_inflight_fd(
        &self,
        ask: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File), RawError> {
        let mut r = self.call(FrontendReq::GET_INFLIGHT_FD, ask.as_slice(), &[])?;
        let info: VhostUserInflight = r.body_as()?;
        let fd = r.fds.pop().ok_or(RawError::NoFd(r.header.request))?;
        Ok((info, File::from(fd)))
    }

    /// SET_INFLIGHT_FD with any descriptor.
    pub fn set_inflight_fd(&self, info: &VhostUserInflight, fd: RawFd) -> Result<(), RawError> {
        self.set(FrontendReq::SET_INFLIGHT_FD, info.as_slice(), &[fd])
    }

    /// SET_BACKEND_REQ_FD with any descriptor.
    pub fn set_backend_req_fd(&self, fd: RawFd) -> Result<(), RawError> {
        self.set(FrontendReq::SET_BACKEND_REQ_FD, &[], &[fd])
    }

    /// RESET_DEVICE.
    pub fn reset_device(&self) -> Result<(), RawError> {
        self.set(FrontendReq::RESET_DEVICE, &[], &[])
    }

    /// Shuts the socket down in both directions.
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_any_number_of_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let fe = RawFrontend::from_stream(a).unwrap();
        let peer = RawFrontend::from_stream(b).unwrap();
        let files: Vec<File> = (0..40).map(|_| fds::memfd(0, false).unwrap()).collect();
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        fe.send(FrontendReq::SET_VRING_KICK, &7u64.to_le_bytes(), &raw)
            .unwrap();
        let m = peer.recv().unwrap();
        assert_eq!(m.header.request, u32::from(FrontendReq::SET_VRING_KICK));
        assert_eq!(m.header.flags, VERSION);
        assert_eq!(m.u64().unwrap(), 7);
        assert_eq!(m.fds.len(), 40);
        // Half a message: the receiver times out instead of hanging.
        fe.send_bytes(&[1, 0, 0, 0, 1]).unwrap();
        assert!(matches!(
            peer.recv_timeout(Duration::from_millis(50)),
            Err(RawError::Timeout(_))
        ));
        drop(fe);
        assert!(peer.closed_within(Duration::from_secs(1)));
    }

    #[test]
    fn setting_requests_wait_for_their_acknowledgement() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut fe = RawFrontend::from_stream(a).unwrap();
        fe.set_reply_ack(true);
        let t = std::thread::spawn(move || {
            let peer = RawFrontend::from_stream(b).unwrap();
            for value in [0u64, 1] {
                let m = peer.recv().unwrap();
                assert_ne!(m.header.flags & VhostUserHeaderFlag::NEED_REPLY.bits(), 0);
                peer.send_message(
                    Header {
                        request: m.header.request,
                        flags: VERSION | VhostUserHeaderFlag::REPLY.bits(),
                        size: 8,
                    },
                    &value.to_le_bytes(),
                    &[],
                )
                .unwrap();
            }
        });
        fe.set_vring_num(0, 64).unwrap();
        assert!(matches!(
            fe.set_vring_base(0, 0),
            Err(RawError::Refused { value: 1, .. })
        ));
        t.join().unwrap();
    }
}
