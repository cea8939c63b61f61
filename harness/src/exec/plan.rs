//! What `exec` will do, worked out before anything boots: the options, the disks (checked,
//! created when `size=` asks for it, each with its backend), the agent's plan (mounts, copies
//! in, the command, copies out, unmounts) and where the copied-out files land.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vloop_frontend::backend::Template;
use vloop_guest::{Step, HOME};

use super::spec::{CopyIn, CopyOut, DiskArg, DiskBackend, MountArg};
use crate::backend::{Backend, BackendKind, ChooseError, DiskSpec};
use crate::file_error::{at, FileError};
use crate::guest::{device_name, BootError};
use crate::images::{FsKind, ImageError, Images};
use crate::initramfs::copy_in_path;
use crate::setup::{SetupError, SetupOptions};

/// Errors that keep the command from running at all.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Neither a command nor `--console`.
    #[error("nothing to run: give a command after `--` (e.g. `vloop-harness exec -- uname -a`) or --console for a shell")]
    NoCommand,
    /// An image that does not exist and has no `size=`.
    #[error("--disk {0}: no such image; add ,size=64M to create a blank one")]
    NoImage(PathBuf),
    /// An image with `size=` that exists with another size.
    #[error("--disk {path}: the image exists with {found} bytes, not the {asked} of size=; drop size= to use it as it is")]
    SizeMismatch {
        /// The image.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The size asked for.
        asked: u64,
    },
    /// `backend=cmd` without `--backend-cmd`.
    #[error("--disk {0}: backend=cmd needs --backend-cmd TEMPLATE")]
    NoTemplate(PathBuf),
    /// The backend program is missing.
    #[error(transparent)]
    Backend(#[from] ChooseError),
    /// `--mount` names a disk that is not there.
    #[error("--mount {0}: there are only {1} disk(s) (counted from 0)")]
    NoSuchDisk(usize, usize),
    /// `--mount` of a disk without a file system the guest mounts.
    #[error("--mount: disk {0} ({1}) holds no ext2/3/4 or ISO 9660 file system; format it in the command instead (e.g. mke2fs /dev/vda)")]
    NoFileSystem(usize, PathBuf),
    /// A `--copy-in` source that does not exist.
    #[error("--copy-in {0}: no such file or folder")]
    NoCopyIn(PathBuf),
    /// A `--copy-out` guest path without a name.
    #[error("--copy-out {0}: the guest path has no file name")]
    CopyOutName(String),
    /// An image could not be made or read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The guests cannot be set up.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The guest could not boot.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A file or folder of the run could not be made.
    #[error(transparent)]
    Io(#[from] FileError),
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// The disks, `/dev/vda` first.
    pub disks: Vec<DiskArg>,
    /// Files put into the guest before the command.
    pub copy_in: Vec<CopyIn>,
    /// Files brought back after it.
    pub copy_out: Vec<CopyOut>,
    /// Disks mounted before it.
    pub mounts: Vec<MountArg>,
    /// Run it on the console (a shell when there is no command).
    pub console: bool,
    /// The default backend (without `--backend-cmd`).
    pub backend: BackendKind,
    /// Its program.
    pub backend_bin: Option<PathBuf>,
    /// Any backend, from a template; the default for every disk when given.
    pub backend_cmd: Option<Template>,
    /// Kernel, initramfs, accelerator, guest size, start time-out.
    pub setup: SetupOptions,
    /// vCPUs.
    pub cpus: u32,
    /// Time limit for the whole guest run.
    pub timeout: Option<Duration>,
    /// Where the run's folder goes (default: the temporary directory).
    pub results: Option<PathBuf>,
    /// Keep the run's folder when the command succeeds too.
    pub keep: bool,
    /// The command and its arguments.
    pub command: Vec<String>,
}

/// A prepared disk: what the backend serves and which backend.
pub struct Disk {
    /// What the backend serves.
    pub spec: DiskSpec,
    /// Which backend serves it.
    pub backend: Backend,
    /// The file system it holds, when it is mounted.
    pub fs: Option<FsKind>,
}

/// Checks the disks, creates those with `size=` that are missing (into `created`); a disk
/// without `backend=` is served by `given` when there is one.
pub fn prepare_disks(
    opts: &ExecOptions,
    given: Option<&Backend>,
    created: &mut Vec<PathBuf>,
) -> Result<Vec<Disk>, ExecError> {
    let images = Images::default();
    let mut out = Vec::new();
    for d in &opts.disks {
        match (d.path.exists(), d.size) {
            (false, None) => return Err(ExecError::NoImage(d.path.clone())),
            (false, Some(size)) => {
                images.create(&d.path, size)?;
                created.push(d.path.clone());
            }
            (true, Some(asked)) => {
                let found = std::fs::metadata(&d.path)
                    .map_err(at("reading", &d.path))?
                    .len();
                // vloop's writer rounds a size up to whole 512-byte sectors.
                if found != asked.div_ceil(512).saturating_mul(512) {
                    return Err(ExecError::SizeMismatch {
                        path: d.path.clone(),
                        found,
                        asked,
                    });
                }
            }
            (true, None) => {}
        }
        let known = |kind| Backend::find(kind, opts.backend_bin.as_deref());
        let backend = match (d.backend, given, &opts.backend_cmd) {
            (DiskBackend::Default, Some(b), _) => b.clone(),
            (DiskBackend::Default, None, Some(t)) | (DiskBackend::Cmd, _, Some(t)) => {
                Backend::template(t.clone())
            }
            (DiskBackend::Cmd, _, None) => return Err(ExecError::NoTemplate(d.path.clone())),
            (DiskBackend::Default, None, None) => known(opts.backend)?,
            (DiskBackend::Vloop, _, _) => Backend::find(BackendKind::Vloop, None)?,
            (DiskBackend::Qsd, _, _) => Backend::find(BackendKind::Qsd, None)?,
        };
        out.push(Disk {
            spec: DiskSpec {
                image: d.path.clone(),
                readonly: d.readonly,
                queues: d.queues,
            },
            backend,
            fs: None,
        });
    }
    Ok(out)
}

/// A guest path as the agent reads it: relative ones are relative to the home folder.
fn in_home(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{HOME}/{p}")
    }
}

