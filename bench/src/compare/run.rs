//! The run of a comparison: the images prepared, each backend measured idle, then round after
//! round every workload on every target in a turning order, each run on a backend started
//! fresh; progress goes to stderr.

use std::path::Path;

use vloop_frontend::backend::ImageFormat;

use super::backend::{measure_idle, run_one};
use super::options::{Case, CompareOptions, ImageState};
use super::report::{BackendFacts, Report, Row, TargetImage};
use super::stats::Round;
use crate::images::{self, prepare_image, ImageError, QemuImg};
use crate::machine::{self, MachineError};
use crate::session::{turn_order, Session};
use crate::target::Mode;

/// Errors of the comparison.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// An image could not be prepared.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The socket directory could not be created.
    #[error("cannot create a temporary directory for the sockets")]
    TempDir(#[source] std::io::Error),
    /// No workloads were given.
    #[error("no workloads to compare")]
    NoWorkloads,
    /// The qcow2 mode was asked for together with the null mode.
    #[error("the qcow2 mode serves images: it cannot be combined with the null mode")]
    Qcow2Null,
    /// A workload on an empty overlay was asked for outside the qcow2 mode.
    #[error("{0} runs on an empty qcow2 overlay: that needs the qcow2 mode")]
    OverlayWithoutQcow2(String),
    /// The load average could not be read.
    #[error("cannot read the machine's load average")]
    Load(#[source] MachineError),
}

/// Runs the comparison; progress goes to stderr.
pub fn run(opts: &CompareOptions) -> Result<Report, CompareError> {
    if opts.cases.is_empty() {
        return Err(CompareError::NoWorkloads);
    }
    if opts.qcow2 && opts.mode == Mode::Null {
        return Err(CompareError::Qcow2Null);
    }
    if let Some(c) = opts
        .cases
        .iter()
        .find(|c| !opts.qcow2 && c.on == ImageState::EmptyOverlay)
    {
        return Err(CompareError::OverlayWithoutQcow2(c.to_string()));
    }
    let session = Session::start(&opts.qsd_bin).map_err(CompareError::Load)?;
    let written = prepare_image(&opts.image, opts.image_size, opts.fresh_image)?;
    let qcow2 = if opts.qcow2 {
        let q = QemuImg(opts.qemu_img_bin.clone()).prepare_qcow2(
            &opts.image,
            opts.image_size,
            opts.fresh_image || written,
        )?;
        eprintln!(
            "qcow2 copy {}: {} of {} clusters allocated, {} MiB on disk",
            q.path.display(),
            q.check.allocated_clusters,
            q.check.total_clusters,
            q.info.actual_size.unwrap_or(0) >> 20
        );
        Some(q)
    } else {
        None
    };
    if opts.mode == Mode::PageCache {
        // Every target should find its image in the page cache, the first one too.
        images::warm_page_cache(&opts.image)?;
        if let Some(q) = &qcow2 {
            images::warm_page_cache(&q.path)?;
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("vloop-bench")
        .tempdir()
        .map_err(CompareError::TempDir)?;
    // The empty overlays live beside the image, on its file system (O_DIRECT and allocation
    // behave as they do for the image).
    let scratch_dir = opts
        .image
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let scratch = tempfile::Builder::new()
        .prefix(".vloop-bench-overlays")
        .tempdir_in(scratch_dir)
        .map_err(CompareError::TempDir)?;
    let targets = opts.targets();
    let overlays = opts.cases.iter().any(|c| c.on == ImageState::EmptyOverlay);
    let target_images = targets
        .iter()
        .map(|&t| {
            let (image, format) = opts.image_of(t);
            TargetImage {
                target: t,
                format: format.name(),
                image,
                empty_overlay: overlays.then(|| match format {
                    ImageFormat::Qcow2 { .. } => {
                        format!("an empty qcow2 overlay over {} (raw)", opts.image.display())
                    }
                    _ => format!("a sparse raw file of {} bytes", opts.image_size),
                }),
            }
        })
        .collect();
    let mut rows: Vec<Row> = opts.cases.iter().map(|c| Row::new(c, &targets)).collect();
    let mut backends: Vec<BackendFacts> = targets
        .iter()
        .filter(|t| t.is_backend())
        .map(|&t| BackendFacts {
            target: t,
            command: Vec::new(),
            idle_rss_kib: None,
            peak_rss_kib: None,
            anon_rss_kib: None,
            idle: None,
        })
        .collect();
    if let Some(secs) = opts.idle {
        let queues = opts
            .cases
            .iter()
            .map(|c| c.workload.queues)
            .max()
            .unwrap_or(1);
        for facts in &mut backends {
            eprintln!(
                "[idle] {:12} {queues} queue(s), connected, no I/O, for {secs:?}",
                facts.target.name()
            );
            let idle = measure_idle(opts, dir.path(), queues, secs, facts);
            match (&idle.failure, idle.cpu_pct) {
                (Some(f), _) => eprintln!("[idle] {:12} FAILED: {f}", facts.target.name()),
                (None, Some(p)) => {
                    eprintln!("[idle] {:12} {p:.3}% of one CPU", facts.target.name())
                }
                (None, None) => {}
            }
            facts.idle = Some(idle);
        }
    }
    let mut rounds = session.rounds(opts.rounds, opts.time_budget);
    for round in &mut rounds {
        for (wi, row) in rows.iter_mut().enumerate() {
            // A new order for every (round, workload).
            for target in turn_order(&targets, round as usize + wi) {
                let facts = backends.iter_mut().find(|b| b.target == target);
                let load = machine::load_now();
                let case = Case {
                    workload: row.workload,
                    on: row.on,
                };
                let res = run_one(opts, dir.path(), scratch.path(), target, &case, facts);
                let tag = format!(
                    "[round {}/{}] {:12} {:22}",
                    round + 1,
                    opts.rounds,
                    target.name(),
                    row.name
                );
                let Some(sum) = row.get_mut(target) else {
                    continue;
                };
                match res {
                    Ok((r, memory)) => {
                        eprintln!(
                            "{tag} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>8.1} us  p99 {:>8.1} us",
                            r.iops, r.mib_s, r.latency.p50_us, r.latency.p99_us
                        );
                        sum.add(Round::new(round + 1, load, &r, memory), &r.hist);
                    }
                    Err(msg) => {
                        eprintln!("{tag} FAILED: {msg}");
                        sum.fail(round + 1, msg);
                    }
                }
            }
        }
    }
    for row in &mut rows {
        row.set_ratios();
    }
    let load = session.load_span().map_err(CompareError::Load)?;
    Ok(Report {
        started: session.started_at.clone(),
        mode: opts.mode,
        direct: opts.mode == Mode::Direct,
        qcow2,
        machine: session.machine.clone(),
        load,
        image: opts.image.clone(),
        image_size: opts.image_size,
        rounds: rounds.started(),
        rounds_requested: opts.rounds,
        targets,
        images: target_images,
        rows,
        backends,
        wall_secs: session.wall_secs(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::compare::fixtures::options;
    use crate::compare::options::qcow2_cases;

    #[test]
    fn modes_that_cannot_hold_together_are_refused_before_any_work() {
        let mut o = options(Mode::Null, false);
        o.qcow2 = true;
        assert!(matches!(run(&o), Err(CompareError::Qcow2Null)));
        let mut o = options(Mode::PageCache, false);
        o.cases = qcow2_cases(Duration::from_secs(1));
        match run(&o) {
            Err(CompareError::OverlayWithoutQcow2(name)) => {
                assert_eq!(name, "1M write QD8 overlay")
            }
            other => panic!("{other:?}"),
        }
        o.cases.clear();
        assert!(matches!(run(&o), Err(CompareError::NoWorkloads)));
    }
}
