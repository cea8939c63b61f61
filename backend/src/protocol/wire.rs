//! vhost-user message framing on a unix stream socket: a 12-byte header (request, flags, body
//! size), the body, and the file descriptors sent with the header as SCM_RIGHTS.
//!
//! Request codes and header flags are the `vhost` crate's ([`FrontendReq`], [`BackendReq`],
//! [`VhostUserHeaderFlag`]) and bodies are its message structs read as [`ByteValued`]; the
//! crate keeps its header type and socket endpoint private, so the framing itself is here.
//! Every descriptor the kernel hands over is owned from the moment it arrives, so a message
//! that is refused (too many descriptors, a truncated control message, a body too large)
//! closes them instead of leaking them.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    BackendReq, FrontendReq, VhostUserHeaderFlag, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vm_memory::ByteValued;

/// Bytes of a message header.
pub const HEADER_SIZE: usize = std::mem::size_of::<Header>();
/// Most descriptors one message may carry.
pub const MAX_FDS: usize = MAX_ATTACHED_FD_ENTRIES;
/// Most descriptors the kernel passes in one SCM_RIGHTS message (`SCM_MAX_FD`): the control
/// buffer has room for all of them, so they are always received (and closed when refused).
const SCM_MAX_FD: usize = 253;
/// The protocol version in every header's flags.
const VERSION: u32 = 0x1;

/// Errors reading a message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed.
    #[error("vhost-user socket error")]
    Io(#[from] io::Error),
    /// The peer closed the connection in the middle of a message.
    #[error("the peer closed the connection in the middle of a message")]
    Partial,
    /// A message carried more descriptors than any request takes.
    #[error("a message carried {0} file descriptors (at most {MAX_FDS} are allowed)")]
    TooManyFds(usize),
    /// The kernel truncated the control data (descriptors were lost on the way).
    #[error("the control data of a message was truncated")]
    Truncated,
    /// The header announced a body larger than the protocol allows.
    #[error("a message announced a body of {0} bytes (at most {MAX_MSG_SIZE})")]
    TooLarge(u32),
    /// The peer sent part of a message and then nothing for too long.
    #[error("the peer sent part of a message and then nothing for {0:?}")]
    Stalled(Duration),
}

/// A message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Flags: version, REPLY, NEED_REPLY.
    pub flags: u32,
    /// Body size in bytes.
    pub size: u32,
}

// SAFETY: three u32 fields, no padding: every byte pattern is a valid value.
unsafe impl ByteValued for Header {}

impl Header {
    /// A request header for `code` with `flags` (the version is added).
    pub fn request(code: u32, flags: VhostUserHeaderFlag, size: u32) -> Header {
        Header {
            request: code,
            flags: VERSION | flags.bits(),
            size,
        }
    }

    /// The frontend request this header carries, when the code is one the protocol knows.
    pub fn frontend_req(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.request).ok()
    }

    /// True when it is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::REPLY.bits() != 0
    }

    /// True when the sender asked for a reply (REPLY_ACK).
    pub fn needs_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }
}

/// One message.
#[derive(Debug)]
pub struct Message {
    /// Its header (the size always matches the body).
    pub header: Header,
    /// Its body.
    pub body: Vec<u8>,
    /// The descriptors sent with it.
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// A message with `header.size` set to the body's length.
    pub fn new(mut header: Header, body: Vec<u8>, fds: Vec<OwnedFd>) -> Message {
        header.size = body.len() as u32;
        Message { header, body, fds }
    }

    /// The reply to request `code` with `body`.
    pub fn reply(code: u32, body: Vec<u8>, fds: Vec<OwnedFd>) -> Message {
        Message::new(
            Header::request(code, VhostUserHeaderFlag::REPLY, 0),
            body,
            fds,
        )
    }

    /// A REPLY_ACK answer to request `code` (0 for success).
    pub fn ack(code: u32, ok: bool) -> Message {
        Message::reply(code, u64::from(!ok).to_le_bytes().to_vec(), Vec::new())
    }

