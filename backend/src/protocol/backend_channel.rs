//! The backend request channel (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`) of one connection: a
//! socket the frontend hands over with SET_BACKEND_REQ_FD, on which the backend sends its own
//! requests. vloop-blk sends one: VHOST_USER_BACKEND_CONFIG_CHANGE_MSG when the image size
//! changed. Sends and the wait for an acknowledgement are bounded by
//! [`BACKEND_REPLY_TIMEOUT`], so a frontend that never reads the channel, or answers a byte
//! at a time, cannot block the daemon; a new channel (SET_BACKEND_REQ_FD) never waits for an
//! exchange on the old one.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use vhost::vhost_user::message::{BackendReq, VhostUserHeaderFlag};
use vm_memory::ByteValued;

use super::wire::{self, Header, Message, HEADER_SIZE};
use crate::LockUnpoisoned;

/// How long the frontend has to take a backend request and acknowledge it.
pub const BACKEND_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The channel, once the frontend has sent it.
#[derive(Debug, Default)]
pub struct BackendChannel {
    /// The socket, and whether REPLY_ACK was negotiated when it arrived.
    sock: Mutex<Option<(UnixStream, bool)>>,
    /// Held through one request and its acknowledgement, so that two are never interleaved.
    exchange: Mutex<()>,
}

impl BackendChannel {
    /// Use `sock` from now on (with time-outs on both directions).
    pub fn set(&self, sock: UnixStream, reply_ack: bool) -> io::Result<()> {
        self.set_with_timeout(sock, reply_ack, BACKEND_REPLY_TIMEOUT)
    }

    fn set_with_timeout(
        &self,
        sock: UnixStream,
        reply_ack: bool,
        timeout: Duration,
    ) -> io::Result<()> {
        sock.set_write_timeout(Some(timeout))?;
        sock.set_read_timeout(Some(timeout))?;
        *self.sock.lock_unpoisoned() = Some((sock, reply_ack));
        Ok(())
    }

    /// Tell the frontend the config space changed (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG); with
    /// REPLY_ACK, wait (bounded) for its acknowledgement. Returns false when there is no
    /// channel.
    pub fn config_changed(&self) -> io::Result<bool> {
        let _exchange = self.exchange.lock_unpoisoned();
        let (sock, reply_ack) = {
            let guard = self.sock.lock_unpoisoned();
            let Some((sock, reply_ack)) = guard.as_ref() else {
                return Ok(false);
            };
            (sock.try_clone()?, *reply_ack)
        };
        let code = wire::backend_code(BackendReq::CONFIG_CHANGE_MSG);
        let flags = if reply_ack {
            VhostUserHeaderFlag::NEED_REPLY
        } else {
            VhostUserHeaderFlag::empty()
        };
        wire::send(
            &sock,
            &Message::new(Header::request(code, flags, 0), Vec::new(), Vec::new()),
        )?;
        if reply_ack {
            // One limit for the whole reply (the read time-out [`Self::set`] gave the socket).
            let limit = sock.read_timeout()?.unwrap_or(BACKEND_REPLY_TIMEOUT);
            let mut r = [0u8; HEADER_SIZE + 8];
            wire::read_exact_within(&sock, &mut r, limit).map_err(io::Error::other)?;
            let hdr = Header::from_slice(&r[..HEADER_SIZE])
                .copied()
                .unwrap_or_default();
            let value = u64::from_le_bytes(r[HEADER_SIZE..].try_into().unwrap_or_default());
            if hdr.request != code || !hdr.is_reply() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "unexpected reply {} (flags {:#x}) to CONFIG_CHANGE_MSG",
                        hdr.request, hdr.flags
                    ),
                ));
            }
            if value != 0 {
                return Err(io::Error::other(format!(
                    "the frontend failed CONFIG_CHANGE_MSG ({value})"
                )));
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frontend_that_never_reads_cannot_block_the_sender() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let c = BackendChannel::default();
        assert!(!c.config_changed().unwrap());
        let timeout = Duration::from_millis(100);
        c.set_with_timeout(ours.try_clone().unwrap(), true, timeout)
            .unwrap();
        let t = std::time::Instant::now();
        // Nobody answers: the wait for the acknowledgement times out.
        assert!(c.config_changed().is_err());
        assert!(t.elapsed() < timeout * 5);
        // Nobody reads: once the socket buffer is full, a send times out too.
        c.set_with_timeout(ours, false, timeout).unwrap();
        let t = std::time::Instant::now();
        let failed = (0..1_000_000).find_map(|_| c.config_changed().err());
        assert!(failed.is_some());
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_reply_trickled_in_is_bounded_and_a_new_channel_does_not_wait_for_it() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let c = std::sync::Arc::new(BackendChannel::default());
        let timeout = Duration::from_millis(300);
        c.set_with_timeout(ours, true, timeout).unwrap();
        let sender = {
            let c = c.clone();
            std::thread::spawn(move || {
                let t = std::time::Instant::now();
                (c.config_changed(), t.elapsed())
            })
        };
        let m = wire::recv(&theirs).unwrap().unwrap();
        assert!(m.header.needs_reply());
        // The acknowledgement a byte at a time, each within the read time-out.
        let ack = Message::ack(m.header.request, true);
        let mut bytes = ack.header.as_slice().to_vec();
        bytes.extend_from_slice(&ack.body);
        let trickle = std::thread::spawn(move || {
            use std::io::Write;
            for b in bytes {
                if (&theirs).write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        // Meanwhile the frontend sends a new channel: taken at once.
        let (next, _next_theirs) = UnixStream::pair().unwrap();
        let t = std::time::Instant::now();
        c.set(next, true).unwrap();
        assert!(
            t.elapsed() < timeout,
            "the new channel waited {:?}",
            t.elapsed()
        );
        let (sent, took) = sender.join().unwrap();
        assert!(
            sent.is_err(),
            "a reply 20 bytes at 100 ms each came within 300 ms"
        );
        assert!(took < timeout * 2, "the wait for the reply took {took:?}");
        trickle.join().unwrap();
    }

    #[test]
    fn an_acknowledged_change() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let c = BackendChannel::default();
        c.set(ours, true).unwrap();
        let t = std::thread::spawn(move || {
            let m = wire::recv(&theirs).unwrap().unwrap();
            assert_eq!(m.header.request, 2);
            assert!(m.header.needs_reply());
            wire::send(&theirs, &Message::ack(m.header.request, true)).unwrap();
        });
        assert!(c.config_changed().unwrap());
        t.join().unwrap();
    }
}
