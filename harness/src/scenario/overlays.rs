//! The overlays family: many guests on one read-only base, the way hosts provision VMs from
//! one image. A base ext2 image is built on the host from the sample tree, and each guest gets
//! its own qcow2 overlay over it; the guests run at once, each on its own overlay served by its
//! own backend process, verify the base's files, write their own and verify both after a
//! remount. The host then checks that the base is unchanged, that each overlay is a sound
//! qcow2 image holding about what its guest wrote, and that each overlay read through its
//! chain holds its guest's files and the base's, and nothing of the other guests.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use vloop_frontend::backend::on_path;
use vloop_guest::{Entry, FileSpec, Step};

use super::ctx::{
    chain, file_sha, mount, spec, verify, write_remount_verify, Ctx, GuestPlan, Scenario,
    ScenarioError, MIB,
};
use crate::backend::{DiskSpec, Qcow2Support};
use crate::file_error::at;
use crate::images::OVERLAY_CLUSTER;
use crate::manifest::{
    compare, e2fsck, file_entries, qemu_img_check, qemu_img_flatten, scan_ext2_qcow2, summarise,
    writer_refused,
};
use crate::qemu::{Progress, Watch};

/// `overlays`.
pub const OVERLAYS: Scenario = Scenario {
    name: "overlays",
    about: "four guests at once, each on its own qcow2 overlay of one raw ext2 base: each verifies the base, writes its own files, remounts and verifies both; host checks the base unchanged and locked against writers, qemu-img check, each overlay's allocation, and reads each overlay back through its chain",
    exercises: "qcow2 overlays: the virtual size, reads falling through to a raw base, allocating and copy-on-write writes; several backends serving one base read-only at once",
    default: false,
    boots: GUESTS as u32,
    writes: true,
    run: overlays,
};

/// Guests booted at once, each on its own overlay.
const GUESTS: usize = 4;
/// Size of the base image, and so of every overlay.
const BASE_SIZE: u64 = 32 * MIB;
/// The base image's name, as the overlays store it (relative: resolved from their folder).
const BASE: &str = "base.img";
/// The overlay's allocation may exceed what its guest wrote by a cluster per file (its two
/// partial clusters share one with the file before or after) plus this many clusters: the
/// ext2 metadata the guest changes (superblock, group descriptors, bitmaps, inode tables,
/// directories: copied on write a whole cluster each) and qcow2's own (header, refcount
/// table and block, L1 and L2 tables). vloop's ext2 writer (4 KiB blocks, one block group)
/// needs about 12 of them; `mke2fs -d` (1 KiB blocks and four block groups in 32 MiB, so its
/// metadata and files spread over more clusters) about 25.
const SLACK_CLUSTERS: u64 = 32;

/// The files guest `g` writes: a few MiB under `guest<g>/`, sizes around a block and a
/// cluster, contents seeded per guest.
fn guest_files(g: u64) -> Vec<FileSpec> {
    let seed = 50_000 + 100 * g;
    let dir = format!("guest{g}");
    vec![
        spec(&format!("{dir}/big.bin"), 3 * MIB + 4097 * g, seed),
        spec(&format!("{dir}/half.bin"), MIB / 2 + 1, seed + 1),
        spec(&format!("{dir}/one.bin"), 1, seed + 2),
        spec(&format!("{dir}/b4095.bin"), 4095, seed + 3),
        spec(&format!("{dir}/c65537.bin"), 65_537, seed + 4),
        spec(&format!("{dir}/deep/a/b/c.dat"), 70_000 + g, seed + 5),
    ]
}

/// What guest `g` does: check that its disk has the overlay's virtual size, verify the base,
/// write its files, remount (caches dropped) and verify the base's files and its own.
fn guest_steps(base: &[Entry], files: &[FileSpec]) -> Vec<Step> {
    let mut after = base.to_vec();
    after.extend(file_entries(files));
    [
        Step::DiskSize {
            name: "vda".into(),
            bytes: BASE_SIZE,
        },
        mount("ext2", false),
        verify(base),
        // The write, remount and verify of every ext2 scenario: files fsynced one by one.
    ]
    .into_iter()
    .chain(write_remount_verify(files, 1, &after))
    .collect()
}

/// Guest `g`'s overlay.
fn overlay_name(g: usize) -> String {
    format!("overlay{g}.qcow2")
}

/// Bytes allocated to a file (`st_blocks`).
fn allocated(p: &Path) -> Result<u64, ScenarioError> {
    std::fs::metadata(p)
        .map(|m| m.blocks() * 512)
        .map_err(|e| at("stat", p)(e).into())
}