    /// The body read as `T` (from its first bytes), when it is long enough.
    pub fn body_as<T: ByteValued>(&self) -> Option<T> {
        T::from_slice(self.body.get(..std::mem::size_of::<T>())?).copied()
    }

    /// The body's first 8 bytes as a little-endian u64 (VhostUserU64 bodies).
    pub fn u64_body(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.body.get(..8)?.try_into().ok()?))
    }

    /// Replace the body, keeping the header's size right.
    pub fn set_body(&mut self, body: Vec<u8>) {
        self.header.size = body.len() as u32;
        self.body = body;
    }
}

/// The request code of a backend request (for the backend request channel).
pub fn backend_code(req: BackendReq) -> u32 {
    req.into()
}

/// Receive one message; `None` when the peer closed the connection between messages.
pub fn recv(sock: &UnixStream) -> Result<Option<Message>, WireError> {
    recv_within(sock, None)
}

/// As [`recv`]; with `rest`, once the first bytes of a message have arrived the rest must
/// follow within that time (the socket's read time-out is set for it, and restored after).
pub fn recv_within(
    sock: &UnixStream,
    rest: Option<Duration>,
) -> Result<Option<Message>, WireError> {
    let mut header = Header::default();
    let (got, fds, truncated) = {
        let buf = header.as_mut_slice();
        recv_with_fds(sock.as_raw_fd(), buf)?
    };
    // The descriptors are owned now: every return below closes them.
    if truncated {
        return Err(WireError::Truncated);
    }
    if fds.len() > MAX_FDS {
        return Err(WireError::TooManyFds(fds.len()));
    }
    if got == 0 {
        return Ok(None);
    }
    if got == HEADER_SIZE && header.size == 0 {
        return Ok(Some(Message {
            header,
            body: Vec::new(),
            fds,
        }));
    }
    // The rest within `rest` of the first bytes, however it trickles in (a time-out per read
    // would let a byte every few seconds hold the connection for ever).
    let previous = match rest {
        Some(_) => Some(sock.read_timeout()?),
        None => None,
    };
    let deadline = rest.map(|limit| (Instant::now() + limit, limit));
    let body = read_rest(sock, &mut header, got, deadline);
    if let Some(previous) = previous {
        sock.set_read_timeout(previous)?;
    }
    Ok(Some(Message {
        header,
        body: body?,
        fds,
    }))
}

/// The rest of a message whose first `got` bytes are in `header`, then its body.
fn read_rest(
    sock: &UnixStream,
    header: &mut Header,
    got: usize,
    deadline: Option<(Instant, Duration)>,
) -> Result<Vec<u8>, WireError> {
    if got < HEADER_SIZE {
        read_exact(sock, &mut header.as_mut_slice()[got..], deadline)?;
    }
    if header.size as usize > MAX_MSG_SIZE {
        return Err(WireError::TooLarge(header.size));
    }
    let mut body = vec![0u8; header.size as usize];
    read_exact(sock, &mut body, deadline)?;
    Ok(body)
}

/// Fill `buf` from `s` within `limit` in all, however the bytes trickle in (the socket's read
/// time-out is set for it, and restored after).
pub fn read_exact_within(s: &UnixStream, buf: &mut [u8], limit: Duration) -> Result<(), WireError> {
    let previous = s.read_timeout()?;
    let read = read_exact(s, buf, Some((Instant::now() + limit, limit)));
    s.set_read_timeout(previous)?;
    read
}

/// Fill `buf` from `s`, by `deadline` (when, and the limit it stands for) if given.
fn read_exact(
    s: &UnixStream,
    buf: &mut [u8],
    deadline: Option<(Instant, Duration)>,
) -> Result<(), WireError> {
    let mut at = 0;
    while at < buf.len() {
        if let Some((end, limit)) = deadline {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WireError::Stalled(limit));
            }
            s.set_read_timeout(Some(left)).map_err(WireError::Io)?;
        }
        match (&mut &*s).read(&mut buf[at..]) {
            Ok(0) => return Err(WireError::Partial),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(match (e.kind(), deadline) {
                    (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some((_, limit))) => {
                        WireError::Stalled(limit)
                    }
                    _ => WireError::Io(e),
                })
            }
        }
    }
    Ok(())
}

