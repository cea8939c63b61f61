//! vhost-user-blk backend processes: the command line that exports one image with each backend
//! program the project knows (vloop-blk, qemu-storage-daemon, or any program described by a
//! command template), and a running backend that is killed when dropped, so a failing test,
//! benchmark or guest run never leaves one behind.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::process::ChildGuard;

/// Errors of starting a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The program could not be executed.
    #[error("cannot run {program}: is it installed (or built) at that path?")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The program exited before its socket appeared.
    #[error("{name} exited ({status}) before listening on {socket}; its last log lines:\n{log}")]
    Exited {
        /// Backend name.
        name: String,
        /// Exit status.
        status: ExitStatus,
        /// Socket path.
        socket: PathBuf,
        /// The tail of its log.
        log: String,
    },
    /// The socket did not appear in time.
    #[error("{name} did not create {socket} within {after:?}; its last log lines:\n{log}")]
    NoSocket {
        /// Backend name.
        name: String,
        /// Socket path.
        socket: PathBuf,
        /// Time waited.
        after: Duration,
        /// The tail of its log.
        log: String,
    },
    /// The log file could not be created.
    #[error("cannot create log file {path}")]
    Log {
        /// Log path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A backend program and the command-line convention it follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// `vloop-blk` at this path: `--socket-path S --blk-file F [--format raw|qcow2]
    /// [--read-only] [--num-queues N] [--direct] [--io-engine null]`.
    Vloop(PathBuf),
    /// `qemu-storage-daemon` at this path (`--blockdev driver=file,... [--blockdev
    /// driver=qcow2,...] --export type=vhost-user-blk,...`, `aio=io_uring`, discards passed
    /// down), serving from its main loop or, with `iothread`, from an iothread (how its users
    /// run it for speed).
    Qsd {
        /// The program (usually `qemu-storage-daemon` on PATH).
        bin: PathBuf,
        /// Serve the export from an iothread.
        iothread: bool,
    },
    /// Any program, described by a command template (see [`Template`]).
    Template(Template),
}

/// Errors of parsing a backend command template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The quoting does not close (an unmatched `'` or `"`, or a trailing `\`).
    #[error("backend command template {0:?}: unbalanced quotes or a trailing backslash")]
    Quoting(String),
    /// The template has no words.
    #[error("backend command template is empty")]
    Empty,
    /// A `{name}` that is not one of the placeholders.
    #[error(
        "backend command template: unknown placeholder {{{0}}}: use {{socket}}, {{image}}, \
         {{writable}}, {{queues}} (and {{{{ or }}}} for a literal brace)"
    )]
    Unknown(String),
    /// A `{` without its `}`, or a lone `}`.
    #[error("backend command template: unmatched brace in {0:?} (write {{{{ or }}}} for a literal brace)")]
    Brace(String),
    /// The template never names the socket, so the backend could not know where to listen.
    #[error("backend command template must contain {{socket}}: the backend listens there")]
    NoSocket,
}

/// A value the harness fills into a [`Template`] for each disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    /// `{socket}`: the vhost-user socket path to listen on.
    Socket,
    /// `{image}`: the image file.
    Image,
    /// `{writable}`: `on` or `off`.
    Writable,
    /// `{queues}`: the number of virtqueues.
    Queues,
}

/// One piece of a template word.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Text copied as it is.
    Text(String),
    /// A value filled in per disk.
    Value(Placeholder),
}

/// A backend command line with placeholders, e.g.
/// `qemu-storage-daemon --blockdev driver=file,node-name=f,filename={image} --export
/// type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={socket},writable={writable}`.
///
/// The text is split into words like a POSIX shell does (quotes and backslashes, no
/// expansions), then `{socket}`, `{image}`, `{writable}` (`on`/`off`) and `{queues}` are
/// replaced inside each word, so a value with spaces stays one word; `{{` and `}}` are
/// literal braces. Values are filled in as they are (no QEMU `,,` escaping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    words: Vec<Vec<Piece>>,
}

