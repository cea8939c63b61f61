//! The exec family of steps: files copied in from the archive, the user's command, and files
//! copied out; the command's output and the copied-out files travel to the host as
//! [`vloop_guest::frame`]s on the data port.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vloop_guest::frame::{self, FileHeader, FileKind, Tag, CHUNK};
use vloop_guest::{Event, Step, CONSOLE_PORT, DATA_PORT_NAME, HOME, PATH};

use super::Res;

/// How long the output of a command may keep flowing after the command itself exited (a
/// background process that still holds its stdout open is cut off then).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// The virtio-serial port that carries frames to the host.
#[derive(Clone)]
pub struct DataPort {
    file: Arc<Mutex<File>>,
    closed: Arc<AtomicBool>,
}

impl DataPort {
    /// Finds the port named [`DATA_PORT_NAME`] (waiting up to `limit` for it) and opens it.
    pub fn open(limit: Duration) -> Res<DataPort> {
        let t = Instant::now();
        loop {
            if let Some(dev) = find_port(DATA_PORT_NAME) {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&dev)
                    .map_err(|e| format!("open data port {}: {e}", dev.display()))?;
                return Ok(DataPort {
                    file: Arc::new(Mutex::new(f)),
                    closed: Arc::new(AtomicBool::new(false)),
                });
            }
            if t.elapsed() > limit {
                return Err(format!(
                    "virtio-serial port {DATA_PORT_NAME} did not appear within {limit:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `data` as frames of at most [`CHUNK`] bytes; nothing once the stream is closed.
    pub fn send(&self, tag: Tag, data: &[u8]) -> Res<()> {
        if data.is_empty() {
            return self.send_frame(&frame::encode(tag, &[]));
        }
        for c in data.chunks(CHUNK) {
            self.send_frame(&frame::encode(tag, c))?;
        }
        Ok(())
    }

    /// Sends a raw, already encoded frame.
    fn send_frame(&self, bytes: &[u8]) -> Res<()> {
        let mut f = self
            .file
            .lock()
            .map_err(|_| "data port lock poisoned".to_string())?;
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        f.write_all(bytes)
            .map_err(|e| format!("write data port: {e}"))
    }

    /// Sends [`Tag::End`]; later sends are dropped.
    pub fn finish(&self) {
        let _ = self.send(Tag::End, &[]);
        self.closed.store(true, Ordering::Release);
    }
}

/// `/dev/vportNpM` of the port named `name`, once the driver announced it.
fn find_port(name: &str) -> Option<PathBuf> {
    let rd = fs::read_dir("/sys/class/virtio-ports").ok()?;
    rd.flatten().find_map(|e| {
        let n = fs::read_to_string(e.path().join("name")).ok()?;
        let dev = Path::new("/dev").join(e.file_name());
        (n.trim() == name && dev.exists()).then_some(dev)
    })
}

/// A guest path: relative ones are relative to [`HOME`].
fn guest_path(p: &str) -> PathBuf {
    Path::new(HOME).join(p)
}

/// Runs one step of the exec family; `report` sends the command's [`Event::Exit`].
pub fn run(step: &Step, data: Option<&DataPort>, report: &dyn Fn(&Event)) -> Res<String> {
    match step {
        Step::CopyIn { from, to } => copy_in(Path::new(from), to),
        Step::Exec { argv, env, console } => {
            let (status, ms, detail) = if *console {
                exec_console(argv, env)?
            } else {
                let data = data.ok_or("exec needs the data port for its output")?;
                exec_piped(argv, env, data)?
            };
            report(&Event::Exit {
                status,
                ms,
                detail: detail.clone(),
            });
            Ok(detail)
        }
        Step::CopyOut { paths } => {
            let data = data.ok_or("copy-out needs the data port")?;
            copy_out(paths, data)
        }
        other => Err(format!("{} is not an exec step", other.op())),
    }
}

/// Where a copied-in item goes: into `to` when it names a folder, else `to` itself.
fn copy_in(from: &Path, to: &str) -> Res<String> {
    let name = from
        .file_name()
        .ok_or_else(|| format!("copy-in source {} has no name", from.display()))?;
    let target = guest_path(to);
    let dest = if to.ends_with('/') || target.is_dir() {
        target.join(name)
    } else {
        target
    };
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
    }
    match fs::rename(from, &dest) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => copy_tree(from, &dest)?,
        Err(e) => {
            return Err(format!(
                "move {} to {}: {e}",
                from.display(),
                dest.display()
            ))
        }
    }
    Ok(format!("{}", dest.display()))
}

/// Copies a file, symlink or folder (recursively), keeping permission bits.
fn copy_tree(from: &Path, to: &Path) -> Res<()> {
    let md = fs::symlink_metadata(from).map_err(|e| format!("stat {}: {e}", from.display()))?;
    if md.is_dir() {
        fs::create_dir_all(to).map_err(|e| format!("mkdir {}: {e}", to.display()))?;
        for e in fs::read_dir(from).map_err(|e| format!("list {}: {e}", from.display()))? {
            let e = e.map_err(|e| format!("list {}: {e}", from.display()))?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        fs::set_permissions(to, md.permissions())
            .map_err(|e| format!("chmod {}: {e}", to.display()))
    } else if md.file_type().is_symlink() {
        let t = fs::read_link(from).map_err(|e| format!("readlink {}: {e}", from.display()))?;
        std::os::unix::fs::symlink(&t, to).map_err(|e| format!("symlink {}: {e}", to.display()))
    } else {
        fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
    }
}

/// The command, with the environment every command gets.
fn command(argv: &[String], env: &[(String, String)], term: &str) -> Res<Command> {
    let (prog, args) = argv.split_first().ok_or("exec without a command")?;
    let mut c = Command::new(prog);
    c.args(args)
        .current_dir(HOME)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", HOME)
        .env("TERM", term)
        .envs(env.iter().map(|(k, v)| (k, v)));
    Ok(c)
}

/// The exit status of a command that could not start: 127 not found, 126 not runnable.
fn spawn_status(e: &std::io::Error) -> i32 {
    if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

/// The shell's convention: the exit code, or 128 + the signal.
fn status_code(st: std::process::ExitStatus) -> (i32, String) {
    match (st.code(), st.signal()) {
        (Some(c), _) => (c, format!("exited with status {c}")),
        (None, Some(sig)) => (128 + sig, format!("killed by signal {sig}")),
        (None, None) => (125, format!("ended with {st}")),
    }
}

fn ms_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Runs the command with stdin empty and stdout/stderr relayed to the data port as they come.
fn exec_piped(
    argv: &[String],
    env: &[(String, String)],
    data: &DataPort,
) -> Res<(i32, u64, String)> {
    let mut cmd = command(argv, env, "dumb")?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("vloop-guest: {}: {e}\n", argv[0]);
            data.send(Tag::Stderr, msg.as_bytes())?;
            return Ok((spawn_status(&e), 0, msg.trim().to_string()));
        }
    };
    let relays: Vec<_> = [
        child
            .stdout
            .take()
            .map(|p| (Tag::Stdout, Box::new(p) as Box<dyn Read + Send>)),
        child
            .stderr
            .take()
            .map(|p| (Tag::Stderr, Box::new(p) as Box<dyn Read + Send>)),
    ]
    .into_iter()
    .flatten()
    .map(|(tag, mut pipe)| {
        let port = data.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if port.send(tag, &buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        })
    })
    .collect();
    let st = child
        .wait()
        .map_err(|e| format!("wait for {}: {e}", argv[0]))?;
    let ms = ms_since(t);
    let end = Instant::now() + OUTPUT_GRACE;
    while relays.iter().any(|r| !r.is_finished()) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(2));
    }
    let (code, detail) = status_code(st);
    Ok((code, ms, detail))
}

