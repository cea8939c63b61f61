//! The guest's initramfs: the guest agent as `/init`, busybox-static with a link for each of
//! its applets (mke2fs for the scenarios, a userland for `exec`), the kernel modules; plus,
//! per boot, a second archive with the plan and the files copied in, appended (the kernel
//! unpacks concatenated archives in order). Also finds the static guest agent and busybox.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use vloop_guest::{Plan, BUSYBOX_PATH, COPY_IN_DIR, HOME, MODULES_DIR, PLAN_PATH};

use crate::cpio::{Archive, CpioError};
use crate::modules::{read_module, ModuleError, ModuleFile};

/// Errors of building the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// The static guest agent binary is missing and could not be built.
    #[error("guest agent: {0}")]
    Guest(String),
    /// busybox-static is missing.
    #[error("no static busybox found ({0}); install busybox-static")]
    Busybox(String),
    /// A module could not be read.
    #[error(transparent)]
    Module(#[from] ModuleError),
    /// The archive could not be written.
    #[error(transparent)]
    Cpio(#[from] CpioError),
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// A file to copy in has a name the archive cannot hold, or is not a file, folder or
    /// symlink.
    #[error("cannot copy {0} into the guest: {1}")]
    CopyIn(PathBuf, String),
}

/// The target triple the guest agent is built for (with `+crt-static`).
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Whether an ELF file has no program interpreter (is statically linked).
pub fn is_static_elf(data: &[u8]) -> bool {
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        data.get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) != 3)
    })
}

fn check_static(p: &Path) -> bool {
    fs::read(p).is_ok_and(|d| is_static_elf(&d))
}

/// The target dir the running harness was built into (`<dir>/release/vloop-harness`).
fn own_target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut d = exe.parent()?;
    // Test binaries live in <target>/<profile>/deps.
    if d.file_name().is_some_and(|n| n == "deps") {
        d = d.parent()?;
    }
    Some(d.parent()?.to_path_buf())
}

/// Finds the static guest agent: `explicit` (`--guest-bin` / `VLOOP_GUEST`), else builds it
/// from the workspace source with cargo (a no-op when up to date) into the harness's own
/// target dir under `x86_64-unknown-linux-gnu/release` when the sources are newer than the
/// build there, else uses that build.
pub fn find_guest(explicit: Option<&Path>) -> Result<PathBuf, InitramfsError> {
    if let Some(p) = explicit {
        if !check_static(p) {
            return Err(InitramfsError::Guest(format!(
                "{} is not a statically linked ELF program; build it with RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p vloop-guest --target {GUEST_TARGET}",
                p.display()
            )));
        }
        return Ok(p.to_path_buf());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(own_target_dir)
        .ok_or_else(|| {
            InitramfsError::Guest(
                "cannot tell where the harness was built; pass --guest-bin".into(),
            )
        })?;
    let built = target
        .join(GUEST_TARGET)
        .join("release")
        .join("vloop-guest");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/Cargo.toml");
    if src.exists() && !up_to_date(&built, &src) {
        eprintln!(
            "vloop-harness: building the static guest agent (only when its sources change) into {}",
            target.join(GUEST_TARGET).display()
        );
        let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "vloop-guest",
                "--target",
                GUEST_TARGET,
                "--manifest-path",
            ])
            .arg(&src)
            .env("CARGO_TARGET_DIR", &target)
            .env(
                "RUSTFLAGS",
                "-C target-feature=+crt-static -C strip=debuginfo",
            )
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(InitramfsError::Guest(format!(
                    "building it with cargo failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                        .trim()
                        .lines()
                        .last()
                        .unwrap_or("")
                )))
            }
            Err(e) if built.exists() => {
                tracing::warn!("cannot run cargo ({e}); using {}", built.display())
            }
            Err(e) => {
                return Err(InitramfsError::Guest(format!(
                    "cannot run cargo to build it: {e}; pass --guest-bin"
                )))
            }
        }
    }
    if check_static(&built) {
        Ok(built)
    } else {
        Err(InitramfsError::Guest(format!(
            "no static build at {}; build it with RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p vloop-guest --target {GUEST_TARGET}, or pass --guest-bin",
            built.display()
        )))
    }
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Whether the static build at `built` is newer than every source file of the guest crate
/// (those in the folders below `src/` too).
fn up_to_date(built: &Path, manifest: &Path) -> bool {
    let Some(b) = mtime(built).filter(|_| check_static(built)) else {
        return false;
    };
    let mut files = vec![manifest.to_path_buf()];
    let mut dirs = vec![manifest.with_file_name("src")];
    while let Some(d) = dirs.pop() {
        files.push(d.clone());
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                } else {
                    files.push(e.path());
                }
            }
        }
    }
    files.iter().all(|f| mtime(f).is_some_and(|m| m <= b))
}

