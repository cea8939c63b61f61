//! One frontend connection, from accept to disconnect: a fresh [`BlkDevice`] (new vrings, new
//! worker threads, new I/O engines, the driver's settings at their defaults), vhost-user-backend's
//! request handler serving it, and the relay between the frontend's socket and the handler
//! ([`crate::protocol::relay`]). The daemon serves one connection at a time with it; the
//! `vhost_user` fuzz target drives the same type.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;

use crate::config::Config;
use crate::device::{BlkDevice, DeviceError};
use crate::disk::Disk;
use crate::fault;
use crate::inflight::Inflight;
use crate::io::{GuestMem, Stats};
use crate::protocol::rings::Rings;
use crate::protocol::{relay, BackendChannel, RelayHandle, RelayShutdown};

/// Errors setting up a connection. Each ends that connection only.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The device could not be created (I/O engines, eventfds).
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A system call of the set-up failed.
    #[error("{what} failed")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// vhost-user-backend refused to start.
    #[error("vhost-user daemon: {0}")]
    Vhost(String),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ConnectionError {
    move |source| ConnectionError::Io { what, source }
}

/// How a connection ended.
#[derive(Debug)]
pub struct Ended {
    /// The library's error, when the connection did not end by a plain disconnect.
    pub error: Option<String>,
    /// The device's counters.
    pub stats: Stats,
}

/// A connection being served.
pub struct Connection {
    daemon: VhostUserDaemon<Arc<BlkDevice>>,
    device: Arc<BlkDevice>,
    relay: RelayHandle,
    channel: Arc<BackendChannel>,
    id: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("id", &self.id).finish()
    }
}

/// Connections of this process whose workers and relay threads are not joined yet (counted
/// while [`Connection::wait`] runs): what a stop may still wait for.
pub static UNJOINED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Longest a stopping connection waits for the requests its workers took.
pub const STOP_DRAIN: Duration = Duration::from_secs(2);

/// Ends a connection from any thread, whatever its frontend does.
pub struct StopConnection {
    relay: RelayShutdown,
    device: Arc<BlkDevice>,
    daemon: Option<ShutdownHandle>,
}

impl std::fmt::Debug for StopConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopConnection").finish_non_exhaustive()
    }
}

impl StopConnection {
    /// Stop serving: the workers take no more requests and finish those they took (for at
    /// most [`STOP_DRAIN`]), then both sockets are shut down (unblocking any send to a
    /// frontend that stopped reading), and the library's request handler ends.
    ///
    /// In that order because the frontend, seeing the socket close, takes the used index as
    /// the ring's position: a request completed after that would be in the used ring behind
    /// its back (QEMU then restarts the ring before it, and a next backend serves it again).
    pub fn stop(&self) {
        self.device.stop();
        if !self.device.wait_idle(STOP_DRAIN) {
            warn!(
                "requests still in flight after {STOP_DRAIN:?}: closing the connection \
                 without them"
            );
        }
        self.relay.shutdown();
        if let Some(h) = &self.daemon {
            h.shutdown();
        }
    }
}

/// A listener in a fresh private directory (mkdtemp: an unpredictable name only this user can
/// enter) with one connection to it pending; the socket and the directory are gone when this
/// returns.
fn private_pair() -> io::Result<(Listener, UnixStream)> {
    let dir = tempfile::Builder::new().prefix("vloop-blk-").tempdir()?;
    let path = dir.path().join("relay.sock");
    let listener = UnixListener::bind(&path)?;
    let stream = UnixStream::connect(&path)?;
    Ok((Listener::from(listener), stream))
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Connection {
    /// Serve the frontend on `stream` with a new device for `disk`.
    pub fn start(
        stream: UnixStream,
        disk: Arc<Disk>,
        config: &Config,
    ) -> Result<Connection, ConnectionError> {
        fault::install().map_err(io_err("installing the SIGBUS handler"))?;
        let inflight = Arc::new(Inflight::new(config.num_queues, config.queue_size));
        let channel = Arc::new(BackendChannel::default());
        let device = Arc::new(BlkDevice::new(disk, config, inflight.clone())?);
        let mem = GuestMemoryAtomic::new(GuestMem::new());
        let mut daemon = VhostUserDaemon::new("vloop-blk".into(), device.clone(), mem)
            .map_err(|e| ConnectionError::Vhost(e.to_string()))?;
        let (mut listener, inner) =
            private_pair().map_err(io_err("creating the vhost-user relay socket"))?;
        daemon
            .start(&mut listener)
            .map_err(|e| ConnectionError::Vhost(e.to_string()))?;
        drop(listener);
        let rings = Rings::new(config.num_queues, config.queue_size);
        let offered = device.protocol_features();
        let relay = relay::start(stream, inner, inflight, channel.clone(), rings, offered)
            .map_err(io_err("starting the vhost-user relay"))?;
        let hangup = relay
            .shutdown_handle()
            .map_err(io_err("cloning the relay sockets"))?;
        device.set_hangup(Box::new(move || hangup.shutdown()));
        Ok(Connection {
            daemon,
            device,
            relay,
            channel,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// A handle that ends this connection from another thread.
    pub fn stopper(&self) -> io::Result<StopConnection> {
        Ok(StopConnection {
            relay: self.relay.shutdown_handle()?,
            device: self.device.clone(),
            daemon: self.daemon.shutdown_handle(),
        })
    }

    /// The backend request channel, once the frontend set it up.
    pub fn backend_channel(&self) -> &Arc<BackendChannel> {
        &self.channel
    }

    /// The device.
    pub fn device(&self) -> &Arc<BlkDevice> {
        &self.device
    }

    /// Wait until the frontend disconnects (or the connection is stopped), then stop the
    /// workers and the relay.
    pub fn wait(mut self) -> Ended {
        UNJOINED.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let result = self.daemon.wait();
        // The frontend is gone, but a guest may still fill its rings: the workers stop after
        // their current pass instead of serving a ring nobody is connected to.
        self.device.stop();
        self.relay.shutdown();
        let Connection {
            daemon,
            device,
            relay,
            ..
        } = self;
        // Dropping the daemon joins the workers.
        drop(daemon);
        relay.join();
        UNJOINED.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        let error = match result {
            Ok(()) => None,
            Err(e) if is_disconnect(&e) => None,
            Err(e) => Some(e.to_string()),
        };
        Ended {
            error,
            stats: device.stats(),
        }
    }
}

fn is_disconnect(e: &vhost_user_backend::Error) -> bool {
    matches!(
        e,
        vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected
                | VhostUserError::PartialMessage
                | VhostUserError::SocketBroken(_)
        )
    )
}