impl Template {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let split = shlex::split(text).ok_or_else(|| TemplateError::Quoting(text.to_string()))?;
        if split.is_empty() {
            return Err(TemplateError::Empty);
        }
        let words = split
            .iter()
            .map(|w| parse_word(w))
            .collect::<Result<Vec<_>, _>>()?;
        let names_socket = words
            .iter()
            .flatten()
            .any(|p| *p == Piece::Value(Placeholder::Socket));
        if !names_socket {
            return Err(TemplateError::NoSocket);
        }
        Ok(Template {
            text: text.to_string(),
            words,
        })
    }

    /// The text it was parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The words with the values of `export` filled in; the first is the program.
    pub fn words(&self, export: &Export) -> Vec<String> {
        self.words
            .iter()
            .map(|pieces| {
                pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Text(t) => t.clone(),
                        Piece::Value(Placeholder::Socket) => {
                            export.socket.to_string_lossy().into_owned()
                        }
                        Piece::Value(Placeholder::Image) => {
                            export.image.to_string_lossy().into_owned()
                        }
                        Piece::Value(Placeholder::Writable) => {
                            if export.read_only { "off" } else { "on" }.to_string()
                        }
                        Piece::Value(Placeholder::Queues) => export.queues.max(1).to_string(),
                    })
                    .collect()
            })
            .collect()
    }
}

impl std::str::FromStr for Template {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Template::parse(s)
    }
}

/// Splits one word into text and placeholders.
fn parse_word(word: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => name.push(c),
                        None => return Err(TemplateError::Brace(word.to_string())),
                    }
                }
                let value = match name.as_str() {
                    "socket" => Placeholder::Socket,
                    "image" => Placeholder::Image,
                    "writable" => Placeholder::Writable,
                    "queues" => Placeholder::Queues,
                    _ => return Err(TemplateError::Unknown(name)),
                };
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Value(value));
            }
            '}' => return Err(TemplateError::Brace(word.to_string())),
            c => text.push(c),
        }
    }
    if !text.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

impl Program {
    /// qemu-storage-daemon from PATH, main loop.
    pub fn qsd() -> Program {
        Program::Qsd {
            bin: "qemu-storage-daemon".into(),
            iothread: false,
        }
    }

    /// Short name for tables and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Program::Vloop(_) => "vloop-blk",
            Program::Qsd {
                iothread: false, ..
            } => "qsd",
            Program::Qsd { iothread: true, .. } => "qsd-iothread",
            Program::Template(_) => "backend-cmd",
        }
    }
}

/// The format an export's image is served in, as the backend is told it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ImageFormat {
    /// Nothing said: vloop-blk decides with its `--format auto` rule (a file not named
    /// `*.qcow2` that does not look like another format is served as raw); qemu-storage-daemon
    /// exports the file node itself, the bytes as they are.
    #[default]
    Auto,
    /// The bytes of the file as they are: vloop-blk `--format raw`; qemu-storage-daemon
    /// exports the file node itself.
    Raw,
    /// A qcow2 image with its backing chain: vloop-blk `--format qcow2`; qemu-storage-daemon
    /// exports a `driver=qcow2` node over the file node (discards freeing clusters, as
    /// vloop-blk's do), which opens the backing chain the image header names.
    Qcow2 {
        /// Size in bytes of qemu-storage-daemon's qcow2 metadata cache (`cache-size=`; `None`:
        /// QEMU's default, which holds every L2 table of an image of up to 256 GiB with 64 KiB
        /// clusters). vloop-blk sizes its metadata cache itself and is given nothing.
        cache_size: Option<u64>,
    },
}

impl ImageFormat {
    /// Name in tables and JSON: `auto`, `raw` or `qcow2`.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Auto => "auto",
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 { .. } => "qcow2",
        }
    }
}

/// One image exported over one vhost-user-blk socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Image file (or block device).
    pub image: PathBuf,
    /// The format the image is served in.
    pub format: ImageFormat,
    /// Socket path to listen on (removed first if it exists).
    pub socket: PathBuf,
    /// Number of virtqueues.
    pub queues: u16,
    /// Export read-only.
    pub read_only: bool,
    /// Open the image with O_DIRECT (qemu-storage-daemon: `cache.direct=on`).
    pub direct: bool,
    /// Serve a null device of this many bytes (give the image's size): every request
    /// completes without touching the image, so a run measures the vhost-user hop alone.
    /// vloop-blk: `--io-engine null` (it still opens and locks the image and takes its size
    /// from it); qemu-storage-daemon: `--blockdev driver=null-co,size=N,read-zeroes=off` (the
    /// image is not opened).
    pub null: Option<u64>,
}