/// Runs the command on the console as its controlling terminal (a session of its own).
fn exec_console(argv: &[String], env: &[(String, String)]) -> Res<(i32, u64, String)> {
    let term = env
        .iter()
        .find(|(k, _)| k == "TERM")
        .map_or("linux", |(_, v)| v.as_str())
        .to_string();
    let mut cmd = command(argv, env, &term)?;
    let tty = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONSOLE_PORT)
            .map_err(|e| format!("open {CONSOLE_PORT}: {e}"))
    };
    cmd.stdin(tty()?).stdout(tty()?).stderr(tty()?);
    // SAFETY: the closure runs in the child between fork and exec and calls only setsid(2)
    // and ioctl(2), which are async-signal-safe; fd 0 is the console opened above.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 1) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t = Instant::now();
    match cmd.spawn() {
        Ok(mut child) => {
            let st = child
                .wait()
                .map_err(|e| format!("wait for {}: {e}", argv[0]))?;
            let (code, detail) = status_code(st);
            Ok((code, ms_since(t), detail))
        }
        Err(e) => {
            let msg = format!("vloop-guest: {}: {e}", argv[0]);
            if let Ok(mut c) = tty() {
                let _ = writeln!(c, "{msg}\r");
            }
            Ok((spawn_status(&e), 0, msg))
        }
    }
}

