//! One backend process of a comparison: the spec that exports an image with it in the
//! comparison's cache mode, its start (recording its command line and start-up memory), its
//! stop (with its memory at the end), the image one run of it serves (a fresh empty overlay on
//! the allocating rows), one workload run on it, and its CPU measured idle.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vloop_frontend::backend::{BackendError, BackendProcess, BackendSpec, Export, ImageFormat};
use vloop_frontend::client::Client;

use super::options::{Case, CompareOptions, ImageState};
use super::report::{BackendFacts, Idle};
use super::stats::Footprint;
use crate::images::{self, QemuImg, Scratch};
use crate::load::{client_options, run_raw, run_vhost, LoadError, Pattern, RunResult, Workload};
use crate::procfs::{self, CpuSample};
use crate::target::{self, Mode, Target};
use crate::text::chain;

/// The spec that exports `image` (in `format`) with backend `target` and `queues` queues (None
/// for the raw target, which has no backend process).
pub(super) fn spec(
    opts: &CompareOptions,
    dir: &Path,
    target: Target,
    queues: u16,
    (image, format): (&Path, ImageFormat),
) -> Option<BackendSpec> {
    let program = target.program(&opts.vloop_bin, &opts.qsd_bin)?;
    let socket = dir.join(format!("{}.sock", target.name()));
    let mut spec = BackendSpec::new(
        program,
        Export {
            queues,
            format,
            direct: opts.mode == Mode::Direct,
            null: (opts.mode == Mode::Null).then_some(opts.image_size),
            ..Export::new(image, &socket)
        },
    );
    if target.is_vloop() {
        spec.extra_args = opts.vloop_args.clone();
    }
    Some(spec)
}

/// Starts backend `target` on `image` and records its command line and start-up footprint in
/// `facts`.
fn start(
    opts: &CompareOptions,
    dir: &Path,
    target: Target,
    queues: u16,
    image: (&Path, ImageFormat),
    facts: &mut BackendFacts,
) -> Result<BackendProcess, String> {
    let spec = spec(opts, dir, target, queues, image).ok_or("no backend process to start")?;
    if facts.command.is_empty() {
        facts.command = target::command_line(&spec);
    }
    let d = BackendProcess::spawn(
        &spec,
        &spec.export.socket.with_extension("log"),
        Duration::from_secs(10),
    )
    .map_err(|e: BackendError| format!("cannot start: {}", chain(&e)))?;
    if facts.idle_rss_kib.is_none() {
        // Let it settle before reading its idle footprint.
        std::thread::sleep(Duration::from_millis(300));
        facts.idle_rss_kib = procfs::rss_kib(d.pid()).ok();
    }
    Ok(d)
}

/// Stops `d` after reading its memory into `facts`; an exit during the run is an error.
fn finish(mut d: BackendProcess, facts: &mut BackendFacts) -> Result<Footprint, String> {
    let memory = Footprint {
        peak_rss_kib: procfs::peak_rss_kib(d.pid()).ok(),
        anon_rss_kib: procfs::anon_rss_kib(d.pid()).ok(),
    };
    facts.peak_rss_kib = facts.peak_rss_kib.max(memory.peak_rss_kib);
    facts.anon_rss_kib = facts.anon_rss_kib.max(memory.anon_rss_kib);
    if !d.is_running() {
        return Err(format!(
            "{} exited during the run; its log:\n{}",
            d.name(),
            d.log_tail(20)
        ));
    }
    d.kill();
    Ok(memory)
}

