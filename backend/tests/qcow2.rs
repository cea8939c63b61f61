//! qcow2 images served by the real `vloop-blk` binary and driven by the project's frontend
//! client, with qemu-img as the oracle: images qemu-img made read back as `qemu-img convert -O
//! raw` gives them; writes of every shape leave images `qemu-img check` finds clean and
//! `qemu-img compare` finds equal to a raw copy that took the same writes; backing files are
//! shared read-only; the format is never guessed from data a guest may have written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vloop_frontend::backend::{on_path, BackendProcess};
use vloop_frontend::blk::{S_IOERR, S_OK};
use vloop_frontend::loopdev::Loop;
use vloop_frontend::{Client, ClientOptions, Request};

const MIB: u64 = 1 << 20;

fn have_qemu_img() -> bool {
    if on_path("qemu-img") && on_path("qemu-io") {
        return true;
    }
    vloop_frontend::skip::skip("qemu-img / qemu-io are not installed (apt-get install qemu-utils)");
    false
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[String]) {
    let mut a = vec!["qemu-io".to_string(), "-f".into(), fmt.into()];
    for c in cmds {
        a.push("-c".into());
        a.push(c.clone());
    }
    a.push(img.display().to_string());
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    run(&refs);
}

/// `qemu-img create -q -f qcow2 [-o OPTS] IMG SIZE`.
fn qemu_create(img: &Path, opts: &str, size: &str) {
    let img = img.display().to_string();
    let mut args = vec!["qemu-img", "create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img.as_str(), size]);
    run(&args);
}

fn opts() -> ClientOptions {
    ClientOptions {
        queue_size: 64,
        slots: 8,
        slot_data_size: 256 << 10,
        timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

fn serve(image: &Path, extra: &[&str]) -> (BackendProcess, Client) {
    let sock = image.with_extension("sock");
    let b = common::start(image, &sock, extra);
    let c = Client::connect(&sock, &opts()).unwrap();
    (b, c)
}

/// The whole virtual disk through the client.
fn read_all(c: &mut Client, size: u64) -> Vec<u8> {
    let q = c.queue(0).unwrap();
    let mut out = Vec::with_capacity(size as usize);
    let chunk = 256 << 10;
    let mut at = 0;
    while at < size {
        let n = chunk.min(size - at);
        out.extend(q.read(at / 512, n as u32).unwrap());
        at += n;
    }
    out
}

fn stop(mut b: BackendProcess) {
    let st = common::terminate(&mut b);
    assert!(st.success(), "vloop-blk exited {st}:\n{}", common::log(&b));
    assert!(!common::log(&b).contains("panicked"));
}

fn convert_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("converted.raw");
    let _ = std::fs::remove_file(&raw);
    run(&[
        "qemu-img",
        "convert",
        "-O",
        "raw",
        &img.display().to_string(),
        &raw.display().to_string(),
    ]);
    std::fs::read(raw).unwrap()
}

fn check(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", &img.display().to_string()])
        .output()
        .unwrap();
    // 0: clean; 3: leaked clusters only (allowed, as in QEMU).
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "qemu-img check found corruption in {}:\n{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Patterns at a few places and sizes, written by qemu-io.
fn patterns(size: u64) -> Vec<String> {
    let mut v = Vec::new();
    for (i, (off, len)) in [
        (0, 4096),
        (65536 - 512, 1024),
        (MIB, 3 * 65536),
        (size - 8192, 8192),
    ]
    .iter()
    .enumerate()
    {
        v.push(format!("write -P {} {off} {len}", 0x11 + i * 0x22));
    }
    v
}

#[test]
fn images_qemu_img_made_read_back_as_qemu_img_converts_them() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    for (compat, cluster) in [
        ("1.1", 65536u64),
        ("0.10", 65536),
        ("1.1", 512),
        ("1.1", 4096),
        ("1.1", 2 * MIB),
    ] {
        let img = dir.path().join(format!("c{cluster}-{compat}.qcow2"));
        qemu_create(
            &img,
            &format!("compat={compat},cluster_size={cluster}"),
            &size.to_string(),
        );
        let mut cmds = patterns(size);
        if compat == "1.1" {
            // A zero cluster over data.
            cmds.push(format!("write -z {MIB} {cluster}"));
        }
        qemu_io(&img, "qcow2", &cmds);
        let want = convert_raw(&img, dir.path());
        let (b, mut c) = serve(&img, &["--read-only"]);
        assert!(read_all(&mut c, size) == want, "{}", img.display());
        drop(c);
        stop(b);
    }
    // Compressed clusters (deflate and zstd), as `qemu-img convert -c` writes them.
    let src = dir.path().join("src.raw");
    std::fs::write(&src, pattern_disk(size)).unwrap();
    for ctype in ["zlib", "zstd"] {
        let img = dir.path().join(format!("compressed-{ctype}.qcow2"));
        let ok = Command::new("qemu-img")
            .args(["convert", "-c", "-O", "qcow2", "-o"])
            .arg(format!("compression_type={ctype}"))
            .arg(&src)
            .arg(&img)
            .status()
            .unwrap()
            .success();
        if !ok {
            assert_eq!(ctype, "zstd", "qemu-img could not write {ctype}");
            continue;
        }
        let (b, mut c) = serve(&img, &["--read-only"]);
        assert!(
            read_all(&mut c, size) == std::fs::read(&src).unwrap(),
            "{ctype}"
        );
        drop(c);
        stop(b);
    }
}

fn pattern_disk(size: u64) -> Vec<u8> {
    (0..size)
        .map(|i| ((i / 512) as u8).wrapping_mul(7) ^ (i as u8))
        .collect()
}

/// `qemu-img create` of a qcow2 overlay at `img` over `backing` (of format `backing_format`,
/// a path relative to the overlay's folder or absolute), of the backing file's size unless
/// `size` is given.
fn overlay(img: &Path, backing: &str, backing_format: &str, size: Option<&str>) {
    let img = img.display().to_string();
    let mut args = vec![
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        backing_format,
        "-b",
        backing,
        &img,
    ];
    args.extend(size);
    run(&args);
}

/// A chain of three: raw base, qcow2 middle (relative path), qcow2 top.
fn chain(dir: &Path, size: u64) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    std::fs::write(&base, pattern_disk(size)).unwrap();
    let mid = dir.join("mid.qcow2");
    overlay(&mid, "base.raw", "raw", None);
    qemu_io(&mid, "qcow2", &["write -P 0xaa 65536 131072".into()]);
    let top = dir.join("top.qcow2");
    overlay(&top, "mid.qcow2", "qcow2", None);
    qemu_io(&top, "qcow2", &["write -P 0xbb 100000 5000".into()]);
    (base, mid, top)
}

#[test]
fn a_backing_chain_reads_through_and_writes_only_the_top() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * MIB;
    let (base, mid, top) = chain(dir.path(), size);
    let base_before = std::fs::read(&base).unwrap();
    let mid_before = std::fs::read(&mid).unwrap();
    let want = convert_raw(&top, dir.path());
    // The same writes go to a raw copy of the disk, the model.
    let mut model = want.clone();
    // Served from another directory: relative backing names resolve next to the image.
    let (b, mut c) = serve(&top, &[]);
    assert!(read_all(&mut c, size) == want);
    {
        let q = c.queue(0).unwrap();
        let mut w = |sector: u64, data: Vec<u8>| {
            let at = (sector * 512) as usize;
            model[at..at + data.len()].copy_from_slice(&data);
            q.write(sector, &data).unwrap();
        };
        // Inside one cluster over the base, across clusters, a partial cluster over the
        // middle layer, a whole cluster.
        w(3, vec![0x31; 512]);
        w(127, vec![0x32; 1024]);
        w(130, vec![0x33; 4096]);
        w(2048, vec![0x34; 65536]);
        q.flush().unwrap();
        // Discard a whole cluster: zeroes, and no backing data reappears.
        q.discard(1024, 128).unwrap();
        model[1024 * 512..1152 * 512].fill(0);
        q.write_zeroes(3000, 16, false).unwrap();
        model[3000 * 512..3016 * 512].fill(0);
        q.write_zeroes(3200, 128, true).unwrap();
        model[3200 * 512..3328 * 512].fill(0);
        q.flush().unwrap();
    }
    assert!(read_all(&mut c, size) == model);
    // The base is shared read-only: another reader may open it, no writer may.
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "a writer opened the backing file"
    );
    let shared = Command::new("qemu-img")
        .args(["info", "-U"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(shared.status.success());
    drop(c);
    stop(b);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_before,
        "the base changed"
    );
    assert_eq!(
        std::fs::read(&mid).unwrap(),
        mid_before,
        "the middle layer changed"
    );
    check(&top);
    // O_DIRECT on every layer reads the same disk.
    let (b, mut c) = serve(&top, &["--direct", "--read-only"]);
    assert!(read_all(&mut c, size) == model, "with --direct");
    drop(c);
    stop(b);
    let model_file = dir.path().join("model.raw");
    std::fs::write(&model_file, &model).unwrap();
    run(&[
        "qemu-img",
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &top.display().to_string(),
        &model_file.display().to_string(),
    ]);
}