/// Sends every item of `paths`; fails when any could not be read, after trying them all.
fn copy_out(paths: &[String], data: &DataPort) -> Res<String> {
    let mut problems = Vec::new();
    let mut sent = 0u64;
    for (i, p) in paths.iter().enumerate() {
        let item = u32::try_from(i).map_err(|_| "too many copy-out items".to_string())?;
        match send_tree(&guest_path(p), item, "", data) {
            Ok(n) => sent += n,
            Err(e) => problems.push(format!("{p}: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(format!("{} item(s), {sent} bytes", paths.len()))
    } else {
        Err(problems.join("; "))
    }
}

/// Sends one entry (and, for a folder, everything below it); returns the content bytes sent.
fn send_tree(path: &Path, item: u32, rel: &str, data: &DataPort) -> Res<u64> {
    let md = fs::symlink_metadata(path).map_err(|e| format!("stat {}: {e}", path.display()))?;
    let mut h = FileHeader {
        item,
        path: rel.to_string(),
        kind: FileKind::File,
        mode: md.permissions().mode() & 0o7777,
        size: 0,
        target: String::new(),
    };
    if md.is_dir() {
        h.kind = FileKind::Dir;
        data.send_frame(&frame::encode_file_start(&h))?;
        let mut names: Vec<_> = fs::read_dir(path)
            .map_err(|e| format!("list {}: {e}", path.display()))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        let mut n = 0u64;
        for name in names {
            let name_s = name
                .to_str()
                .ok_or_else(|| format!("non-UTF-8 name in {}", path.display()))?;
            let sub = if rel.is_empty() {
                name_s.to_string()
            } else {
                format!("{rel}/{name_s}")
            };
            n += send_tree(&path.join(&name), item, &sub, data)?;
        }
        Ok(n)
    } else if md.file_type().is_symlink() {
        h.kind = FileKind::Symlink;
        h.target = fs::read_link(path)
            .map_err(|e| format!("readlink {}: {e}", path.display()))?
            .to_string_lossy()
            .into_owned();
        data.send_frame(&frame::encode_file_start(&h))?;
        Ok(0)
    } else if md.is_file() {
        h.size = md.size();
        let mut f = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
        data.send_frame(&frame::encode_file_start(&h))?;
        let mut left = h.size;
        let mut buf = vec![0u8; CHUNK];
        while left > 0 {
            let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = f
                .read(&mut buf[..want])
                .map_err(|e| format!("read {}: {e}", path.display()))?;
            if n == 0 {
                return Err(format!("{} shrank while it was sent", path.display()));
            }
            data.send(Tag::FileData, &buf[..n])?;
            left -= n as u64;
        }
        Ok(h.size)
    } else {
        Err(format!(
            "{} is not a file, folder or symlink",
            path.display()
        ))
    }
}