/// How far the first message of a new connection has arrived, as [`arrived`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Nothing yet.
    Nothing,
    /// Part of a message.
    Part,
    /// A whole message (or a header no message can follow: the reader refuses it at once).
    Whole,
    /// The peer closed the connection before sending a whole message.
    Closed,
}

nix::ioctl_read_bad!(fionread, libc::FIONREAD, libc::c_int);

/// Keep out-of-band data inline in `sock` (SO_OOBINLINE): a peer's MSG_OOB byte is read as an
/// ordinary one, where peeks and the queued bytes see it.
pub fn oob_inline(sock: &UnixStream) -> io::Result<()> {
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::OobInline, &true)
        .map_err(io::Error::from)
}

/// Bytes waiting in `sock` (FIONREAD).
pub fn queued(sock: &UnixStream) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int, into a live local.
    unsafe { fionread(sock.as_raw_fd(), &mut queued) }?;
    Ok(queued.max(0) as usize)
}

/// How much of the next message is waiting in `sock`, without reading any of it (the header is
/// peeked, the queued bytes counted) and without blocking. Out-of-band data counts in the
/// queued bytes and shows in peeks past it, but a read skips it: sockets passed here get
/// SO_OOBINLINE first ([`oob_inline`]), so that the three agree.
pub fn arrived(sock: &UnixStream) -> io::Result<Arrival> {
    let mut header = Header::default();
    let fd = sock.as_raw_fd();
    let peeked = peek(fd, header.as_mut_slice());
    let queued = queued(sock)?;
    let got = match peeked {
        Ok(0) => return Ok(Arrival::Closed),
        Ok(n) => n,
        // Bytes queued that no peek sees (out-of-band data): readable, so not to be polled.
        Err(nix::errno::Errno::EAGAIN) if queued > 0 => return Ok(Arrival::Part),
        Err(nix::errno::Errno::EAGAIN) => return Ok(Arrival::Nothing),
        Err(e) => return Err(e.into()),
    };
    let whole = got == HEADER_SIZE
        && (header.size as usize > MAX_MSG_SIZE || queued >= HEADER_SIZE + header.size as usize);
    if whole {
        return Ok(Arrival::Whole);
    }
    // A peer that closed after part of a message: the part is readable, then end of file.
    if hung_up(sock) {
        return Ok(Arrival::Closed);
    }
    Ok(Arrival::Part)
}

