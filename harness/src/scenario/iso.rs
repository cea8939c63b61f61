//! The ISO 9660 family: read-only scenarios, so a backend passes only when it serves every
//! byte as the image has it, marks the disk read-only and refuses writes.

use std::path::PathBuf;

use vloop_guest::{Entry, Step};

use super::ctx::{file_sha, mount, umount, Ctx, Scenario, ScenarioError, DEV, MNT};
use crate::backend::DiskSpec;

/// `iso`.
pub const ISO: Scenario = Scenario {
    name: "iso",
    about: "read-only ISO 9660 (Rock Ridge) built on the host: guest checks every name and file against the manifest, and that writing the device fails",
    exercises: "a read-only export: reads, the RO feature, writes refused, the image untouched",
    default: true,
    boots: 1,
    writes: false,
    run: iso,
};

/// `cdrom-copy`.
pub const CDROM_COPY: Scenario = Scenario {
    name: "cdrom-copy",
    about: "a copy of the ISO (the cp /dev/cdrom path) served read-only and verified",
    exercises: "a read-only export of a copied image",
    default: false,
    boots: 1,
    writes: false,
    run: cdrom_copy,
};

/// The sample tree as an ISO image in the scenario's folder, and its manifest.
fn iso_tree(c: &mut Ctx) -> Result<(PathBuf, Vec<Entry>), ScenarioError> {
    let (tree, _, entries) = c.sample_tree()?;
    let img = c.image("image.iso");
    let tool = c.images.iso(&img, &tree)?;
    c.note(format!("ISO by {tool}"));
    Ok((img, entries))
}

fn iso_steps(entries: &[Entry]) -> Vec<Step> {
    vec![
        mount("iso9660", true),
        Step::Verify {
            dir: MNT.into(),
            entries: entries.to_vec(),
            exact: true,
            // Where Rock Ridge relocates directories nested deeper than ISO 9660's 8 levels.
            ignore: vec![".rr_moved".into(), "rr_moved".into()],
        },
        umount(),
        Step::WriteMustFail { dev: DEV.into() },
    ]
}

fn iso(c: &mut Ctx) -> Result<(), ScenarioError> {
    let (img, entries) = iso_tree(c)?;
    let before = file_sha(&img)?;
    c.boot("boot", &[DiskSpec::ro(img.clone())], 1, iso_steps(&entries))?;
    c.note(format!(
        "guest verified {} entries; write to the device failed as it must",
        entries.len()
    ));
    c.host("image unchanged", || {
        if file_sha(&img)? != before {
            return Err(ScenarioError::Host(
                "the read-only ISO image changed".into(),
            ));
        }
        Ok(((), "same SHA-256 as before the boot".to_string()))
    })
}

fn cdrom_copy(c: &mut Ctx) -> Result<(), ScenarioError> {
    let (iso, entries) = iso_tree(c)?;
    let copy = c.image("cdrom-image");
    let tool = c.images.copy(&iso, &copy)?;
    c.note(format!("copied by {tool}"));
    if file_sha(&iso)? != file_sha(&copy)? {
        return Err(ScenarioError::Host("the copy differs from the ISO".into()));
    }
    c.boot("boot", &[DiskSpec::ro(copy)], 1, iso_steps(&entries))
}
