//! The run of a guest comparison: the image prepared, the guests set up, then round after
//! round one guest per backend in a turning order, each phase's figures added to its row;
//! Ctrl-C or SIGTERM ends it after the guest that runs. Progress goes to stderr.

use std::path::Path;

use vloop_guest::io::{IoPlan, IoPlanError};
use vloop_harness::backend::DiskSpec;
use vloop_harness::setup::{Env, SetupError};

use super::boot::{backend_for, boot_one};
use super::options::{GuestOptions, GUEST_CPUS, GUEST_DEVICE};
use super::report::{GuestBackend, GuestReport, PhaseRow};
use crate::images::{self, ImageError};
use crate::machine::MachineError;
use crate::session::{turn_order, Session};
use crate::target::{self, Mode};

/// Errors that keep the guest comparison from running at all (a failed guest is recorded in
/// the report instead).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The null mode has no guest form.
    #[error(
        "--guest runs in a cache mode (the page cache, or O_DIRECT with --direct), not --null"
    )]
    NullMode,
    /// The phases cannot be run.
    #[error("the guest phases cannot be run")]
    Plan(#[source] IoPlanError),
    /// The image could not be prepared.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The load average could not be read.
    #[error("cannot read the machine's load average")]
    Load(#[source] MachineError),
    /// The guests cannot be set up (QEMU, kernel, guest agent, busybox).
    #[error("cannot set up the guests")]
    Setup(#[source] SetupError),
}

/// Runs the guest comparison; progress goes to stderr.
pub fn run(opts: &GuestOptions) -> Result<GuestReport, GuestError> {
    if opts.mode == Mode::Null {
        return Err(GuestError::NullMode);
    }
    let plan = IoPlan {
        dev: GUEST_DEVICE.to_string(),
        phases: opts.phases.clone(),
        gap_ms: u64::try_from(opts.gap.as_millis()).unwrap_or(u64::MAX),
        seed: 1,
    };
    plan.check().map_err(GuestError::Plan)?;
    let session = Session::start(&opts.qsd_bin).map_err(GuestError::Load)?;
    images::prepare_image(&opts.image, opts.image_size, opts.fresh_image)?;
    if opts.mode == Mode::PageCache {
        images::warm_page_cache(&opts.image)?;
    }
    let env = Env::prepare(&opts.setup).map_err(GuestError::Setup)?;
    eprintln!(
        "guests: {}, kernel {}, {} MiB",
        env.accel_line(),
        env.kernel_source,
        env.mem_mib
    );
    let mut rows: Vec<PhaseRow> = opts
        .phases
        .iter()
        .map(|p| PhaseRow::new(p, &opts.targets))
        .collect();
    let disk = DiskSpec::rw(opts.image.clone());
    let backends = opts
        .targets
        .iter()
        .map(|&target| {
            let spec = backend_for(opts, target).spec(&disk, Path::new("SOCKET"));
            GuestBackend {
                target,
                command: target::command_line(&spec),
            }
        })
        .collect();
    let mut boots = Vec::new();
    let mut interrupted = false;
    let mut rounds = session.rounds(opts.rounds, opts.time_budget);
    'rounds: for round in &mut rounds {
        for target in turn_order(&opts.targets, round as usize) {
            // Leave no dirty pages of the previous guest for this one's writeback.
            images::sync([opts.image.as_path()]);
            let (boot, phases) = boot_one(opts, &env, &plan, target, round + 1);
            if let Some(e) = &boot.error {
                eprintln!(
                    "[round {}/{}] {:12} FAILED: {e}",
                    round + 1,
                    opts.rounds,
                    target.name()
                );
            }
            for (row, p) in rows.iter_mut().zip(phases) {
                let Some(sum) = row.get_mut(target) else {
                    continue;
                };
                match p {
                    Ok(r) => sum.add(r),
                    Err(why) => sum.fail(round + 1, why),
                }
            }
            boots.push(boot);
            if vloop_harness::interrupt::requested().is_some() {
                interrupted = true;
                break 'rounds;
            }
        }
    }
    for row in &mut rows {
        row.set_ratios();
    }
    let load = session.load_span().map_err(GuestError::Load)?;
    Ok(GuestReport {
        started: session.started_at.clone(),
        mode: opts.mode,
        direct: opts.mode == Mode::Direct,
        machine: session.machine.clone(),
        load,
        accel: env.accel,
        accel_why: env.accel_why.clone(),
        kernel: env.kernel_source.clone(),
        guest_cpus: GUEST_CPUS,
        guest_mem_mib: env.mem_mib,
        guest_io: "the agent's I/O tool: io_uring, O_DIRECT on /dev/vda, one virtio-blk queue"
            .into(),
        image: opts.image.clone(),
        image_size: opts.image_size,
        rounds: rounds.started(),
        rounds_requested: opts.rounds,
        gap_ms: plan.gap_ms,
        targets: opts.targets.clone(),
        rows,
        boots,
        backends,
        interrupted,
        wall_secs: session.wall_secs(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::fixtures::options;

    #[test]
    fn the_null_mode_and_an_empty_plan_are_refused_before_any_boot() {
        assert!(matches!(
            run(&options(Mode::Null)),
            Err(GuestError::NullMode)
        ));
        let mut none = options(Mode::Direct);
        none.phases.clear();
        assert!(matches!(run(&none), Err(GuestError::Plan(_))));
    }
}
