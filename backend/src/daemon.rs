//! The daemon: a listening socket, one frontend at a time, and a clean exit on request.
//!
//! For every connection a fresh [`BlkDevice`] and `VhostUserDaemon` are built (new vrings, new
//! worker threads, new I/O engines), so nothing from a previous frontend leaks into the next.
//! When the frontend goes away the workers finish their batch and exit, the image is flushed,
//! and the daemon waits for the next connection, as qemu-storage-daemon does. A stop request
//! (SIGINT/SIGTERM in the binary) closes the current connection, lets in-flight requests finish,
//! flushes the image and returns. A resize request (SIGHUP in the binary) re-reads the image
//! size, serves it from then on and announces it to the frontend over the backend request
//! channel (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), so QEMU re-reads the capacity and tells the
//! guest.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{Config, Listen};
use crate::device::{BlkDevice, DeviceError};
use crate::disk::Disk;
use crate::inflight::Inflight;
use crate::LockUnpoisoned;

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another process listens on the socket path.
    #[error("socket {0} is in use by a running backend: stop it or choose another --socket-path")]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket: remove it or choose another --socket-path")]
    NotASocket(PathBuf),
    /// Binding the socket failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The `--fd` descriptor is not a listening unix socket.
    #[error("--fd {0} is not a listening unix socket")]
    BadFd(RawFd),
    /// A system call failed.
    #[error("{what} failed")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The device could not be created.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// vhost-user-backend refused to start.
    #[error("vhost-user daemon: {0}")]
    Vhost(String),
}

/// Asks a running [`Daemon`] to stop or to adopt a new image size; cheap to clone, safe to
/// use from any thread.
#[derive(Clone, Debug)]
pub struct StopHandle {
    inner: Arc<StopInner>,
}

struct StopInner {
    stop: AtomicBool,
    wake: EventFd,
    current: Mutex<Option<ShutdownHandle>>,
    /// The image served, once a daemon runs.
    disk: Mutex<Option<Arc<Disk>>>,
    /// The connection state (with its backend request channel) of the current frontend.
    connection: Mutex<Option<Arc<Inflight>>>,
}

impl std::fmt::Debug for StopInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopInner")
            .field("stop", &self.stop)
            .finish()
    }
}

impl StopHandle {
    /// A new handle.
    pub fn new() -> io::Result<StopHandle> {
        Ok(StopHandle {
            inner: Arc::new(StopInner {
                stop: AtomicBool::new(false),
                wake: EventFd::new(EFD_NONBLOCK)?,
                current: Mutex::new(None),
                disk: Mutex::new(None),
                connection: Mutex::new(None),
            }),
        })
    }

    /// Ask the daemon to stop: the current connection is closed after its in-flight requests,
    /// the image is flushed and [`Daemon::run`] returns.
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        let _ = self.inner.wake.write(1);
        if let Some(h) = self.inner.current.lock_unpoisoned().as_ref() {
            h.shutdown();
        }
    }

    /// True once [`StopHandle::stop`] was called.
    pub fn stopped(&self) -> bool {
        self.inner.stop.load(Ordering::SeqCst)
    }

    fn set_current(&self, h: Option<ShutdownHandle>) {
        *self.inner.current.lock_unpoisoned() = h;
    }

    fn set_disk(&self, disk: Arc<Disk>) {
        *self.inner.disk.lock_unpoisoned() = Some(disk);
    }

    fn set_connection(&self, c: Option<Arc<Inflight>>) {
        *self.inner.connection.lock_unpoisoned() = c;
    }

    /// Re-read the image size and serve it from now on (requests past a smaller end fail
    /// with IOERR), then announce the config change to the connected frontend, if it set up
    /// a backend request channel. Errors are logged.
    pub fn resize(&self) {
        let disk = self.inner.disk.lock_unpoisoned().clone();
        let Some(disk) = disk else {
            warn!("resize requested before the image was opened");
            return;
        };
        match disk.refresh_size() {
            Ok(r) if r.changed() => info!(
                "image size changed from {} to {} bytes ({} sectors)",
                r.old,
                r.new,
                r.new >> crate::request::SECTOR_SHIFT
            ),
            Ok(r) => info!("image size unchanged ({} bytes)", r.new),
            Err(e) => {
                let cause = std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default();
                warn!("{e}: {cause}");
                return;
            }
        }
        let connection = self.inner.connection.lock_unpoisoned().clone();
        let Some(connection) = connection else {
            info!("no frontend connected: the next one sees the new size");
            return;
        };
        match connection.backend_channel().config_changed() {
            Ok(true) => info!("config change announced to the frontend"),
            Ok(false) => warn!(
                "the frontend set up no backend request channel: the guest sees the new size \
                 when it reconnects"
            ),
            Err(e) => warn!("announcing the config change to the frontend failed: {e}"),
        }
    }
}

