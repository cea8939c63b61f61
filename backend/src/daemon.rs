//! The daemon: a listening socket, one frontend at a time, and a clean exit on request.
//!
//! Each accepted frontend is served by a new [`Connection`]; when it disconnects the workers
//! finish their pass, the image is flushed, and the daemon waits for the next frontend, as
//! qemu-storage-daemon does. Connections wait side by side for their first message, and the
//! first one to send it whole is served: frontends that connect and say nothing, or half a
//! message, are closed after a while without delaying one that speaks. A failure that belongs to one connection (accept running out of
//! descriptors, an I/O engine or relay that cannot be set up) ends that connection only. A stop
//! request (SIGINT/SIGTERM in the binary) ends the current connection whatever its frontend
//! does, lets in-flight requests finish, flushes the image and returns. A resize request
//! (SIGHUP in the binary) re-reads the image size, serves it from then on and announces it to
//! the frontend over the backend request channel (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), so
//! QEMU re-reads the capacity and tells the guest.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{Config, Listen};
use crate::connection::{Connection, StopConnection};
use crate::disk::Disk;
use crate::io::RateLimiter;
use crate::protocol::relay::STALL_TIMEOUT;
use crate::protocol::wire::{self, Arrival};
use crate::protocol::BackendChannel;
use crate::LockUnpoisoned;

/// Pause after a failed accept (e.g. out of descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Most connections accepted and waiting for their first message; a newer one closes the
/// oldest.
const LOBBY_PLACES: usize = 32;

/// How often a waiting connection that sent part of its first message is looked at again.
const PART_RECHECK: Duration = Duration::from_millis(20);

/// A connection accepted and not served yet.
#[derive(Debug)]
struct Waiting {
    stream: UnixStream,
    /// When it is closed if its first message has not arrived whole.
    deadline: Instant,
    /// The bytes queued when it was last found holding part of a message.
    part: Option<usize>,
}

/// Connections per second whose lines (connected, ended, counters) are logged: a frontend
/// that connects and closes in a loop could otherwise fill the log.
const LOGGED_CONNECTIONS_PER_SECOND: u32 = 5;

/// A connection that lasts this long has its end logged even when its start was not.
const NOTABLE_CONNECTION: Duration = Duration::from_secs(1);

/// Whether the connection just accepted is one whose lines are logged; the first one logged
/// after others were not says how many.
fn log_connection() -> bool {
    static LIMITER: Mutex<Option<RateLimiter>> = Mutex::new(None);
    let allowed = LIMITER
        .lock_unpoisoned()
        .get_or_insert_with(|| RateLimiter::alone(LOGGED_CONNECTIONS_PER_SECOND))
        .allow();
    match allowed {
        Some(0) => true,
        Some(n) => {
            info!(
                "{n} connections not logged (more than {LOGGED_CONNECTIONS_PER_SECOND} a second)"
            );
            true
        }
        None => false,
    }
}

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another process listens on the socket path.
    #[error("socket {0} is in use by a running backend: stop it or choose another --socket-path")]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket: remove it or choose another --socket-path")]
    NotASocket(PathBuf),
    /// A socket exists at the path and its state cannot be known.
    #[error(
        "{path} is a socket whose backend cannot be probed: remove it if no backend uses it, \
         or choose another --socket-path"
    )]
    Unprobeable {
        /// Socket path.
        path: PathBuf,
        /// The connect error.
        #[source]
        source: io::Error,
    },
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
}

/// Asks a running [`Daemon`] to stop or to adopt a new image size; cheap to clone, safe to
/// use from any thread.
#[derive(Clone, Debug)]
pub struct StopHandle {
    inner: Arc<StopInner>,
}

#[derive(Debug)]
struct StopInner {
    stop: AtomicBool,
    wake: EventFd,
    /// The connection being served.
    current: Mutex<Option<Current>>,
    /// The image served, once a daemon runs.
    disk: Mutex<Option<Arc<Disk>>>,
}

#[derive(Debug)]
struct Current {
    stop: StopConnection,
    channel: Arc<BackendChannel>,
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
            }),
        })
    }

    /// Ask the daemon to stop: the current connection ends after its in-flight requests
    /// whatever its frontend does, the image is flushed and [`Daemon::run`] returns.
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        let _ = self.inner.wake.write(1);
        if let Some(c) = self.inner.current.lock_unpoisoned().as_ref() {
            c.stop.stop();
        }
    }

    /// True once [`StopHandle::stop`] was called.
    pub fn stopped(&self) -> bool {
        self.inner.stop.load(Ordering::SeqCst)
    }

    fn set_current(&self, c: Option<Current>) {
        *self.inner.current.lock_unpoisoned() = c;
        if self.stopped() {
            if let Some(c) = self.inner.current.lock_unpoisoned().as_ref() {
                c.stop.stop();
            }
        }
    }

    fn set_disk(&self, disk: Arc<Disk>) {
        *self.inner.disk.lock_unpoisoned() = Some(disk);
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
        let channel = self
            .inner
            .current
            .lock_unpoisoned()
            .as_ref()
            .map(|c| c.channel.clone());
        let Some(channel) = channel else {
            info!("no frontend connected: the next one sees the new size");
            return;
        };
        match channel.config_changed() {
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
                    // The announcement may wait for the frontend: not on this thread, which
                    // must stay free for SIGTERM.
                    let h = handle.clone();
                    let _ = std::thread::Builder::new()
                        .name("resize".into())
                        .spawn(move || h.resize());
                }
                Ok(sig) => {
                    info!("{sig:?} received: finishing in-flight requests and exiting");
                    handle.stop();
                    exit_if_still_ending();
                }
                Err(e) => {
                    warn!("sigwait failed: {e}");
                    return;
                }
            }
        })?;
    Ok(())
}

