//! Backend command lines: the programs the project knows (vloop-blk, qemu-storage-daemon, a
//! [`Template`]), and the arguments, environment and [`Command`] that export one image with
//! each. Pure, no process is started here; it imports [`Export`] and [`ImageFormat`] from
//! [`export`](super::export) and [`Template`] from [`template`](super::template), and
//! [`process`](super::process) runs what it builds.

use std::path::PathBuf;
use std::process::Command;

use super::export::{Export, ImageFormat};
use super::template::Template;

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
}
