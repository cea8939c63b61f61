//! The vhost-user side of a connection that vloop-blk handles itself, in front of
//! vhost-user-backend:
//!
//! - [`wire`]: message framing (header, body, descriptors) on the `vhost` crate's types;
//! - [`fds`]: checks on every descriptor a frontend sends;
//! - [`backend_channel`]: the backend request channel, for config-change announcements;
//! - [`rings`]: where each vring lies, checked against the memory table;
//! - [`relay`]: the relay that answers the inflight requests, checks descriptors and forwards
//!   everything else to the library.

pub mod backend_channel;
pub mod fds;
pub mod relay;
pub mod rings;
pub mod wire;

pub use self::backend_channel::BackendChannel;
pub use self::relay::{RelayError, RelayHandle, RelayShutdown};