/// Block SIGINT, SIGTERM and SIGHUP in this thread (and every thread it creates later); stop
/// `handle` on SIGINT or SIGTERM, and on SIGHUP re-read the image size and announce it
/// ([`StopHandle::resize`]). Call it before any other thread is spawned.
pub fn stop_on_signals(handle: StopHandle) -> io::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block().map_err(io::Error::from)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(Signal::SIGHUP) => {
                    info!("SIGHUP received: re-reading the image size");
                    handle.resize();
                }
                Ok(sig) => {
                    info!("{sig:?} received: finishing in-flight requests and exiting");
                    handle.stop();
                }
                Err(e) => {
                    warn!("sigwait failed: {e}");
                    return;
                }
            }
        })?;
    Ok(())
}

/// A bound listening socket, and the path to remove when done.
#[derive(Debug)]
pub struct BoundSocket {
    listener: UnixListener,
    path: Option<PathBuf>,
}

impl BoundSocket {
    /// The socket path, when we created it.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = fs::remove_file(p);
        }
    }
}

/// Bind the listening socket described by `listen`.
///
/// A socket path that exists is replaced when it is a stale socket (nobody accepts on it) and
/// refused when a process still listens there. The new socket is made mode 0600.
pub fn bind(listen: &Listen) -> Result<BoundSocket, DaemonError> {
    match listen {
        Listen::SocketPath(path) => {
            match fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
                    Ok(_) => return Err(DaemonError::SocketInUse(path.clone())),
                    Err(_) => {
                        warn!("replacing stale socket {}", path.display());
                        fs::remove_file(path).map_err(|source| DaemonError::Bind {
                            path: path.clone(),
                            source,
                        })?;
                    }
                },
                Ok(_) => return Err(DaemonError::NotASocket(path.clone())),
                Err(_) => {}
            }
            let listener = UnixListener::bind(path).map_err(|source| DaemonError::Bind {
                path: path.clone(),
                source,
            })?;
            let bound = BoundSocket {
                listener,
                path: Some(path.clone()),
            };
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
                DaemonError::Bind {
                    path: path.clone(),
                    source,
                }
            })?;
            Ok(bound)
        }
        Listen::Fd(fd) => {
            let fd = *fd;
            let mut accepting: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `accepting`, a live local; an
            // invalid fd only makes it fail.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ACCEPTCONN,
                    (&mut accepting as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if r != 0 || accepting == 0 {
                return Err(DaemonError::BadFd(fd));
            }
            // SAFETY: the fd is a listening socket handed to us (--fd) and owned by nobody
            // else in this process from now on.
            let listener = unsafe { UnixListener::from_raw_fd(fd) };
            Ok(BoundSocket {
                listener,
                path: None,
            })
        }
    }
}

/// A listener in a fresh directory only this user can enter, with one connection to it
/// pending; the socket file and the directory are gone when this returns.
fn private_pair() -> io::Result<(Listener, UnixStream)> {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vloop-blk-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("relay.sock");
    let pair = UnixListener::bind(&path).and_then(|l| {
        let c = UnixStream::connect(&path)?;
        Ok((Listener::from(l), c))
    });
    let _ = fs::remove_file(&path);
    let _ = fs::remove_dir(&dir);
    pair
}

