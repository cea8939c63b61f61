//! Build time and image size of the ext2 builder next to `mke2fs -d` on the same tree.
//! Not part of the normal test run:
//! `cargo test --release -p vloop-images --test ext2_bench -- --ignored --nocapture`

mod ext2_common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};

use ext2_common::*;
use vloop_images::ext2::{build, Ext2Options};
use vloop_images::tree::{scan, TreeOptions};

#[test]
#[ignore = "benchmark: run by hand with --release --ignored --nocapture"]
fn build_time_and_size_vs_mke2fs() {
    let Some(mke2fs) = tool("mke2fs") else {
        vloop_frontend::skip::skip("mke2fs not found (e2fsprogs)");
        return;
    };
    let dir = tempfile::tempdir_in(std::env::var_os("BENCH_DIR").unwrap_or(".".into())).unwrap();
    let src = dir.path().join("src");
    // ~100 MiB in 400 files over 20 directories, sizes spread from a few bytes to ~1.5 MiB.
    let mut total = 0u64;
    for i in 0..400u32 {
        let len = ((i as usize * 7919) % 500 + 1) * ((i as usize % 4) * 700 + 1);
        let len = len.min(1_500_000);
        let p = src
            .join(format!("dir{:02}", i % 20))
            .join(format!("file-{i:04}.bin"));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, pattern(len, i)).unwrap();
        total += len as u64;
    }
    eprintln!("tree: 400 files, {:.1} MiB", total as f64 / 1048576.0);

    let tree = scan(
        &src,
        &TreeOptions {
            keep_owners: false,
            timestamp: Some(TS),
        },
    )
    .unwrap();
    let ours = dir.path().join("ours.img");
    let theirs = dir.path().join("mke2fs.img");
    let mut t_ours = Duration::MAX;
    let mut t_theirs = Duration::MAX;
    let mut summary = None;
    for _ in 0..2 {
        let _ = fs::remove_file(&ours);
        let t = Instant::now();
        summary = Some(build(&tree, &ours, &Ext2Options::default()).unwrap());
        t_ours = t_ours.min(t.elapsed());

        let size = summary.as_ref().unwrap().size;
        let _ = fs::remove_file(&theirs);
        let t = Instant::now();
        let out = run(
            Command::new(&mke2fs)
                .args(["-q", "-F", "-t", "ext2", "-b", "4096", "-d"])
                .arg(&src)
                .arg(&theirs)
                .arg(format!("{}k", size / 1024))
                .env("E2FSPROGS_FAKE_TIME", TS.to_string()),
            Duration::from_secs(300),
        );
        assert!(out.status.success(), "mke2fs failed: {out:?}");
        t_theirs = t_theirs.min(t.elapsed());
    }
    let s = summary.unwrap();
    assert_fsck_clean(&ours);
    assert_fsck_clean(&theirs);
    let alloc = |p: &std::path::Path| fs::metadata(p).unwrap().blocks() * 512;
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "vloop ext2: {:.3} s, image {:.1} MiB (auto size), {:.1} MiB allocated on disk, \
         {:.1} MiB used in the fs",
        t_ours.as_secs_f64(),
        mib(s.size),
        mib(alloc(&ours)),
        mib((s.blocks - s.free_blocks) * 4096)
    );
    eprintln!(
        "mke2fs -d:  {:.3} s, image {:.1} MiB (same size), {:.1} MiB allocated on disk",
        t_theirs.as_secs_f64(),
        mib(fs::metadata(&theirs).unwrap().len()),
        mib(alloc(&theirs)),
    );
}