/// How long after a stop's drain ([`crate::connection::STOP_DRAIN`]) the workers may still
/// take to end before the process exits without them.
pub const EXIT_GRACE: Duration = Duration::from_secs(3);

/// After a stop: if a connection has not ended [`EXIT_GRACE`] later (its workers still run
/// their requests, or a relay thread is held), exit at once, so that SIGTERM ends the daemon
/// within seconds whatever the guest queued or the frontend does.
/// The kernel finishes or cancels the I/O already issued as it tears the process down (as
/// for SIGKILL); the guest sees none of those requests completed, and where the frontend
/// negotiated the inflight region, the next backend resubmits them.
fn exit_if_still_ending() {
    let _ = std::thread::Builder::new()
        .name("exit-watch".into())
        .spawn(|| {
            std::thread::sleep(EXIT_GRACE);
            if crate::connection::UNJOINED.load(Ordering::Acquire) > 0 {
                warn!(
                    "the connection has not ended {EXIT_GRACE:?} after the stop (its queues are \
                     busy with the guest's requests or its frontend holds it): exiting without \
                     it"
                );
                std::process::exit(1);
            }
        });
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

/// Whether the socket at `path` is stale (nobody listens). Only a refused connection says so:
/// any other error (a socket we may not connect to, say) leaves its state unknown.
fn check_existing(path: &Path) -> Result<(), DaemonError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => Err(DaemonError::SocketInUse(path.to_path_buf())),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                warn!("replacing stale socket {}", path.display());
                Ok(())
            }
            Err(source) => Err(DaemonError::Unprobeable {
                path: path.to_path_buf(),
                source,
            }),
        },
        Ok(_) => Err(DaemonError::NotASocket(path.to_path_buf())),
        Err(_) => Ok(()),
    }
}

