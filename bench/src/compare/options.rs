//! What a comparison is asked to do: its settings ([`CompareOptions`]), the rows it measures
//! ([`Case`]: a workload and what it runs on), the default and qcow2 sets, and which
//! targets serve which image. Pure.

use std::path::PathBuf;
use std::time::Duration;

use vloop_frontend::backend::ImageFormat;

use crate::images;
use crate::load::{Pattern, Workload};
use crate::target::{Mode, Target};

/// What the runs of a row are served from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageState {
    /// The prepared image: the raw image, or in qcow2 mode (for the qcow2 targets) its fully
    /// allocated qcow2 copy, so writes land in place.
    #[default]
    Allocated,
    /// An empty image made fresh for every run of every target, so writes allocate: a qcow2
    /// overlay over the raw image (`qemu-img create -f qcow2 -F raw -b RAW`), or for
    /// vloop-raw a sparse raw file of the same size. Only in qcow2 mode.
    EmptyOverlay,
}

/// A workload and what it runs on: one row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// The workload.
    pub workload: Workload,
    /// What it runs on.
    pub on: ImageState,
}

impl Case {
    /// `w` on the prepared image.
    pub fn allocated(w: Workload) -> Self {
        Case {
            workload: w,
            on: ImageState::Allocated,
        }
    }

    /// `w` on a fresh empty overlay for every run, a sequential `w` going over the image once
    /// (so every write allocates).
    pub fn empty_overlay(w: Workload) -> Self {
        Case {
            workload: Workload {
                one_pass: true,
                ..w
            },
            on: ImageState::EmptyOverlay,
        }
    }
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.workload)?;
        if self.on == ImageState::EmptyOverlay {
            f.write_str(" overlay")?;
        }
        Ok(())
    }
}

/// Settings of a comparison.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// The raw image file (created or reused).
    pub image: PathBuf,
    /// Image size in bytes.
    pub image_size: u64,
    /// Recreate the image (and its qcow2 copy) even if one of the right size exists.
    pub fresh_image: bool,
    /// qcow2 mode: vloop-blk and qemu-storage-daemon serve the qcow2 copy of the image (or
    /// empty overlays over it), and vloop-blk on the raw image takes the raw column's place.
    pub qcow2: bool,
    /// The qemu-img binary (qcow2 mode).
    pub qemu_img_bin: PathBuf,
    /// The vloop-blk binary.
    pub vloop_bin: PathBuf,
    /// The qemu-storage-daemon binary.
    pub qsd_bin: PathBuf,
    /// Repetitions of every (target, workload) pair.
    pub rounds: u32,
    /// Cache mode, or null.
    pub mode: Mode,
    /// Workloads, each with its runtime and what it runs on.
    pub cases: Vec<Case>,
    /// Leave qemu-storage-daemon out.
    pub skip_qsd: bool,
    /// Extra command-line arguments for vloop-blk.
    pub vloop_args: Vec<String>,
    /// Start no further round when it would end after this much wall time.
    pub time_budget: Option<Duration>,
    /// Measure each backend idle (frontend connected, queues set up, no I/O) for this long.
    pub idle: Option<Duration>,
}

impl CompareOptions {
    /// The targets measured, in table order.
    pub fn targets(&self) -> Vec<Target> {
        Target::ALL
            .into_iter()
            .filter(|t| match t {
                Target::Vloop => true,
                Target::Qsd | Target::QsdIothread => !self.skip_qsd,
                Target::Raw => self.mode != Mode::Null && !self.qcow2,
                Target::VloopRaw => self.qcow2,
            })
            .collect()
    }

    /// The image `t` serves on the rows of the prepared image, and its format.
    pub fn image_of(&self, t: Target) -> (PathBuf, ImageFormat) {
        if self.qcow2 && t != Target::VloopRaw && t != Target::Raw {
            (
                images::qcow2_path(&self.image),
                ImageFormat::Qcow2 { cache_size: None },
            )
        } else {
            (self.image.clone(), ImageFormat::Raw)
        }
    }
}

/// The rows of a comparison: the one workload `only` (on empty overlays when
/// `empty_overlay`), else the qcow2 set when `qcow2`, else the default set, `runtime` per run.
pub fn cases(
    only: Option<Workload>,
    empty_overlay: bool,
    qcow2: bool,
    runtime: Duration,
) -> Vec<Case> {
    match only {
        Some(w) if empty_overlay => vec![Case::empty_overlay(w)],
        Some(w) => vec![Case::allocated(w)],
        None if qcow2 => qcow2_cases(runtime),
        None => default_workloads(runtime)
            .into_iter()
            .map(Case::allocated)
            .collect(),
    }
}