#[test]
fn random_writes_discards_and_reads_match_a_raw_model() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let (_base, _mid, top) = chain(dir.path(), size);
    let mut model = convert_raw(&top, dir.path());
    let (b, mut c) = serve(&top, &[]);
    let q = c.queue(0).unwrap();
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let sectors = size / 512;
    for i in 0..300 {
        let len = (1 + next(128)) as u32;
        let sector = next(sectors - u64::from(len));
        let (a, e) = (
            (sector * 512) as usize,
            ((sector + u64::from(len)) * 512) as usize,
        );
        match next(10) {
            0..=4 => {
                let data: Vec<u8> = (0..e - a).map(|j| (i as u8) ^ (j as u8)).collect();
                q.write(sector, &data).unwrap();
                model[a..e].copy_from_slice(&data);
            }
            5 => {
                // Discard frees whole clusters only: what lies in partial clusters stays,
                // whole ones read as zeroes.
                q.discard(sector, len).unwrap();
                let cl = 65536 / 512;
                let first = sector.div_ceil(cl) * cl;
                let last = (sector + u64::from(len)) / cl * cl;
                if last > first {
                    model[(first * 512) as usize..(last * 512) as usize].fill(0);
                }
            }
            6 => {
                q.write_zeroes(sector, len, next(2) == 0).unwrap();
                model[a..e].fill(0);
            }
            7 => q.flush().unwrap(),
            _ => assert!(q.read(sector, len * 512).unwrap() == model[a..e], "op {i}"),
        }
    }
    q.flush().unwrap();
    assert!(read_all(&mut c, size) == model);
    drop(c);
    stop(b);
    check(&top);
}

