//! The host end of `exec`'s data channel: QEMU connects the guest's data port to a socket
//! the harness listens on; a thread decodes the frames as they come, writes the command's
//! stdout and stderr to the harness's own (flushed per frame, so output streams) or hands
//! each line of stdout to a [`LineSink`], and writes the copied-out files into place. Paths
//! from the guest are confined to their target.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vloop_guest::frame::{Decoder, FileHeader, FileKind, Frame};

/// Receives each line of the command's stdout, without its line end, on the data channel's
/// thread as soon as the line is complete.
pub type LineSink = Box<dyn FnMut(&str) + Send>;

/// The longest line handed to a [`LineSink`]; a longer one is handed over in pieces this long.
pub const MAX_LINE: usize = 1 << 20;

/// A writer that cuts the bytes it is given into lines for a [`LineSink`] (invalid UTF-8
/// replaced, a `\r` before the `\n` dropped); [`Lines::finish`] hands over a last line that
/// has no line end.
pub struct Lines {
    sink: LineSink,
    partial: Vec<u8>,
}

impl Lines {
    /// Lines for `sink`.
    pub fn new(sink: LineSink) -> Self {
        Self {
            sink,
            partial: Vec::new(),
        }
    }

    fn deliver(&mut self, mut line: Vec<u8>) {
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        (self.sink)(&String::from_utf8_lossy(&line));
    }

    /// Hands over what is left, if anything.
    pub fn finish(&mut self) {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.deliver(rest);
        }
    }
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.partial.drain(..=i).collect();
            line.pop();
            self.deliver(line);
        }
        while self.partial.len() > MAX_LINE {
            let piece: Vec<u8> = self.partial.drain(..MAX_LINE).collect();
            self.deliver(piece);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the channel carried, once it is closed.
#[derive(Debug, Default)]
pub struct Received {
    /// The guest sent [`Frame::End`]: nothing was lost.
    pub ended: bool,
    /// Bytes of stdout and of stderr.
    pub stdout: u64,
    /// Bytes of stderr.
    pub stderr: u64,
    /// Copied-out entries written.
    pub entries: u64,
    /// Why the stream or a copied-out file went wrong, if it did.
    pub errors: Vec<String>,
}

/// Writes copied-out entries under their targets.
#[derive(Debug)]
pub struct CopyOutWriter {
    targets: Vec<PathBuf>,
    /// The file being written (none when its entry failed: its data is dropped), its path
    /// and the bytes still to come.
    current: Option<(Option<File>, PathBuf, u64)>,
}

impl CopyOutWriter {
    /// Item `i` of the guest's copy-out lands at `targets[i]`.
    pub fn new(targets: Vec<PathBuf>) -> Self {
        Self {
            targets,
            current: None,
        }
    }

    /// Where entry `h` goes: its item's target, then its path below, which must be plain
    /// names (no `..`, no root).
    fn dest(&self, h: &FileHeader) -> Result<PathBuf, String> {
        let root = usize::try_from(h.item)
            .ok()
            .and_then(|i| self.targets.get(i))
            .ok_or_else(|| format!("copy-out item {} was not asked for", h.item))?;
        let rel = Path::new(&h.path);
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(format!("copy-out path {:?} leaves its target", h.path));
        }
        if h.path.is_empty() {
            Ok(root.clone())
        } else {
            Ok(root.join(rel))
        }
    }

    /// The file being written got all its bytes (or there is none).
    fn close_current(&mut self) -> Result<(), String> {
        match self.current.take() {
            Some((Some(_), p, left)) if left > 0 => Err(format!(
                "{}: {left} bytes missing (the guest stopped sending it)",
                p.display()
            )),
            _ => Ok(()),
        }
    }

    /// Starts an entry; when it cannot be written, its data is dropped.
    pub fn start(&mut self, h: &FileHeader) -> Result<(), String> {
        self.close_current()?;
        let r = self.start_entry(h);
        if r.is_err() && h.kind == FileKind::File {
            self.current = Some((None, PathBuf::from(&h.path), h.size));
        }
        r
    }

    fn start_entry(&mut self, h: &FileHeader) -> Result<(), String> {
        let dest = self.dest(h)?;
        let err = |what: &str, e: std::io::Error| format!("{what} {}: {e}", dest.display());
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| err("creating the folder of", e))?;
        }
        match h.kind {
            FileKind::Dir => {
                fs::create_dir_all(&dest).map_err(|e| err("creating", e))?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(h.mode | 0o700))
                    .map_err(|e| err("chmod", e))?;
            }
            FileKind::Symlink => {
                let _ = fs::remove_file(&dest);
                std::os::unix::fs::symlink(&h.target, &dest).map_err(|e| err("symlink", e))?;
            }
            FileKind::File => {
                let f = File::create(&dest).map_err(|e| err("creating", e))?;
                f.set_permissions(fs::Permissions::from_mode(h.mode | 0o600))
                    .map_err(|e| err("chmod", e))?;
                self.current = Some((Some(f), dest, h.size));
            }
        }
        Ok(())
    }

    /// Content of the entry last started.
    pub fn data(&mut self, bytes: &[u8]) -> Result<(), String> {
        let Some((f, p, left)) = self.current.as_mut() else {
            return Err("copy-out data without a file".into());
        };
        let n = bytes.len() as u64;
        if n > *left {
            return Err(format!("{}: more bytes than announced", p.display()));
        }
        *left -= n;
        match f {
            Some(f) => f
                .write_all(bytes)
                .map_err(|e| format!("writing {}: {e}", p.display())),
            None => Ok(()),
        }
    }

    /// The stream ended.
    pub fn finish(&mut self) -> Result<(), String> {
        self.close_current()
    }
}

