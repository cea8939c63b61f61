//! ISO 9660 builder and reader on random input: random trees read back equal, and damaged or
//! truncated images never make the reader or `probe` panic.

mod iso_common;

use std::fs::{self, File};
use std::io::Seek;
use std::os::unix::fs::symlink;
use std::path::Path;

use iso_common::*;
use proptest::prelude::*;
use vloop_images::iso::read::{IsoReader, Kind, Namespace};
use vloop_images::iso::{self, IsoOptions};

#[derive(Debug, Clone)]
enum Gen {
    File(Vec<u8>),
    Link(String),
    Dir(Vec<(String, Gen)>),
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,8}(\\.[a-z]{1,3})?",
        "[A-Za-z0-9 _.-]{1,40}",
        "[a-zäöüß日本]{1,12}",
        "[a-z]{70,120}",
    ]
    .prop_filter("not . or ..", |n| n != "." && n != "..")
}

fn gen_tree() -> impl Strategy<Value = Gen> {
    let leaf = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..5000).prop_map(Gen::File),
        // No empty components: Rock Ridge SL stores "a//b" as "a/b".
        1 => "/?[a-z.]{1,20}(/[a-z.]{1,30}){0,12}".prop_map(Gen::Link),
    ];
    leaf.prop_recursive(4, 40, 8, |inner| {
        proptest::collection::btree_map(name(), inner, 0..8)
            .prop_map(|m| Gen::Dir(m.into_iter().collect()))
    })
}

fn materialise(g: &Gen, path: &Path) {
    match g {
        Gen::File(data) => fs::write(path, data).unwrap(),
        Gen::Link(target) => symlink(target, path).unwrap(),
        Gen::Dir(entries) => {
            fs::create_dir(path).unwrap();
            for (n, e) in entries {
                materialise(e, &path.join(n));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 12,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    #[test]
    fn random_trees_read_back(entries in proptest::collection::btree_map(name(), gen_tree(), 0..10)) {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        materialise(&Gen::Dir(entries.into_iter().collect()), &src);
        let t = scan(&src);
        let img = d.path().join("r.iso");
        iso::build(&t, &img, &IsoOptions::default()).unwrap();
        check_rock_ridge(&img, &t);
        let mut f = File::open(&img).unwrap();
        let info = iso::probe(&mut f).unwrap().unwrap();
        prop_assert_eq!(info.volume_size, f.seek(std::io::SeekFrom::End(0)).unwrap());
        let mut r = IsoReader::open(File::open(&img).unwrap(), Namespace::Joliet).unwrap();
        r.walk().unwrap();
    }
}

/// A small image built once, as bytes, for the corruption test.
fn small_image() -> &'static [u8] {
    static IMAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let deep = src.join("a/b/c/d/e/f/g/h/i/j");
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("f"), b"deep").unwrap();
        fs::write(src.join(LONG_RR), pattern(5000, 9)).unwrap();
        symlink("x".repeat(300), src.join("l")).unwrap();
        let img = d.path().join("s.iso");
        iso::build(&scan(&src), &img, &IsoOptions::default()).unwrap();
        fs::read(img).unwrap()
    })
}

/// Everything the reader offers, on `bytes`; errors are fine, panics are not.
fn read_everything(bytes: &[u8]) {
    use std::io::Cursor;
    let _ = iso::probe(&mut Cursor::new(bytes));
    for ns in [Namespace::RockRidge, Namespace::Joliet, Namespace::Primary] {
        let Ok(mut r) = IsoReader::open(Cursor::new(bytes), ns) else {
            continue;
        };
        let _ = r.path_table(false);
        let _ = r.path_table(true);
        if let Ok(entries) = r.walk() {
            for (_, e) in entries {
                let _ = r.read_file(&e, &mut std::io::sink());
                if e.kind == Kind::Dir {
                    let _ = r.raw_names(&e);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 500,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    /// Corrupted images (bytes changed in the descriptors, path tables, directories and
    /// continuation areas) never make the reader or `probe` panic.
    #[test]
    fn corrupted_images_never_panic(
        edits in proptest::collection::vec((16 * 2048..60 * 2048usize, any::<u8>()), 1..40)
    ) {
        let mut bytes = small_image().to_vec();
        for (at, value) in edits {
            if let Some(b) = bytes.get_mut(at) {
                *b = value;
            }
        }
        read_everything(&bytes);
    }
}

#[test]
fn truncated_images_never_panic() {
    let img = small_image();
    for len in (0..img.len()).step_by(1021) {
        read_everything(&img[..len]);
    }
}