/// The plan: mounts, copies in, the command, copies out, unmounts.
pub fn steps(opts: &ExecOptions, disks: &[Disk]) -> Result<Vec<Step>, ExecError> {
    let mut steps = Vec::new();
    for m in &opts.mounts {
        let d = disks
            .get(m.disk)
            .ok_or(ExecError::NoSuchDisk(m.disk, disks.len()))?;
        let fs =
            d.fs.ok_or_else(|| ExecError::NoFileSystem(m.disk, d.spec.image.clone()))?;
        steps.push(Step::Mount {
            dev: format!("/dev/{}", device_name(m.disk)),
            dir: in_home(&m.dir),
            fstype: fs.fstype().into(),
            readonly: d.spec.readonly || fs == FsKind::Iso9660,
            options: String::new(),
        });
    }
    for (i, c) in opts.copy_in.iter().enumerate() {
        if std::fs::symlink_metadata(&c.host).is_err() {
            return Err(ExecError::NoCopyIn(c.host.clone()));
        }
        let name = c
            .host
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| ExecError::NoCopyIn(c.host.clone()))?;
        steps.push(Step::CopyIn {
            from: copy_in_path(i, &name),
            to: c.guest.clone(),
        });
    }
    let mut argv = opts.command.clone();
    let mut env = Vec::new();
    if opts.console {
        if argv.is_empty() {
            argv = vec!["sh".into()];
            env.push(("PS1".to_string(), "vloop:\\w# ".to_string()));
        }
        env.push((
            "TERM".to_string(),
            std::env::var("TERM").unwrap_or_else(|_| "linux".into()),
        ));
    } else if argv.is_empty() {
        return Err(ExecError::NoCommand);
    }
    steps.push(Step::Exec {
        argv,
        env,
        console: opts.console,
    });
    if !opts.copy_out.is_empty() {
        steps.push(Step::CopyOut {
            paths: opts.copy_out.iter().map(|c| c.guest.clone()).collect(),
        });
    }
    for m in opts.mounts.iter().rev() {
        steps.push(Step::Umount {
            dir: in_home(&m.dir),
        });
    }
    Ok(steps)
}

