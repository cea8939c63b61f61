//! Scenarios: what each one puts on its disks, what the guest does, and what the host checks
//! afterwards. A scenario passes only when every guest step reported success, the guest said
//! it was done, and every host check passed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vloop_guest::{Entry, Event, FileSpec, Plan, Step};

use crate::accel::Accel;
use crate::backend::{Backend, DiskSpec};
use crate::images::Images;
use crate::manifest::{
    compare, e2fsck, file_entries, sample_tree, scan_ext2, summarise, write_tree,
};
use crate::qemu::{self, VmConfig};

/// A scenario's name and what it proves.
#[derive(Debug, Clone, Copy)]
pub struct ScenarioInfo {
    /// Name on the command line.
    pub name: &'static str,
    /// One line on what it does.
    pub about: &'static str,
    /// Run when no `--scenario` is given.
    pub default: bool,
}

/// Every scenario, in the order they run (and are sharded).
pub const SCENARIOS: &[ScenarioInfo] = &[
    ScenarioInfo {
        name: "ext2-format",
        about: "guest formats a blank image (mke2fs), writes edge-size files and a deep tree, remounts and verifies; host runs e2fsck -fn and re-reads every file",
        default: true,
    },
    ScenarioInfo {
        name: "iso",
        about: "read-only ISO 9660 (Rock Ridge) built on the host: guest checks every name and file against the manifest, and that writing the device fails",
        default: true,
    },
    ScenarioInfo {
        name: "ext2-image",
        about: "ext2 image built on the host from a tree: guest verifies it, modifies it, re-verifies; host checks the modifications",
        default: false,
    },
    ScenarioInfo {
        name: "persist",
        about: "two boots on one image: files written in the first are verified in the second",
        default: false,
    },
    ScenarioInfo {
        name: "cdrom-copy",
        about: "a copy of the ISO (the cp /dev/cdrom path) served read-only and verified",
        default: false,
    },
    ScenarioInfo {
        name: "discard",
        about: "delete a large file and fstrim: the host sees the image's allocated size shrink",
        default: false,
    },
    ScenarioInfo {
        name: "multiqueue",
        about: "2 vCPUs, 2 virtqueues, 4 concurrent writers; data verified in the guest and on the host",
        default: false,
    },
];

/// How many guests a scenario boots (a cost estimate for scheduling).
pub fn boots(name: &str) -> u32 {
    match name {
        "persist" | "discard" => 2,
        _ => 1,
    }
}

/// What every scenario shares: the programs, the kernel, the initramfs.
#[derive(Debug, Clone)]
pub struct Env {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Base initramfs (agent, busybox, modules).
    pub base_initrd: PathBuf,
    /// Module file names in load order.
    pub modules: Vec<String>,
    /// The backend program.
    pub backend: Backend,
    /// The image factory.
    pub images: Images,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Per-boot time-out before scaling by the accelerator's slowness.
    pub boot_timeout: Duration,
    /// Extra kernel command-line words.
    pub append: String,
}

/// The result of one scenario.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// Scenario name.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub reason: String,
    /// Accelerator used.
    pub accel: Accel,
    /// Wall seconds from QEMU's start until the guest agent reported it started (first boot).
    pub boot_s: Option<f64>,
    /// Wall seconds for the whole scenario (images, boots, checks).
    pub total_s: f64,
    /// What was checked and with which tools.
    pub notes: Vec<String>,
    /// Directory holding the logs and images of a failed (or `--keep`) run.
    pub kept: Option<PathBuf>,
}

const MNT: &str = "/mnt/d";
const DEV: &str = "/dev/vda";
const MIB: u64 = 1024 * 1024;

struct Ctx<'a> {
    env: &'a Env,
    dir: PathBuf,
    sock_dir: tempfile::TempDir,
    boot_s: Option<f64>,
    notes: Vec<String>,
}

fn tail(path: &Path, n: usize) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = t.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    v[v.len().saturating_sub(n)..].join(" | ")
}

/// Reads the guest's JSON-lines results, skipping lines that are not events.
pub fn parse_events(text: &str) -> Vec<Event> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Event>(l.trim().trim_matches('\0')).ok())
        .collect()
}