#[test]
fn the_format_is_never_guessed_from_guest_data() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A qcow2 header (naming a host file as its backing file) inside a raw image that is not
    // named .qcow2, as a guest could have written it.
    let planted = dir.path().join("planted.qcow2");
    overlay(&planted, "/etc/hostname", "raw", Some("1M"));
    let disk = dir.path().join("disk.img");
    let mut bytes = std::fs::read(&planted).unwrap();
    bytes.resize(MIB as usize, 0);
    std::fs::write(&disk, &bytes).unwrap();
    // --format auto refuses it, naming the fix; the daemon never opens the host file.
    let out = Command::new(common::bin())
        .args(["--socket-path", "/nonexistent/s.sock", "--blk-file"])
        .arg(&disk)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("qcow2 header") && err.contains("--format raw"),
        "{err}"
    );
    // --format raw serves its bytes as they are.
    let (b, mut c) = serve(&disk, &["--format", "raw", "--read-only"]);
    assert!(read_all(&mut c, MIB) == bytes);
    drop(c);
    stop(b);

    // A guest may not plant such a header in an image --format auto decided is raw.
    let clean = dir.path().join("clean.img");
    std::fs::write(&clean, vec![0u8; MIB as usize]).unwrap();
    let (b, mut c) = serve(&clean, &[]);
    {
        let q = c.queue(0).unwrap();
        q.fill_slot(0, &bytes[..4096]).unwrap();
        q.submit_in(
            0,
            Request::Write {
                sector: 0,
                len: 4096,
            },
        )
        .unwrap();
        q.kick().unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            q.wait(std::time::Instant::now() + Duration::from_secs(10))
                .unwrap();
            q.reap(&mut done);
        }
        assert_eq!(done[0].status, S_IOERR, "the header was written");
        // Ordinary data in the first sector is fine.
        q.write(0, &[0x5a; 4096]).unwrap();
        assert_eq!(q.read(0, 4096).unwrap(), vec![0x5a; 4096]);
    }
    drop(c);
    stop(b);
    // Named .qcow2 but not qcow2: refused too.
    let fake = dir.path().join("fake.qcow2");
    std::fs::write(&fake, vec![0u8; MIB as usize]).unwrap();
    let out = Command::new(common::bin())
        .args(["--socket-path", "/nonexistent/s.sock", "--blk-file"])
        .arg(&fake)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no qcow2 header"));
    let _ = S_OK;
}

