//! A device set up step by step over a [`RawFrontend`]: feature and protocol feature
//! negotiation as a [`Negotiation`] asks, the memory table, and queues started at any layout.
//! The top of [`raw`](super): it imports the connection and the framing from there,
//! [`RawQueue`] from the queue part, and [`GuestMem`] and [`RingLayout`] from the crate's lower
//! layers.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::RawQueue;
use super::{MemRegion, RawError, RawFrontend, VringAddrs, PROTOCOL_FEATURES};
use crate::mem::GuestMem;
use crate::ring::RingLayout;

/// How [`RawDevice::negotiate`] sets the device up.
#[derive(Clone, Copy, Debug)]
pub struct Negotiation {
    /// Acknowledge VIRTIO_RING_F_EVENT_IDX (when offered).
    pub event_idx: bool,
    /// Negotiate REPLY_ACK (when offered), so every setting request is acknowledged.
    pub reply_ack: bool,
    /// Further protocol features to ask for (when offered).
    pub protocol: VhostUserProtocolFeatures,
    /// Further virtio feature bits to acknowledge (when offered).
    pub features: u64,
}

impl Default for Negotiation {
    fn default() -> Self {
        Negotiation {
            event_idx: true,
            reply_ack: true,
            protocol: VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ,
            features: 0,
        }
    }
}

/// A device set up step by step over a [`RawFrontend`].
#[derive(Debug)]
pub struct RawDevice {
    /// The connection.
    pub fe: RawFrontend,
    /// Guest memory (shared with the backend by [`Self::set_mem_table`]).
    pub mem: Arc<GuestMem>,
    /// Virtio features acknowledged.
    pub acked: u64,
    /// Protocol features negotiated.
    pub protocol: VhostUserProtocolFeatures,
    /// Queues started.
    pub queues: Vec<RawQueue>,
}

impl RawDevice {
    /// A device on `fe` with guest memory `mem`; nothing is sent yet.
    pub fn new(fe: RawFrontend, mem: Arc<GuestMem>) -> RawDevice {
        RawDevice {
            fe,
            mem,
            acked: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            queues: Vec::new(),
        }
    }

    /// The whole set-up: negotiation, the memory table, and queue 0 started with a ring of
    /// `queue_size` at guest address 0.
    pub fn start(
        fe: RawFrontend,
        mem: Arc<GuestMem>,
        how: &Negotiation,
        queue_size: u16,
    ) -> Result<RawDevice, RawError> {
        let mut d = RawDevice::new(fe, mem);
        d.negotiate(how)?;
        d.set_mem_table()?;
        let layout = RingLayout::new(queue_size, 0)?;
        d.start_queue(0, layout, 0)?;
        Ok(d)
    }

    /// SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, SET_FEATURES:
    /// VERSION_1 and PROTOCOL_FEATURES, plus what `how` asks for that the backend offers.
    pub fn negotiate(&mut self, how: &Negotiation) -> Result<(), RawError> {
        self.fe.set_owner()?;
        let offered = self.fe.get_features()?;
        let pf = self.fe.get_protocol_features()?;
        let mut want = how.protocol;
        if how.reply_ack {
            want |= VhostUserProtocolFeatures::REPLY_ACK;
        }
        self.protocol = pf & want;
        self.fe.set_protocol_features(self.protocol)?;
        let mut acked = (1u64 << VIRTIO_F_VERSION_1) | PROTOCOL_FEATURES | how.features;
        if how.event_idx {
            acked |= 1u64 << VIRTIO_RING_F_EVENT_IDX;
        }
        self.acked = acked & offered;
        self.fe.set_features(self.acked)
    }

    /// Whether EVENT_IDX was acknowledged.
    pub fn event_idx(&self) -> bool {
        self.acked & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    /// SET_MEM_TABLE: all of guest memory as one region at guest address 0.
    pub fn set_mem_table(&self) -> Result<(), RawError> {
        self.fe.set_mem_table(&[MemRegion::of(&self.mem)])
    }

    /// The frontend virtual address of guest address `gpa` (as the memory table maps it;
    /// any value, inside guest memory or not).
    pub fn user_addr(&self, gpa: u64) -> u64 {
        (self.mem.host_base() as u64).wrapping_add(gpa)
    }

    /// SET_VRING_NUM, SET_VRING_BASE `base`, SET_VRING_ADDR for `layout` (anywhere, inside
    /// guest memory or not), SET_VRING_CALL, SET_VRING_KICK (fresh non-blocking eventfds) and
    /// SET_VRING_ENABLE. The rings are used as guest memory holds them (fresh memory is
    /// zeroed).
    pub fn start_queue(
        &mut self,
        index: u8,
        layout: RingLayout,
        base: u16,
    ) -> Result<&mut RawQueue, RawError> {
        let q = u32::from(index);
        self.fe.set_vring_num(q, u32::from(layout.size))?;
        self.fe.set_vring_base(q, u32::from(base))?;
        self.fe.set_vring_addr(
            q,
            &VringAddrs {
                desc: self.user_addr(layout.desc),
                used: self.user_addr(layout.used),
                avail: self.user_addr(layout.avail),
                ..VringAddrs::default()
            },
        )?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        self.fe.set_vring_call(index, Some(call.as_raw_fd()))?;
        self.fe.set_vring_kick(index, Some(kick.as_raw_fd()))?;
        self.fe.set_vring_enable(q, true)?;
        self.queues.push(RawQueue {
            index,
            layout,
            kick,
            call,
            mem: self.mem.clone(),
        });
        let i = self.queues.len() - 1;
        Ok(&mut self.queues[i])
    }

    /// Queue `i` as started (in start order).
    pub fn queue(&self, i: usize) -> Option<&RawQueue> {
        self.queues.get(i)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn user_addresses_are_guest_addresses_in_the_mapping() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mem = Arc::new(GuestMem::new(64 << 10).unwrap());
        let d = RawDevice::new(RawFrontend::from_stream(a).unwrap(), mem.clone());
        assert_eq!(d.user_addr(8), mem.host_base() as u64 + 8);
    }
}
