//! Several threads share one chain, as the daemon's queue threads do: direct writes through
//! the mapping, slow allocating writes, discards and flushes at once, on disjoint ranges.

mod common;

use std::sync::Arc;

use common::*;

#[test]
fn concurrent_writers_leave_a_clean_image() {
    if !have_qemu("concurrent_writers_leave_a_clean_image") {
        return;
    }
    let dir = tempdir();
    let base = path_in(&dir, "base.raw");
    std::fs::write(&base, pattern(1, 8 << 20)).unwrap();
    let img = path_in(&dir, "t.qcow2");
    qemu_create(&img, "8M", "cluster_size=4096", Some((p(&base), "raw")));
    let chain = Arc::new(open_chain(&img, false));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let chain = chain.clone();
            std::thread::spawn(move || {
                let region = t * (2 << 20);
                let mut model =
                    pattern(1, 8 << 20)[region as usize..(region + (2 << 20)) as usize].to_vec();
                for i in 0..200u64 {
                    let off = (i * 7919 % 4000) * 512;
                    let len = 512 * (1 + i % 16);
                    let len = len.min((2 << 20) - off);
                    if i % 23 == 0 {
                        chain.discard(region + off, len).unwrap();
                        let mut c = off.div_ceil(4096) * 4096;
                        while c + 4096 <= off + len {
                            model[c as usize..(c + 4096) as usize].fill(0);
                            c += 4096;
                        }
                    } else {
                        let d = pattern(t * 1000 + i, len as usize);
                        write_mapped(&chain, region + off, &d);
                        model[off as usize..(off + len) as usize].copy_from_slice(&d);
                    }
                    if i % 50 == 0 {
                        chain.flush().unwrap();
                    }
                    let got = read_mapped(&chain, region + off, len);
                    assert!(got[..] == model[off as usize..(off + len) as usize]);
                }
                model
            })
        })
        .collect();
    let mut whole = Vec::new();
    for t in threads {
        whole.extend(t.join().unwrap());
    }
    chain.close().unwrap();
    drop(chain);
    assert_clean(&img);
    let raw = path_in(&dir, "model.raw");
    std::fs::write(&raw, &whole).unwrap();
    assert_same_as_raw(&img, &raw);
}
