//! Scatter-list helpers: byte ranges of the caller's iovecs, copied from or filled.

use std::io::{IoSlice, IoSliceMut};

/// Iovec helpers: the byte range `[start, start + len)` of a scatter list.
pub(super) fn sub_iov<'a>(bufs: &'a [IoSlice<'a>], start: u64, len: u64) -> Vec<IoSlice<'a>> {
    let mut out = Vec::new();
    let (mut pos, end) = (0u64, start + len);
    for b in bufs {
        let (bs, be) = (pos, pos + b.len() as u64);
        pos = be;
        if be <= start || bs >= end {
            continue;
        }
        let x = start.max(bs) - bs;
        let y = end.min(be) - bs;
        out.push(IoSlice::new(&b[x as usize..y as usize]));
    }
    out
}

pub(super) fn sub_iov_mut<'a>(
    bufs: &'a mut [IoSliceMut<'_>],
    start: u64,
    len: u64,
) -> Vec<IoSliceMut<'a>> {
    let mut out = Vec::new();
    let (mut pos, end) = (0u64, start + len);
    for b in bufs.iter_mut() {
        let (bs, be) = (pos, pos + b.len() as u64);
        pos = be;
        if be <= start || bs >= end {
            continue;
        }
        let x = (start.max(bs) - bs) as usize;
        let y = (end.min(be) - bs) as usize;
        out.push(IoSliceMut::new(&mut b[x..y]));
    }
    out
}

pub(super) fn copy_from_iov(bufs: &[IoSlice<'_>], start: u64, dst: &mut [u8]) {
    let mut at = 0;
    for s in sub_iov(bufs, start, dst.len() as u64) {
        dst[at..at + s.len()].copy_from_slice(&s);
        at += s.len();
    }
}

pub(super) fn fill_iov(bufs: &mut [IoSliceMut<'_>], start: u64, src: Option<&[u8]>, len: u64) {
    let mut at = 0;
    for mut s in sub_iov_mut(bufs, start, len) {
        let n = s.len();
        match src {
            Some(src) => s.copy_from_slice(&src[at..at + n]),
            None => s.fill(0),
        }
        at += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_iov_slices_across_buffers() {
        let (a, b) = ([1u8; 4], [2u8; 4]);
        let bufs = [IoSlice::new(&a), IoSlice::new(&b)];
        let s = sub_iov(&bufs, 2, 4);
        let flat: Vec<u8> = s.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(flat, vec![1, 1, 2, 2]);
        let mut out = [0u8; 3];
        copy_from_iov(&bufs, 3, &mut out);
        assert_eq!(out, [1, 2, 2]);
    }
}
