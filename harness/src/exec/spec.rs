//! The words of `vloop-harness exec`'s options, parsed without touching any file:
//! `--disk PATH[,ro][,size=SIZE][,queues=N][,backend=vloop|qsd|cmd]` (QEMU's style: `,,` is a
//! comma in the path), `--copy-in HOST[:GUEST]`, `--copy-out GUEST:HOST` and `--mount N:PATH`.

use std::path::PathBuf;

use crate::images::parse_size;

/// Errors of parsing an option's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// `--disk` without a path.
    #[error("--disk {0:?}: no image path (e.g. --disk data.img,ro)")]
    NoPath(String),
    /// An option of `--disk` that is not known.
    #[error("--disk {spec:?}: unknown option {option:?}; known: ro, readonly=on|off, size=SIZE, queues=N, backend=vloop|qsd|cmd")]
    UnknownOption {
        /// The whole value.
        spec: String,
        /// The option.
        option: String,
    },
    /// A `--disk` option with a bad value.
    #[error("--disk {spec:?}: {option}: {why}")]
    BadValue {
        /// The whole value.
        spec: String,
        /// The option.
        option: String,
        /// What is wrong.
        why: String,
    },
    /// `--copy-in`, `--copy-out` or `--mount` without one of its two halves.
    #[error("{option} {value:?}: expected {form}")]
    Form {
        /// The option.
        option: &'static str,
        /// Its value.
        value: String,
        /// The expected form, with an example.
        form: &'static str,
    },
}

/// Which program serves a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBackend {
    /// The run's default (`--backend-cmd` when given, else `--backend`).
    Default,
    /// vloop-blk.
    Vloop,
    /// qemu-storage-daemon.
    Qsd,
    /// The `--backend-cmd` template.
    Cmd,
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    /// The image.
    pub path: PathBuf,
    /// Exported read-only.
    pub readonly: bool,
    /// Create the image (sparse) with this size when it does not exist.
    pub size: Option<u64>,
    /// Virtqueues.
    pub queues: u16,
    /// Which program serves it.
    pub backend: DiskBackend,
}

/// Splits QEMU-style `a,b,,c` into `["a", "b,c"]`.
fn split_commas(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(last) = out.last_mut() {
                    last.push(',');
                }
            } else {
                out.push(String::new());
            }
        } else if let Some(last) = out.last_mut() {
            last.push(c);
        }
    }
    out
}

fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" => Some(true),
        "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

impl std::str::FromStr for DiskArg {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut parts = split_commas(spec).into_iter();
        let path = parts.next().filter(|p| !p.is_empty());
        let path = path.ok_or_else(|| SpecError::NoPath(spec.to_string()))?;
        let mut d = DiskArg {
            path: PathBuf::from(path),
            readonly: false,
            size: None,
            queues: 1,
            backend: DiskBackend::Default,
        };
        for opt in parts {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt.as_str(), None),
            };
            let bad = |why: String| SpecError::BadValue {
                spec: spec.to_string(),
                option: key.to_string(),
                why,
            };
            match (key, value) {
                ("ro" | "readonly", None) => d.readonly = true,
                ("ro" | "readonly", Some(v)) => {
                    d.readonly = on_off(v).ok_or_else(|| bad(format!("{v:?} is not on or off")))?
                }
                ("size", Some(v)) => {
                    let n = parse_size(v).map_err(|e| bad(e.to_string()))?;
                    if n == 0 {
                        return Err(bad("a disk of 0 bytes".into()));
                    }
                    d.size = Some(n);
                }
                ("queues", Some(v)) => {
                    d.queues = v
                        .parse::<u16>()
                        .ok()
                        .filter(|&q| q >= 1)
                        .ok_or_else(|| bad(format!("{v:?} is not a count from 1 to 65535")))?
                }
                ("backend", Some(v)) => {
                    d.backend = match v {
                        "vloop" => DiskBackend::Vloop,
                        "qsd" => DiskBackend::Qsd,
                        "cmd" => DiskBackend::Cmd,
                        _ => return Err(bad(format!("{v:?}: use vloop, qsd or cmd"))),
                    }
                }
                _ => {
                    return Err(SpecError::UnknownOption {
                        spec: spec.to_string(),
                        option: opt.clone(),
                    })
                }
            }
        }
        Ok(d)
    }
}

/// One `--copy-in HOST[:GUEST]`: a host file or folder put in the guest before the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyIn {
    /// The host path.
    pub host: PathBuf,
    /// The guest path (a folder to put it in, or its new name); empty: the home folder.
    pub guest: String,
}

impl std::str::FromStr for CopyIn {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, guest) = match s.rsplit_once(':') {
            Some((h, g)) => (h, g),
            None => (s, ""),
        };
        if host.is_empty() {
            return Err(SpecError::Form {
                option: "--copy-in",
                value: s.to_string(),
                form: "HOST[:GUEST], e.g. --copy-in test.sh:/root/",
            });
        }
        Ok(CopyIn {
            host: PathBuf::from(host),
            guest: guest.to_string(),
        })
    }
}