/// Judges one boot from its events: Ok(boot seconds) or the reason it failed.
pub fn judge_events(events: &[Event], exit: &qemu::VmExit, limit: Duration) -> Result<f64, String> {
    let mut boot = None;
    for e in events {
        match e {
            Event::Start { uptime_s, .. } => boot = Some(*uptime_s),
            Event::Fatal { error } => return Err(format!("guest agent failed: {error}")),
            Event::Step {
                ok: false,
                index,
                op,
                detail,
                ..
            } => {
                return Err(format!("guest step {index} ({op}) failed: {detail}"));
            }
            Event::Done { ok: true, .. } => {
                return boot.ok_or_else(|| "guest said done without starting".to_string())
            }
            Event::Done { ok: false, .. } => return Err("guest finished with a failed step".into()),
            Event::Step { .. } => {}
        }
    }
    let how = if let Some(why) = &exit.aborted {
        format!("was stopped: {why}")
    } else if exit.timed_out {
        format!("did not finish within {limit:?} (killed)")
    } else {
        format!(
            "stopped ({}) before reporting done",
            exit.status.as_deref().unwrap_or("?")
        )
    };
    Err(match boot {
        None => format!("guest never reported: QEMU {how}"),
        Some(_) => format!("guest {how}"),
    })
}

impl Ctx<'_> {
    fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// Boots one guest with `disks` and runs `steps`.
    fn boot(
        &mut self,
        label: &str,
        disks: &[DiskSpec],
        cpus: u32,
        steps: Vec<Step>,
    ) -> Result<(), String> {
        let env = self.env;
        let mut backends = Vec::new();
        let mut socks = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            let sock = self.sock_dir.path().join(format!("{label}-{i}.sock"));
            let log = self.dir.join(format!("{label}-backend{i}.log"));
            let g = env
                .backend
                .start(d, &sock, &log, Duration::from_secs(10))
                .map_err(|e| format!("{e} (log: {})", log.display()))?;
            backends.push(g);
            socks.push((sock, d.queues));
        }
        let plan = Plan {
            scenario: label.to_string(),
            modules: env.modules.clone(),
            devices: (0..disks.len())
                .map(|i| format!("vd{}", char::from(b'a' + i as u8)))
                .collect(),
            steps,
        };
        let initrd = self.sock_dir.path().join(format!("{label}-initrd.img"));
        crate::initramfs::write_initrd(&env.base_initrd, &plan, &initrd)
            .map_err(|e| e.to_string())?;
        let cfg = VmConfig {
            qemu: env.qemu.clone(),
            accel: env.accel,
            kernel: env.kernel.clone(),
            initrd,
            append: env.append.clone(),
            mem_mib: env.mem_mib,
            cpus,
            disks: socks,
            console_log: self.dir.join(format!("{label}-console.log")),
            results: self.dir.join(format!("{label}-results.jsonl")),
        };
        let limit = env.boot_timeout * env.accel.slowness();
        let qemu_log = self.dir.join(format!("{label}-qemu.log"));
        let mut backend_died = || {
            backends.iter_mut().enumerate().find_map(|(i, b)| {
                b.try_wait()
                    .map(|st| format!("backend for disk {i} exited ({st}) while the guest ran"))
            })
        };
        let exit =
            qemu::run(&cfg, &qemu_log, limit, &mut backend_died).map_err(|e| e.to_string())?;
        for b in &mut backends {
            b.stop(Duration::from_secs(5));
        }
        let events = parse_events(&std::fs::read_to_string(&cfg.results).unwrap_or_default());
        if let Some(b) = exit.agent_started {
            self.boot_s.get_or_insert(b.as_secs_f64());
        }
        let at = |d: Option<Duration>| {
            d.map_or_else(|| "-".to_string(), |d| format!("{:.1}s", d.as_secs_f64()))
        };
        self.note(format!(
            "{label}: agent started at {}, done at {}, QEMU exited at {:.1}s",
            at(exit.agent_started),
            at(exit.agent_done),
            exit.elapsed.as_secs_f64(),
        ));
        match judge_events(&events, &exit, limit) {
            Ok(_) => Ok(()),
            Err(e) => {
                let q = tail(&qemu_log, 2);
                let c = tail(&cfg.console_log, 3);
                let mut msg = format!("{label}: {e}");
                if !q.is_empty() {
                    msg.push_str(&format!("; qemu: {q}"));
                }
                if !c.is_empty() && !msg.contains("step") {
                    msg.push_str(&format!("; console: {c}"));
                }
                if exit.aborted.is_some() {
                    for i in 0..disks.len() {
                        let b = tail(&self.dir.join(format!("{label}-backend{i}.log")), 2);
                        if !b.is_empty() {
                            msg.push_str(&format!("; backend{i}: {b}"));
                        }
                    }
                }
                Err(msg)
            }
        }
    }

    fn image(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn host_check_ext2(&mut self, img: &Path, entries: &[Entry]) -> Result<(), String> {
        let fsck = e2fsck(img).map_err(|e| format!("host: {e}"))?;
        self.note(format!("e2fsck -fn clean ({fsck})"));
        let found = scan_ext2(img).map_err(|e| format!("host: {e}"))?;
        let problems = compare(entries, &found, true, &["lost+found"]);
        if !problems.is_empty() {
            return Err(format!(
                "host read-back (ext4-view): {}",
                summarise(&problems, 4)
            ));
        }
        self.note(format!(
            "host read back {} entries with ext4-view",
            entries.len()
        ));
        Ok(())
    }
}

