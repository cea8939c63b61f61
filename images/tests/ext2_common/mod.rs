//! Shared helpers for the ext2 builder tests: sample trees, e2fsck and debugfs runs with
//! time-outs, and a read-back comparison through the `ext4-view` crate.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Build timestamp used by the tests (in the past, so e2fsck sees no future times).
pub const TS: i64 = 1_700_000_000;

/// Deterministic file content with no zero byte (so no block of it is a hole).
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&(x | 0x0101_0101_0101_0101).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn write(p: &Path, data: &[u8]) {
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(p, data).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Fills `root` with every case the builder must handle. `big` adds multi-MiB files.
pub fn populate(root: &Path, big: bool) {
    write(&root.join("empty"), b"");
    write(&root.join("one"), b"x");
    for (i, n) in [4095usize, 4096, 4097, 1023, 1024, 1025, 2048]
        .iter()
        .enumerate()
    {
        write(&root.join(format!("size-{n}")), &pattern(*n, i as u32));
    }
    if big {
        // 3 MiB + a bit: double indirect blocks with 1024-byte blocks.
        write(
            &root.join("big/three-mib"),
            &pattern(3 * 1024 * 1024 + 123, 7),
        );
        // 300 KiB: single then double indirect with 1024-byte blocks.
        write(&root.join("big/300k"), &pattern(300 * 1024, 8));
    }
    // Zero blocks in the middle and at the end: holes in the image.
    let mut holey = vec![0u8; 5 * 4096];
    holey[8192..8200].copy_from_slice(b"datadata");
    write(&root.join("holey"), &holey);
    write(&root.join("all-zero"), &vec![0u8; 3 * 4096 + 5]);
    // Deep directories.
    let mut deep = root.join("deep");
    for i in 0..30 {
        deep = deep.join(format!("d{i}"));
    }
    write(&deep.join("bottom"), b"bottom of the tree\n");
    // Long names.
    let n100 = "n".repeat(100);
    let n255 = "L".repeat(250) + ".long";
    write(&root.join("names").join(&n100), b"hundred");
    write(&root.join("names").join(&n255), b"two hundred fifty five");
    fs::create_dir_all(root.join("names").join("d".repeat(255))).unwrap();
    // Symlinks: fast, exactly 59 and 60 bytes, slow, dangling, to a directory.
    symlink("one", root.join("link-fast")).unwrap();
    symlink("a".repeat(59), root.join("link-59")).unwrap();
    symlink("b".repeat(60), root.join("link-60")).unwrap();
    symlink(
        format!("../{}/{}", "s".repeat(200), "t".repeat(100)),
        root.join("link-slow"),
    )
    .unwrap();
    symlink("deep/d0/d1", root.join("link-dir")).unwrap();
    // Hard links, within and across directories.
    write(&root.join("hard/a"), b"linked content");
    fs::hard_link(root.join("hard/a"), root.join("hard/b")).unwrap();
    fs::create_dir_all(root.join("hard2")).unwrap();
    fs::hard_link(root.join("hard/a"), root.join("hard2/c")).unwrap();
    // A directory with 1000 entries.
    for i in 0..1000 {
        write(
            &root
                .join("many")
                .join(format!("entry-{i:04}-{}", "x".repeat(i % 40))),
            format!("{i}\n").as_bytes(),
        );
    }
    // Modes.
    write(&root.join("modes/setuid"), b"#!/bin/sh\n");
    chmod(&root.join("modes/setuid"), 0o4755);
    write(&root.join("modes/setgid"), b"g");
    chmod(&root.join("modes/setgid"), 0o2711);
    write(&root.join("modes/private"), b"p");
    chmod(&root.join("modes/private"), 0o600);
    write(&root.join("modes/readonly"), b"r");
    chmod(&root.join("modes/readonly"), 0o444);
    fs::create_dir_all(root.join("modes/sticky")).unwrap();
    chmod(&root.join("modes/sticky"), 0o1777);
    fs::create_dir_all(root.join("modes/closed")).unwrap();
    chmod(&root.join("modes/closed"), 0o700);
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    // Times older than the build timestamp are kept (newer ones are clamped).
    set_mtime(&root.join("one"), 1_000_000_000);
    set_mtime(&root.join("link-fast"), 1_100_000_000);
    set_mtime(&root.join("empty-dir"), 1_200_000_000);
    set_mtime(&root.join("modes/setuid"), 0);
}

/// Sets a path's mtime (and atime), not following symlinks.
pub fn set_mtime(p: &Path, secs: i64) {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(secs, 0);
    utimensat(None, p, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
}

/// Copies a tree, creating entries in reverse order and keeping hard links and modes.
pub fn copy_tree_reversed(src: &Path, dst: &Path) {
    let mut links = HashMap::new();
    copy_rev(src, dst, &mut links);
}

fn copy_rev(src: &Path, dst: &Path, links: &mut HashMap<(u64, u64), PathBuf>) {
    fs::create_dir_all(dst).unwrap();
    let mut entries: Vec<_> = fs::read_dir(src).unwrap().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
    for e in entries {
        let from = e.path();
        let to = dst.join(e.file_name());
        let m = fs::symlink_metadata(&from).unwrap();
        if m.is_dir() {
            copy_rev(&from, &to, links);
        } else if m.file_type().is_symlink() {
            symlink(fs::read_link(&from).unwrap(), &to).unwrap();
        } else if let Some(first) = links.get(&(m.dev(), m.ino())) {
            fs::hard_link(first, &to).unwrap();
        } else {
            fs::copy(&from, &to).unwrap();
            if m.nlink() > 1 {
                links.insert((m.dev(), m.ino()), to.clone());
            }
        }
        if !m.file_type().is_symlink() {
            fs::set_permissions(&to, fs::Permissions::from_mode(m.mode() & 0o7777)).unwrap();
        }
        set_mtime(&to, m.mtime());
    }
    let m = fs::metadata(src).unwrap();
    fs::set_permissions(dst, fs::Permissions::from_mode(m.mode() & 0o7777)).unwrap();
    set_mtime(dst, m.mtime());
}

/// Runs a command with a time-out, killing it if it overruns.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} timed out after {timeout:?}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Finds a tool in PATH or /sbin, /usr/sbin.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/sbin", "/usr/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Asserts `e2fsck -fn` finds nothing wrong; skips visibly without e2fsck.
pub fn assert_fsck_clean(img: &Path) {
    let Some(e2fsck) = tool("e2fsck") else {
        vloop_frontend::skip::skip(&format!(
            "e2fsck not found (e2fsprogs): {} not checked",
            img.display()
        ));
        return;
    };
    let out = run(
        Command::new(e2fsck).arg("-fn").arg(img),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "e2fsck -fn {} failed ({}):\n{}\n{}",
        img.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `debugfs -R 'stat PATH'` output, or None without debugfs.
pub fn debugfs_stat(img: &Path, path: &str) -> Option<String> {
    let debugfs = tool("debugfs")?;
    let out = run(
        Command::new(debugfs)
            .arg("-R")
            .arg(format!("stat \"{path}\""))
            .arg(img),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "debugfs failed: {out:?}");
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value after `key` in debugfs output (`Inode: 12`).
pub fn debugfs_field(stat: &str, key: &str) -> Option<u64> {
    let i = stat.find(key)? + key.len();
    stat[i..].split_whitespace().next()?.parse().ok()
}

fn sha_host(p: &Path) -> (u64, [u8; 32]) {
    let mut f = fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
    (n, h.finalize().into())
}

fn sha_image(fs: &ext4_view::Ext4, p: &[u8]) -> (u64, [u8; 32]) {
    let mut f = fs.open(ext4_view::Path::new(p)).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read_bytes(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
    (n, h.finalize().into())
}

/// Every path below `root` (relative, `/`-separated bytes) with its metadata.
fn host_walk(root: &Path) -> BTreeMap<Vec<u8>, fs::Metadata> {
    fn go(dir: &Path, rel: &[u8], out: &mut BTreeMap<Vec<u8>, fs::Metadata>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let mut r = rel.to_vec();
            r.push(b'/');
            r.extend_from_slice(e.file_name().as_bytes());
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                go(&e.path(), &r, out);
            }
            out.insert(r, m);
        }
    }
    let mut out = BTreeMap::new();
    go(root, b"", &mut out);
    out
}

/// Reads every entry of the image back with ext4-view and compares type, mode, owner,
/// mtime, size, content and symlink target with the source folder. Owners are expected
/// squashed to 0 and mtimes clamped to `timestamp`.
pub fn assert_same_as_source(img: &Path, src: &Path, timestamp: i64) {
    assert_same_as_source_owners(img, src, timestamp, false);
}

/// [`assert_same_as_source`], expecting the source's owners if `keep_owners`.
pub fn assert_same_as_source_owners(img: &Path, src: &Path, timestamp: i64, keep_owners: bool) {
    let fs4 = open_image(img);
    let host = host_walk(src);
    // Listing: the image holds exactly the source's entries, plus /lost+found.
    let mut listed = Vec::new();
    let mut stack = vec![b"/".to_vec()];
    while let Some(dir) = stack.pop() {
        for e in fs4.read_dir(ext4_view::Path::new(&dir)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().as_ref().to_vec();
            if name == b"." || name == b".." {
                continue;
            }
            let mut p = if dir == b"/" { Vec::new() } else { dir.clone() };
            p.push(b'/');
            p.extend_from_slice(&name);
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            listed.push(p);
        }
    }
    listed.sort();
    let mut expected: Vec<Vec<u8>> = host.keys().cloned().collect();
    if !host.contains_key(b"/lost+found".as_slice()) {
        expected.push(b"/lost+found".to_vec());
    }
    expected.sort();
    assert_eq!(
        listed
            .iter()
            .map(|p| String::from_utf8_lossy(p))
            .collect::<Vec<_>>(),
        expected
            .iter()
            .map(|p| String::from_utf8_lossy(p))
            .collect::<Vec<_>>(),
        "image listing differs from the source folder"
    );
    let root_meta = fs4.metadata(ext4_view::Path::new("/")).unwrap();
    let src_root = fs::metadata(src).unwrap();
    assert_eq!(u32::from(root_meta.mode()), src_root.mode() & 0o7777);
    assert_eq!(
        root_meta.modified().seconds(),
        src_root.mtime().min(timestamp)
    );
    for (rel, m) in &host {
        let what = String::from_utf8_lossy(rel).into_owned();
        let p = ext4_view::Path::new(rel);
        let im = fs4.symlink_metadata(p).unwrap();
        assert_eq!(u32::from(im.mode()), m.mode() & 0o7777, "{what}: mode");
        let owner = if keep_owners {
            (m.uid(), m.gid())
        } else {
            (0, 0)
        };
        assert_eq!((im.uid(), im.gid()), owner, "{what}: owner");
        assert_eq!(
            im.modified().seconds(),
            m.mtime().min(timestamp),
            "{what}: mtime"
        );
        let ft = m.file_type();
        if ft.is_dir() {
            assert!(im.is_dir(), "{what}: not a directory in the image");
        } else if ft.is_symlink() {
            assert!(im.is_symlink(), "{what}: not a symlink in the image");
            let target = fs::read_link(src.join(std::str::from_utf8(&rel[1..]).unwrap())).unwrap();
            let it = fs4.read_link(p).unwrap();
            assert_eq!(it.as_ref(), target.as_os_str().as_bytes(), "{what}: target");
            assert_eq!(im.len(), target.as_os_str().len() as u64, "{what}: size");
        } else {
            assert!(im.file_type().is_regular_file(), "{what}: not a file");
            assert_eq!(im.len(), m.len(), "{what}: size");
            let hp = src.join(std::ffi::OsStr::from_bytes(&rel[1..]));
            assert_eq!(sha_image(&fs4, rel), sha_host(&hp), "{what}: content");
        }
    }
}

/// Asserts that paths sharing an inode in `src` share one in the image, with the link
/// count the source has (checked with debugfs; skipped visibly without it).
pub fn assert_hard_links(img: &Path, src: &Path) {
    if tool("debugfs").is_none() {
        vloop_frontend::skip::skip("debugfs not found (e2fsprogs): hard links not checked");
        return;
    }
    let host = host_walk(src);
    let mut groups: BTreeMap<u64, Vec<&Vec<u8>>> = BTreeMap::new();
    for (rel, m) in &host {
        if m.is_file() && m.nlink() > 1 {
            groups.entry(m.ino()).or_default().push(rel);
        }
    }
    for paths in groups.values() {
        let stats: Vec<String> = paths
            .iter()
            .map(|p| debugfs_stat(img, std::str::from_utf8(p).unwrap()).unwrap())
            .collect();
        let inos: Vec<u64> = stats
            .iter()
            .map(|s| debugfs_field(s, "Inode:").unwrap())
            .collect();
        assert!(inos.windows(2).all(|w| w[0] == w[1]), "{paths:?}: {inos:?}");
        assert_eq!(
            debugfs_field(&stats[0], "Links:"),
            Some(paths.len() as u64),
            "{paths:?}"
        );
    }
}

/// An image file as ext4-view's block source.
struct ImageReader(fs::File);

impl ext4_view::Ext4Read for ImageReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        use std::os::unix::fs::FileExt;
        Ok(self.0.read_exact_at(dst, start_byte)?)
    }
}

/// Opens an image with ext4-view.
pub fn open_image(img: &Path) -> ext4_view::Ext4 {
    ext4_view::Ext4::load(Box::new(ImageReader(fs::File::open(img).unwrap()))).unwrap()
}

/// SHA-256 of a file.
pub fn sha256_file(p: &Path) -> [u8; 32] {
    sha_host(p).1
}

/// A read-only loop mount of an image, unmounted on drop.
pub struct Mount {
    /// Where the image is mounted.
    pub dir: PathBuf,
}

impl Mount {
    /// Mounts `img` read-only at `dir`; `None` (with a visible message) where that is not
    /// possible: not root, no loop devices, no mount command.
    pub fn new(img: &Path, dir: &Path) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            vloop_frontend::skip::skip(&format!(
                "not root: {} not mounted by the kernel",
                img.display()
            ));
            return None;
        }
        let mount = tool("mount")?;
        fs::create_dir_all(dir).unwrap();
        let out = run(
            Command::new(mount)
                .args(["-t", "ext2", "-o", "ro,loop"])
                .arg(img)
                .arg(dir),
            Duration::from_secs(60),
        );
        if !out.status.success() {
            vloop_frontend::skip::skip(&format!(
                "cannot loop-mount here ({}): {} not mounted by the kernel",
                String::from_utf8_lossy(&out.stderr).trim(),
                img.display()
            ));
            return None;
        }
        Some(Self {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(umount) = tool("umount") {
            let ok = Command::new(&umount)
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new(umount).arg("-l").arg(&self.dir).status();
            }
        }
    }
}

/// Compares a mounted image with its source through the kernel: types, modes, mtimes,
/// sizes, content, symlink targets, link counts and shared inodes of hard links.
pub fn assert_mount_matches(mnt: &Path, src: &Path, timestamp: i64) {
    let host = host_walk(src);
    let image = host_walk(mnt);
    let mut names: Vec<&Vec<u8>> = image.keys().collect();
    names.retain(|n| n.as_slice() != b"/lost+found" || host.contains_key(*n));
    assert_eq!(names, host.keys().collect::<Vec<_>>());
    let mut inode_of = HashMap::new();
    for (rel, m) in &host {
        let what = String::from_utf8_lossy(rel).into_owned();
        let im = &image[rel];
        assert_eq!(im.mode(), m.mode(), "{what}: type and mode");
        assert_eq!(im.mtime(), m.mtime().min(timestamp), "{what}: mtime");
        if m.is_dir() {
            // The kernel's view: 2 + subdirectories (+1 on the root for lost+found).
            let subdirs = host
                .keys()
                .filter(|k| {
                    k.len() > rel.len()
                        && k.starts_with(rel)
                        && k[rel.len()] == b'/'
                        && !k[rel.len() + 1..].contains(&b'/')
                        && host[*k].is_dir()
                })
                .count() as u64;
            assert_eq!(im.nlink(), 2 + subdirs, "{what}: links");
            continue;
        }
        assert_eq!(im.len(), m.len(), "{what}: size");
        assert_eq!(im.nlink(), m.nlink(), "{what}: links");
        let rel_os = std::ffi::OsStr::from_bytes(&rel[1..]);
        if m.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(mnt.join(rel_os)).unwrap(),
                fs::read_link(src.join(rel_os)).unwrap(),
                "{what}: target"
            );
        } else {
            assert_eq!(
                sha_host(&mnt.join(rel_os)),
                sha_host(&src.join(rel_os)),
                "{what}: content"
            );
            // Paths sharing an inode in the source share one in the image, and only those.
            let prev = inode_of.insert(m.ino(), im.ino());
            assert!(
                prev.is_none_or(|p| p == im.ino()),
                "{what}: hard link split"
            );
        }
    }
    let distinct: std::collections::HashSet<_> = inode_of.values().collect();
    assert_eq!(
        distinct.len(),
        inode_of.len(),
        "files merged into one inode"
    );
}