/// What the guests have shown so far, for the lock probe.
#[derive(Debug, Default)]
struct Seen {
    /// Each guest's QEMU runs (so its backend has opened the overlay and the base).
    running: [bool; GUESTS],
    /// Each guest's agent said done.
    done: [bool; GUESTS],
}

/// The lock probe's result: how many guests were running, and what qemu-io got.
type Probe = (usize, Result<String, String>);

fn overlays(c: &mut Ctx) -> Result<(), ScenarioError> {
    let support = c.backend.qcow2();
    for (tool, package) in [
        ("qemu-img", "qemu-utils"),
        ("qemu-io", "qemu-utils"),
        ("e2fsck", "e2fsprogs"),
    ] {
        if !on_path(tool) {
            return Err(ScenarioError::NotRun(format!(
                "{tool} is not installed (package {package}); the host checks the overlays with it"
            )));
        }
    }

    let (tree, _, base_entries) = c.sample_tree()?;
    let base = c.image(BASE);
    let tool = c.images.ext2(&base, &tree, BASE_SIZE)?;
    let before = file_sha(&base)?;
    c.note(format!(
        "base: {} MiB ext2 by {tool}, SHA-256 {}",
        BASE_SIZE / MIB,
        &before[..16]
    ));
    let mut guests = Vec::new();
    let mut written = Vec::new();
    let mut overlay_tool = "";
    for g in 0..GUESTS {
        let ov = c.image(&overlay_name(g));
        overlay_tool = c.images.overlay(&ov, BASE, BASE_SIZE)?;
        let files = guest_files(g as u64);
        written.push(files.clone());
        guests.push(GuestPlan {
            label: format!("guest{g}"),
            disks: vec![DiskSpec::rw(ov)],
            cpus: 1,
            steps: guest_steps(&base_entries, &files),
        });
    }
    c.note(format!(
        "{GUESTS} qcow2 overlays by {overlay_tool}: backing file {BASE} (format raw), {} KiB clusters",
        OVERLAY_CLUSTER / 1024
    ));

    // Once every guest's backend serves, a writer must be refused the base.
    let seen = Mutex::new(Seen::default());
    let probe: OnceLock<Probe> = OnceLock::new();
    let watch = |i: usize, p: &Progress| {
        let running = {
            let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
            s.running[i] = true;
            s.done[i] |= p.done.is_some();
            s.running
                .iter()
                .all(|&b| b)
                .then(|| s.done.iter().filter(|&&d| !d).count())
        };
        if let Some(running) = running {
            probe.get_or_init(|| (running, writer_refused(&base).map_err(|e| chain(&e))));
        }
        Watch::Continue
    };
    let runs = c.boot_all(&guests, &watch);

    if support == Qcow2Support::Unknown {
        // A backend that does not serve qcow2 exports the overlay file's own bytes: its guests
        // all stop at the first step, seeing the file's length instead of the image's size.
        let seen: Vec<String> = runs
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter_map(|r| match r.steps().first() {
                Some((op, false, detail)) if op == "disk_size" => Some(detail.clone()),
                _ => None,
            })
            .collect();
        if seen.len() == GUESTS {
            return Err(ScenarioError::NotRun(format!(
                "the backend does not serve qcow2 images: the guests' disks are not the overlays' \
                 {} MiB images ({}); a --backend-cmd template is given the image's path and \
                 nothing that says it is qcow2, so it must open {{image}} as qcow2 itself",
                BASE_SIZE / MIB,
                seen[0]
            )));
        }
    }
    c.record_all(&guests, runs)?;
    c.note(format!(
        "{GUESTS} guests booted at once: each verified the base, wrote {} files and verified both after a remount",
        written[0].len()
    ));

    let mut first = None;
    match (probe.get(), &support) {
        (
            Some((running, r)),
            Qcow2Support::Served {
                locks_backing: true,
            },
        ) => {
            let r = r.clone();
            let running = *running;
            let locked = c.host("base locked against writers", || {
                r.map(|said| ((), format!("{running} of {GUESTS} guests running: {said}")))
                    .map_err(|e| {
                        ScenarioError::Host(format!(
                            "base locked against writers: {running} of {GUESTS} guests running: {e}"
                        ))
                    })
            });
            if let Err(e) = locked {
                first.get_or_insert(e);
            }
        }
        (Some((running, r)), _) => c.note(format!(
            "with {running} of {GUESTS} guests running, a writer {} the base (the backend \
             promises nothing about locks)",
            match r {
                Ok(_) => "was refused",
                Err(_) => "could open",
            }
        )),
        (None, _) => return Err(ScenarioError::Host(
            "the guests' backends never all served at once, so the base's lock was never probed"
                .into(),
        )),
    }
    let unchanged = c.host("base unchanged", || {
        if file_sha(&base)? != before {
            return Err(ScenarioError::Host(
                "the base's SHA-256 changed: a guest's writes reached it".into(),
            ));
        }
        Ok(((), "same SHA-256 as before the guests ran".to_string()))
    });
    if let Err(e) = unchanged {
        first.get_or_insert(e);
    }
    for (g, files) in written.iter().enumerate() {
        if let Err(e) = check_overlay(c, g, &base_entries, files) {
            if matches!(e, ScenarioError::NotRun(_)) {
                return Err(e);
            }
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// The host's checks of guest `g`'s overlay; every check runs, the first failure is the error.
fn check_overlay(
    c: &mut Ctx,
    g: usize,
    base_entries: &[Entry],
    files: &[FileSpec],
) -> Result<(), ScenarioError> {
    let ov = c.image(&overlay_name(g));
    let label = format!("guest{g} overlay");
    let mut first = None;
    let mut keep = |r: Result<(), ScenarioError>| {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    };
    keep(c.host(&format!("{label}: qemu-img check"), || {
        Ok(((), qemu_img_check(&ov)?))
    }));
    let wrote: u64 = files.iter().map(|f| f.size).sum();
    let n = files.len() as u64;
    let what = format!("{label}: allocation");
    keep(c.host(&what, || {
        let got = allocated(&ov)?;
        let most = wrote + (n + SLACK_CLUSTERS) * OVERLAY_CLUSTER;
        let seen = format!(
            "{} KiB allocated for {} KiB written in {n} files (bound: {} to {} KiB: the data, \
             plus a cluster per file and {SLACK_CLUSTERS} clusters of metadata)",
            got / 1024,
            wrote / 1024,
            wrote / 1024,
            most / 1024
        );
        if got < wrote || got > most {
            return Err(ScenarioError::Host(format!(
                "{what}: {seen}: out of bounds"
            )));
        }
        Ok(((), seen))
    }));
    let mut expected = base_entries.to_vec();
    expected.extend(file_entries(files));
    let what = format!("{label}: read-back (vloop-qcow2 + ext4-view)");
    keep(c.host(&what, || {
        let found = scan_ext2_qcow2(&ov)?;
        let problems = compare(&expected, &found, true, &["lost+found"]);
        if !problems.is_empty() {
            return Err(ScenarioError::Host(format!(
                "{what}: {}",
                summarise(&problems, 4)
            )));
        }
        Ok((
            (),
            format!(
                "the base's {} entries and the guest's {} files, nothing else",
                base_entries.len(),
                files.len()
            ),
        ))
    }));
    let raw: PathBuf = c.tmp.path().join(format!("overlay{g}.raw"));
    keep(
        c.host(&format!("{label}: e2fsck -fn (qemu-img convert)"), || {
            qemu_img_flatten(&ov, &raw)?;
            let r = e2fsck(&raw);
            let _ = std::fs::remove_file(&raw);
            let summary = r?;
            let summary = summary
                .strip_prefix(&format!("{}: ", raw.display()))
                .unwrap_or(&summary);
            Ok(((), format!("clean ({summary})")))
        }),
    );
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_guest_writes_its_own_few_mib_and_verifies_the_base_first() {
        let mut paths = std::collections::BTreeSet::new();
        for g in 0..GUESTS as u64 {
            let files = guest_files(g);
            let total: u64 = files.iter().map(|f| f.size).sum();
            assert!((3 * MIB..6 * MIB).contains(&total), "guest {g}: {total}");
            for f in &files {
                assert!(f.path.starts_with(&format!("guest{g}/")));
                assert!(paths.insert(f.path.clone()), "{} twice", f.path);
            }
            // The data and its slack stay well below the base: an overlay that copied the base
            // fails the allocation bound.
            let most = total + (files.len() as u64 + SLACK_CLUSTERS) * OVERLAY_CLUSTER;
            assert!(most < BASE_SIZE / 4, "{most}");
        }
        let base = vec![Entry::Dir { path: "d".into() }];
        let steps = guest_steps(&base, &guest_files(0));
        assert!(matches!(&steps[0], Step::DiskSize { bytes, .. } if *bytes == BASE_SIZE));
        assert!(matches!(&steps[2], Step::Verify { entries, .. } if *entries == base));
        let Some(Step::Verify { entries, .. }) = steps.iter().rev().nth(1) else {
            panic!("no final verify: {steps:?}");
        };
        assert_eq!(entries.len(), 1 + guest_files(0).len());
        assert!(steps.iter().any(|s| matches!(s, Step::DropCaches)));
    }
}
