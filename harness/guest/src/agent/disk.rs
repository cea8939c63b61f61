//! The disk steps of a plan: format, mount, write, verify, trim, and the read-only checks.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use vloop_guest::{content_chunks, Entry, FileSpec, Step, BUSYBOX_PATH};

use super::sys::{cstr, errno, fsync_path, mount};
use super::Res;

/// Runs one disk step (every step but the exec family).
pub fn run(step: &Step) -> Res<String> {
    match step {
        Step::Mkfs { dev, args } => {
            let out = std::process::Command::new(BUSYBOX_PATH)
                .args(["mke2fs", "-F"])
                .args(args)
                .arg(dev)
                .output()
                .map_err(|e| format!("run busybox mke2fs: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "busybox mke2fs {dev} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(format!("mke2fs {} {dev}", args.join(" ")))
        }
        Step::Mount {
            dev,
            dir,
            fstype,
            readonly,
            options,
        } => {
            let flags = if *readonly { libc::MS_RDONLY } else { 0 };
            mount(dev, dir, fstype, flags, options)?;
            Ok(format!("{dev} on {dir} type {fstype}"))
        }
        Step::Umount { dir } => {
            let d = cstr(dir)?;
            // SAFETY: d is a valid NUL-terminated path.
            if unsafe { libc::umount(d.as_ptr()) } != 0 {
                return Err(format!("umount {dir}: {}", errno()));
            }
            Ok(format!("unmounted {dir}"))
        }
        Step::WriteFiles {
            dir,
            files,
            writers,
        } => write_files(Path::new(dir), files, (*writers).max(1)),
        Step::MakeEntries { dir, entries } => {
            for e in entries {
                let p = Path::new(dir).join(e.path());
                match e {
                    Entry::Dir { .. } => {
                        fs::create_dir_all(&p).map_err(|x| format!("mkdir {}: {x}", p.display()))?
                    }
                    Entry::Symlink { target, .. } => {
                        if let Some(parent) = p.parent() {
                            fs::create_dir_all(parent)
                                .map_err(|x| format!("mkdir {}: {x}", parent.display()))?;
                        }
                        std::os::unix::fs::symlink(target, &p)
                            .map_err(|x| format!("symlink {}: {x}", p.display()))?
                    }
                    Entry::File { path, .. } => {
                        return Err(format!("make_entries cannot create file {path}"))
                    }
                }
            }
            fsync_path(Path::new(dir))?;
            Ok(format!("{} entries", entries.len()))
        }
        Step::Remove { dir, paths } => {
            for p in paths {
                let full = Path::new(dir).join(p);
                let md = fs::symlink_metadata(&full)
                    .map_err(|e| format!("stat {}: {e}", full.display()))?;
                if md.is_dir() {
                    fs::remove_dir(&full)
                } else {
                    fs::remove_file(&full)
                }
                .map_err(|e| format!("remove {}: {e}", full.display()))?;
                if let Some(parent) = full.parent() {
                    fsync_path(parent)?;
                }
            }
            Ok(format!("removed {}", paths.len()))
        }
        Step::Verify {
            dir,
            entries,
            exact,
            ignore,
        } => verify(Path::new(dir), entries, *exact, ignore),
        Step::DropCaches => {
            // SAFETY: sync(2) has no arguments and cannot fail.
            unsafe { libc::sync() };
            fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| format!("drop caches: {e}"))?;
            Ok("synced, caches dropped".into())
        }
        Step::Fstrim { dir } => fstrim(dir),
        Step::WriteMustFail { dev } => write_must_fail(dev),
        Step::Queues { name, min } => {
            let p = format!("/sys/block/{name}/mq");
            let n = fs::read_dir(&p)
                .map_err(|e| format!("read {p}: {e}"))?
                .count();
            if (n as u64) < u64::from(*min) {
                return Err(format!("{name} has {n} queues, expected at least {min}"));
            }
            Ok(format!("{name} has {n} queues"))
        }
        Step::DiskSize { name, bytes } => {
            let p = format!("/sys/block/{name}/size");
            let text = fs::read_to_string(&p).map_err(|e| format!("read {p}: {e}"))?;
            let sectors: u64 = text
                .trim()
                .parse()
                .map_err(|e| format!("{p} holds {:?}: {e}", text.trim()))?;
            // /sys/block/*/size counts 512-byte sectors whatever the logical block size.
            let got = sectors
                .checked_mul(512)
                .ok_or_else(|| format!("{p}: {sectors} sectors overflow a byte count"))?;
            if got != *bytes {
                return Err(format!("{name} has {got} bytes, expected {bytes}"));
            }
            Ok(format!("{name} has {got} bytes"))
        }
        Step::CopyIn { .. } | Step::Exec { .. } | Step::CopyOut { .. } => {
            Err(format!("{} is not a disk step", step.op()))
        }
    }
}

fn write_one(dir: &Path, spec: &FileSpec) -> Res<()> {
    let p = dir.join(&spec.path);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
    }
    let mut f = File::create(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
    content_chunks(spec.seed, spec.size, &mut |c| {
        f.write_all(c)
            .map_err(|e| format!("write {}: {e}", p.display()))
    })?;
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", p.display()))?;
    if let Some(parent) = p.parent() {
        fsync_path(parent)?;
    }
    Ok(())
}

fn write_files(dir: &Path, files: &[FileSpec], writers: u32) -> Res<String> {
    let total: u64 = files.iter().map(|f| f.size).sum();
    if writers <= 1 {
        for f in files {
            write_one(dir, f)?;
        }
    } else {
        let n = writers as usize;
        let results: Vec<Res<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|w| {
                    s.spawn(move || {
                        for f in files.iter().skip(w).step_by(n) {
                            write_one(dir, f)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("writer panicked".into())))
                .collect()
        });
        for r in results {
            r?;
        }
    }
    Ok(format!(
        "{} files, {total} bytes, {writers} writer(s)",
        files.len()
    ))
}

fn file_sha256(p: &Path) -> Res<(u64, String)> {
    let mut f = File::open(p).map_err(|e| format!("open {}: {e}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n_total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("read {}: {e}", p.display()))?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        h.update(&buf[..n]);
    }
    Ok((n_total, hex::encode(h.finalize())))
}

fn walk(root: &Path, rel: &Path, out: &mut BTreeSet<String>) -> Res<()> {
    let d = root.join(rel);
    for e in fs::read_dir(&d).map_err(|e| format!("list {}: {e}", d.display()))? {
        let e = e.map_err(|e| format!("list {}: {e}", d.display()))?;
        let r = rel.join(e.file_name());
        out.insert(r.to_string_lossy().into_owned());
        let ft = e
            .file_type()
            .map_err(|x| format!("stat {}: {x}", r.display()))?;
        if ft.is_dir() {
            walk(root, &r, out)?;
        }
    }
    Ok(())
}

fn verify(dir: &Path, entries: &[Entry], exact: bool, ignore: &[String]) -> Res<String> {
    let mut problems = Vec::new();
    let mut bytes = 0u64;
    for e in entries {
        let p = dir.join(e.path());
        let md = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(x) => {
                problems.push(format!("{}: {x}", e.path()));
                continue;
            }
        };
        match e {
            Entry::File { size, sha256, .. } => {
                if !md.is_file() {
                    problems.push(format!("{}: not a regular file", e.path()));
                    continue;
                }
                match file_sha256(&p) {
                    Ok((n, h)) => {
                        bytes += n;
                        if n != *size {
                            problems.push(format!("{}: size {n}, expected {size}", e.path()));
                        } else if &h != sha256 {
                            problems.push(format!("{}: SHA-256 {h}, expected {sha256}", e.path()));
                        }
                    }
                    Err(x) => problems.push(x),
                }
            }
            Entry::Dir { .. } => {
                if !md.is_dir() {
                    problems.push(format!("{}: not a directory", e.path()));
                }
            }
            Entry::Symlink { target, .. } => match fs::read_link(&p) {
                Ok(t) if t == Path::new(target) => {}
                Ok(t) => problems.push(format!(
                    "{}: link to {}, expected {target}",
                    e.path(),
                    t.display()
                )),
                Err(x) => problems.push(format!("{}: {x}", e.path())),
            },
        }
    }
    if exact {
        let mut found = BTreeSet::new();
        walk(dir, &PathBuf::new(), &mut found)?;
        let mut allowed: BTreeSet<String> = BTreeSet::new();
        for e in entries {
            let mut p = Path::new(e.path());
            allowed.insert(p.to_string_lossy().into_owned());
            while let Some(parent) = p.parent() {
                if parent.as_os_str().is_empty() {
                    break;
                }
                allowed.insert(parent.to_string_lossy().into_owned());
                p = parent;
            }
        }
        for f in &found {
            let top = f.split('/').next().unwrap_or("");
            if !allowed.contains(f) && !ignore.iter().any(|i| i == top) {
                problems.push(format!("{f}: not in the manifest"));
            }
        }
    }
    if problems.is_empty() {
        Ok(format!("{} entries, {bytes} bytes verified", entries.len()))
    } else {
        let n = problems.len();
        problems.truncate(8);
        Err(format!("{n} problem(s): {}", problems.join("; ")))
    }
}

#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

/// `_IOWR('X', 121, struct fstrim_range)`.
const FITRIM: libc::c_ulong = 0xC018_5879;

fn fstrim(dir: &str) -> Res<String> {
    let f = File::open(dir).map_err(|e| format!("open {dir}: {e}"))?;
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: FITRIM reads and writes one fstrim_range, which lives across the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FITRIM, &mut range as *mut FstrimRange) };
    if r != 0 {
        return Err(format!("FITRIM {dir}: {}", errno()));
    }
    Ok(format!("trimmed {} bytes", range.len))
}

