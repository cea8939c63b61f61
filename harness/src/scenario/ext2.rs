//! The ext2 family: scenarios whose guests write, so a backend passes only when every write
//! reaches the image (the host reads the image again afterwards).

use std::path::Path;

use vloop_guest::{Entry, FileSpec, Step};

use super::ctx::{
    mkfs, mount, spec, umount, verify, write, write_remount_verify, Ctx, Scenario, ScenarioError,
    MIB, MNT,
};
use crate::backend::DiskSpec;
use crate::file_error::at;
use crate::manifest::file_entries;

/// `ext2-format`.
pub const FORMAT: Scenario = Scenario {
    name: "ext2-format",
    about: "guest formats a blank image (mke2fs), writes edge-size files and a deep tree, remounts and verifies; host runs e2fsck -fn and re-reads every file",
    exercises: "reads and writes of every size around a block, FLUSH, writes reaching the image",
    default: true,
    boots: 1,
    writes: true,
    run: ext2_format,
};

/// `ext2-image`.
pub const IMAGE: Scenario = Scenario {
    name: "ext2-image",
    about: "ext2 image built on the host from a tree: guest verifies it, modifies it, re-verifies; host checks the modifications",
    exercises: "reads of an existing image, writes of changes reaching it",
    default: false,
    boots: 1,
    writes: true,
    run: ext2_image,
};

/// `persist`.
pub const PERSIST: Scenario = Scenario {
    name: "persist",
    about: "two boots on one image: files written in the first are verified in the second",
    exercises: "data surviving the backend's restart",
    default: false,
    boots: 2,
    writes: true,
    run: persist,
};

/// `discard`.
pub const DISCARD: Scenario = Scenario {
    name: "discard",
    about: "delete a large file and fstrim: the host sees the image's allocated size shrink",
    exercises: "DISCARD punching holes in the image",
    default: false,
    boots: 2,
    writes: true,
    run: discard,
};

/// `multiqueue`.
pub const MULTIQUEUE: Scenario = Scenario {
    name: "multiqueue",
    about:
        "2 vCPUs, 2 virtqueues, 4 concurrent writers; data verified in the guest and on the host",
    exercises: "MQ: two virtqueues under concurrent writers",
    default: false,
    boots: 1,
    writes: true,
    run: multiqueue,
};

/// Files of the ext2 scenarios: edge sizes around a 4 KiB block, a multi-MiB file, a deep tree.
fn edge_files(seed: u64) -> Vec<FileSpec> {
    let mut v = vec![
        spec("empty", 0, seed),
        spec("one.bin", 1, seed + 1),
        spec("b4095.bin", 4095, seed + 2),
        spec("b4096.bin", 4096, seed + 3),
        spec("b4097.bin", 4097, seed + 4),
        spec("random.bin", 3 * MIB + 12_345, seed + 5),
    ];
    let mut dir = String::from("tree");
    for i in 0..12 {
        dir.push_str(&format!("/level{i}"));
        v.push(spec(
            &format!("{dir}/f{i}.dat"),
            100 + 517 * i,
            seed + 10 + i,
        ));
    }
    v
}

/// A blank image of `size` bytes in the scenario's folder.
fn blank(c: &mut Ctx, name: &str, size: u64) -> Result<std::path::PathBuf, ScenarioError> {
    let img = c.image(name);
    let tool = c.images.create(&img, size)?;
    c.note(format!("blank {} MiB image by {tool}", size / MIB));
    Ok(img)
}

fn ext2_format(c: &mut Ctx) -> Result<(), ScenarioError> {
    let img = blank(c, "disk.img", 32 * MIB)?;
    let files = edge_files(1000);
    let entries = file_entries(&files);
    c.boot(
        "boot",
        &[DiskSpec::rw(img.clone())],
        1,
        [mkfs(), mount("ext2", false)]
            .into_iter()
            .chain(write_remount_verify(&files, 1, &entries))
            .collect(),
    )?;
    c.note(format!(
        "guest wrote and re-read {} files after remount",
        files.len()
    ));
    c.host_check_ext2(&img, &entries)
}

