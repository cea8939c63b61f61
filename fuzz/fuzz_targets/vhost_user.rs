//! vhost-user message sequences from a hostile frontend, into the daemon's connection handling.
//!
//! Every run serves one connection as the daemon does (`vloop_blk::Connection`: a
//! `BlkDevice`, vhost-user-backend's request handler, and the relay in front of it, which
//! answers GET/SET_INFLIGHT_FD itself and checks every descriptor), connects a unix socket to
//! it and writes the messages the input describes: any request code, flags and body, with memfds
//! and eventfds attached where the input says so. An optional well-formed start-up (features,
//! memory table, one started vring) comes first so that later messages reach deeper states, and
//! the vring is kicked at the end so the worker thread reads whatever rings the input left in
//! guest memory. The daemon must not panic, must end the connection when the socket closes, and
//! must close every descriptor the connection opened.

#![no_main]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vloop_blk::{Config, Connection, Disk, EngineKind};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const VERSION: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
const PAGE: u64 = 4096;
/// Guest memory of the start-up sequence: 1 MiB at guest address 0, frontend address `UA`.
const UA: u64 = 0x7f00_0000_0000;
const MEM_SIZE: u64 = 1 << 20;
const PROTOCOL_FEATURES: u64 = 1 << 30;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Code {
    GetFeatures,
    SetFeatures,
    SetOwner,
    ResetOwner,
    SetMemTable,
    SetLogBase,
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
        match self {
            Code::GetFeatures => 1,
            Code::SetFeatures => 2,
            Code::SetOwner => 3,
            Code::ResetOwner => 4,
            Code::SetMemTable => 5,
            Code::SetLogBase => 6,
            Code::SetVringNum => 8,
            Code::SetVringAddr => 9,
            Code::SetVringBase => 10,
            Code::GetVringBase => 11,
            Code::SetVringKick => 12,
            Code::SetVringCall => 13,
            Code::SetVringErr => 14,
            Code::GetProtocolFeatures => 15,
            Code::SetProtocolFeatures => 16,
            Code::GetQueueNum => 17,
            Code::SetVringEnable => 18,
            Code::SetBackendReqFd => 21,
            Code::GetConfig => 24,
            Code::SetConfig => 25,
            Code::GetInflightFd => 31,
            Code::SetInflightFd => 32,
            Code::ResetDevice => 34,
            Code::GetMaxMemSlots => 36,
            Code::AddMemReg => 37,
            Code::RemMemReg => 38,
            Code::SetStatus => 39,
            Code::GetStatus => 40,
            Code::Raw(v) => v,
        }
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

#[derive(Arbitrary, Debug)]
enum Fd {
    Event { signalled: bool },
    Mem { pages: u8 },
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
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Run a well-formed start-up first, acknowledging these virtio features.
    startup: Option<u64>,
    /// Bytes written at guest address 0 (where the start-up vring lives) before the start-up.
    ring: Vec<u8>,
    msgs: Vec<Msg>,
    /// Kick queue 0 at the end.
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

fn state() -> &'static State {
    static S: OnceLock<State> = OnceLock::new();
    S.get_or_init(|| {
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

fn memfd(len: u64, fill: &[u8]) -> OwnedFd {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vloop-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let f = std::fs::File::from(fd);
    f.set_len(len).expect("memfd size");
    let n = fill.len().min(len as usize);
    std::os::unix::fs::FileExt::write_all_at(&f, &fill[..n], 0).expect("memfd fill");
    OwnedFd::from(f)
}

fn eventfd(signalled: bool) -> OwnedFd {
    let e = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    if signalled {
        let _ = e.write(1);
    }
    // SAFETY: the descriptor is duplicated from a live eventfd and owned by the result alone.
    unsafe { OwnedFd::from_raw_fd(libc::dup(e.as_raw_fd())) }
}

struct Conn {
    sock: UnixStream,
    /// Keeps every attached descriptor open until the connection ends.
    keep: Vec<OwnedFd>,
}

impl Conn {
    fn send(&mut self, code: u32, flags: u32, size: Option<u32>, body: &[u8], fds: Vec<OwnedFd>) {
        let mut hdr = [0u8; 12];
        hdr[0..4].copy_from_slice(&code.to_le_bytes());
        hdr[4..8].copy_from_slice(&flags.to_le_bytes());
        hdr[8..12].copy_from_slice(&size.unwrap_or(body.len() as u32).to_le_bytes());
        let mut msg = hdr.to_vec();
        msg.extend_from_slice(body);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        // A closed peer is fine: the daemon may end the connection on any message.
        let _ = if raw.is_empty() {
            self.sock.write_all(&msg).map(|_| msg.len())
        } else {
            self.sock
                .send_with_fds(&[&msg[..]], &raw)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        };
        self.keep.extend(fds);
    }
}

fn le64(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn mem_table(regions: &[Region], count: Option<u32>) -> (Vec<u8>, Vec<OwnedFd>) {
    let regions = &regions[..regions.len().min(9)];
    let mut body = Vec::new();
    body.extend_from_slice(&count.unwrap_or(regions.len() as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
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
        // The file covers the mapping, as a frontend's memory backend does.
        fds.push(memfd(offset + size.max(PAGE), &r.fill));
    }
    (body, fds)
}

fn startup(c: &mut Conn, features: u64, ring: &[u8]) -> OwnedFd {
    let f = VERSION;
    c.send(3, f, None, &[], vec![]);
    c.send(1, f, None, &[], vec![]);
    c.send(15, f, None, &[], vec![]);
    // CONFIG | MQ | REPLY_ACK.
    c.send(16, f, None, &le64(&[(1 << 9) | 1 | (1 << 3)]), vec![]);
    c.send(
        2,
        f,
        None,
        &le64(&[features | PROTOCOL_FEATURES | (1 << 32)]),
        vec![],
    );
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend(le64(&[0, MEM_SIZE, UA, 0]));
    c.send(5, f, None, &table, vec![memfd(MEM_SIZE, ring)]);
    let mut st = Vec::new();
    st.extend_from_slice(&0u32.to_le_bytes());
    st.extend_from_slice(&16u32.to_le_bytes());
    c.send(8, f, None, &st, vec![]);
    let mut base = Vec::new();
    base.extend_from_slice(&0u32.to_le_bytes());
    base.extend_from_slice(&0u32.to_le_bytes());
    c.send(10, f, None, &base, vec![]);
    let mut addr = Vec::new();
    addr.extend_from_slice(&0u32.to_le_bytes());
    addr.extend_from_slice(&0u32.to_le_bytes());
    addr.extend(le64(&[UA, UA + 0x2000, UA + 0x1000, 0]));
    c.send(9, f, None, &addr, vec![]);
    c.send(13, f, None, &le64(&[0]), vec![eventfd(false)]);
    let kick = eventfd(false);
    // SAFETY: duplicating a live descriptor; the copy is owned by the returned OwnedFd.
    let mine = unsafe { OwnedFd::from_raw_fd(libc::dup(kick.as_raw_fd())) };
    c.send(12, f, None, &le64(&[0]), vec![kick]);
    let mut en = Vec::new();
    en.extend_from_slice(&0u32.to_le_bytes());
    en.extend_from_slice(&1u32.to_le_bytes());
    c.send(18, f, None, &en, vec![]);
    mine
}

fn body(b: &Body) -> (Vec<u8>, Vec<OwnedFd>) {
    let two = |a: u32, b: u32| {
        let mut v = a.to_le_bytes().to_vec();
        v.extend_from_slice(&b.to_le_bytes());
        v
    };
    match b {
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
            v.extend(le64(&[
                UA + u64::from(*desc),
                UA + u64::from(*used),
                UA + u64::from(*avail),
                0,
            ]));
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

fn run(input: Input) {
    let st = state();
    let _one = st.lock.lock().unwrap_or_else(|p| p.into_inner());
    let before = open_fds();
    let sock = UnixStream::connect(&st.path).expect("connect");
    let (outer, _) = st.listener.accept().expect("accept");
    let conn = Connection::start(outer, st.disk.clone(), &st.config).expect("connection");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    sock.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut c = Conn {
        sock,
        keep: Vec::new(),
    };

    let kick = input.startup.map(|f| startup(&mut c, f, &input.ring));
    for m in input.msgs.iter().take(32) {
        let (b, mut fds) = body(&m.body);
        for fd in m.fds.iter().take(4) {
            fds.push(match fd {
                Fd::Event { signalled } => eventfd(*signalled),
                Fd::Mem { pages } => memfd(u64::from(*pages % 17) * PAGE, &[]),
            });
        }
        let flags = m
            .raw_flags
            .unwrap_or(VERSION | if m.need_reply { NEED_REPLY } else { 0 });
        c.send(m.code.value(), flags, m.raw_size, &b, fds);
    }
    if input.kick {
        if let Some(k) = &kick {
            // SAFETY: writing 8 bytes from a live u64 to an eventfd we own.
            unsafe { libc::write(k.as_raw_fd(), (&1u64 as *const u64).cast(), 8) };
        }
    }
    let _ = c.sock.shutdown(std::net::Shutdown::Write);
    // Replies until the daemon closes the connection.
    let mut buf = [0u8; 4096];
    while matches!(c.sock.read(&mut buf), Ok(n) if n > 0) {}
    let _ = conn.wait();
    drop((c, kick));
    // Everything the connection opened is closed again (a leak per connection lets any
    // client that can connect exhaust the daemon's descriptors).
    // The first connections open descriptors that stay (lazily created process state).
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let after = open_fds();
    if RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 3 {
        assert!(
            after <= before,
            "descriptors leaked: {before} open before the connection, {after} after: {:?}",
            fd_kinds()
        );
    }
}

fuzz_target!(|input: Input| run(input));