fn write_must_fail(dev: &str) -> Res<String> {
    let name = dev.trim_start_matches("/dev/");
    let ro = fs::read_to_string(format!("/sys/block/{name}/ro")).unwrap_or_default();
    if ro.trim() != "1" {
        return Err(format!(
            "{dev} is not read-only (/sys/block/{name}/ro = {:?})",
            ro.trim()
        ));
    }
    let f = match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
    {
        Ok(f) => f,
        Err(e) => {
            return Ok(format!(
                "read-only; open for writing failed as it must: {e}"
            ))
        }
    };
    let layout = std::alloc::Layout::from_size_align(4096, 4096).map_err(|e| e.to_string())?;
    // SAFETY: layout has a non-zero size.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    if buf.is_null() {
        return Err("out of memory".into());
    }
    // SAFETY: buf points to 4096 initialised bytes, valid until dealloc below.
    let r = unsafe { libc::pwrite(f.as_raw_fd(), buf as *const libc::c_void, 4096, 0) };
    let e = errno();
    // SAFETY: buf was allocated above with the same layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    if r < 0 {
        return Ok(format!("read-only; write failed as it must: {e}"));
    }
    if f.sync_all().is_err() {
        return Ok("read-only; write accepted but flush failed".into());
    }
    Err(format!(
        "a write of 4096 bytes to read-only {dev} succeeded"
    ))
}
