//! The guest kernel: a file the user names, or a distribution kernel package fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x` (no root) into a cache that later runs
//! reuse, with its modules tree (which [`crate::modules`] reads).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::modules::{parse_builtin, walk_modules};

/// Errors of finding or fetching the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No kernel was given and none could be fetched.
    #[error("no guest kernel: {0}")]
    NoKernel(String),
    /// A file or directory could not be read or written.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KernelError {
    let w = what.into();
    move |e| KernelError::Io(w, e)
}

/// A kernel image and (optionally) its modules tree `lib/modules/<version>`.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The bzImage/vmlinuz.
    pub image: PathBuf,
    /// `lib/modules/<version>` holding `kernel/**.ko*`, `modules.builtin`, `modules.dep`.
    pub modules: Option<PathBuf>,
    /// Where it came from (a package name or "--kernel").
    pub source: String,
}

/// The cache directory: `$XDG_CACHE_HOME/vloop`, default `~/.cache/vloop`.
pub fn cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("vloop");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("vloop")
}

/// Puts `bytes` at `path` in the cache whole or not at all: written to a temporary file of
/// its own beside it, then renamed over it, so that concurrent writers (parallel tests, two
/// runs sharing a cache) never see or leave half a file.
pub fn publish(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    // Readable by all, as a plain write leaves it (a cache may be shared).
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The distribution's meta package for a small virtual-machine kernel, from /etc/os-release.
pub fn meta_package(os_release: &str) -> &'static str {
    let ids: Vec<&str> = os_release
        .lines()
        .filter_map(|l| l.strip_prefix("ID=").or_else(|| l.strip_prefix("ID_LIKE=")))
        .flat_map(|v| v.trim_matches('"').split_whitespace())
        .collect();
    if ids.contains(&"ubuntu") {
        "linux-image-virtual"
    } else {
        "linux-image-cloud-amd64"
    }
}

/// The `Depends:` of a package from `apt-cache depends` output that start with `prefix`.
pub fn depends_with_prefix(apt_cache_output: &str, prefix: &str) -> Vec<String> {
    apt_cache_output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|p| {
            p.trim()
                .trim_start_matches('|')
                .trim_matches(|c| c == '<' || c == '>')
                .to_string()
        })
        .filter(|p| p.starts_with(prefix))
        .collect()
}

