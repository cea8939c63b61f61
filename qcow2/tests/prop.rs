//! Random writes, discards, write-zeroes, reads, flushes and reclaims against a raw model;
//! afterwards `qemu-img check` finds the image clean and `qemu-img compare` equal to the model.

mod common;

use common::*;
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Discard { off: u64, len: u64 },
    Zeroes { off: u64, len: u64, unmap: bool },
    Read { off: u64, len: u64 },
    Flush,
    Reclaim,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE / 512, 1..64u64).prop_map(|(s, n)| {
        let off = s * 512;
        (off, (n * 512).min(SIZE - off))
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (range(), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zeroes { off, len, unmap }),
        2 => range().prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reclaim),
    ]
}

fn run_case(compat: &str, cs: u64, backed: bool, ops: &[Op]) {
    let dir = tempdir();
    let img = path_in(&dir, "p.qcow2");
    let o = format!("cluster_size={cs},compat={compat}");
    if backed {
        let base = path_in(&dir, "base.raw");
        std::fs::write(&base, pattern(5, SIZE as usize / 2)).unwrap();
        qemu_create(&img, &SIZE.to_string(), &o, Some((p(&base), "raw")));
    } else {
        qemu_create(&img, &SIZE.to_string(), &o, None);
    }
    let mut model = qemu_raw(&img);
    let discard_keeps = compat == "0.10" && backed;
    // Small reservations, so that freed and reclaimed clusters are reused.
    let chain = try_open_with(&img, false, vloop_qcow2::Backing::FromImage, 4 * cs).unwrap();
    for op in ops {
        match *op {
            Op::Write { off, len, seed } => {
                let d = pattern(seed, len as usize);
                write_mapped(&chain, off, &d);
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            Op::Discard { off, len } => {
                chain.discard(off, len).unwrap();
                if !discard_keeps {
                    let mut c = off.div_ceil(cs) * cs;
                    while c + cs <= off + len {
                        model[c as usize..(c + cs) as usize].fill(0);
                        c += cs;
                    }
                }
            }
            Op::Zeroes { off, len, unmap } => {
                chain.write_zeroes(off, len, unmap).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read { off, len } => {
                let got = read_mapped(&chain, off, len);
                assert!(
                    got[..] == model[off as usize..(off + len) as usize],
                    "read {off}+{len}"
                );
            }
            Op::Flush => chain.flush().unwrap(),
            Op::Reclaim => chain.reclaim_freed(chain.free_mark()).unwrap(),
        }
    }
    assert!(read_all(&chain, 65536) == model, "final read");
    chain.close().unwrap();
    drop(chain);
    assert_clean(&img);
    let raw = path_in(&dir, "model.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_same_as_raw(&img, &raw);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn random_ops_match_a_raw_model(
        ops in proptest::collection::vec(op(), 1..60),
        v3 in any::<bool>(),
        backed in any::<bool>(),
        big in any::<bool>(),
    ) {
        if !have_qemu("random_ops_match_a_raw_model") {
            return Ok(());
        }
        let cs = if big { 65536 } else { 4096 };
        run_case(if v3 { "1.1" } else { "0.10" }, cs, backed, &ops);
    }
}