#[test]
fn a_completed_write_survives_a_killed_backend() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern_disk(size)).unwrap();
    let top = dir.path().join("top.qcow2");
    overlay(&top, "base.raw", "raw", None);
    let mut model = pattern_disk(size);
    let (mut b, mut c) = serve(&top, &[]);
    let q = c.queue(0).unwrap();
    // Allocating writes (a partial cluster copied from the base, whole clusters, a write into
    // a cluster allocated a moment ago), write zeroes and a discard: none flushed.
    for (off, len, seed) in [
        (70_144u64, 4096usize, 1u8),
        (MIB, 192 << 10, 2),
        (73_216, 512, 3),
    ] {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
            .collect();
        q.write(off / 512, &data).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    q.write_zeroes(2 * MIB / 512, (128 << 10) / 512, true)
        .unwrap();
    model[2 * MIB as usize..(2 * MIB + (128 << 10)) as usize].fill(0);
    q.discard(3 * MIB / 512, (64 << 10) / 512).unwrap();
    model[3 * MIB as usize..(3 * MIB + (64 << 10)) as usize].fill(0);
    // Killed without a flush: what completed is in the page cache, and a new backend
    // serves it.
    drop(c);
    common::signal(&b, nix::sys::signal::Signal::SIGKILL);
    common::wait_exit(&mut b);
    let (b, mut c) = serve(&top, &[]);
    let got = read_all(&mut c, size);
    let diff = got.iter().zip(&model).position(|(a, b)| a != b);
    assert!(
        diff.is_none(),
        "a completed write was lost: first difference at byte {diff:?}"
    );
    drop(c);
    stop(b);
    check(&top);
}

#[test]
fn images_on_block_devices_an_overlay_over_one_and_qcow2_on_one_read_only() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 4 * MIB;
    // An overlay file over a raw base on a block device reads the device's data (its st_size
    // is 0: taken as its length, the overlay read as zeroes).
    let base = d.join("base.raw");
    let data = pattern_disk(size);
    std::fs::write(&base, &data).unwrap();
    let Some(base_dev) = Loop::attach(&base, true) else {
        return;
    };
    let top = d.join("top.qcow2");
    overlay(&top, base_dev.path(), "raw", None);
    let (b, mut c) = serve(&top, &[]);
    assert!(
        read_all(&mut c, size) == data,
        "the overlay does not read the device's data"
    );
    drop(c);
    stop(b);

    // A qcow2 image on a block device: refused writable with one line naming the fix, served
    // with --read-only.
    let img = d.join("image.qcow2");
    qemu_create(&img, "", "4M");
    qemu_io(&img, "qcow2", &patterns(size));
    let want = convert_raw(&img, d);
    let Some(dev) = Loop::attach(&img, false) else {
        return;
    };
    let sock = d.join("dev.sock");
    let socks = sock.display().to_string();
    let line = refused(&[
        "--socket-path",
        &socks,
        "--blk-file",
        dev.path(),
        "--format",
        "qcow2",
    ]);
    assert!(
        line.contains("block device") && line.contains("--read-only"),
        "{line}"
    );
    let b = common::start(
        Path::new(dev.path()),
        &sock,
        &["--format", "qcow2", "--read-only"],
    );
    let mut c = Client::connect(&sock, &opts()).unwrap();
    assert!(
        read_all(&mut c, size) == want,
        "the device reads unlike qemu-img's conversion"
    );
    drop(c);
    stop(b);
}