fn rw(image: PathBuf) -> DiskSpec {
    DiskSpec {
        image,
        readonly: false,
        queues: 1,
    }
}

fn ro(image: PathBuf) -> DiskSpec {
    DiskSpec {
        image,
        readonly: true,
        queues: 1,
    }
}

fn mount(fstype: &str, readonly: bool) -> Step {
    Step::Mount {
        dev: DEV.into(),
        dir: MNT.into(),
        fstype: fstype.into(),
        readonly,
        options: String::new(),
    }
}

fn mkfs() -> Step {
    Step::Mkfs {
        dev: DEV.into(),
        // 4 KiB blocks: busybox would pick 1 KiB for small disks, and formats 40% slower.
        args: vec!["-b".into(), "4096".into()],
    }
}

fn umount() -> Step {
    Step::Umount { dir: MNT.into() }
}

fn write(files: &[FileSpec], writers: u32) -> Step {
    Step::WriteFiles {
        dir: MNT.into(),
        files: files.to_vec(),
        writers,
    }
}

fn verify(entries: &[Entry]) -> Step {
    Step::Verify {
        dir: MNT.into(),
        entries: entries.to_vec(),
        exact: true,
        ignore: vec!["lost+found".into()],
    }
}

/// Writes `files` to the mounted ext2 file system with `writers` concurrent writers, unmounts,
/// drops the page cache, mounts it again and verifies `entries`, then unmounts.
fn write_remount_verify(files: &[FileSpec], writers: u32, entries: &[Entry]) -> [Step; 6] {
    [
        write(files, writers),
        umount(),
        Step::DropCaches,
        mount("ext2", false),
        verify(entries),
        umount(),
    ]
}

fn spec(path: &str, size: u64, seed: u64) -> FileSpec {
    FileSpec {
        path: path.into(),
        size,
        seed,
    }
}

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

