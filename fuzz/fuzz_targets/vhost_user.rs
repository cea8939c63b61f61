//! vhost-user message sequences from a hostile frontend, into the daemon's connection handling.
//!
//! Every run serves one connection as the daemon does (`vloop_blk::Connection`: a
//! `BlkDevice`, vhost-user-backend's request handler, and the relay in front of it, which
//! answers GET/SET_INFLIGHT_FD itself and checks every descriptor), connects a unix socket to
//! it and plays the steps the input describes:
//!
//! - messages with any request code, flags, size field and body, carrying up to 40
//!   descriptors of any kind: eventfds (blocking or not, counters at zero or near the maximum),
//!   memfds of any size (sealable or not, an inflight region with any contents), files on
//!   tmpfs, pipes (empty or full, either end), unix stream sockets (empty or full), datagram
//!   sockets, `/dev/null`, a directory;
//! - writes into guest memory where the start-up vring lives (the available index jumping
//!   anywhere, ring entries, descriptors), ring addresses near the end of guest memory;
//! - truncating guest memory under the daemon's mapping;
//! - kicks.
//!
//! An optional well-formed start-up (features, CONFIGURE_MEM_SLOTS among the protocol
//! features, so regions can be added and removed later, memory table, one started vring,
//! EVENT_IDX if the input acknowledges it) comes first so that later steps reach deeper
//! states. The daemon must not panic, must end the connection when the socket closes, must close every
//! descriptor and end every thread the connection started, and the whole run must end within
//! a bounded time (a worker that spins, or a thread that blocks, shows as a time-out: the run
//! aborts with the state of every thread).

#![no_main]

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag};
use vloop_blk::{Config, Connection, Disk, EngineKind};
use vloop_frontend::raw::{fds, Header, RawFrontend, VERSION};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const PAGE: u64 = 4096;
/// Guest memory of the start-up sequence: 1 MiB at guest address 0, frontend address `UA`.
const UA: u64 = 0x7f00_0000_0000;
const MEM_SIZE: u64 = 1 << 20;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// The start-up vring: 16 descriptors at guest address 0, available ring at 0x1000, used ring
/// at 0x2000.
const QSIZE: u64 = 16;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Most descriptors on one message (the protocol allows 32).
const MAX_FDS: usize = 40;
/// A run that takes longer than this is stuck.
const RUN_LIMIT: Duration = Duration::from_secs(15);

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Code {
    GetFeatures,
    SetFeatures,
    SetOwner,
    ResetOwner,
    SetMemTable,
    SetLogBase,
    SetLogFd,
    SetVringNum,
    SetVringAddr,
    SetVringBase,
    GetVringBase,
    SetVringKick,
    SetVringCall,
    SetVringErr,
    GetProtocolFeatures,
    SetProtocolFeatures,
    GetQueueNum,
    SetVringEnable,
    SetBackendReqFd,
    GetConfig,
    SetConfig,
    GetInflightFd,
    SetInflightFd,
    ResetDevice,
    GetMaxMemSlots,
    AddMemReg,
    RemMemReg,
    SetStatus,
    GetStatus,
    Raw(u32),
}

impl Code {
    fn value(self) -> u32 {
        let r = match self {
            Code::GetFeatures => FrontendReq::GET_FEATURES,
            Code::SetFeatures => FrontendReq::SET_FEATURES,
            Code::SetOwner => FrontendReq::SET_OWNER,
            Code::ResetOwner => FrontendReq::RESET_OWNER,
            Code::SetMemTable => FrontendReq::SET_MEM_TABLE,
            Code::SetLogBase => FrontendReq::SET_LOG_BASE,
            Code::SetLogFd => FrontendReq::SET_LOG_FD,
            Code::SetVringNum => FrontendReq::SET_VRING_NUM,
            Code::SetVringAddr => FrontendReq::SET_VRING_ADDR,
            Code::SetVringBase => FrontendReq::SET_VRING_BASE,
            Code::GetVringBase => FrontendReq::GET_VRING_BASE,
            Code::SetVringKick => FrontendReq::SET_VRING_KICK,
            Code::SetVringCall => FrontendReq::SET_VRING_CALL,
            Code::SetVringErr => FrontendReq::SET_VRING_ERR,
            Code::GetProtocolFeatures => FrontendReq::GET_PROTOCOL_FEATURES,
            Code::SetProtocolFeatures => FrontendReq::SET_PROTOCOL_FEATURES,
            Code::GetQueueNum => FrontendReq::GET_QUEUE_NUM,
            Code::SetVringEnable => FrontendReq::SET_VRING_ENABLE,
            Code::SetBackendReqFd => FrontendReq::SET_BACKEND_REQ_FD,
            Code::GetConfig => FrontendReq::GET_CONFIG,
            Code::SetConfig => FrontendReq::SET_CONFIG,
            Code::GetInflightFd => FrontendReq::GET_INFLIGHT_FD,
            Code::SetInflightFd => FrontendReq::SET_INFLIGHT_FD,
            Code::ResetDevice => FrontendReq::RESET_DEVICE,
            Code::GetMaxMemSlots => FrontendReq::GET_MAX_MEM_SLOTS,
            Code::AddMemReg => FrontendReq::ADD_MEM_REG,
            Code::RemMemReg => FrontendReq::REM_MEM_REG,
            Code::SetStatus => FrontendReq::SET_STATUS,
            Code::GetStatus => FrontendReq::GET_STATUS,
            Code::Raw(v) => return v,
        };
        r.into()
    }
}