#[test]
fn direct_refuses_a_writable_image_with_clusters_smaller_than_a_page() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("small.qcow2");
    let imgs = img.display().to_string();
    qemu_create(&img, "cluster_size=512", "1M");
    qemu_io(&img, "qcow2", &["write -P 0x5a 0 4096".into()]);
    let sock = dir.path().join("s.sock").display().to_string();
    let line = refused(&["--socket-path", &sock, "--blk-file", &imgs, "--direct"]);
    assert!(
        line.contains("512 bytes") && line.contains("--direct"),
        "{line}"
    );
    let (b, mut c) = serve(&img, &["--direct", "--read-only"]);
    assert_eq!(c.queue(0).unwrap().read(0, 4096).unwrap(), vec![0x5a; 4096]);
    drop(c);
    stop(b);
}

/// Runs vloop-blk with `args`; it must exit 1 within 20 s. Returns its last stderr line.
fn refused(args: &[&str]) -> String {
    let mut child = Command::new(common::bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("vloop-blk {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err.lines().last().unwrap_or_default().to_owned()
}

#[test]
fn fifos_folders_and_loops_in_a_chain_are_refused_with_their_reason() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("s.sock").display().to_string();
    nix::unistd::mkfifo(&d.join("fifo.qcow2"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    nix::unistd::mkfifo(&d.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::fs::create_dir(d.join("folder")).unwrap();
    // A plain open of a FIFO waits for a writer, and SIGTERM does not end the wait.
    let fifo = d.join("fifo.qcow2").display().to_string();
    for ro in [false, true] {
        let mut args = vec!["--socket-path", &sock, "--blk-file", &fifo];
        if ro {
            args.push("--read-only");
        }
        let line = refused(&args);
        assert!(line.contains("not a regular file"), "{line}");
    }
    std::fs::write(d.join("base.raw"), vec![0u8; MIB as usize]).unwrap();
    // The last names itself.
    for (backing, why) in [
        ("fifo", "not a regular file"),
        ("folder", "not a regular file"),
        ("self.qcow2", "loops"),
    ] {
        let top = d.join(if backing == "self.qcow2" {
            backing.to_owned()
        } else {
            format!("over-{backing}.qcow2")
        });
        overlay(&top, "base.raw", "raw", None);
        let tops = top.display().to_string();
        run(&[
            "qemu-img", "rebase", "-u", "-F", "raw", "-b", backing, &tops,
        ]);
        let line = refused(&["--socket-path", &sock, "--blk-file", &tops]);
        assert!(line.contains(why), "{backing}: {line}");
    }
}

/// Bytes the file holds on disk.
fn allocated(img: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(img).unwrap().blocks() * 512
}

#[test]
fn discards_give_the_clusters_back_to_the_host_unless_ignored() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for mode in ["unmap", "ignore"] {
        let img = dir.path().join(format!("{mode}.qcow2"));
        qemu_create(&img, "", "32M");
        let (b, mut c) = serve(&img, &["--discard", mode]);
        let q = c.queue(0).unwrap();
        let chunk = 256u64 << 10;
        for i in 0..16 * MIB / chunk {
            q.write(i * chunk / 512, &vec![0x5a; chunk as usize])
                .unwrap();
        }
        q.flush().unwrap();
        let full = allocated(&img);
        for i in 0..8 {
            q.discard(i * MIB / 512, (MIB / 512) as u32).unwrap();
        }
        // Freed on disk at the flush, given back once no request can still use them: when
        // the pass that served the flush ends, after the flush completed. (The metadata
        // written meanwhile may take a block or two: 7 of the 8 MiB at least.)
        q.flush().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut after = allocated(&img);
        while mode == "unmap" && after + 7 * MIB > full && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            after = allocated(&img);
        }
        if mode == "unmap" {
            assert!(after + 7 * MIB <= full, "{after} of {full} bytes");
            assert!(q.read(0, 2048).unwrap().iter().all(|&b| b == 0));
        } else {
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(allocated(&img), full);
        }
        assert!(q
            .read(8 * MIB / 512, 2048)
            .unwrap()
            .iter()
            .all(|&b| b == 0x5a));
        drop(c);
        stop(b);
        check(&img);
    }
}