/// Serves one image on one listening socket until stopped.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    disk: Arc<Disk>,
    socket: BoundSocket,
    stop: StopHandle,
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

impl Daemon {
    /// A daemon serving `disk` on `socket`.
    pub fn new(config: Config, disk: Arc<Disk>, socket: BoundSocket, stop: StopHandle) -> Self {
        stop.set_disk(disk.clone());
        Daemon {
            config,
            disk,
            socket,
            stop,
        }
    }

    /// Wait until a frontend connects (true) or a stop is requested (false).
    fn wait_for_connection(&self) -> Result<bool, DaemonError> {
        loop {
            if self.stop.stopped() {
                return Ok(false);
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.socket.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.inner.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a live array of two pollfd for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DaemonError::Io {
                    what: "poll",
                    source: e,
                });
            }
            if self.stop.stopped() {
                return Ok(false);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return Ok(true);
            }
        }
    }

    /// Serve one connection from accept to disconnect.
    fn serve_one(&self) -> Result<(), DaemonError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = Arc::new(BlkDevice::new(
            self.disk.clone(),
            &self.config,
            mem.clone(),
        )?);
        let mut daemon = VhostUserDaemon::new("vloop-blk".into(), device.clone(), mem)
            .map_err(|e| DaemonError::Vhost(e.to_string()))?;
        let (outer, _) = self
            .socket
            .listener
            .accept()
            .map_err(|source| DaemonError::Io {
                what: "accept",
                source,
            })?;
        // vhost-user-backend gets the other end of a private relay that adds inflight I/O
        // tracking (crate::inflight).
        let (mut listener, inner) = private_pair().map_err(|source| DaemonError::Io {
            what: "creating the vhost-user relay socket",
            source,
        })?;
        daemon
            .start(&mut listener)
            .map_err(|e| DaemonError::Vhost(e.to_string()))?;
        drop(listener);
        let relay =
            crate::inflight::relay(outer, inner, device.inflight().clone()).map_err(|source| {
                DaemonError::Io {
                    what: "starting the vhost-user relay",
                    source,
                }
            })?;
        self.stop.set_current(daemon.shutdown_handle());
        self.stop.set_connection(Some(device.inflight().clone()));
        if self.stop.stopped() {
            daemon.request_shutdown();
        }
        info!("frontend connected");
        let result = daemon.wait();
        self.stop.set_current(None);
        self.stop.set_connection(None);
        // Dropping the daemon stops the workers after their current batch.
        drop(daemon);
        for t in relay {
            let _ = t.join();
        }
        let s = device.stats();
        match result {
            Ok(()) => info!("frontend disconnected"),
            Err(e) if is_disconnect(&e) => info!("frontend disconnected"),
            Err(e) => warn!("connection ended: {e}"),
        }
        info!(
            "{} requests ({} failed) in {} batches, {} bytes read, {} bytes written",
            s.requests, s.errors, s.batches, s.bytes_read, s.bytes_written
        );
        if let Err(e) = self.disk.flush() {
            warn!("flushing the image after the connection failed: {e}");
        }
        Ok(())
    }

    /// Serve frontends one after another until stopped; then flush the image.
    pub fn run(&self) -> Result<(), DaemonError> {
        match self.socket.path() {
            Some(p) => info!("listening on {}", p.display()),
            None => info!("listening on the socket passed as --fd"),
        }
        while self.wait_for_connection()? {
            self.serve_one()?;
        }
        self.disk.flush().map_err(|source| DaemonError::Io {
            what: "flushing the image on exit",
            source,
        })?;
        info!("stopped");
        Ok(())
    }
}

/// Open the image, bind the socket and serve until `stop` is triggered: the library entry
/// point behind the `vloop-blk` binary.
pub fn start_backend(config: Config, listen: &Listen, stop: StopHandle) -> anyhow::Result<()> {
    config.validate()?;
    let disk = Arc::new(Disk::open(&config)?);
    let socket = bind(listen)?;
    Daemon::new(config, disk, socket, stop).run()?;
    Ok(())
}