impl Export {
    /// A read-write, one-queue, buffered export of `image` on `socket`, in the format the
    /// program decides by itself ([`ImageFormat::Auto`]).
    pub fn new(image: impl Into<PathBuf>, socket: impl Into<PathBuf>) -> Export {
        Export {
            image: image.into(),
            format: ImageFormat::Auto,
            socket: socket.into(),
            queues: 1,
            read_only: false,
            direct: false,
            null: None,
        }
    }
}

/// Everything needed to start one backend process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// The program.
    pub program: Program,
    /// What it exports.
    pub export: Export,
    /// Extra arguments appended to the command line.
    pub extra_args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

/// QEMU option values escape ',' by doubling it.
pub fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

impl BackendSpec {
    /// A spec with no extra arguments.
    pub fn new(program: Program, export: Export) -> BackendSpec {
        BackendSpec {
            program,
            export,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The program's arguments.
    pub fn args(&self) -> Vec<String> {
        let e = &self.export;
        let img = e.image.to_string_lossy();
        let sock = e.socket.to_string_lossy();
        let mut a = match &self.program {
            Program::Vloop(_) => {
                let mut a = vec![
                    "--socket-path".to_string(),
                    sock.into_owned(),
                    "--blk-file".into(),
                    img.into_owned(),
                ];
                if e.format != ImageFormat::Auto {
                    a.push("--format".into());
                    a.push(e.format.name().into());
                }
                if e.read_only {
                    a.push("--read-only".into());
                }
                if e.queues != 1 {
                    a.push("--num-queues".into());
                    a.push(e.queues.to_string());
                }
                if e.direct {
                    a.push("--direct".into());
                }
                if e.null.is_some() {
                    a.push("--io-engine".into());
                    a.push("null".into());
                }
                a
            }
            Program::Qsd { iothread, .. } => {
                let mut a = Vec::new();
                if *iothread {
                    a.push("--object".to_string());
                    a.push("iothread,id=iothread0".to_string());
                }
                let read_only = if e.read_only { ",read-only=on" } else { "" };
                a.push("--blockdev".into());
                a.push(match e.null {
                    Some(size) => {
                        format!("driver=null-co,node-name=f,size={size},read-zeroes=off{read_only}")
                    }
                    None => format!(
                        "driver=file,node-name=f,filename={},aio=io_uring,cache.direct={},discard=unmap{read_only}",
                        qemu_escape(&img),
                        if e.direct { "on" } else { "off" },
                    ),
                });
                // The node the export serves: the file (or null) node, or a qcow2 node over it.
                let node = match (e.format, e.null) {
                    (ImageFormat::Qcow2 { cache_size }, None) => {
                        a.push("--blockdev".into());
                        a.push(format!(
                            "driver=qcow2,node-name=q,file=f,discard=unmap{}{read_only}",
                            cache_size.map_or_else(String::new, |n| format!(",cache-size={n}"))
                        ));
                        "q"
                    }
                    _ => "f",
                };
                a.push("--export".into());
                a.push(format!(
                    "type=vhost-user-blk,id=e,node-name={node},addr.type=unix,addr.path={},writable={},num-queues={}{}",
                    qemu_escape(&sock),
                    if e.read_only { "off" } else { "on" },
                    e.queues.max(1),
                    if *iothread { ",iothread=iothread0" } else { "" }
                ));
                a
            }
            Program::Template(t) => t.words(e).into_iter().skip(1).collect(),
        };
        a.extend(self.extra_args.iter().cloned());
        a
    }

    /// The command line that starts this export (no redirections).
    pub fn command(&self) -> Command {
        let bin = match &self.program {
            Program::Vloop(bin) | Program::Qsd { bin, .. } => bin.clone(),
            Program::Template(t) => t
                .words(&self.export)
                .into_iter()
                .next()
                .map(PathBuf::from)
                .unwrap_or_default(),
        };
        let mut c = Command::new(bin);
        c.args(self.args());
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

/// The last `lines` lines of the file at `path` (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Lines of log given in error messages.
const LOG_TAIL_LINES: usize = 20;

/// A running backend; killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct BackendProcess {
    child: ChildGuard,
    name: String,
    socket: PathBuf,
    log: PathBuf,
}

impl BackendProcess {
    /// Starts `spec` with stdout and stderr going to `log`, and waits up to `timeout` for its
    /// socket to appear.
    pub fn spawn(
        spec: &BackendSpec,
        log: &Path,
        timeout: Duration,
    ) -> Result<BackendProcess, BackendError> {
        Self::spawn_with(spec, log, timeout, |_| {})
    }

    /// As [`Self::spawn`], with `tweak` applied to the command first (a `pre_exec` hook that
    /// lowers a resource limit or changes user, a working directory, a umask).
    pub fn spawn_with(
        spec: &BackendSpec,
        log: &Path,
        timeout: Duration,
        tweak: impl FnOnce(&mut Command),
    ) -> Result<BackendProcess, BackendError> {
        let socket = spec.export.socket.clone();
        let _ = std::fs::remove_file(&socket);
        let log_err = |source| BackendError::Log {
            path: log.to_path_buf(),
            source,
        };
        let out = File::create(log).map_err(log_err)?;
        let err = out.try_clone().map_err(log_err)?;
        let mut cmd = spec.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        tweak(&mut cmd);
        let program = PathBuf::from(cmd.get_program());
        tracing::debug!(?cmd, "starting backend");
        let child = cmd
            .spawn()
            .map_err(|source| BackendError::Spawn { program, source })?;
        let name = spec.program.name().to_string();
        let mut p = BackendProcess {
            child: ChildGuard::new(child, name.clone()),
            name,
            socket,
            log: log.to_path_buf(),
        };
        let start = Instant::now();
        loop {
            if let Some(status) = p.child.try_wait() {
                return Err(BackendError::Exited {
                    name: p.name.clone(),
                    status,
                    socket: p.socket.clone(),
                    log: p.log_tail(LOG_TAIL_LINES),
                });
            }
            if p.socket.exists() {
                return Ok(p);
            }
            if start.elapsed() > timeout {
                return Err(BackendError::NoSocket {
                    name: p.name.clone(),
                    socket: p.socket.clone(),
                    after: timeout,
                    log: p.log_tail(LOG_TAIL_LINES),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Log file path.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Backend name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Its exit status, once it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Sends SIGTERM, waits up to `grace` for the exit, then kills it; returns its status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.child.stop(grace)
    }

    /// Waits up to `limit` for it to exit on its own.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.child.wait_timeout(limit)
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.child.kill()
    }
}

/// Whether `program` can be found on PATH.
pub fn on_path(program: &str) -> bool {
    which(program).is_some()
}

/// `program` as found on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A binary of this workspace built beside the running executable: in the same directory, or
/// one level up (test executables live in `<target>/<profile>/deps/`).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> Export {
        Export {
            image: "/tmp/a,b.img".into(),
            format: ImageFormat::Auto,
            socket: "/tmp/s,.sock".into(),
            queues: 2,
            read_only: false,
            direct: true,
            null: None,
        }
    }

    #[test]
    fn qsd_command_escapes_commas_and_sets_modes() {
        let a = BackendSpec::new(Program::qsd(), export()).args();
        assert_eq!(a[0], "--blockdev");
        assert_eq!(
            a[1],
            "driver=file,node-name=f,filename=/tmp/a,,b.img,aio=io_uring,cache.direct=on,discard=unmap"
        );
        assert_eq!(
            a[3],
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/s,,.sock,writable=on,num-queues=2"
        );
        let ro = Export {
            read_only: true,
            direct: false,
            ..export()
        };
        let a = BackendSpec::new(Program::qsd(), ro).args();
        assert!(
            a[1].ends_with("cache.direct=off,discard=unmap,read-only=on"),
            "{}",
            a[1]
        );
        assert!(a[3].contains("writable=off"), "{}", a[3]);
    }

    #[test]
    fn qsd_iothread_serves_the_export_from_it() {
        let p = Program::Qsd {
            bin: "qemu-storage-daemon".into(),
            iothread: true,
        };
        let a = BackendSpec::new(p, export()).args();
        assert_eq!(a[..2], ["--object", "iothread,id=iothread0"]);
        assert!(a[5].ends_with(",iothread=iothread0"), "{}", a[5]);
    }

    #[test]
    fn null_exports_complete_without_the_image() {
        let e = Export {
            null: Some(16 << 20),
            direct: false,
            ..export()
        };
        let a = BackendSpec::new(Program::qsd(), e.clone()).args();
        assert_eq!(
            a[1],
            "driver=null-co,node-name=f,size=16777216,read-zeroes=off"
        );
        assert!(
            a[3].starts_with("type=vhost-user-blk,id=e,node-name=f,"),
            "{}",
            a[3]
        );
        let a = BackendSpec::new(Program::Vloop("/bin/vloop-blk".into()), e).args();
        assert_eq!(a[a.len() - 2..], ["--io-engine", "null"]);
        assert!(a.contains(&"--blk-file".to_string()));
    }

    #[test]
    fn vloop_command_uses_backend_conventions() {
        let mut s = BackendSpec::new(Program::Vloop("/bin/vloop-blk".into()), export());
        s.extra_args.push("-v".into());
        assert_eq!(
            s.args(),
            [
                "--socket-path",
                "/tmp/s,.sock",
                "--blk-file",
                "/tmp/a,b.img",
                "--num-queues",
                "2",
                "--direct",
                "-v"
            ]
        );
        s.export.queues = 1;
        s.export.direct = false;
        s.export.read_only = true;
        s.extra_args.clear();
        assert_eq!(
            s.args(),
            [
                "--socket-path",
                "/tmp/s,.sock",
                "--blk-file",
                "/tmp/a,b.img",
                "--read-only"
            ]
        );
    }

    #[test]
    fn template_fills_values_per_word_after_splitting() {
        let t = Template::parse(
            "qemu-storage-daemon --blockdev driver=file,node-name=f,filename={image} \
             --export 'type=vhost-user-blk,addr.path={socket},writable={writable},num-queues={queues}' \
             \"{image}.log\" '{{json}}'",
        )
        .unwrap();
        let e = Export {
            image: "/tmp/my disk.img".into(),
            socket: "/tmp/s.sock".into(),
            queues: 2,
            read_only: true,
            direct: false,
            null: None,
            format: ImageFormat::Auto,
        };
        let spec = BackendSpec::new(Program::Template(t.clone()), e.clone());
        assert_eq!(
            spec.args(),
            [
                "--blockdev",
                "driver=file,node-name=f,filename=/tmp/my disk.img",
                "--export",
                "type=vhost-user-blk,addr.path=/tmp/s.sock,writable=off,num-queues=2",
                "/tmp/my disk.img.log",
                "{json}",
            ]
        );
        assert_eq!(spec.command().get_program(), "qemu-storage-daemon");
        let rw = Export {
            read_only: false,
            queues: 0,
            ..e
        };
        let w = t.words(&rw);
        assert!(w[4].ends_with("writable=on,num-queues=1"), "{}", w[4]);
        assert_eq!(Program::Template(t).name(), "backend-cmd");
    }

    #[test]
    fn template_errors_name_the_problem() {
        assert_eq!(Template::parse("  "), Err(TemplateError::Empty));
        assert!(matches!(
            Template::parse("b --s '{socket}"),
            Err(TemplateError::Quoting(_))
        ));
        assert_eq!(
            Template::parse("b {socket} {disk}"),
            Err(TemplateError::Unknown("disk".into()))
        );
        assert!(matches!(
            Template::parse("b {socket} {image"),
            Err(TemplateError::Brace(_))
        ));
        assert!(matches!(
            Template::parse("b {socket} x}"),
            Err(TemplateError::Brace(_))
        ));
        assert_eq!(Template::parse("b {image}"), Err(TemplateError::NoSocket));
        let msg = TemplateError::Unknown("disk".into()).to_string();
        assert!(msg.contains("{disk}") && msg.contains("{socket}"), "{msg}");
        assert_eq!(
            "b --socket-path={socket}"
                .parse::<Template>()
                .unwrap()
                .text(),
            "b --socket-path={socket}"
        );
    }

    #[test]
    fn a_template_backend_runs_and_reports_an_early_exit() {
        let dir = tempfile::tempdir().unwrap();
        let t =
            Template::parse("sh -c 'echo listening on \"$1\" >&2; exit 3' sh {socket}").unwrap();
        let s = BackendSpec::new(
            Program::Template(t),
            Export::new("/nonexistent", dir.path().join("s.sock")),
        );
        let e =
            BackendProcess::spawn(&s, &dir.path().join("log"), Duration::from_secs(5)).unwrap_err();
        match e {
            BackendError::Exited { log, status, .. } => {
                assert_eq!(status.code(), Some(3));
                assert!(log.contains("s.sock"), "{log}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn qsd_serves_a_qcow2_image_from_a_qcow2_node_over_the_file() {
        let e = Export {
            image: "/tmp/a,b.qcow2".into(),
            format: ImageFormat::Qcow2 { cache_size: None },
            ..export()
        };
        let a = BackendSpec::new(Program::qsd(), e.clone()).args();
        assert_eq!(
            a,
            [
                "--blockdev",
                "driver=file,node-name=f,filename=/tmp/a,,b.qcow2,aio=io_uring,cache.direct=on,discard=unmap",
                "--blockdev",
                "driver=qcow2,node-name=q,file=f,discard=unmap",
                "--export",
                "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path=/tmp/s,,.sock,writable=on,num-queues=2",
            ]
        );
        // The cache size, read-only on both nodes, and the iothread variant.
        let ro = Export {
            format: ImageFormat::Qcow2 {
                cache_size: Some(4 << 20),
            },
            read_only: true,
            direct: false,
            ..e.clone()
        };
        let p = Program::Qsd {
            bin: "qemu-storage-daemon".into(),
            iothread: true,
        };
        let a = BackendSpec::new(p, ro).args();
        assert_eq!(a[..2], ["--object", "iothread,id=iothread0"]);
        assert!(
            a[3].ends_with("cache.direct=off,discard=unmap,read-only=on"),
            "{}",
            a[3]
        );
        assert_eq!(
            a[5],
            "driver=qcow2,node-name=q,file=f,discard=unmap,cache-size=4194304,read-only=on"
        );
        assert_eq!(
            a[7],
            "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path=/tmp/s,,.sock,writable=off,num-queues=2,iothread=iothread0"
        );
        // A null export opens no image, so it has no qcow2 node either.
        let null = Export {
            null: Some(1 << 20),
            ..e
        };
        let a = BackendSpec::new(Program::qsd(), null).args();
        assert_eq!(a.len(), 4, "{a:?}");
        assert!(a[1].starts_with("driver=null-co,") && a[3].contains("node-name=f,"));
    }

    #[test]
    fn vloop_is_told_the_format_unless_it_decides() {
        let vloop = |format| {
            let e = Export {
                format,
                queues: 1,
                direct: false,
                ..export()
            };
            BackendSpec::new(Program::Vloop("/bin/vloop-blk".into()), e).args()
        };
        let head = [
            "--socket-path",
            "/tmp/s,.sock",
            "--blk-file",
            "/tmp/a,b.img",
        ];
        assert_eq!(vloop(ImageFormat::Auto), head);
        assert_eq!(
            vloop(ImageFormat::Raw)[..],
            [&head[..], &["--format", "raw"]].concat()[..]
        );
        // qemu-storage-daemon's cache size is not a vloop-blk option.
        assert_eq!(
            vloop(ImageFormat::Qcow2 {
                cache_size: Some(1 << 20)
            })[..],
            [&head[..], &["--format", "qcow2"]].concat()[..]
        );
        let raw = Export {
            format: ImageFormat::Raw,
            ..export()
        };
        let a = BackendSpec::new(Program::qsd(), raw).args();
        assert_eq!(a.len(), 4, "a raw export is the file node alone: {a:?}");
        assert!(a[3].contains(",node-name=f,"), "{}", a[3]);
    }

    #[test]
    fn a_backend_that_exits_early_reports_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = BackendSpec::new(
            Program::Vloop("/bin/sh".into()),
            Export::new("/nonexistent", dir.path().join("s.sock")),
        );
        // `sh --socket-path ...` fails at once with a message on stderr.
        s.extra_args.clear();
        let e =
            BackendProcess::spawn(&s, &dir.path().join("log"), Duration::from_secs(5)).unwrap_err();
        match e {
            BackendError::Exited { log, .. } => assert!(!log.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    }
}