fn ext2_format(c: &mut Ctx) -> Result<(), String> {
    let img = c.image("disk.img");
    let tool = c.env.images.create(&img, 32 * MIB)?;
    c.note(format!("blank 32 MiB image by {tool}"));
    let files = edge_files(1000);
    let entries = file_entries(&files);
    c.boot(
        "boot",
        &[rw(img.clone())],
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

fn ext2_image(c: &mut Ctx) -> Result<(), String> {
    let tree = c.image("tree");
    let (files, dirs) = sample_tree(2 * MIB + 7);
    write_tree(&tree, &files, &dirs).map_err(|e| format!("writing the tree: {e}"))?;
    let img = c.image("ext2.img");
    let tool = c.env.images.ext2(&img, &tree, 32 * MIB)?;
    c.note(format!("ext2 image by {tool}"));
    let mut before = file_entries(&files);
    before.extend(dirs.iter().cloned());
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
        &[rw(img.clone())],
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

fn persist(c: &mut Ctx) -> Result<(), String> {
    let img = c.image("disk.img");
    c.env.images.create(&img, 32 * MIB)?;
    let first = edge_files(2000);
    let second = vec![spec("second/boot.bin", 300_000, 2100)];
    let mut entries = file_entries(&first);
    c.boot(
        "boot1",
        &[rw(img.clone())],
        1,
        vec![mkfs(), mount("ext2", false), write(&first, 1), umount()],
    )?;
    c.boot(
        "boot2",
        &[rw(img.clone())],
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

fn iso_tree(c: &mut Ctx) -> Result<(PathBuf, Vec<Entry>), String> {
    let tree = c.image("tree");
    let (files, dirs) = sample_tree(2 * MIB + 7);
    write_tree(&tree, &files, &dirs).map_err(|e| format!("writing the tree: {e}"))?;
    let img = c.image("image.iso");
    let tool = c.env.images.iso(&img, &tree)?;
    c.note(format!("ISO by {tool}"));
    let mut entries = file_entries(&files);
    entries.extend(dirs);
    Ok((img, entries))
}

fn file_sha(p: &Path) -> Result<String, String> {
    std::fs::read(p)
        .map(|d| vloop_guest::sha256_hex(&d))
        .map_err(|e| format!("read {}: {e}", p.display()))
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

fn iso(c: &mut Ctx) -> Result<(), String> {
    let (img, entries) = iso_tree(c)?;
    let before = file_sha(&img)?;
    c.boot("boot", &[ro(img.clone())], 1, iso_steps(&entries))?;
    c.note(format!(
        "guest verified {} entries; write to the device failed as it must",
        entries.len()
    ));
    if file_sha(&img)? != before {
        return Err("host: the read-only ISO image changed".into());
    }
    c.note("image unchanged");
    Ok(())
}

fn cdrom_copy(c: &mut Ctx) -> Result<(), String> {
    let (iso, entries) = iso_tree(c)?;
    let copy = c.image("cdrom-image");
    let tool = c.env.images.copy(&iso, &copy)?;
    c.note(format!("copied by {tool}"));
    if file_sha(&iso)? != file_sha(&copy)? {
        return Err("host: the copy differs from the ISO".into());
    }
    c.boot("boot", &[ro(copy)], 1, iso_steps(&entries))
}

fn allocated(p: &Path) -> Result<u64, String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .map(|m| m.blocks() * 512)
        .map_err(|e| format!("stat {}: {e}", p.display()))
}

fn discard(c: &mut Ctx) -> Result<(), String> {
    let img = c.image("disk.img");
    c.env.images.create(&img, 64 * MIB)?;
    let big = vec![
        spec("big.bin", 24 * MIB, 3000),
        spec("keep.bin", 5000, 3001),
    ];
    c.boot(
        "boot1",
        &[rw(img.clone())],
        1,
        vec![mkfs(), mount("ext2", false), write(&big, 1), umount()],
    )?;
    let full = allocated(&img)?;
    c.boot(
        "boot2",
        &[rw(img.clone())],
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
    let trimmed = allocated(&img)?;
    c.note(format!(
        "allocated {} KiB after writing, {} KiB after fstrim",
        full / 1024,
        trimmed / 1024
    ));
    if trimmed + 16 * MIB > full {
        return Err(format!(
            "host: allocated size went from {} KiB to {} KiB; expected it to shrink by at least 16 MiB",
            full / 1024,
            trimmed / 1024
        ));
    }
    c.host_check_ext2(&img, &file_entries(&big[1..]))
}

fn multiqueue(c: &mut Ctx) -> Result<(), String> {
    let img = c.image("disk.img");
    c.env.images.create(&img, 32 * MIB)?;
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
        image: img.clone(),
        readonly: false,
        queues: 2,
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

/// Runs one scenario with its files under `results/<name>`; the directory is removed when
/// the scenario passes (unless `keep`).
pub fn run(env: &Env, name: &str, results: &Path, keep: bool) -> Outcome {
    let t = Instant::now();
    let dir = results.join(name);
    let mut out = Outcome {
        name: name.to_string(),
        passed: false,
        reason: String::new(),
        accel: env.accel,
        boot_s: None,
        total_s: 0.0,
        notes: Vec::new(),
        kept: None,
    };
    let _ = std::fs::remove_dir_all(&dir);
    let setup = std::fs::create_dir_all(&dir)
        .map_err(|e| format!("create {}: {e}", dir.display()))
        .and_then(|()| {
            tempfile::Builder::new()
                .prefix("vloop-")
                .tempdir_in(std::env::temp_dir())
                .map_err(|e| format!("temporary directory: {e}"))
        });
    let r = match setup {
        Err(e) => Err(e),
        Ok(sock_dir) => {
            let mut c = Ctx {
                env,
                dir: dir.clone(),
                sock_dir,
                boot_s: None,
                notes: Vec::new(),
            };
            let r = match name {
                "ext2-format" => ext2_format(&mut c),
                "ext2-image" => ext2_image(&mut c),
                "persist" => persist(&mut c),
                "iso" => iso(&mut c),
                "cdrom-copy" => cdrom_copy(&mut c),
                "discard" => discard(&mut c),
                "multiqueue" => multiqueue(&mut c),
                other => Err(format!("unknown scenario {other}")),
            };
            out.boot_s = c.boot_s;
            out.notes = c.notes;
            r
        }
    };
    out.total_s = t.elapsed().as_secs_f64();
    match r {
        Ok(()) => {
            out.passed = true;
            if keep {
                out.kept = Some(dir);
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Err(e) => {
            out.reason = e;
            out.kept = Some(dir);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(timed_out: bool) -> qemu::VmExit {
        qemu::VmExit {
            status: if timed_out {
                None
            } else {
                Some("exit status: 0".into())
            },
            success: !timed_out,
            timed_out,
            elapsed: Duration::from_secs(1),
            agent_started: None,
            agent_done: None,
            aborted: None,
        }
    }

    #[test]
    fn events_decide_the_verdict() {
        let lim = Duration::from_secs(5);
        let text = "garbage\r\n{\"event\":\"start\",\"scenario\":\"x\",\"uptime_s\":1.5,\"setup_ms\":3}\n\
                    {\"event\":\"step\",\"index\":0,\"op\":\"mkfs\",\"ok\":true,\"ms\":1,\"detail\":\"\"}\n\
                    {\"event\":\"done\",\"ok\":true,\"uptime_s\":2.0}\n";
        let ev = parse_events(text);
        assert_eq!(ev.len(), 3);
        assert_eq!(judge_events(&ev, &exit(false), lim), Ok(1.5));

        let failed = parse_events(
            "{\"event\":\"start\",\"scenario\":\"x\",\"uptime_s\":1.5,\"setup_ms\":3}\n\
             {\"event\":\"step\",\"index\":4,\"op\":\"verify\",\"ok\":false,\"ms\":1,\"detail\":\"a: missing\"}\n",
        );
        let e = judge_events(&failed, &exit(false), lim).unwrap_err();
        assert!(e.contains("step 4 (verify) failed: a: missing"), "{e}");

        let e = judge_events(&[], &exit(true), lim).unwrap_err();
        assert!(e.contains("never reported") && e.contains("killed"), "{e}");

        let started = &ev[..2];
        let e = judge_events(started, &exit(false), lim).unwrap_err();
        assert!(e.contains("before reporting done"), "{e}");
    }

    #[test]
    fn scenario_names_are_unique_and_defaults_exist() {
        let mut names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SCENARIOS.len());
        assert!(SCENARIOS
            .iter()
            .any(|s| s.default && s.name == "ext2-format"));
        assert!(SCENARIOS.iter().any(|s| s.default && s.name == "iso"));
    }
}
