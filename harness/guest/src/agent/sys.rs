//! System calls the agent wraps: mounting, module loading, waiting for devices, fsync.

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use super::Res;

pub fn cstr(s: &str) -> Res<CString> {
    CString::new(s).map_err(|_| format!("NUL byte in {s:?}"))
}

pub fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

pub fn mount(src: &str, dir: &str, fstype: &str, flags: libc::c_ulong, options: &str) -> Res<()> {
    fs::create_dir_all(dir).map_err(|e| format!("mkdir {dir}: {e}"))?;
    let (s, d, t, o) = (cstr(src)?, cstr(dir)?, cstr(fstype)?, cstr(options)?);
    let data = if options.is_empty() {
        std::ptr::null()
    } else {
        o.as_ptr().cast::<libc::c_void>()
    };
    // SAFETY: all pointers are valid NUL-terminated strings (or NULL data) that outlive the call.
    let r = unsafe { libc::mount(s.as_ptr(), d.as_ptr(), t.as_ptr(), flags, data) };
    if r != 0 {
        return Err(format!("mount {src} on {dir} ({fstype}): {}", errno()));
    }
    Ok(())
}

pub fn mount_basics() -> Res<()> {
    mount("proc", "/proc", "proc", 0, "")?;
    mount("sysfs", "/sys", "sysfs", 0, "")?;
    mount("devtmpfs", "/dev", "devtmpfs", 0, "")?;
    Ok(())
}

pub fn load_module(path: &Path) -> Res<()> {
    let f = File::open(path).map_err(|e| format!("open module {}: {e}", path.display()))?;
    let params = cstr("")?;
    // SAFETY: finit_module reads the open fd and the NUL-terminated parameter string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if r != 0 {
        let e = errno();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("load module {}: {e}", path.display()));
        }
    }
    Ok(())
}

pub fn wait_for_device(name: &str, limit: Duration) -> Res<()> {
    let t = Instant::now();
    let dev = format!("/dev/{name}");
    loop {
        if Path::new(&dev).exists() {
            return Ok(());
        }
        if t.elapsed() > limit {
            let found: Vec<String> = fs::read_dir("/sys/block")
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            return Err(format!(
                "block device {dev} did not appear within {limit:?} (present: {found:?})"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn fsync_path(p: &Path) -> Res<()> {
    let f = File::open(p).map_err(|e| format!("open {}: {e}", p.display()))?;
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", p.display()))
}
