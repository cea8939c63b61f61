//! Guest memory on the data path: descriptor chains walked, and small objects (descriptors,
//! status bytes) read and written, through one region lookup each instead of vm-memory's
//! general byte-range machinery, which dominated the backend's own instructions per request.
//!
//! [`walk`] yields a chain's descriptors with the rules virtio-queue's `DescriptorChain`
//! applies (the same ones the specification sets): at most `queue size` descriptors per
//! table, one level of indirection, an indirect table a whole number of descriptors long and
//! within 65535 of them, no more than `u32::MAX` bytes in all; the walk ends at the first
//! descriptor that breaks a rule or cannot be read, and the request parser then refuses what
//! it got.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use super::GuestMem;

/// Bytes of one split-ring descriptor.
const DESC_SIZE: u64 = 16;
/// `VRING_DESC_F_NEXT`.
const F_NEXT: u16 = 1;
/// `VRING_DESC_F_INDIRECT`.
const F_INDIRECT: u16 = 4;

/// The `N` bytes at `addr`, when they lie in one region of guest memory.
pub fn read<const N: usize>(mem: &GuestMem, addr: GuestAddress) -> Option<[u8; N]> {
    let s = mem.get_slice(addr, N).ok()?;
    let mut out = [0u8; N];
    (s.copy_to(&mut out[..]) == N).then_some(out)
}

/// Write one byte at `addr`; false when it is not in guest memory.
pub fn write_u8(mem: &GuestMem, addr: GuestAddress, v: u8) -> bool {
    match mem.get_slice(addr, 1) {
        Ok(s) => {
            s.copy_from(&[v]);
            true
        }
        Err(_) => false,
    }
}

/// The descriptors of the chain whose head is `head`, in a descriptor table of `size` entries
/// at `table`.
pub fn walk(mem: &GuestMem, table: GuestAddress, size: u16, head: u16) -> Walk<'_> {
    Walk {
        mem,
        table,
        size,
        next: head,
        ttl: size,
        indirect: false,
        bytes: 0,
    }
}

/// An iterator over one chain's descriptors.
#[derive(Debug)]
pub struct Walk<'a> {
    mem: &'a GuestMem,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl Iterator for Walk<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.size {
                return None;
            }
            let at = self.table.checked_add(u64::from(self.next) * DESC_SIZE)?;
            let raw: [u8; 16] = read(self.mem, at)?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().ok()?);
            let len = u32::from_le_bytes(raw[8..12].try_into().ok()?);
            let flags = u16::from_le_bytes(raw[12..14].try_into().ok()?);
            let next = u16::from_le_bytes(raw[14..16].try_into().ok()?);
            if flags & F_INDIRECT != 0 {
                let entries = u64::from(len) / DESC_SIZE;
                if self.indirect
                    || !u64::from(len).is_multiple_of(DESC_SIZE)
                    || entries > u64::from(u16::MAX)
                {
                    return None;
                }
                self.table = GuestAddress(addr);
                self.size = entries as u16;
                self.ttl = self.size;
                self.next = 0;
                self.indirect = true;
                continue;
            }
            self.bytes = self.bytes.checked_add(len)?;
            if flags & F_NEXT != 0 {
                self.next = next;
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(Descriptor::new(addr, len, flags, next));
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{QueueOwnedT, QueueT};
    use vm_memory::Bytes;

    use super::*;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// The walk yields what virtio-queue's own chain yields, for good and broken chains.
    #[test]
    fn walks_as_virtio_queue_does() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let d =
            |addr, len, flags, next| RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        // 0 -> 1 -> 2; 3 indirect (table at 0x8000: a -> b); 4 loops to itself; 5 indirect
        // with a bad length; 6 next past the table.
        let table = [
            d(0x1000, 16, F_NEXT, 1),
            d(0x2000, 512, F_NEXT | 2, 2),
            d(0x3000, 1, 2, 0),
            d(0x8000, 32, F_INDIRECT, 0),
            d(0x1000, 16, F_NEXT, 4),
            d(0x8000, 17, F_INDIRECT, 0),
            d(0x1000, 16, F_NEXT, 99),
        ];
        for (i, desc) in table.iter().enumerate() {
            m.write_obj(*desc, vq.desc_table_addr().unchecked_add(16 * i as u64))
                .unwrap();
        }
        m.write_obj(d(0x4000, 16, F_NEXT, 1), GuestAddress(0x8000))
            .unwrap();
        m.write_obj(d(0x5000, 1, 2, 0), GuestAddress(0x8010))
            .unwrap();
        let q: virtio_queue::Queue = vq.create_queue().unwrap();
        for head in 0..7u16 {
            vq.avail()
                .ring()
                .ref_at(usize::from(head))
                .unwrap()
                .store(head);
        }
        vq.avail().idx().store(7);
        let mut q = q;
        let chains: Vec<_> = q.iter(&m).unwrap().collect();
        for chain in chains {
            let head = chain.head_index();
            let key = |d: Descriptor| (d.addr().0, d.len(), d.flags(), d.next());
            let theirs: Vec<_> = chain.map(key).collect();
            let ours: Vec<_> = walk(&m, GuestAddress(q.desc_table()), q.size(), head)
                .map(key)
                .collect();
            assert_eq!(ours, theirs, "head {head}");
        }
    }

    #[test]
    fn small_objects_inside_and_outside_memory() {
        let m = mem();
        assert!(write_u8(&m, GuestAddress(5), 7));
        assert_eq!(read::<1>(&m, GuestAddress(5)), Some([7]));
        assert!(!write_u8(&m, GuestAddress(0x10_0000), 1));
        assert_eq!(read::<16>(&m, GuestAddress(0x10_0000 - 8)), None);
    }
}
