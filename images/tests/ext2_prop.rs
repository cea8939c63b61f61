//! Property test: random small trees give ext2 images that pass `e2fsck -fn` and read
//! back equal to their source folder.

mod ext2_common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use ext2_common::*;
use proptest::prelude::*;
use vloop_images::ext2::{build, Ext2Options};
use vloop_images::tree::{scan, TreeOptions};

#[derive(Debug, Clone)]
enum Entry {
    /// Length, seed, whether the content is mostly zeros (holes), mode.
    File(usize, u32, bool, u32),
    Dir(BTreeMap<String, Entry>, u32),
    Link(String),
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z][a-z0-9._-]{0,15}",
        1 => "[A-Z]{100,255}",
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    let leaf = prop_oneof![
        4 => (0usize..40_000, any::<u32>(), any::<bool>(), 0u32..0o7777)
            .prop_map(|(l, s, z, m)| Entry::File(l, s, z, m | 0o600)),
        1 => "[a-z./]{1,120}".prop_map(Entry::Link),
    ];
    leaf.prop_recursive(4, 64, 12, |inner| {
        (
            prop::collection::btree_map(name(), inner, 0..12),
            0u32..0o7777,
        )
            .prop_map(|(m, mode)| Entry::Dir(m, mode | 0o700))
    })
}

fn materialize(path: &Path, e: &Entry) {
    match e {
        Entry::File(len, seed, zeros, mode) => {
            let mut data = pattern(*len, *seed);
            if *zeros {
                data.iter_mut().skip(64).for_each(|b| *b = 0);
            }
            fs::write(path, data).unwrap();
            fs::set_permissions(path, fs::Permissions::from_mode(*mode)).unwrap();
        }
        Entry::Dir(children, mode) => {
            fs::create_dir(path).unwrap();
            for (n, c) in children {
                materialize(&path.join(n), c);
            }
            fs::set_permissions(path, fs::Permissions::from_mode(*mode)).unwrap();
        }
        Entry::Link(target) => symlink(target, path).unwrap(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_check_clean_and_read_back(
        root in prop::collection::btree_map(name(), entry(), 0..10),
        links in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        block_size in prop::sample::select(vec![1024u32, 2048, 4096]),
        inode_size in prop::sample::select(vec![128u16, 256]),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        materialize(&src, &Entry::Dir(root.clone(), 0o755));
        // Hard links to some of the top-level files.
        let files: Vec<&String> = root
            .iter()
            .filter(|(_, e)| matches!(e, Entry::File(..)))
            .map(|(n, _)| n)
            .collect();
        if !files.is_empty() {
            for (i, ix) in links.iter().enumerate() {
                let f = files[ix.index(files.len())];
                fs::hard_link(src.join(f), src.join(format!("zz-link-{i}"))).unwrap();
            }
        }
        let tree = scan(&src, &TreeOptions { keep_owners: false, timestamp: Some(TS) }).unwrap();
        let img = dir.path().join("fs.img");
        let opts = Ext2Options { block_size, inode_size, ..Ext2Options::default() };
        let s = build(&tree, &img, &opts).unwrap();
        prop_assert_eq!(fs::metadata(&img).unwrap().len(), s.size);
        assert_fsck_clean(&img);
        assert_same_as_source(&img, &src, TS);
        assert_hard_links(&img, &src);
    }
}