/// Bind the listening socket described by `listen`.
///
/// A socket path that exists is replaced when it is a stale socket (a connection to it is
/// refused) and refused otherwise. The socket is created mode 0600 in a private directory
/// beside the path and renamed into place, so it never exists with a looser mode.
pub fn bind(listen: &Listen) -> Result<BoundSocket, DaemonError> {
    match listen {
        Listen::SocketPath(path) => {
            let bind_err = |source| DaemonError::Bind {
                path: path.clone(),
                source,
            };
            check_existing(path)?;
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let dir = tempfile::Builder::new()
                .prefix(".vloop-blk-")
                .tempdir_in(&parent)
                .map_err(bind_err)?;
            let tmp = dir.path().join("s");
            let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
            // The private directory is ours alone: no symlink can stand in for `tmp`.
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
            fs::rename(&tmp, path).map_err(bind_err)?;
            Ok(BoundSocket {
                listener,
                path: Some(path.clone()),
            })
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

/// Serves one image on one listening socket until stopped.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    disk: Arc<Disk>,
    socket: BoundSocket,
    stop: StopHandle,
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

    /// The next frontend to serve: of the connections accepted, the one waiting longest whose
    /// first message has arrived whole; `None` once a stop is requested. Connections wait in
    /// `lobby` side by side, so ones that send nothing, or part of a message, never delay a
    /// frontend that speaks: each is closed [`STALL_TIMEOUT`] after it was accepted, or when
    /// [`LOBBY_PLACES`] newer ones wait. While a frontend is served nothing is accepted (new
    /// connections wait in the listen backlog) and the lobby is not looked at: its connections
    /// are served, or closed if their time is up, once the served one ends.
    fn next_frontend(&self, lobby: &mut Vec<Waiting>) -> Result<Option<UnixStream>, DaemonError> {
        loop {
            if self.stop.stopped() {
                return Ok(None);
            }
            let now = Instant::now();
            let mut watched = Vec::with_capacity(lobby.len());
            let mut part = false;
            let mut next = None::<Instant>;
            let mut i = 0;
            while i < lobby.len() {
                let w = &mut lobby[i];
                // Part of a message that has not grown is not peeked again (a peek of bytes
                // sent with descriptors takes a reference to each of them).
                let arrival = match (w.part, wire::queued(&w.stream)) {
                    (Some(before), Ok(queued)) if queued == before => {
                        Ok(match wire::hung_up(&w.stream) {
                            true => Arrival::Closed,
                            false => Arrival::Part,
                        })
                    }
                    (_, Ok(queued)) => wire::arrived(&w.stream).inspect(|a| {
                        w.part = (*a == Arrival::Part).then_some(queued);
                    }),
                    (_, Err(e)) => Err(e),
                };
                let w = &lobby[i];
                match arrival {
                    Ok(Arrival::Whole) => return Ok(Some(lobby.remove(i).stream)),
                    Ok(a @ (Arrival::Nothing | Arrival::Part)) if now < w.deadline => {
                        // Part of a message stays readable: it is looked at again shortly
                        // instead of being polled.
                        match a {
                            Arrival::Nothing => watched.push(w.stream.as_raw_fd()),
                            _ => part = true,
                        }
                        next = Some(next.map_or(w.deadline, |n| n.min(w.deadline)));
                        i += 1;
                    }
                    Ok(Arrival::Nothing | Arrival::Part) => {
                        if log_connection() {
                            warn!(
                                "a frontend sent no whole message within {STALL_TIMEOUT:?} of \
                                 connecting: connection closed"
                            );
                        }
                        lobby.remove(i);
                    }
                    Ok(Arrival::Closed) => {
                        debug!("a frontend closed its connection before its first message");
                        lobby.remove(i);
                    }
                    Err(e) => {
                        debug!("a waiting connection failed: {e}");
                        lobby.remove(i);
                    }
                }
            }
            // Full, and none of them ready: the oldest gives way.
            if lobby.len() > LOBBY_PLACES {
                lobby.remove(0);
                if log_connection() {
                    warn!(
                        "more than {LOBBY_PLACES} frontends connected and sent no whole \
                         message: the oldest connection closed"
                    );
                }
                continue;
            }
            let mut fds: Vec<libc::pollfd> = [
                self.socket.listener.as_raw_fd(),
                self.stop.inner.wake.as_raw_fd(),
            ]
            .into_iter()
            .chain(watched)
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
            let timeout = match (next, part) {
                (_, true) => PART_RECHECK.as_millis() as libc::c_int,
                (Some(n), false) => {
                    // Rounded up, so that the deadline has passed when poll returns.
                    let left = n.saturating_duration_since(now).as_micros().div_ceil(1000);
                    left.min(libc::c_int::MAX as u128) as libc::c_int
                }
                (None, false) => -1,
            };
            // SAFETY: `fds` is a live array of `fds.len()` pollfd for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
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
            if fds[0].revents & libc::POLLIN == 0 {
                continue;
            }
            match self.socket.listener.accept() {
                Ok((stream, _)) => match wire::oob_inline(&stream) {
                    Ok(()) => lobby.push(Waiting {
                        stream,
                        deadline: Instant::now() + STALL_TIMEOUT,
                        part: None,
                    }),
                    Err(e) => debug!("a new connection failed: {e}"),
                },
                Err(e) => {
                    warn!("accepting a frontend failed: {e}");
                    std::thread::sleep(ACCEPT_BACKOFF);
                }
            }
        }
    }

    /// Serve one connection until it ends; a failure is that connection's only.
    fn serve_one(&self, stream: UnixStream) {
        let logged = log_connection();
        let conn = match Connection::start(stream, self.disk.clone(), &self.config) {
            Ok(c) => c,
            Err(e) => {
                if logged {
                    warn!("cannot serve the frontend: {e:#}");
                }
                std::thread::sleep(ACCEPT_BACKOFF);
                return;
            }
        };
        match conn.stopper() {
            Ok(stop) => self.stop.set_current(Some(Current {
                stop,
                channel: conn.backend_channel().clone(),
            })),
            Err(e) => {
                if logged {
                    warn!("cannot serve the frontend: {e}");
                }
                return;
            }
        }
        if logged {
            info!("frontend connected");
        }
        let since = Instant::now();
        let ended = conn.wait();
        self.stop.set_current(None);
        let s = ended.stats;
        // A connection that lasted a while (a real frontend, not one of a loop that connects
        // and closes) has its end logged whatever the budget said when it came.
        let lasted = since.elapsed();
        let notable = lasted >= NOTABLE_CONNECTION;
        if !logged && notable {
            info!(
                "frontend connected {:.1} s ago (not logged then: more than \
                 {LOGGED_CONNECTIONS_PER_SECOND} connections a second)",
                lasted.as_secs_f64()
            );
        }
        if logged || notable {
            match ended.error {
                None => info!("frontend disconnected"),
                Some(e) => warn!("connection ended: {e}"),
            }
            info!(
                "{} requests ({} failed) in {} batches, {} bytes read, {} bytes written",
                s.requests, s.errors, s.batches, s.bytes_read, s.bytes_written
            );
        }
        if let Err(e) = self.disk.flush() {
            warn!("flushing the image after the connection failed: {e}");
        }
    }

    /// Serve frontends one after another until stopped; then flush the image.
    pub fn run(&self) -> Result<(), DaemonError> {
        match self.socket.path() {
            Some(p) => info!("listening on {}", p.display()),
            None => info!("listening on the socket passed as --fd"),
        }
        let mut lobby = Vec::new();
        while let Some(stream) = self.next_frontend(&mut lobby)? {
            self.serve_one(stream);
        }
        self.disk.close().map_err(|source| DaemonError::Io {
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