fn apt_depends(pkg: &str) -> Result<String, KernelError> {
    let out = Command::new("apt-cache")
        .args(["depends", pkg])
        .output()
        .map_err(|e| {
            KernelError::NoKernel(format!(
                "cannot run apt-cache ({e}); pass --kernel PATH --modules DIR"
            ))
        })?;
    if !out.status.success() {
        return Err(KernelError::NoKernel(format!(
            "`apt-cache depends {pkg}` failed: {}; run `apt-get update` or pass --kernel PATH --modules DIR",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Follows meta packages (`linux-image-virtual` -> ... -> `linux-image-6.8.0-48-generic`)
/// to the first `linux-image-*` package whose name carries a version number.
fn versioned_image(meta: &str) -> Result<String, KernelError> {
    let mut pkg = meta.to_string();
    for _ in 0..4 {
        let deps = apt_depends(&pkg)?;
        let next = depends_with_prefix(&deps, "linux-image-").into_iter().next().ok_or_else(|| {
            KernelError::NoKernel(format!(
                "`apt-cache depends {pkg}` names no linux-image package; install the package lists (`apt-get update`) or pass --kernel PATH"
            ))
        })?;
        if next.chars().any(|c| c.is_ascii_digit()) {
            return Ok(next);
        }
        pkg = next;
    }
    Err(KernelError::NoKernel(format!(
        "no versioned kernel package behind {meta}; pass --kernel PATH --modules DIR"
    )))
}

/// Resolves a kernel: `--kernel` (+ `--modules`) if given, else the distribution package.
pub fn resolve(kernel: Option<&Path>, modules: Option<&Path>) -> Result<Kernel, KernelError> {
    if let Some(k) = kernel {
        if !k.is_file() {
            return Err(KernelError::NoKernel(format!(
                "--kernel {} is not a file",
                k.display()
            )));
        }
        return Ok(Kernel {
            image: k.to_path_buf(),
            modules: modules.map(Path::to_path_buf),
            source: "--kernel".into(),
        });
    }
    let os = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let meta = meta_package(&os);
    let kernels = cache_dir().join("kernels");
    // The meta package's resolution is remembered for a day, so a warm run asks apt nothing.
    let memo = kernels.join(format!("{meta}.resolved"));
    let fresh = fs::metadata(&memo)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < std::time::Duration::from_secs(86_400));
    let remembered = fs::read_to_string(&memo)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|p| fresh && !p.is_empty() && kernels.join(p).join(".complete").exists());
    let pkg = match remembered {
        Some(p) => p,
        None => versioned_image(meta)?,
    };
    let root = fetched(&kernels, &pkg, fetch_into)?;
    let _ = publish(&memo, pkg.as_bytes());
    let mut k = find_in_tree(&root, &pkg)?;
    if let Some(m) = modules {
        k.modules = Some(m.to_path_buf());
    }
    Ok(k)
}

/// The tree of `pkg` in `kernels`, fetched with `fetch` unless complete there. Fetches run
/// one at a time per package (parallel tests, runs sharing a cache): the others wait on the
/// lock and then find the tree complete.
fn fetched(
    kernels: &Path,
    pkg: &str,
    fetch: impl FnOnce(&str, &Path) -> Result<(), KernelError>,
) -> Result<PathBuf, KernelError> {
    let root = kernels.join(pkg);
    let done = root.join(".complete");
    if done.exists() {
        return Ok(root);
    }
    fs::create_dir_all(kernels).map_err(io_err(kernels.display().to_string()))?;
    let lock_path = kernels.join(format!("{pkg}.lock"));
    let _lock = fs::File::create(&lock_path)
        .and_then(|f| {
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| e.into())
        })
        .map_err(io_err(lock_path.display().to_string()))?;
    if !done.exists() {
        fetch(pkg, &root)?;
        fs::write(&done, b"").map_err(io_err(done.display().to_string()))?;
    }
    Ok(root)
}

/// Downloads `pkg` (and on Ubuntu its `linux-modules-*` dependency) and unpacks it into `root`.
fn fetch_into(pkg: &str, root: &Path) -> Result<(), KernelError> {
    let dl = root.with_extension("download");
    let _ = fs::remove_dir_all(&dl);
    let _ = fs::remove_dir_all(root);
    fs::create_dir_all(&dl).map_err(io_err(dl.display().to_string()))?;
    let mut pkgs = vec![pkg.to_string()];
    if let Ok(d) = apt_depends(pkg) {
        pkgs.extend(depends_with_prefix(&d, "linux-modules-"));
    }
    eprintln!(
        "vloop-harness: fetching guest kernel package {} into {}",
        pkgs.join(" "),
        root.display()
    );
    let out = Command::new("apt-get")
        .arg("download")
        .args(&pkgs)
        .current_dir(&dl)
        .output()
        .map_err(|e| {
            KernelError::NoKernel(format!(
                "cannot run apt-get ({e}); pass --kernel PATH --modules DIR"
            ))
        })?;
    if !out.status.success() {
        return Err(KernelError::NoKernel(format!(
            "`apt-get download {}` failed: {}; check the network and apt sources or pass --kernel PATH --modules DIR",
            pkgs.join(" "),
            String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("")
        )));
    }
    let staging = root.with_extension("unpack");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(io_err(staging.display().to_string()))?;
    for e in fs::read_dir(&dl).map_err(io_err(dl.display().to_string()))? {
        let p = e.map_err(io_err(dl.display().to_string()))?.path();
        if p.extension().is_some_and(|x| x == "deb") {
            let st = Command::new("dpkg-deb")
                .arg("-x")
                .arg(&p)
                .arg(&staging)
                .status()
                .map_err(|e| {
                    KernelError::NoKernel(format!("cannot run dpkg-deb ({e}); install dpkg"))
                })?;
            if !st.success() {
                return Err(KernelError::NoKernel(format!(
                    "`dpkg-deb -x {}` failed",
                    p.display()
                )));
            }
        }
    }
    // Ubuntu ships some of the guest's modules (isofs) in linux-modules-extra-<version>.
    if !tree_has_module(&staging, "isofs") {
        let extra = pkg.replacen("linux-image-", "linux-modules-extra-", 1);
        if extra != pkg && download_and_unpack(&extra, &dl, &staging).is_ok() {
            eprintln!("vloop-harness: unpacked {extra} for the isofs module");
        }
    }
    fs::rename(&staging, root).map_err(io_err(root.display().to_string()))?;
    let _ = fs::remove_dir_all(&dl);
    Ok(())
}

fn tree_has_module(root: &Path, name: &str) -> bool {
    let mut found = BTreeMap::new();
    for base in [root.join("lib/modules"), root.join("usr/lib/modules")] {
        walk_modules(&base, &mut found);
    }
    found.contains_key(name) || {
        // Built in: listed in modules.builtin.
        [root.join("lib/modules"), root.join("usr/lib/modules")]
            .iter()
            .any(|b| {
                fs::read_dir(b).into_iter().flatten().flatten().any(|v| {
                    fs::read_to_string(v.path().join("modules.builtin"))
                        .is_ok_and(|t| parse_builtin(&t).contains(name))
                })
            })
    }
}

/// `apt-get download pkg` into `dl`, then `dpkg-deb -x` it into `into`.
fn download_and_unpack(pkg: &str, dl: &Path, into: &Path) -> Result<(), KernelError> {
    let st = Command::new("apt-get")
        .args(["download", pkg])
        .current_dir(dl)
        .output()
        .map_err(|e| KernelError::NoKernel(format!("cannot run apt-get: {e}")))?;
    if !st.status.success() {
        return Err(KernelError::NoKernel(format!(
            "`apt-get download {pkg}` failed"
        )));
    }
    for e in fs::read_dir(dl)
        .map_err(io_err(dl.display().to_string()))?
        .flatten()
    {
        let p = e.path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(pkg))
        {
            let ok = Command::new("dpkg-deb")
                .arg("-x")
                .arg(&p)
                .arg(into)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err(KernelError::NoKernel(format!(
                    "`dpkg-deb -x {}` failed",
                    p.display()
                )));
            }
        }
    }
    Ok(())
}