/// Where each `--copy-out` lands: into HOST when it is a folder, else at HOST.
pub fn copy_out_targets(opts: &ExecOptions) -> Result<Vec<PathBuf>, ExecError> {
    opts.copy_out
        .iter()
        .map(|c| {
            if c.host.is_dir() {
                let name = Path::new(c.guest.trim_end_matches('/'))
                    .file_name()
                    .ok_or_else(|| ExecError::CopyOutName(c.guest.clone()))?;
                Ok(c.host.join(name))
            } else {
                Ok(c.host.clone())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ExecOptions {
        ExecOptions {
            disks: vec![],
            copy_in: vec![],
            copy_out: vec![],
            mounts: vec![],
            console: false,
            backend: BackendKind::Vloop,
            backend_bin: None,
            backend_cmd: None,
            setup: SetupOptions::default(),
            cpus: 1,
            timeout: None,
            results: None,
            keep: false,
            command: vec!["true".into()],
        }
    }

    fn disk(image: &str, readonly: bool, fs: Option<FsKind>) -> Disk {
        Disk {
            spec: DiskSpec {
                image: image.into(),
                readonly,
                queues: 1,
            },
            backend: Backend::template(Template::parse("b {socket}").unwrap()),
            fs,
        }
    }

    #[test]
    fn the_plan_mounts_copies_runs_copies_back_and_unmounts() {
        let t = tempfile::tempdir().unwrap();
        let script = t.path().join("t.sh");
        std::fs::write(&script, "true").unwrap();
        let o = ExecOptions {
            copy_in: vec![format!("{}:bin/", script.display()).parse().unwrap()],
            copy_out: vec!["out.txt:res".parse().unwrap()],
            mounts: vec!["1:/data".parse().unwrap(), "0:cd".parse().unwrap()],
            ..opts()
        };
        let disks = [
            disk("a.iso", false, Some(FsKind::Iso9660)),
            disk("b.img", true, Some(FsKind::Ext)),
        ];
        let s = steps(&o, &disks).unwrap();
        let ops: Vec<&str> = s.iter().map(Step::op).collect();
        assert_eq!(
            ops,
            ["mount", "mount", "copy_in", "exec", "copy_out", "umount", "umount"]
        );
        assert_eq!(
            s[0],
            Step::Mount {
                dev: "/dev/vdb".into(),
                dir: "/data".into(),
                fstype: "ext4".into(),
                readonly: true,
                options: String::new(),
            }
        );
        assert!(
            matches!(&s[1], Step::Mount { dir, fstype, readonly: true, .. }
            if dir == "/root/cd" && fstype == "iso9660")
        );
        assert_eq!(
            s[2],
            Step::CopyIn {
                from: "/vloop/in/0/t.sh".into(),
                to: "bin/".into(),
            }
        );
        assert!(matches!(&s[5], Step::Umount { dir } if dir == "/root/cd"));

        let none = ExecOptions {
            mounts: vec!["2:/x".parse().unwrap()],
            ..opts()
        };
        assert!(matches!(
            steps(&none, &disks),
            Err(ExecError::NoSuchDisk(2, 2))
        ));
        let blank = [disk("c.img", false, None)];
        let m = ExecOptions {
            mounts: vec!["0:/x".parse().unwrap()],
            ..opts()
        };
        assert!(matches!(
            steps(&m, &blank),
            Err(ExecError::NoFileSystem(0, _))
        ));
        let missing = ExecOptions {
            copy_in: vec!["/nonexistent/x".parse().unwrap()],
            ..opts()
        };
        assert!(matches!(steps(&missing, &[]), Err(ExecError::NoCopyIn(_))));
    }

    #[test]
    fn a_console_without_a_command_is_a_shell() {
        let o = ExecOptions {
            console: true,
            command: vec![],
            ..opts()
        };
        let s = steps(&o, &[]).unwrap();
        assert!(
            matches!(&s[0], Step::Exec { argv, console: true, env } if argv == &["sh"] && env.iter().any(|(k, _)| k == "PS1"))
        );
        let o = ExecOptions {
            command: vec![],
            ..opts()
        };
        assert!(matches!(steps(&o, &[]), Err(ExecError::NoCommand)));
    }

    #[test]
    fn disks_are_created_once_and_checked() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("new.img");
        let o = ExecOptions {
            disks: vec![format!("{},size=1M,backend=cmd", p.display())
                .parse()
                .unwrap()],
            backend_cmd: Some(Template::parse("b {socket}").unwrap()),
            ..opts()
        };
        let mut created = Vec::new();
        prepare_disks(&o, None, &mut created).unwrap();
        assert_eq!(created, std::slice::from_ref(&p));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let mut again = Vec::new();
        prepare_disks(&o, None, &mut again).unwrap();
        assert!(
            again.is_empty(),
            "an existing image of that size is used as it is"
        );
        let other = ExecOptions {
            disks: vec![format!("{},size=2M", p.display()).parse().unwrap()],
            backend_cmd: o.backend_cmd.clone(),
            ..opts()
        };
        assert!(matches!(
            prepare_disks(&other, None, &mut again),
            Err(ExecError::SizeMismatch { .. })
        ));
        let missing = ExecOptions {
            disks: vec!["/nonexistent.img".parse().unwrap()],
            ..opts()
        };
        assert!(matches!(
            prepare_disks(&missing, None, &mut again),
            Err(ExecError::NoImage(_))
        ));
        let no_template = ExecOptions {
            disks: vec![format!("{},backend=cmd", p.display()).parse().unwrap()],
            ..opts()
        };
        assert!(matches!(
            prepare_disks(&no_template, None, &mut again),
            Err(ExecError::NoTemplate(_))
        ));
    }

    #[test]
    fn a_given_backend_serves_the_disks_without_backend() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("d.img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let o = ExecOptions {
            disks: vec![
                p.display().to_string().parse().unwrap(),
                format!("{},backend=cmd", p.display()).parse().unwrap(),
            ],
            backend_cmd: Some(Template::parse("b {socket}").unwrap()),
            ..opts()
        };
        let given = Backend::template(Template::parse("given {socket}").unwrap());
        let d = prepare_disks(&o, Some(&given), &mut Vec::new()).unwrap();
        assert_eq!(d[0].backend.describe(), "--backend-cmd given {socket}");
        assert_eq!(d[1].backend.describe(), "--backend-cmd b {socket}");
        let d = prepare_disks(&o, None, &mut Vec::new()).unwrap();
        assert_eq!(d[0].backend.describe(), "--backend-cmd b {socket}");
    }

    #[test]
    fn copies_out_land_inside_a_folder_or_at_the_path() {
        let t = tempfile::tempdir().unwrap();
        let o = ExecOptions {
            copy_out: vec![
                format!("/root/a.txt:{}", t.path().display())
                    .parse()
                    .unwrap(),
                format!("/root/dir/:{}/b", t.path().display())
                    .parse()
                    .unwrap(),
            ],
            ..opts()
        };
        assert_eq!(
            copy_out_targets(&o).unwrap(),
            [t.path().join("a.txt"), t.path().join("b")]
        );
    }
}
