//! What every guest of a run shares, found once: QEMU, the accelerator (and why), the kernel
//! (PVH-extracted when possible), the modules and the base initramfs. `run` and `exec` both
//! start here, so they boot the same way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vloop_frontend::backend::which;

use crate::accel::{self, Accel, AccelChoice};
use crate::initramfs::{self, InitramfsError};
use crate::kernel::{self, KernelError};
use crate::modules::{self, ModuleError};
use crate::pvh::{self, PvhError};

/// Errors that keep any guest from booting.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// QEMU is not installed.
    #[error("qemu-system-x86_64 not found; install the package qemu-system-x86 (ci/setup does)")]
    NoQemu,
    /// The guest kernel could not be found or fetched.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A module the guest needs is missing or unreadable.
    #[error(transparent)]
    Module(#[from] ModuleError),
    /// The guest agent, busybox or the initramfs is missing or could not be built.
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
}

/// How to set guests up.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--modules`.
    pub modules: Option<PathBuf>,
    /// `--guest-bin`.
    pub guest_bin: Option<PathBuf>,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Time-out in seconds under KVM for a guest to start (scenarios: to finish); TCG gets
    /// ten times this.
    pub timeout_s: u64,
    /// Extra kernel command line.
    pub append: String,
    /// Boot the extracted vmlinux through its PVH entry point (faster under TCG).
    pub pvh: bool,
}

impl Default for SetupOptions {
    fn default() -> Self {
        Self {
            accel: AccelChoice::Auto,
            kernel: None,
            modules: None,
            guest_bin: None,
            mem_mib: 256,
            timeout_s: 12,
            append: String::new(),
            pvh: true,
        }
    }
}

/// What every guest shares.
#[derive(Debug, Clone)]
pub struct Env {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// Why that accelerator: the KVM probe's verdict, or the option that forced it.
    pub accel_why: String,
    /// Kernel image booted.
    pub kernel: PathBuf,
    /// Where the kernel came from.
    pub kernel_source: String,
    /// Base initramfs (agent, busybox and its applets, modules).
    pub base_initrd: PathBuf,
    /// Module file names in load order.
    pub modules: Vec<String>,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Per-boot time-out before scaling by the accelerator's slowness.
    pub boot_timeout: Duration,
    /// Extra kernel command-line words.
    pub append: String,
}

impl Env {
    /// Finds or builds everything; probes the accelerator.
    pub fn prepare(opts: &SetupOptions) -> Result<Env, SetupError> {
        let qemu = which("qemu-system-x86_64").ok_or(SetupError::NoQemu)?;
        let k = kernel::resolve(opts.kernel.as_deref(), opts.modules.as_deref())?;
        let modules = match &k.modules {
            Some(dir) => modules::resolve_modules(dir, modules::GUEST_MODULES)?,
            None => {
                tracing::warn!(
                    "no modules directory for {}: assuming the guest's drivers are built in",
                    k.image.display()
                );
                Vec::new()
            }
        };
        let boot_kernel = if opts.pvh {
            pvh_kernel(&k.image)
        } else {
            k.image.clone()
        };
        let guest = initramfs::find_guest(opts.guest_bin.as_deref())?;
        let busybox = initramfs::find_busybox()?;
        let applets = initramfs::busybox_applets(&busybox)?;
        let base = initramfs::base_archive(&guest, &busybox, &applets, &modules)?;
        let base_initrd = initramfs::cached_base(&base, &kernel::cache_dir())?;
        let (accel, accel_why) = accel::choose(opts.accel);
        Ok(Env {
            qemu,
            accel,
            accel_why,
            kernel: boot_kernel,
            kernel_source: k.source,
            base_initrd,
            modules: initramfs::plan_module_names(&modules),
            mem_mib: opts.mem_mib,
            boot_timeout: Duration::from_secs(opts.timeout_s),
            append: opts.append.clone(),
        })
    }

    /// The accelerator and why, as every report states it.
    pub fn accel_line(&self) -> String {
        format!("{} ({})", self.accel, self.accel_why)
    }

    /// The modules a boot loads: all of them with the data port, else all but its driver.
    pub fn modules_for(&self, data_port: bool) -> Vec<String> {
        self.modules
            .iter()
            .filter(|m| data_port || m.as_str() != "virtio_console.ko")
            .cloned()
            .collect()
    }
}

/// The PVH-bootable vmlinux of `image`, extracted into the cache; `image` itself when that
/// is impossible.
fn pvh_kernel(image: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(image) else {
        return image.to_path_buf();
    };
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = kernel::cache_dir().join("pvh");
    let out = dir.join(format!("{name}-{}-{}.vmlinux", md.len(), md.mtime()));
    let r = std::fs::create_dir_all(&dir)
        .map_err(|e| PvhError::Io(dir.clone(), e))
        .and_then(|()| pvh::extract(image, &out));
    match r {
        Ok(()) => out,
        Err(e) => {
            tracing::warn!("booting the bzImage as is: {e}");
            image.to_path_buf()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_port_driver_loads_only_with_the_data_port() {
        let env = Env {
            qemu: "q".into(),
            accel: Accel::Tcg,
            accel_why: "forced by --accel tcg".into(),
            kernel: "k".into(),
            kernel_source: "s".into(),
            base_initrd: "i".into(),
            modules: vec!["virtio_blk.ko".into(), "virtio_console.ko".into()],
            mem_mib: 256,
            boot_timeout: Duration::from_secs(1),
            append: String::new(),
        };
        assert_eq!(env.modules_for(false), ["virtio_blk.ko"]);
        assert_eq!(env.modules_for(true).len(), 2);
        assert_eq!(env.accel_line(), "tcg (forced by --accel tcg)");
    }
}