/// Whether the peer of `sock` closed its side (or the socket failed), without blocking.
pub fn hung_up(sock: &UnixStream) -> bool {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one live pollfd for the duration of the call, which does not block.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Copy the first bytes waiting in `fd` to `buf`, reading none of them. A peek ends after bytes
/// that came with descriptors, so it goes on from an offset (SO_PEEK_OFF) until `buf` is full or
/// no more bytes wait.
fn peek(fd: RawFd, buf: &mut [u8]) -> nix::Result<usize> {
    use nix::sys::socket::{recv, MsgFlags};
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    let mut got = recv(fd, buf, flags)?;
    if got == 0 || got == buf.len() {
        return Ok(got);
    }
    let set_offset = |off: libc::c_int| {
        // SAFETY: SO_PEEK_OFF reads one int, from a live local.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEEK_OFF,
                (&off as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        nix::errno::Errno::result(r).map(drop)
    };
    set_offset(got as libc::c_int)?;
    let mut result = Ok(());
    while got < buf.len() {
        match recv(fd, &mut buf[got..], flags) {
            Ok(0) | Err(nix::errno::Errno::EAGAIN) => break,
            Ok(n) => got += n,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // -1 turns peeking from an offset off again.
    set_offset(-1)?;
    result.map(|()| got)
}

/// Whether `e` is a read time-out (SO_RCVTIMEO expired).
pub fn is_timeout(e: &WireError) -> bool {
    matches!(e, WireError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

/// One recvmsg into `buf`: bytes received, the descriptors, and whether the control data was
/// truncated.
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    // Room for SCM_MAX_FD descriptors, aligned for cmsghdr.
    let mut control = [0u64; (SCM_MAX_FD * 4 + 64) / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    loop {
        // SAFETY: msghdr is a plain C struct for which all-zero bytes are valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `msg` points to a live iovec over `buf` and to `control`, both valid for the
        // lengths given, for the duration of the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut fds = Vec::new();
        // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within
        // `msg_controllen`; SCM_RIGHTS data is an array of ints, each a new descriptor of this
        // process that nobody else owns.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c);
                    let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                    for i in 0..len / std::mem::size_of::<libc::c_int>() {
                        let raw = std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i));
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        return Ok((n as usize, fds, msg.msg_flags & libc::MSG_CTRUNC != 0));
    }
}

/// Send `msg` (header, body, and its descriptors with the first bytes).
pub fn send(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let mut buf = Vec::with_capacity(HEADER_SIZE + msg.body.len());
    buf.extend_from_slice(msg.header.as_slice());
    buf.extend_from_slice(&msg.body);
    let raw: Vec<RawFd> = msg.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let mut sent = 0;
    while sent < buf.len() {
        let iov = [io::IoSlice::new(&buf[sent..])];
        let c: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
            &cmsg
        } else {
            &[]
        };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, c, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn fds_open() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[test]
    fn arrival_tells_nothing_part_whole_and_closed_apart_and_reads_nothing() {
        use std::io::Write;
        let (mut a, b) = UnixStream::pair().unwrap();
        assert_eq!(arrived(&b).unwrap(), Arrival::Nothing);
        let header = Header::request(2, VhostUserHeaderFlag::empty(), 8);
        // The first bytes of the header come with a descriptor, which peeking leaves for the
        // reader (and a peek stops after them).
        let f = tempfile::tempfile().unwrap();
        let fd = [f.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fd)];
        let iov = [io::IoSlice::new(&header.as_slice()[..5])];
        nix::sys::socket::sendmsg::<()>(
            a.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        let before = fds_open();
        assert_eq!(arrived(&b).unwrap(), Arrival::Part);
        a.write_all(&header.as_slice()[5..]).unwrap();
        a.write_all(&[0; 7]).unwrap();
        assert_eq!(arrived(&b).unwrap(), Arrival::Part);
        a.write_all(&[0x2a]).unwrap();
        assert_eq!(arrived(&b).unwrap(), Arrival::Whole);
        assert_eq!(fds_open(), before);
        drop(a);
        // Still whole after the peer closed: the message is read as it was sent.
        assert_eq!(arrived(&b).unwrap(), Arrival::Whole);
        let m = recv(&b).unwrap().unwrap();
        assert_eq!((m.header.request, m.body[7], m.fds.len()), (2, 0x2a, 1));
        assert_eq!(arrived(&b).unwrap(), Arrival::Closed);

        // An out-of-band byte: queued and readable, but no peek sees it.
        let (a, b) = UnixStream::pair().unwrap();
        nix::sys::socket::send(a.as_raw_fd(), b"x", nix::sys::socket::MsgFlags::MSG_OOB).unwrap();
        assert_eq!(arrived(&b).unwrap(), Arrival::Part);
        drop(a);

        // Part of a message, then the peer closed.
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&header.as_slice()[..5]).unwrap();
        drop(a);
        assert_eq!(arrived(&b).unwrap(), Arrival::Closed);
        // A header announcing more than any message may carry counts as whole: the reader
        // refuses it at once.
        let (mut a, b) = UnixStream::pair().unwrap();
        let huge = Header::request(2, VhostUserHeaderFlag::empty(), u32::MAX);
        a.write_all(huge.as_slice()).unwrap();
        assert_eq!(arrived(&b).unwrap(), Arrival::Whole);
        assert!(matches!(recv(&b), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn messages_round_trip_with_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        let m = Message::new(
            Header::request(
                FrontendReq::SET_VRING_KICK.into(),
                VhostUserHeaderFlag::NEED_REPLY,
                0,
            ),
            7u64.to_le_bytes().to_vec(),
            vec![f.as_fd().try_clone_to_owned().unwrap()],
        );
        send(&a, &m).unwrap();
        let r = recv(&b).unwrap().unwrap();
        assert_eq!(r.header, m.header);
        assert_eq!(r.header.frontend_req(), Some(FrontendReq::SET_VRING_KICK));
        assert!(r.header.needs_reply() && !r.header.is_reply());
        assert_eq!(r.u64_body(), Some(7));
        assert_eq!(r.fds.len(), 1);
        drop(a);
        assert!(recv(&b).unwrap().is_none());
    }

    #[test]
    fn too_many_descriptors_are_closed_not_leaked() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<std::fs::File> = (0..40).map(|_| tempfile::tempfile().unwrap()).collect();
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let before = fds_open();
        let hdr = Header::request(1, VhostUserHeaderFlag::empty(), 0);
        nix::sys::socket::sendmsg::<()>(
            a.as_raw_fd(),
            &[io::IoSlice::new(hdr.as_slice())],
            &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert!(matches!(recv(&b), Err(WireError::TooManyFds(40))));
        assert_eq!(fds_open(), before);
    }

    #[test]
    fn oversized_and_partial_messages_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut hdr = Header::request(1, VhostUserHeaderFlag::empty(), 0);
        hdr.size = 1 << 20;
        send(
            &a,
            &Message {
                header: hdr,
                body: Vec::new(),
                fds: Vec::new(),
            },
        )
        .unwrap();
        assert!(matches!(recv(&b), Err(WireError::TooLarge(_))));
        let (a, b) = UnixStream::pair().unwrap();
        use std::io::Write;
        (&a).write_all(&[1, 0, 0, 0, 1]).unwrap();
        drop(a);
        assert!(matches!(recv(&b), Err(WireError::Partial)));
    }

    #[test]
    fn a_message_left_half_sent_stalls_and_the_time_out_is_restored() {
        use std::io::Write;
        let (a, b) = UnixStream::pair().unwrap();
        let limit = Duration::from_millis(50);
        (&a).write_all(&[1, 0, 0, 0, 1]).unwrap();
        let t = std::time::Instant::now();
        assert!(matches!(
            recv_within(&b, Some(limit)),
            Err(WireError::Stalled(l)) if l == limit
        ));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(b.read_timeout().unwrap(), None);
        // A whole message within the limit is fine, and waiting for the next one is not
        // limited.
        let (a, b) = UnixStream::pair().unwrap();
        let m = Message::new(
            Header::request(1, VhostUserHeaderFlag::empty(), 0),
            vec![7; 8],
            Vec::new(),
        );
        send(&a, &m).unwrap();
        let r = recv_within(&b, Some(limit)).unwrap().unwrap();
        assert_eq!(r.body, vec![7; 8]);
        assert_eq!(b.read_timeout().unwrap(), None);
        // A time-out the caller set applies to the wait for the first byte, and stays.
        b.set_read_timeout(Some(limit)).unwrap();
        let before = b.read_timeout().unwrap();
        let e = recv_within(&b, Some(Duration::from_secs(1))).unwrap_err();
        assert!(is_timeout(&e), "{e:?}");
        assert_eq!(b.read_timeout().unwrap(), before);
    }

    #[test]
    fn a_message_that_trickles_in_stalls_at_the_limit_of_its_first_byte() {
        // One byte at a time, each well within the limit: the whole message is not.
        let (a, b) = UnixStream::pair().unwrap();
        let limit = Duration::from_millis(300);
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let m = Message::new(
                Header::request(1, VhostUserHeaderFlag::empty(), 0),
                vec![7; 8],
                Vec::new(),
            );
            let mut bytes = m.header.as_slice().to_vec();
            bytes.extend_from_slice(&m.body);
            for byte in bytes {
                if (&a).write_all(&[byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let t = std::time::Instant::now();
        let r = recv_within(&b, Some(limit));
        assert!(
            matches!(r, Err(WireError::Stalled(l)) if l == limit),
            "{r:?} after {:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(b.read_timeout().unwrap(), None);
        drop(b);
        writer.join().unwrap();
    }
}