/// Applies one frame; false once the stream is complete.
pub fn apply(
    frame: Frame,
    out: &mut dyn Write,
    err: &mut dyn Write,
    files: &mut CopyOutWriter,
    got: &mut Received,
) -> bool {
    let r = match frame {
        Frame::End => {
            got.ended = true;
            if let Err(e) = files.finish() {
                got.errors.push(e);
            }
            return false;
        }
        Frame::Stdout(b) => {
            got.stdout += b.len() as u64;
            out.write_all(&b)
                .and_then(|()| out.flush())
                .map_err(|e| format!("stdout: {e}"))
        }
        Frame::Stderr(b) => {
            got.stderr += b.len() as u64;
            err.write_all(&b)
                .and_then(|()| err.flush())
                .map_err(|e| format!("stderr: {e}"))
        }
        Frame::FileStart(h) => {
            got.entries += 1;
            files.start(&h)
        }
        Frame::FileData(b) => files.data(&b),
    };
    if let Err(e) = r {
        got.errors.push(e);
    }
    true
}

/// The channel's thread.
pub struct Relay {
    handle: JoinHandle<Received>,
    ended: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Accepts QEMU's connection on `listener` and relays it until the guest sends End or
    /// QEMU closes the socket.
    pub fn start(listener: UnixListener, targets: Vec<PathBuf>) -> std::io::Result<Relay> {
        Relay::start_with(listener, targets, None)
    }