fn ext2_image(c: &mut Ctx) -> Result<(), ScenarioError> {
    let (tree, _, before) = c.sample_tree()?;
    let img = c.image("ext2.img");
    let tool = c.images.ext2(&img, &tree, 32 * MIB)?;
    c.note(format!("ext2 image by {tool}"));
    let added = vec![
        spec("added/new.bin", 100_000, 77),
        spec("added/deeper/x", 4097, 78),
    ];
    let link = Entry::Symlink {
        path: "added/link".into(),
        target: "../one.bin".into(),
    };
    let mut after: Vec<Entry> = before
        .iter()
        .filter(|e| e.path() != "b4096.bin")
        .cloned()
        .collect();
    after.extend(file_entries(&added));
    after.push(link.clone());
    c.boot(
        "boot",
        &[DiskSpec::rw(img.clone())],
        1,
        vec![
            mount("ext2", false),
            verify(&before),
            write(&added, 1),
            Step::Remove {
                dir: MNT.into(),
                paths: vec!["b4096.bin".into()],
            },
            Step::MakeEntries {
                dir: MNT.into(),
                entries: vec![link],
            },
            umount(),
            Step::DropCaches,
            mount("ext2", true),
            verify(&after),
            umount(),
        ],
    )?;
    c.host_check_ext2(&img, &after)
}

fn persist(c: &mut Ctx) -> Result<(), ScenarioError> {
    let img = blank(c, "disk.img", 32 * MIB)?;
    let first = edge_files(2000);
    let second = vec![spec("second/boot.bin", 300_000, 2100)];
    let mut entries = file_entries(&first);
    c.boot(
        "boot1",
        &[DiskSpec::rw(img.clone())],
        1,
        vec![mkfs(), mount("ext2", false), write(&first, 1), umount()],
    )?;
    c.boot(
        "boot2",
        &[DiskSpec::rw(img.clone())],
        1,
        vec![
            mount("ext2", false),
            verify(&entries),
            write(&second, 1),
            umount(),
        ],
    )?;
    c.note("second boot verified the first boot's files");
    entries.extend(file_entries(&second));
    c.host_check_ext2(&img, &entries)
}

fn allocated(p: &Path) -> Result<u64, ScenarioError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .map(|m| m.blocks() * 512)
        .map_err(|e| at("stat", p)(e).into())
}

fn discard(c: &mut Ctx) -> Result<(), ScenarioError> {
    let img = blank(c, "disk.img", 64 * MIB)?;
    let big = vec![
        spec("big.bin", 24 * MIB, 3000),
        spec("keep.bin", 5000, 3001),
    ];
    c.boot(
        "boot1",
        &[DiskSpec::rw(img.clone())],
        1,
        vec![mkfs(), mount("ext2", false), write(&big, 1), umount()],
    )?;
    let full = allocated(&img)?;
    c.boot(
        "boot2",
        &[DiskSpec::rw(img.clone())],
        1,
        vec![
            mount("ext2", false),
            Step::Remove {
                dir: MNT.into(),
                paths: vec!["big.bin".into()],
            },
            Step::Fstrim { dir: MNT.into() },
            umount(),
        ],
    )?;
    c.host("allocated size shrinks", || {
        let trimmed = allocated(&img)?;
        let what = format!(
            "allocated {} KiB after writing, {} KiB after fstrim",
            full / 1024,
            trimmed / 1024
        );
        if trimmed.saturating_add(16 * MIB) > full {
            return Err(ScenarioError::Host(format!(
                "{what}; expected it to shrink by at least 16 MiB"
            )));
        }
        Ok(((), what))
    })?;
    c.host_check_ext2(&img, &file_entries(&big[1..]))
}

fn multiqueue(c: &mut Ctx) -> Result<(), ScenarioError> {
    let img = blank(c, "disk.img", 32 * MIB)?;
    let files: Vec<FileSpec> = (0..16)
        .map(|i| {
            spec(
                &format!("w{}/f{i}.bin", i % 4),
                512 * 1024 + i * 1000,
                4000 + i,
            )
        })
        .collect();
    let entries = file_entries(&files);
    let disk = DiskSpec {
        queues: 2,
        ..DiskSpec::rw(img.clone())
    };
    c.boot(
        "boot",
        &[disk],
        2,
        [
            mkfs(),
            mount("ext2", false),
            Step::Queues {
                name: "vda".into(),
                min: 2,
            },
        ]
        .into_iter()
        .chain(write_remount_verify(&files, 4, &entries))
        .collect(),
    )?;
    c.note("2 queues, 4 concurrent writers");
    c.host_check_ext2(&img, &entries)
}