/// The issue's workload set with `runtime` per run: 4k random reads at depth 1 and 32 on one
/// queue and at depth 32 on two, 4k random writes at depth 1 and 32, 1 MiB sequential reads
/// and writes at depth 8.
pub fn default_workloads(runtime: Duration) -> Vec<Workload> {
    let w = |pattern, bs: u32, iodepth, queues| Workload {
        pattern,
        bs,
        iodepth,
        queues,
        runtime,
        one_pass: false,
        think: Duration::ZERO,
    };
    vec![
        w(Pattern::RandRead, 4096, 1, 1),
        w(Pattern::RandRead, 4096, 32, 1),
        w(Pattern::RandRead, 4096, 32, 2),
        w(Pattern::RandWrite, 4096, 1, 1),
        w(Pattern::RandWrite, 4096, 32, 1),
        w(Pattern::Read, 1 << 20, 8, 1),
        w(Pattern::Write, 1 << 20, 8, 1),
    ]
}

/// The issue's qcow2 set with `runtime` per run: 4k random reads and writes at depth 1 and 32
/// on the fully allocated image (writes land in allocated clusters), and 1 MiB sequential
/// writes at depth 8 on an empty overlay (every write allocates).
pub fn qcow2_cases(runtime: Duration) -> Vec<Case> {
    let w = |pattern, bs: u32, iodepth| Workload {
        pattern,
        bs,
        iodepth,
        queues: 1,
        runtime,
        one_pass: false,
        think: Duration::ZERO,
    };
    vec![
        Case::allocated(w(Pattern::RandRead, 4096, 1)),
        Case::allocated(w(Pattern::RandRead, 4096, 32)),
        Case::allocated(w(Pattern::RandWrite, 4096, 1)),
        Case::allocated(w(Pattern::RandWrite, 4096, 32)),
        Case::empty_overlay(w(Pattern::Write, 1 << 20, 8)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::fixtures::options;

    #[test]
    fn targets_follow_the_mode() {
        use Target::*;
        assert_eq!(
            options(Mode::PageCache, false).targets(),
            [Vloop, Qsd, QsdIothread, Raw]
        );
        assert_eq!(
            options(Mode::Null, false).targets(),
            [Vloop, Qsd, QsdIothread]
        );
        assert_eq!(options(Mode::Direct, true).targets(), [Vloop, Raw]);
        // qcow2: vloop-blk on the raw image takes the raw column's place.
        let q = |mode, skip_qsd| CompareOptions {
            qcow2: true,
            ..options(mode, skip_qsd)
        };
        assert_eq!(
            q(Mode::PageCache, false).targets(),
            [Vloop, Qsd, QsdIothread, VloopRaw]
        );
        assert_eq!(q(Mode::Direct, true).targets(), [Vloop, VloopRaw]);
    }
    #[test]
    fn the_qcow2_set_is_the_issues() {
        let cases = qcow2_cases(Duration::from_secs(1));
        let names: Vec<String> = cases.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "4k randread QD1",
                "4k randread QD32",
                "4k randwrite QD1",
                "4k randwrite QD32",
                "1M write QD8 overlay"
            ]
        );
        assert!(cases[..4]
            .iter()
            .all(|c| c.on == ImageState::Allocated && !c.workload.one_pass));
        // The overlay is written once per run: every write allocates.
        assert_eq!(cases[4].on, ImageState::EmptyOverlay);
        assert!(cases[4].workload.one_pass);
    }
    #[test]
    fn the_rows_are_the_one_workload_or_a_set() {
        let s = Duration::from_secs(1);
        let w = default_workloads(s)[0];
        assert_eq!(cases(Some(w), false, true, s), [Case::allocated(w)]);
        assert_eq!(cases(Some(w), true, true, s), [Case::empty_overlay(w)]);
        assert_eq!(cases(None, false, true, s), qcow2_cases(s));
        let all = cases(None, true, false, s);
        assert_eq!(all.len(), 7);
        assert!(all.iter().all(|c| c.on == ImageState::Allocated));
    }

    #[test]
    fn the_default_set_is_the_issues() {
        let names: Vec<String> = default_workloads(Duration::from_secs(1))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            names,
            [
                "4k randread QD1",
                "4k randread QD32",
                "4k randread QD32 x2q",
                "4k randwrite QD1",
                "4k randwrite QD32",
                "1M read QD8",
                "1M write QD8"
            ]
        );
    }
}