/// One `--copy-out GUEST:HOST`: a guest file or folder brought back after the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOut {
    /// The guest path (relative paths are relative to the home folder).
    pub guest: String,
    /// The host path (a folder to put it in, when it is one, or its new name).
    pub host: PathBuf,
}

impl std::str::FromStr for CopyOut {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((g, h)) if !g.is_empty() && !h.is_empty() => Ok(CopyOut {
                guest: g.to_string(),
                host: PathBuf::from(h),
            }),
            _ => Err(SpecError::Form {
                option: "--copy-out",
                value: s.to_string(),
                form: "GUEST:HOST, e.g. --copy-out /root/out.txt:out.txt",
            }),
        }
    }
}

/// One `--mount N:PATH`: disk N (0 for the first `--disk`, or its name, `vda`) mounted at
/// PATH before the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountArg {
    /// Index of the disk.
    pub disk: usize,
    /// Where it is mounted in the guest.
    pub dir: String,
}

impl std::str::FromStr for MountArg {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let form = || SpecError::Form {
            option: "--mount",
            value: s.to_string(),
            form: "N:PATH with N counted from 0 or a name like vdb, e.g. --mount 0:/mnt",
        };
        let (n, dir) = s.split_once(':').ok_or_else(form)?;
        if dir.is_empty() {
            return Err(form());
        }
        let disk = match n.parse::<usize>() {
            Ok(i) => i,
            Err(_) => device_index(n).ok_or_else(form)?,
        };
        Ok(MountArg {
            disk,
            dir: dir.to_string(),
        })
    }
}

/// The index of a device named `vda`, `vdb`... `vdz`, `vdaa`...
fn device_index(name: &str) -> Option<usize> {
    let letters = name.strip_prefix("vd").filter(|l| !l.is_empty())?;
    let mut n: usize = 0;
    for c in letters.chars() {
        if !c.is_ascii_lowercase() {
            return None;
        }
        n = n
            .checked_mul(26)?
            .checked_add(usize::from(c as u8 - b'a') + 1)?;
    }
    n.checked_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(s: &str) -> DiskArg {
        s.parse().unwrap()
    }

    #[test]
    fn disks_take_qemu_style_options() {
        assert_eq!(
            disk("data.img"),
            DiskArg {
                path: "data.img".into(),
                readonly: false,
                size: None,
                queues: 1,
                backend: DiskBackend::Default,
            }
        );
        assert!(disk("cd.iso,ro").readonly);
        assert!(disk("cd.iso,readonly=on").readonly);
        assert!(!disk("cd.iso,ro=off").readonly);
        assert_eq!(disk("new.img,size=64M").size, Some(64 << 20));
        assert_eq!(disk("base.img,queues=2").queues, 2);
        assert_eq!(disk("x.img,backend=qsd").backend, DiskBackend::Qsd);
        assert_eq!(disk("x.img,backend=cmd").backend, DiskBackend::Cmd);
        assert_eq!(disk("a,,b.img,ro").path, PathBuf::from("a,b.img"));
    }

    #[test]
    fn bad_disks_say_what_is_wrong() {
        for (s, want) in [
            (",ro", "no image path"),
            ("x.img,fast", "unknown option \"fast\""),
            ("x.img,size=big", "is not a size"),
            ("x.img,size=0", "0 bytes"),
            ("x.img,queues=0", "from 1 to 65535"),
            ("x.img,backend=spdk", "use vloop, qsd or cmd"),
            ("x.img,ro=maybe", "not on or off"),
        ] {
            let e = s.parse::<DiskArg>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn copies_split_at_the_guest_side() {
        let c: CopyIn = "dir/a:b.txt:/root/x".parse().unwrap();
        assert_eq!(c.host, PathBuf::from("dir/a:b.txt"));
        assert_eq!(c.guest, "/root/x");
        let c: CopyIn = "test.sh".parse().unwrap();
        assert_eq!((c.host, c.guest), (PathBuf::from("test.sh"), String::new()));
        assert!(":x".parse::<CopyIn>().is_err());
        let o: CopyOut = "/root/out:res/a:b".parse().unwrap();
        assert_eq!(o.guest, "/root/out");
        assert_eq!(o.host, PathBuf::from("res/a:b"));
        assert!("/root/out".parse::<CopyOut>().is_err());
        assert!(":x".parse::<CopyOut>().is_err());
    }

    #[test]
    fn mounts_name_disks_by_index_or_device() {
        let m: MountArg = "1:/mnt".parse().unwrap();
        assert_eq!((m.disk, m.dir.as_str()), (1, "/mnt"));
        assert_eq!("vda:/a".parse::<MountArg>().unwrap().disk, 0);
        assert_eq!("vdc:/a".parse::<MountArg>().unwrap().disk, 2);
        assert_eq!("vdaa:/a".parse::<MountArg>().unwrap().disk, 26);
        for bad in ["1", "1:", "sda:/mnt", "vd:/mnt", "vdA:/m"] {
            assert!(bad.parse::<MountArg>().is_err(), "{bad}");
        }
    }
}
