//! Shared test helpers: qemu-img / qemu-io as the oracle, chains opened from paths, and
//! reads through the mapping exactly as the daemon does them.

#![allow(dead_code)]

use std::fs::{File, OpenOptions as FsOpen};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use vloop_qcow2::{Backing, Chain, Extent, OpenOptions, WritePath};

/// Whether qemu-img and qemu-io are installed. Without them a test says it is skipped and
/// passes, except under CI=true, where it fails.
pub fn have_qemu(test: &str) -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        vloop_frontend::skip::skip(&format!(
            "{test}: qemu-img / qemu-io are not installed (apt-get install qemu-utils)"
        ));
    }
    ok
}

/// Runs a command that must succeed; returns its stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `qemu-img create -q -f qcow2 [-o OPTS] [-b BACKING -F BACKING_FMT] IMG SIZE`; `opts`
/// empty: none.
pub fn qemu_create(img: &Path, size: &str, opts: &str, backing: Option<(&str, &str)>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some((name, fmt)) = backing {
        args.extend(["-b", name, "-F", fmt]);
    }
    args.extend([p(img), size]);
    run("qemu-img", &args);
}

/// `qemu-img convert -q -c -f raw -O qcow2 -o OPTS RAW IMG`: a qcow2 image of compressed
/// clusters holding the raw file.
pub fn qemu_compress(raw: &Path, img: &Path, opts: &str) {
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            p(raw),
            p(img),
        ],
    );
}

/// `qemu-io -f FMT -c CMD...` on an image.
pub fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(img));
    run("qemu-io", &args);
}

/// The image's contents as `qemu-img convert -O raw` gives them.
pub fn qemu_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("oracle.raw");
    run("qemu-img", &["convert", "-O", "raw", p(img), p(&out)]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// `qemu-img check`: exit code and output.
pub fn qemu_check(img: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", p(img)])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Asserts `qemu-img check` finds the image clean: no corruption and no leaks.
pub fn assert_clean(img: &Path) {
    let (code, out) = qemu_check(img);
    assert_eq!(code, 0, "qemu-img check {}: {out}", img.display());
}

/// Asserts `qemu-img compare` finds the image equal to the raw file.
pub fn assert_same_as_raw(img: &Path, raw: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-F", "raw", p(img), p(raw)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        img.display(),
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens backing files read-only.
pub fn ro_opener(path: &Path, _fmt: Option<vloop_qcow2::Format>) -> std::io::Result<File> {
    File::open(path)
}

pub fn open_chain(path: &Path, read_only: bool) -> Chain {
    try_open(path, read_only, Backing::FromImage).unwrap()
}

pub fn try_open(
    path: &Path,
    read_only: bool,
    backing: Backing,
) -> vloop_qcow2::chain::Result<Chain> {
    try_open_with(path, read_only, backing, vloop_qcow2::DEFAULT_RESERVE_BYTES)
}

pub fn try_open_with(
    path: &Path,
    read_only: bool,
    backing: Backing,
    reserve_bytes: u64,
) -> vloop_qcow2::chain::Result<Chain> {
    try_open_opts(
        path,
        &OpenOptions {
            format: None,
            read_only,
            backing,
            reserve_bytes,
            ..OpenOptions::default()
        },
    )
}

/// Opens `path` with `opts` (read-write unless `opts.read_only`), backing files read-only.
pub fn try_open_opts(path: &Path, opts: &OpenOptions) -> vloop_qcow2::chain::Result<Chain> {
    let f = FsOpen::new()
        .read(true)
        .write(!opts.read_only)
        .open(path)
        .unwrap();
    Chain::open(f, path, opts, &mut ro_opener)
}

fn pread(fd: i32, buf: &mut [u8], off: u64) -> usize {
    // SAFETY: the descriptor belongs to a layer of the chain, which outlives this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut done = 0;
    while done < buf.len() {
        let n = nix::sys::uio::pread(fd, &mut buf[done..], (off + done as u64) as i64).unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    done
}

fn pwrite(fd: i32, buf: &[u8], off: u64) {
    // SAFETY: the descriptor belongs to the chain's top layer, which outlives this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut done = 0;
    while done < buf.len() {
        done += nix::sys::uio::pwrite(fd, &buf[done..], (off + done as u64) as i64).unwrap();
    }
}

/// Reads `[off, off + len)` as the daemon does: map, then I/O on the extents (slow extents
/// through `read_slow`).
pub fn read_mapped(chain: &Chain, off: u64, len: u64) -> Vec<u8> {
    let mut ext = Vec::new();
    chain.map_read(off, len, &mut ext).unwrap();
    assert_eq!(ext.iter().map(|e| e.len()).sum::<u64>(), len, "{ext:?}");
    let mut out = vec![0u8; len as usize];
    let mut pos = 0u64;
    for e in ext {
        let n = e.len();
        let dst = &mut out[pos as usize..(pos + n) as usize];
        match e {
            Extent::Data { fd, host, .. } => {
                let got = pread(fd, dst, host);
                dst[got..].fill(0);
            }
            Extent::Zero { .. } => dst.fill(0),
            Extent::Slow { .. } => chain.read_at(dst, off + pos).unwrap(),
        }
        pos += n;
    }
    out
}

/// Writes as the daemon does: map, then direct I/O on the extents or the slow path.
pub fn write_mapped(chain: &Chain, off: u64, data: &[u8]) -> WritePath {
    let mut ext = Vec::new();
    let path = chain.map_write(off, data.len() as u64, &mut ext).unwrap();
    match path {
        WritePath::Direct => {
            let mut pos = 0usize;
            for e in ext {
                let Extent::Data { fd, host, len, .. } = e else {
                    panic!("map_write gave {e:?}");
                };
                pwrite(fd, &data[pos..pos + len as usize], host);
                pos += len as usize;
            }
            assert_eq!(pos, data.len());
        }
        WritePath::Slow => chain
            .write_slow(off, &[std::io::IoSlice::new(data)])
            .unwrap(),
    }
    path
}

/// Reads the whole disk through the mapping, in chunks of `chunk` bytes.
pub fn read_all(chain: &Chain, chunk: u64) -> Vec<u8> {
    let size = chain.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut at = 0;
    while at < size {
        let n = chunk.min(size - at);
        out.extend(read_mapped(chain, at, n));
        at += n;
    }
    out
}

/// A deterministic byte pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn path_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Index of the first differing byte, for messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}