/// Finds `boot/vmlinuz-*` and `lib/modules/*` in an unpacked package tree.
fn find_in_tree(root: &Path, pkg: &str) -> Result<Kernel, KernelError> {
    let boot = root.join("boot");
    let image = fs::read_dir(&boot)
        .map_err(io_err(boot.display().to_string()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .ok_or_else(|| KernelError::NoKernel(format!("no boot/vmlinuz* in {}", root.display())))?;
    let mut modules = None;
    for base in [root.join("lib/modules"), root.join("usr/lib/modules")] {
        if let Some(d) = fs::read_dir(&base)
            .ok()
            .and_then(|mut r| r.find_map(|e| e.ok()))
        {
            modules = Some(d.path());
            break;
        }
    }
    Ok(Kernel {
        image,
        modules,
        source: pkg.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_writers_of_a_cache_file_leave_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.cpio");
        let bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..4 {
                        publish(&path, &bytes).unwrap();
                        // Whatever another writer is doing, the file is complete.
                        assert!(fs::read(&path).unwrap() == bytes);
                    }
                });
            }
        });
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind: {left:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o644,
            "readable by all, as a plain write leaves it"
        );
    }

    #[test]
    fn concurrent_resolutions_fetch_a_kernel_once() {
        let dir = tempfile::tempdir().unwrap();
        let fetches = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let root = fetched(dir.path(), "linux-image-1.0-test", |_, root| {
                        fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        // A fetch takes a while; it fails if another one meddles meanwhile.
                        fs::create_dir(root).map_err(io_err("root"))?;
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        fs::write(root.join("vmlinuz"), b"k").map_err(io_err("vmlinuz"))
                    })
                    .unwrap();
                    assert_eq!(fs::read(root.join("vmlinuz")).unwrap(), b"k");
                });
            }
        });
        assert_eq!(fetches.into_inner(), 1);
    }

    #[test]
    fn chooses_the_distributions_kernel_package() {
        assert_eq!(
            meta_package("ID=ubuntu\nVERSION_ID=\"24.04\"\n"),
            "linux-image-virtual"
        );
        assert_eq!(meta_package("ID=debian\n"), "linux-image-cloud-amd64");
        let apt = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n  Depends: foo\n";
        assert_eq!(
            depends_with_prefix(apt, "linux-image-"),
            ["linux-image-6.1.0-56-cloud-amd64"]
        );
    }
}