    /// [`Relay::start`], handing the command's stdout line by line to `stdout` instead of
    /// writing it to this process's stdout, when given.
    pub fn start_with(
        listener: UnixListener,
        targets: Vec<PathBuf>,
        stdout: Option<LineSink>,
    ) -> std::io::Result<Relay> {
        listener.set_nonblocking(true)?;
        let ended = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (e2, s2) = (ended.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("exec-data".into())
            .spawn(move || {
                let mut lines = stdout.map(Lines::new);
                let got = relay(listener, targets, lines.as_mut(), &e2, &s2);
                if let Some(l) = lines.as_mut() {
                    l.finish();
                }
                got
            })?;
        Ok(Relay {
            handle,
            ended,
            stop,
        })
    }

    /// Whether the guest closed the stream with End.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Waits for the thread (QEMU is gone, so its socket is closed) and returns what came.
    pub fn finish(self) -> Received {
        self.stop.store(true, Ordering::Release);
        self.handle.join().unwrap_or_else(|_| Received {
            errors: vec!["the data channel's thread panicked".into()],
            ..Received::default()
        })
    }
}

fn relay(
    listener: UnixListener,
    targets: Vec<PathBuf>,
    mut lines: Option<&mut Lines>,
    ended: &AtomicBool,
    stop: &AtomicBool,
) -> Received {
    let mut got = Received::default();
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Acquire) {
                    return got;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                got.errors.push(format!("data channel: accept: {e}"));
                return got;
            }
        }
    };
    if let Err(e) = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(Duration::from_millis(100))))
    {
        got.errors.push(format!("data channel: {e}"));
        return got;
    }
    let mut files = CopyOutWriter::new(targets);
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 256 * 1024];
    let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => dec.push(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                got.errors.push(format!("data channel: read: {e}"));
                break;
            }
        }
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    let more = match lines.as_deref_mut() {
                        Some(l) => apply(f, l, &mut stderr.lock(), &mut files, &mut got),
                        None => apply(
                            f,
                            &mut stdout.lock(),
                            &mut stderr.lock(),
                            &mut files,
                            &mut got,
                        ),
                    };
                    if !more {
                        ended.store(true, Ordering::Release);
                        return got;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    got.errors.push(e.to_string());
                    return got;
                }
            }
        }
    }
    if let Err(e) = files.finish() {
        got.errors.push(e);
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(item: u32, path: &str, kind: FileKind, size: u64) -> FileHeader {
        FileHeader {
            item,
            path: path.into(),
            kind,
            mode: 0o640,
            size,
            target: "t".into(),
        }
    }

    #[test]
    fn frames_become_output_and_files() {
        let t = tempfile::tempdir().unwrap();
        let mut w = CopyOutWriter::new(vec![t.path().join("one.bin"), t.path().join("tree")]);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut got = Received::default();
        let frames = vec![
            Frame::Stdout(b"hi\n".to_vec()),
            Frame::Stderr(b"oops\n".to_vec()),
            Frame::FileStart(header(0, "", FileKind::File, 4)),
            Frame::FileData(vec![1, 2]),
            Frame::FileData(vec![3, 4]),
            Frame::FileStart(header(1, "", FileKind::Dir, 0)),
            Frame::FileStart(header(1, "sub/x", FileKind::File, 1)),
            Frame::FileData(vec![9]),
            Frame::FileStart(header(1, "l", FileKind::Symlink, 0)),
        ];
        for f in frames {
            assert!(apply(f, &mut out, &mut err, &mut w, &mut got));
        }
        assert!(!apply(Frame::End, &mut out, &mut err, &mut w, &mut got));
        assert!(got.ended && got.errors.is_empty(), "{:?}", got.errors);
        assert_eq!(
            (out.as_slice(), err.as_slice()),
            (&b"hi\n"[..], &b"oops\n"[..])
        );
        assert_eq!(fs::read(t.path().join("one.bin")).unwrap(), [1, 2, 3, 4]);
        assert_eq!(fs::read(t.path().join("tree/sub/x")).unwrap(), [9]);
        assert_eq!(
            fs::read_link(t.path().join("tree/l")).unwrap(),
            PathBuf::from("t")
        );
        assert_eq!(got.entries, 4);
    }

    #[test]
    fn stdout_is_cut_into_lines_for_a_sink() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let s2 = seen.clone();
        let mut l = Lines::new(Box::new(move |line: &str| {
            s2.lock().unwrap().push(line.to_string())
        }));
        l.write_all(b"one\r\ntw").unwrap();
        l.write_all(b"o\n\nthree\xff").unwrap();
        assert_eq!(*seen.lock().unwrap(), ["one", "two", ""]);
        l.finish();
        l.finish();
        assert_eq!(seen.lock().unwrap()[3], "three\u{fffd}");
        l.write_all(&vec![b'x'; MAX_LINE + 5]).unwrap();
        assert_eq!(seen.lock().unwrap()[4].len(), MAX_LINE);
        l.finish();
        assert_eq!(seen.lock().unwrap()[5], "xxxxx");
    }

    #[test]
    fn hostile_or_short_copies_are_errors() {
        let t = tempfile::tempdir().unwrap();
        let mut w = CopyOutWriter::new(vec![t.path().join("x")]);
        assert!(w.data(b"x").unwrap_err().contains("without a file"));
        assert!(w.start(&header(0, "../evil", FileKind::File, 1)).is_err());
        assert!(w.start(&header(0, "/etc/evil", FileKind::Dir, 0)).is_err());
        assert!(w.start(&header(3, "", FileKind::File, 0)).is_err());
        assert!(!t.path().parent().unwrap().join("evil").exists());
        w.start(&header(0, "", FileKind::File, 2)).unwrap();
        assert!(w.data(b"abc").unwrap_err().contains("more bytes"));
        w.data(b"a").unwrap();
        assert!(w.finish().unwrap_err().contains("1 bytes missing"));
        // An entry that cannot be written reports once; its data is dropped quietly.
        std::fs::remove_file(t.path().join("x")).unwrap();
        std::fs::create_dir_all(t.path().join("x")).unwrap();
        assert!(w.start(&header(0, "", FileKind::File, 2)).is_err());
        w.data(b"ab").unwrap();
        w.finish().unwrap();
    }
}