#[derive(Arbitrary, Debug)]
struct Region {
    /// Guest physical address in pages, or any value.
    gpa: Result<u16, u64>,
    /// Size in pages (0 allowed).
    pages: u8,
    /// Frontend virtual address: near the start-up mapping, or any value.
    ua: Result<u16, u64>,
    /// Offset in the memfd, in pages.
    offset_pages: u8,
    /// Size of the memfd in pages, when it is not the one the region needs.
    file_pages: Option<u8>,
    /// The memfd allows sealing.
    sealable: bool,
    /// Bytes at the start of the region.
    fill: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Body {
    Empty,
    U64(u64),
    State {
        index: u32,
        num: u32,
    },
    Addr {
        index: u32,
        flags: u32,
        desc: u64,
        used: u64,
        avail: u64,
        log: u64,
    },
    /// Ring addresses relative to the start-up mapping.
    AddrNear {
        index: u32,
        desc: u16,
        used: u16,
        avail: u16,
    },
    /// Ring addresses this many bytes before the end of the start-up mapping.
    AddrEnd {
        index: u32,
        desc: u16,
        used: u16,
        avail: u16,
    },
    /// A memory table; on ADD_MEM_REG and REM_MEM_REG its first region ([`single_region`]).
    MemTable {
        regions: Vec<Region>,
        count: Option<u32>,
    },
    Config {
        offset: u32,
        size: u32,
        flags: u32,
        payload: Vec<u8>,
    },
    Inflight {
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    },
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Count {
    Zero,
    One,
    /// The maximum counter value minus this.
    NearMax(u8),
}

impl Count {
    fn value(self) -> u64 {
        match self {
            Count::Zero => 0,
            Count::One => 1,
            Count::NearMax(n) => fds::EVENTFD_MAX - u64::from(n),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Fd {
    Event {
        blocking: bool,
        count: Count,
    },
    Mem {
        pages: u8,
        sealable: bool,
    },
    /// A sealable memfd holding an inflight region: `queues` regions of `queue_size`
    /// descriptors, version 1 headers, with these descriptor states (head, inflight, counter).
    Inflight {
        queues: u8,
        queue_size: u16,
        used_idx: u16,
        states: Vec<(u16, bool, Count, u16)>,
    },
    Tmpfs {
        pages: u8,
    },
    Pipe {
        write_end: bool,
        full: bool,
    },
    Stream {
        full: bool,
    },
    Datagram,
    DevNull,
    Directory,
    /// The start-up guest memory's memfd.
    GuestMemory,
}

#[derive(Arbitrary, Debug)]
struct Msg {
    code: Code,
    need_reply: bool,
    /// Replace the flags (version bits and all).
    raw_flags: Option<u32>,
    /// Replace the size field of the header.
    raw_size: Option<u32>,
    body: Body,
    fds: Vec<Fd>,
    /// Send every descriptor this many more times (up to 40 on the message).
    repeat: u8,
}

#[derive(Arbitrary, Debug)]
enum Step {
    Msg(Msg),
    /// Write the start-up vring's available index.
    AvailIdx(u16),
    /// Write available ring entries (slot, head) and descriptors (index, addr, len, flags,
    /// next) of the start-up vring.
    Ring {
        entries: Vec<(u8, u16)>,
        descs: Vec<(u8, u64, u32, u16, u16)>,
    },
    /// Write bytes anywhere in the start-up guest memory.
    Poke {
        at: u32,
        bytes: Vec<u8>,
    },
    /// Cut the start-up guest memory to this many pages.
    Truncate(u8),
    /// Kick the start-up vring.
    Kick,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Run a well-formed start-up first, acknowledging these virtio features.
    startup: Option<u64>,
    /// The start-up guest memory allows sealing (the daemon then seals it).
    sealable: bool,
    /// Bytes written at guest address 0 (where the start-up vring lives) before the start-up.
    ring: Vec<u8>,
    steps: Vec<Step>,
    /// Kick the start-up vring at the end.
    kick: bool,
}

struct State {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: UnixListener,
    disk: Arc<Disk>,
    config: Config,
    lock: Mutex<()>,
}

/// When the current run must have ended (milliseconds since `epoch()`; 0 when no run).
static DEADLINE: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

/// Every thread of this process: name, state (R running, S sleeping, D blocked) and CPU
/// ticks.
fn threads() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                    let (name, rest) = stat
                        .split_once(" (")
                        .and_then(|(_, r)| r.rsplit_once(") "))
                        .unwrap_or(("?", ""));
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    let state = f.first().copied().unwrap_or("?");
                    let ticks = f.get(11).copied().unwrap_or("?");
                    format!("{name} [{state}, {ticks} ticks]")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Aborts the process, with the state of every thread, when a run outlives its deadline.
fn watchdog() {
    std::thread::Builder::new()
        .name("fuzz-watchdog".into())
        .spawn(|| loop {
            std::thread::sleep(Duration::from_millis(200));
            let d = DEADLINE.load(Ordering::Acquire);
            if d != 0 && epoch().elapsed().as_millis() as u64 > d {
                eprintln!(
                    "a run took more than {RUN_LIMIT:?}: a worker spins or a thread is blocked; \
                     threads: {:#?}",
                    threads()
                );
                std::process::abort();
            }
        })
        .expect("watchdog thread");
}

fn state() -> &'static State {
    static S: OnceLock<State> = OnceLock::new();
    S.get_or_init(|| {
        epoch();
        watchdog();
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");
        let path = dir.path().join("sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let mut config = Config::new(&image);
        config.num_queues = 2;
        config.queue_size = 64;
        config.engine = EngineKind::Auto;
        let disk = Arc::new(Disk::open(&config).expect("open image"));
        State {
            _dir: dir,
            path,
            listener,
            disk,
            config,
            lock: Mutex::new(()),
        }
    })
}

fn owned(e: EventFd) -> OwnedFd {
    // SAFETY: the eventfd gives up its descriptor, which the result alone owns.
    unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
}

fn memfd(len: u64, sealable: bool, fill: &[u8]) -> File {
    let f = fds::memfd(len, sealable).expect("memfd");
    let n = fill.len().min(len as usize);
    f.write_all_at(&fill[..n], 0).expect("memfd fill");
    f
}

struct Conn {
    fe: RawFrontend,
    /// Keeps every descriptor sent (and the other ends of pipes and sockets) open until the
    /// connection ends.
    keep: Vec<OwnedFd>,
    /// The start-up guest memory.
    guest: Option<File>,
}

impl Conn {
    fn send(&mut self, code: u32, flags: u32, size: Option<u32>, body: &[u8], fds: Vec<OwnedFd>) {
        let header = Header {
            request: code,
            flags,
            size: size.unwrap_or(body.len() as u32),
        };
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        // A closed peer is fine: the daemon may end the connection on any message.
        let _ = self.fe.send_message(header, body, &raw);
        self.keep.extend(fds);
    }

    fn req(&mut self, req: FrontendReq, body: &[u8], fds: Vec<OwnedFd>) {
        self.send(req.into(), VERSION, None, body, fds);
    }

    /// One descriptor of the kind `fd` describes.
    fn make(&mut self, fd: &Fd) -> OwnedFd {
        match fd {
            Fd::Event { blocking, count } => {
                let e = if *blocking {
                    fds::blocking_eventfd(count.value()).expect("eventfd")
                } else {
                    let e = EventFd::new(EFD_NONBLOCK).expect("eventfd");
                    let _ = e.write(count.value());
                    e
                };
                owned(e)
            }
            Fd::Mem { pages, sealable } => {
                memfd(u64::from(*pages % 17) * PAGE, *sealable, &[]).into()
            }
            Fd::Inflight {
                queues,
                queue_size,
                used_idx,
                states,
            } => {
                let qs = u64::from(*queue_size % 1025);
                let region = (16 + 16 * qs).next_multiple_of(64);
                let nq = u64::from(*queues % 3).max(1);
                let f = memfd(region * nq, true, &[]);
                for q in 0..nq {
                    let base = q * region;
                    let _ = f.write_all_at(&1u16.to_le_bytes(), base + 8);
                    let _ = f.write_all_at(&(qs as u16).to_le_bytes(), base + 10);
                    let _ = f.write_all_at(&used_idx.to_le_bytes(), base + 14);
                    for &(head, inflight, counter, next) in states.iter().take(64) {
                        let at = base + 16 + 16 * u64::from(head % 1024);
                        if at + 16 > base + region {
                            continue;
                        }
                        let _ = f.write_all_at(&[u8::from(inflight)], at);
                        let _ = f.write_all_at(&next.to_le_bytes(), at + 6);
                        let _ = f.write_all_at(&counter.value().to_le_bytes(), at + 8);
                    }
                }
                f.into()
            }
            Fd::Tmpfs { pages } => {
                let f = tempfile::tempfile_in("/dev/shm").expect("tmpfs file");
                f.set_len(u64::from(*pages % 17) * PAGE)
                    .expect("tmpfs size");
                f.into()
            }
            Fd::Pipe { write_end, full } => {
                let (r, w) = if *full {
                    fds::full_pipe().expect("pipe")
                } else {
                    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe")
                };
                let (send, other) = if *write_end { (w, r) } else { (r, w) };
                self.keep.push(other);
                send
            }
            Fd::Stream { full } => {
                let (a, b) = UnixStream::pair().expect("socketpair");
                if *full {
                    fds::fill_socket(&a).expect("fill");
                }
                self.keep.push(b.into());
                a.into()
            }
            Fd::Datagram => {
                let (a, b) = UnixDatagram::pair().expect("socketpair");
                self.keep.push(b.into());
                a.into()
            }
            Fd::DevNull => File::open("/dev/null").expect("/dev/null").into(),
            Fd::Directory => File::open("/tmp").expect("/tmp").into(),
            Fd::GuestMemory => match &self.guest {
                Some(g) => g.try_clone().expect("dup").into(),
                None => memfd(MEM_SIZE, false, &[]).into(),
            },
        }
    }

    fn guest_write(&self, at: u64, bytes: &[u8]) {
        if let Some(g) = &self.guest {
            let n = bytes.len().min(4096);
            let _ = g.write_all_at(&bytes[..n], at % MEM_SIZE);
        }
    }
}

fn le64(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn two(a: u32, b: u32) -> Vec<u8> {
    let mut v = a.to_le_bytes().to_vec();
    v.extend_from_slice(&b.to_le_bytes());
    v
}

/// A memory table body on ADD_MEM_REG or REM_MEM_REG: its first region in the single-region
/// layout (a u64 of padding, `count` if given, then the region), with the region's memfd.
fn single_region(regions: &[Region], count: Option<u32>) -> (Vec<u8>, Vec<OwnedFd>) {
    let (table, fds) = mem_table(&regions[..regions.len().min(1)], None);
    let mut body = le64(&[u64::from(count.unwrap_or(0))]);
    body.extend_from_slice(&table[8..]);
    (body, fds)
}

fn mem_table(regions: &[Region], count: Option<u32>) -> (Vec<u8>, Vec<OwnedFd>) {
    let regions = &regions[..regions.len().min(9)];
    let mut body = two(count.unwrap_or(regions.len() as u32), 0);
    let mut fds = Vec::new();
    for r in regions {
        let size = u64::from(r.pages % 65) * PAGE;
        let offset = u64::from(r.offset_pages % 16) * PAGE;
        let gpa = match r.gpa {
            Ok(p) => u64::from(p) * PAGE,
            Err(v) => v,
        };
        let ua = match r.ua {
            Ok(p) => UA + u64::from(p) * PAGE,
            Err(v) => v,
        };
        body.extend(le64(&[gpa, size, ua, offset]));
        // By default the file covers the mapping, as a frontend's memory backend does.
        let len = match r.file_pages {
            Some(p) => u64::from(p % 81) * PAGE,
            None => offset + size.max(PAGE),
        };
        fds.push(memfd(len, r.sealable, &r.fill).into());
    }
    (body, fds)
}

fn startup(c: &mut Conn, features: u64, sealable: bool, ring: &[u8]) -> OwnedFd {
    let guest = memfd(MEM_SIZE, sealable, ring);
    c.req(FrontendReq::SET_OWNER, &[], vec![]);
    c.req(FrontendReq::GET_FEATURES, &[], vec![]);
    c.req(FrontendReq::GET_PROTOCOL_FEATURES, &[], vec![]);
    // CONFIG | MQ | REPLY_ACK | CONFIGURE_MEM_SLOTS.
    c.req(
        FrontendReq::SET_PROTOCOL_FEATURES,
        &le64(&[(1 << 9) | 1 | (1 << 3) | (1 << 15)]),
        vec![],
    );
    c.req(
        FrontendReq::SET_FEATURES,
        &le64(&[features | PROTOCOL_FEATURES | (1 << 32)]),
        vec![],
    );
    let mut table = two(1, 0);
    table.extend(le64(&[0, MEM_SIZE, UA, 0]));
    let fd = guest.try_clone().expect("dup");
    c.req(FrontendReq::SET_MEM_TABLE, &table, vec![fd.into()]);
    c.guest = Some(guest);
    c.req(FrontendReq::SET_VRING_NUM, &two(0, QSIZE as u32), vec![]);
    c.req(FrontendReq::SET_VRING_BASE, &two(0, 0), vec![]);
    let mut addr = two(0, 0);
    addr.extend(le64(&[UA, UA + USED, UA + AVAIL, 0]));
    c.req(FrontendReq::SET_VRING_ADDR, &addr, vec![]);
    let call = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    c.req(FrontendReq::SET_VRING_CALL, &le64(&[0]), vec![owned(call)]);
    let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mine = kick.try_clone().expect("dup");
    c.req(FrontendReq::SET_VRING_KICK, &le64(&[0]), vec![owned(kick)]);
    c.req(FrontendReq::SET_VRING_ENABLE, &two(0, 1), vec![]);
    owned(mine)
}

fn body(b: &Body, code: Code) -> (Vec<u8>, Vec<OwnedFd>) {
    match b {
        Body::MemTable { regions, count } if matches!(code, Code::AddMemReg | Code::RemMemReg) => {
            single_region(regions, *count)
        }
        Body::Empty => (Vec::new(), Vec::new()),
        Body::U64(v) => (le64(&[*v]), Vec::new()),
        Body::State { index, num } => (two(*index, *num), Vec::new()),
        Body::Addr {
            index,
            flags,
            desc,
            used,
            avail,
            log,
        } => {
            let mut v = two(*index, *flags);
            v.extend(le64(&[*desc, *used, *avail, *log]));
            (v, Vec::new())
        }
        Body::AddrNear {
            index,
            desc,
            used,
            avail,
        } => {
            let mut v = two(*index, 0);
            let near = |o: u16| UA + u64::from(o);
            v.extend(le64(&[near(*desc), near(*used), near(*avail), 0]));
            (v, Vec::new())
        }
        Body::AddrEnd {
            index,
            desc,
            used,
            avail,
        } => {
            let mut v = two(*index, 0);
            let end = |o: u16| UA + MEM_SIZE - u64::from(o);
            v.extend(le64(&[end(*desc), end(*used), end(*avail), 0]));
            (v, Vec::new())
        }
        Body::MemTable { regions, count } => mem_table(regions, *count),
        Body::Config {
            offset,
            size,
            flags,
            payload,
        } => {
            let mut v = two(*offset, *size);
            v.extend_from_slice(&flags.to_le_bytes());
            v.extend_from_slice(&payload[..payload.len().min(512)]);
            (v, Vec::new())
        }
        Body::Inflight {
            mmap_size,
            mmap_offset,
            num_queues,
            queue_size,
        } => {
            let mut v = le64(&[*mmap_size, *mmap_offset]);
            v.extend_from_slice(&num_queues.to_le_bytes());
            v.extend_from_slice(&queue_size.to_le_bytes());
            (v, Vec::new())
        }
        Body::Bytes(v) => (v[..v.len().min(4096)].to_vec(), Vec::new()),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn fd_kinds() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn kick(k: &Option<OwnedFd>) {
    if let Some(k) = k {
        let _ = nix::unistd::write(k, &1u64.to_ne_bytes());
    }
}

fn play(c: &mut Conn, step: &Step, kick_fd: &Option<OwnedFd>) {
    match step {
        Step::Msg(m) => {
            let (b, mut fds) = body(&m.body, m.code);
            let mut kinds: Vec<&Fd> = m.fds.iter().take(MAX_FDS).collect();
            let base = kinds.len();
            for _ in 0..m.repeat {
                if base == 0 || kinds.len() >= MAX_FDS {
                    break;
                }
                kinds.extend_from_within(..base.min(MAX_FDS - kinds.len()));
            }
            for fd in kinds {
                let made = c.make(fd);
                fds.push(made);
            }
            fds.truncate(MAX_FDS);
            let flags = m.raw_flags.unwrap_or(
                VERSION
                    | if m.need_reply {
                        VhostUserHeaderFlag::NEED_REPLY.bits()
                    } else {
                        0
                    },
            );
            c.send(m.code.value(), flags, m.raw_size, &b, fds);
        }
        Step::AvailIdx(idx) => c.guest_write(AVAIL + 2, &idx.to_le_bytes()),
        Step::Ring { entries, descs } => {
            for &(slot, head) in entries.iter().take(32) {
                let at = AVAIL + 4 + 2 * (u64::from(slot) % QSIZE);
                c.guest_write(at, &head.to_le_bytes());
            }
            for &(i, addr, len, flags, next) in descs.iter().take(32) {
                let mut d = addr.to_le_bytes().to_vec();
                d.extend_from_slice(&len.to_le_bytes());
                d.extend_from_slice(&flags.to_le_bytes());
                d.extend_from_slice(&next.to_le_bytes());
                c.guest_write(16 * (u64::from(i) % QSIZE), &d);
            }
        }
        Step::Poke { at, bytes } => c.guest_write(u64::from(*at), bytes),
        Step::Truncate(pages) => {
            if let Some(g) = &c.guest {
                // A sealed memfd refuses: that is the point of sealing it.
                let _ = g.set_len(u64::from(*pages) * PAGE % MEM_SIZE);
            }
        }
        Step::Kick => kick(kick_fd),
    }
}

fn run(input: Input) {
    let st = state();
    let _one = st.lock.lock().unwrap_or_else(|p| p.into_inner());
    let before = open_fds();
    let threads_before = thread_count();
    DEADLINE.store(
        epoch().elapsed().as_millis() as u64 + RUN_LIMIT.as_millis() as u64,
        Ordering::Release,
    );
    let sock = UnixStream::connect(&st.path).expect("connect");
    let (outer, _) = st.listener.accept().expect("accept");
    let conn = Connection::start(outer, st.disk.clone(), &st.config).expect("connection");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut c = Conn {
        fe: RawFrontend::from_stream(sock).expect("raw frontend"),
        keep: Vec::new(),
        guest: None,
    };

    let kick_fd = input
        .startup
        .map(|f| startup(&mut c, f, input.sealable, &input.ring));
    for step in input.steps.iter().take(32) {
        play(&mut c, step, &kick_fd);
    }
    if input.kick {
        kick(&kick_fd);
    }
    let _ = c.fe.socket().shutdown(std::net::Shutdown::Write);
    // Replies until the daemon closes the connection.
    let mut buf = [0u8; 4096];
    while matches!(c.fe.socket().read(&mut buf), Ok(n) if n > 0) {}
    let _ = conn.wait();
    drop((c, kick_fd));
    DEADLINE.store(0, Ordering::Release);
    // Everything the connection opened is closed again, and every thread it started has
    // ended (a leak per connection lets any client that can connect exhaust the daemon).
    // The first connections open descriptors that stay (lazily created process state).
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    if RUNS.fetch_add(1, Ordering::Relaxed) >= 3 {
        let after = open_fds();
        assert!(
            after <= before,
            "descriptors leaked: {before} open before the connection, {after} after: {:?}",
            fd_kinds()
        );
        // A joined thread leaves the task list a moment after the join returns.
        let deadline = Instant::now() + Duration::from_secs(2);
        while thread_count() > threads_before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            thread_count() <= threads_before,
            "threads outlive the connection: {threads_before} before, now {:#?}",
            threads()
        );
    }
}

fuzz_target!(|input: Input| run(input));