/// Finds a statically linked busybox on PATH or in the usual places.
pub fn find_busybox() -> Result<PathBuf, InitramfsError> {
    let mut cands: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("busybox"))
                .collect()
        })
        .unwrap_or_default();
    cands.extend(["/bin/busybox", "/usr/bin/busybox"].map(PathBuf::from));
    let mut seen_dynamic = None;
    for c in cands {
        if c.is_file() {
            if check_static(&c) {
                return Ok(c);
            }
            seen_dynamic = Some(c);
        }
    }
    Err(InitramfsError::Busybox(match seen_dynamic {
        Some(p) => format!("{} is dynamically linked", p.display()),
        None => "busybox not on PATH".into(),
    }))
}

/// The applets `busybox` has, as paths of their links (`bin/ls`, `usr/bin/awk`...).
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>, InitramfsError> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| InitramfsError::Io(format!("{} --list-full", busybox.display()), e))?;
    if !out.status.success() {
        return Err(InitramfsError::Busybox(format!(
            "{} --list-full failed ({})",
            busybox.display(),
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains(".."))
        .map(str::to_string)
        .collect())
}

/// Files every guest has: a root user, so that tools that look one up find it.
const ETC_PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";
const ETC_GROUP: &str = "root:x:0:\n";

/// The base archive: /init, busybox and a link per applet in `applets`, modules,
/// /dev/console, a root user.
pub fn base_archive(
    guest: &Path,
    busybox: &Path,
    applets: &[String],
    modules: &[ModuleFile],
) -> Result<Archive, InitramfsError> {
    let rd = |p: &Path| fs::read(p).map_err(|e| InitramfsError::Io(p.display().to_string(), e));
    let mut a = Archive::new();
    // Links first: a real file at the same path replaces its link.
    for applet in applets {
        a.symlink(applet, BUSYBOX_PATH)?;
    }
    a.file("etc/passwd", 0o644, ETC_PASSWD.as_bytes().to_vec())?;
    a.file("etc/group", 0o644, ETC_GROUP.as_bytes().to_vec())?;
    a.symlink("etc/mtab", "/proc/self/mounts")?;
    a.dir(HOME, 0o700)?;
    a.file("init", 0o755, rd(guest)?)?;
    a.file(BUSYBOX_PATH, 0o755, rd(busybox)?)?;
    for d in ["proc", "sys", "dev", "mnt", "tmp", "vloop"] {
        a.dir(d, 0o755)?;
    }
    a.char_dev("dev/console", 0o600, 5, 1)?;
    a.char_dev("dev/null", 0o666, 1, 3)?;
    for m in modules {
        a.file(
            &format!("{MODULES_DIR}/{}.ko", m.name),
            0o644,
            read_module(&m.path)?,
        )?;
    }
    Ok(a)
}

/// The module file names the plan lists, in load order.
pub fn plan_module_names(modules: &[ModuleFile]) -> Vec<String> {
    modules.iter().map(|m| format!("{}.ko", m.name)).collect()
}

/// Writes the base archive to the cache (named by its SHA-256) unless it is there already;
/// returns its path.
pub fn cached_base(archive: &Archive, cache: &Path) -> Result<PathBuf, InitramfsError> {
    let bytes = archive.to_bytes()?;
    let hash = hex::encode(Sha256::digest(&bytes));
    let dir = cache.join("initramfs");
    let path = dir.join(format!("{}.cpio", &hash[..16]));
    if !path.exists() {
        fs::create_dir_all(&dir).map_err(|e| InitramfsError::Io(dir.display().to_string(), e))?;
        crate::kernel::publish(&path, &bytes)
            .map_err(|e| InitramfsError::Io(path.display().to_string(), e))?;
    }
    Ok(path)
}

/// Where the per-boot archive puts copy-in item `index` named `name`.
pub fn copy_in_path(index: usize, name: &str) -> String {
    format!("{COPY_IN_DIR}/{index}/{name}")
}

/// Adds the host file, symlink or folder `host` (recursively) at `at`.
fn add_host_tree(a: &mut Archive, host: &Path, at: &str) -> Result<(), InitramfsError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |why: String| InitramfsError::CopyIn(host.to_path_buf(), why);
    let md = fs::symlink_metadata(host).map_err(|e| bad(e.to_string()))?;
    let mode = md.permissions().mode();
    if md.is_dir() {
        a.dir(at, mode)?;
        let mut names: Vec<_> = fs::read_dir(host)
            .map_err(|e| bad(e.to_string()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        names.sort();
        for n in names {
            let s = n
                .to_str()
                .ok_or_else(|| bad(format!("{n:?} is not UTF-8")))?;
            add_host_tree(a, &host.join(&n), &format!("{at}/{s}"))?;
        }
    } else if md.file_type().is_symlink() {
        let t = fs::read_link(host).map_err(|e| bad(e.to_string()))?;
        let t = t
            .to_str()
            .ok_or_else(|| bad("symlink target is not UTF-8".into()))?;
        a.symlink(at, t)?;
    } else if md.is_file() {
        a.file(at, mode, fs::read(host).map_err(|e| bad(e.to_string()))?)?;
    } else {
        return Err(bad("not a file, folder or symlink".into()));
    }
    Ok(())
}

/// Writes `base` followed by an archive holding `plan` at [`PLAN_PATH`] and each host path
/// of `copy_in` at [`copy_in_path`] to `out`.
pub fn write_initrd(
    base: &Path,
    plan: &Plan,
    copy_in: &[PathBuf],
    out: &Path,
) -> Result<(), InitramfsError> {
    let mut bytes =
        fs::read(base).map_err(|e| InitramfsError::Io(base.display().to_string(), e))?;
    let mut a = Archive::new();
    let json = serde_json::to_vec(plan).map_err(|e| InitramfsError::Io("plan".into(), e.into()))?;
    a.file(PLAN_PATH, 0o644, json)?;
    for (i, host) in copy_in.iter().enumerate() {
        let name = host
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| InitramfsError::CopyIn(host.clone(), "no UTF-8 file name".into()))?;
        add_host_tree(&mut a, host, &copy_in_path(i, name))?;
    }
    a.write_to(&mut bytes)?;
    fs::write(out, bytes).map_err(|e| InitramfsError::Io(out.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_archive_holds_init_busybox_console_and_modules_and_plan_is_appended() {
        let t = tempfile::tempdir().unwrap();
        let (guest, bb, m) = (
            t.path().join("g"),
            t.path().join("b"),
            t.path().join("virtio_blk.ko"),
        );
        fs::write(&guest, b"agent").unwrap();
        fs::write(&bb, b"busybox").unwrap();
        fs::write(&m, b"module").unwrap();
        let mods = vec![ModuleFile {
            name: "virtio_blk".into(),
            path: m,
        }];
        let a = base_archive(&guest, &bb, &["bin/ls".into(), "init".into()], &mods).unwrap();
        let bytes = a.to_bytes().unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for name in [
            "init\0",
            "bin/busybox\0",
            "dev/console\0",
            "vloop/modules/virtio_blk.ko\0",
            "etc/passwd\0",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
        let base = cached_base(&a, t.path()).unwrap();
        assert_eq!(
            cached_base(&a, t.path()).unwrap(),
            base,
            "same content, same cache file"
        );
        let plan = Plan {
            scenario: "s".into(),
            modules: plan_module_names(&mods),
            devices: vec![],
            steps: vec![],
            data_port: false,
        };
        let out = t.path().join("initrd");
        let tree = t.path().join("tree");
        fs::create_dir_all(tree.join("sub")).unwrap();
        fs::write(tree.join("sub/x.txt"), b"copied in").unwrap();
        std::os::unix::fs::symlink("sub/x.txt", tree.join("l")).unwrap();
        write_initrd(&base, &plan, &[guest.clone(), tree], &out).unwrap();
        let all = fs::read(&out).unwrap();
        assert_eq!(&all[..bytes.len()], &bytes[..]);
        let tail = String::from_utf8_lossy(&all[bytes.len()..]);
        assert!(
            tail.starts_with("070701")
                && tail.contains("vloop/plan.json")
                && tail.contains("virtio_blk.ko")
        );
        assert!(holds(&tail, "vloop/in/0/g", "agent"));
        assert!(holds(&tail, "vloop/in/1/tree/sub/x.txt", "copied in"));
        assert!(holds(&tail, "vloop/in/1/tree/l", "sub/x.txt"));
        assert!(holds(&text, "bin/ls", "/bin/busybox"));
        // The `init` link gave way to the agent itself.
        assert!(holds(&text, "init", "agent"));
    }

    /// Whether the archive text has an entry `name` whose content starts with `data`.
    fn holds(text: &str, name: &str, data: &str) -> bool {
        text.match_indices(&format!("{name}\0")).any(|(i, m)| {
            let after = text[i + m.len()..].trim_start_matches('\0');
            after.starts_with(data)
        })
    }

    #[test]
    fn a_source_changed_in_a_subfolder_makes_the_guest_build_stale() {
        use std::time::{Duration, SystemTime};
        let t = tempfile::tempdir().unwrap();
        let manifest = t.path().join("Cargo.toml");
        let nested = t.path().join("src/agent/io.rs");
        fs::create_dir_all(nested.parent().unwrap()).unwrap();
        for f in [&manifest, &t.path().join("src/main.rs"), &nested] {
            fs::write(f, "").unwrap();
        }
        let built = t.path().join("vloop-guest");
        let mut elf = vec![0u8; 64];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        fs::write(&built, elf).unwrap();
        let touch = |p: &Path, secs: u64| {
            let at = SystemTime::now() + Duration::from_secs(secs);
            fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(at)
                .unwrap();
        };
        touch(&built, 100);
        assert!(up_to_date(&built, &manifest));
        touch(&nested, 200);
        assert!(!up_to_date(&built, &manifest));
    }

    #[test]
    fn tells_static_from_dynamic() {
        let sh = fs::read("/bin/sh").unwrap();
        assert!(
            !is_static_elf(&sh),
            "/bin/sh is dynamically linked on every supported host"
        );
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        if let Ok(bb) = find_busybox() {
            assert!(check_static(&bb));
        } else {
            vloop_frontend::skip::skip("the static half: busybox-static not installed");
        }
    }
}