/// Measures backend `facts.target` with a frontend connected and `queues` queues set up, but no
/// request, for `secs`.
pub(super) fn measure_idle(
    opts: &CompareOptions,
    dir: &Path,
    queues: u16,
    secs: Duration,
    facts: &mut BackendFacts,
) -> Idle {
    let mut idle = Idle {
        queues,
        ..Idle::default()
    };
    let target = facts.target;
    let (image, format) = opts.image_of(target);
    let d = match start(opts, dir, target, queues, (&image, format), facts) {
        Ok(d) => d,
        Err(e) => {
            idle.failure = Some(e);
            return idle;
        }
    };
    let w = Workload {
        pattern: Pattern::RandRead,
        bs: 4096,
        iodepth: 1,
        queues,
        runtime: secs,
        one_pass: false,
        think: Duration::ZERO,
    };
    let client = match Client::connect(d.socket(), &client_options(&w)) {
        Ok(c) => c,
        Err(e) => {
            idle.failure = Some(format!("cannot connect: {}", chain(&e)));
            let _ = finish(d, facts);
            return idle;
        }
    };
    // Let the set-up settle (threads started, first polls done) before measuring.
    std::thread::sleep(Duration::from_millis(200));
    let pid = d.pid();
    let before = CpuSample::read(pid);
    let t0 = Instant::now();
    std::thread::sleep(secs);
    let elapsed = t0.elapsed().as_secs_f64();
    let used = before.until(&CpuSample::read(pid));
    idle.secs = elapsed;
    idle.rss_kib = procfs::rss_kib(pid).ok();
    let pct = |ns: f64| ns / 1e9 / elapsed * 100.0;
    idle.cpu_pct = used.threads_ns().map(|ns| pct(ns as f64));
    idle.threads = used.shares(|ns| pct(ns as f64));
    idle.cpu_pct_ticks = used.ticks.map(|t| pct(t.as_nanos() as f64));
    drop(client);
    if let Err(e) = finish(d, facts) {
        idle.failure = Some(e);
    }
    idle
}

/// The image `target` serves for one run of `case`: the prepared one, or a fresh empty overlay
/// made in `scratch` (removed when the returned guard is dropped).
fn served_image(
    opts: &CompareOptions,
    scratch: &Path,
    target: Target,
    case: &Case,
) -> Result<(PathBuf, ImageFormat, Option<Scratch>), String> {
    let (image, format) = opts.image_of(target);
    if case.on == ImageState::Allocated {
        return Ok((image, format, None));
    }
    let made = match format {
        ImageFormat::Qcow2 { .. } => {
            let s = Scratch::new(scratch.join(format!("{}.qcow2", target.name())));
            QemuImg(opts.qemu_img_bin.clone())
                .create_overlay(&opts.image, s.path())
                .map(|()| s)
        }
        _ => {
            let s = Scratch::new(scratch.join(format!("{}.raw", target.name())));
            images::create_sparse(s.path(), opts.image_size).map(|()| s)
        }
    };
    let s = made.map_err(|e| format!("cannot make the empty overlay: {}", chain(&e)))?;
    Ok((s.path().to_path_buf(), format, Some(s)))
}

/// Starts `target`'s backend (if any) with the workload's queue count on the image `case`
/// runs on, runs the workload once, stops it; returns the run and the backend's memory at its
/// end.
pub(super) fn run_one(
    opts: &CompareOptions,
    dir: &Path,
    scratch: &Path,
    target: Target,
    case: &Case,
    facts: Option<&mut BackendFacts>,
) -> Result<(RunResult, Footprint), String> {
    let w = &case.workload;
    // Start every run with no dirty pages left over from the previous one, so writeback
    // throttling hits the run that caused it.
    let qcow2 = opts.qcow2.then(|| images::qcow2_path(&opts.image));
    images::sync(
        std::iter::once(&opts.image)
            .chain(&qcow2)
            .map(PathBuf::as_path),
    );
    let Some(facts) = facts else {
        let direct = opts.mode == Mode::Direct;
        return run_raw(&opts.image, w, direct)
            .map(|r| (r, Footprint::default()))
            .map_err(|e| chain(&e));
    };
    let (image, format, _scratch) = served_image(opts, scratch, target, case)?;
    let d = start(opts, dir, target, w.queues, (&image, format), facts)?;
    let r = run_vhost(d.socket(), w, Some(d.pid())).map_err(|e: LoadError| chain(&e));
    let memory = finish(d, facts)?;
    r.map(|r| (r, memory))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::fixtures::options;

    fn args(o: &CompareOptions, t: Target, queues: u16) -> Vec<String> {
        let (image, format) = o.image_of(t);
        spec(o, Path::new("/tmp/d"), t, queues, (&image, format))
            .unwrap()
            .args()
    }

    #[test]
    fn the_qcow2_mode_serves_the_qcow2_copy_and_vloop_raw_the_raw_image() {
        let o = CompareOptions {
            qcow2: true,
            ..options(Mode::Direct, false)
        };
        let v = args(&o, Target::Vloop, 1);
        assert_eq!(
            v[..6],
            [
                "--socket-path",
                "/tmp/d/vloop.sock",
                "--blk-file",
                "/tmp/i.img.qcow2",
                "--format",
                "qcow2"
            ]
        );
        assert!(v.contains(&"--direct".to_string()), "{v:?}");
        let r = args(&o, Target::VloopRaw, 1);
        assert_eq!(
            r[..6],
            [
                "--socket-path",
                "/tmp/d/vloop-raw.sock",
                "--blk-file",
                "/tmp/i.img",
                "--format",
                "raw"
            ]
        );
        assert!(r.ends_with(&["--queue-size=512".to_string()]), "{r:?}");
        for t in [Target::Qsd, Target::QsdIothread] {
            let q = args(&o, t, 1);
            let at = if t == Target::Qsd { 0 } else { 2 };
            assert!(
                q[at + 1].contains("filename=/tmp/i.img.qcow2,")
                    && q[at + 1].contains("cache.direct=on"),
                "{q:?}"
            );
            assert_eq!(q[at + 3], "driver=qcow2,node-name=q,file=f,discard=unmap");
            assert!(q[at + 5].contains(",node-name=q,"), "{q:?}");
        }
        // Outside the qcow2 mode every side serves the raw image as raw.
        let p = options(Mode::PageCache, false);
        assert_eq!(p.image_of(Target::Vloop).1, ImageFormat::Raw);
        assert!(args(&p, Target::Vloop, 1).ends_with(&[
            "--format".to_string(),
            "raw".to_string(),
            "--queue-size=512".to_string()
        ]));
        assert!(!args(&p, Target::Qsd, 1).concat().contains("qcow2"));
    }
    #[test]
    fn every_side_gets_the_same_cache_mode() {
        let o = options(Mode::Direct, false);
        let v = args(&o, Target::Vloop, 2);
        assert!(v.contains(&"--direct".to_string()), "{v:?}");
        assert!(v.ends_with(&["--queue-size=512".to_string()]), "{v:?}");
        let q = args(&o, Target::QsdIothread, 2);
        assert!(q[0..2] == ["--object", "iothread,id=iothread0"], "{q:?}");
        assert!(q[3].contains("cache.direct=on"), "{q:?}");
        assert!(q[5].contains("num-queues=2") && q[5].ends_with("iothread=iothread0"));
        let q = args(&options(Mode::PageCache, false), Target::Qsd, 1);
        assert!(q[1].contains("cache.direct=off"), "{q:?}");
        let n = options(Mode::Null, false);
        let q = args(&n, Target::Qsd, 1);
        assert!(q[1].starts_with("driver=null-co,") && q[1].contains("size=1048576"));
        let v = args(&n, Target::Vloop, 1);
        assert!(v.windows(2).any(|p| p == ["--io-engine", "null"]), "{v:?}");
        assert!(!v.contains(&"--direct".to_string()));
        let image = Path::new("/tmp/i.img");
        let raw = (image, ImageFormat::Raw);
        assert!(spec(&n, Path::new("/tmp/d"), Target::Raw, 1, raw).is_none());
    }
}
