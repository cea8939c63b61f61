//! Recovery after a restart: the chains a previous backend left marked in flight are read
//! from the descriptor table and executed again, in the order they were taken, then put in
//! the used ring; the available ring continues after them.

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::region::QueueInflight;
use crate::config::MAX_QUEUE_SIZE;
use crate::io::{Executor, GuestMem};

/// Bytes of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// The descriptors of the chain whose head is `head`, read from the descriptor table the way
/// virtio-queue reads them (one level of indirection, at most `size` descriptors per table);
/// the walk stops at the first descriptor that cannot be read.
pub fn chain_at<M: GuestMemory>(
    mem: &M,
    desc_table: GuestAddress,
    size: u16,
    head: u16,
) -> Vec<Descriptor> {
    let mut out = Vec::new();
    let (mut table, mut table_len, mut idx) = (desc_table, size, head);
    let mut left = size;
    let mut indirect = false;
    while idx < table_len && left > 0 {
        left -= 1;
        let Some(addr) = table.checked_add(u64::from(idx) * DESC_SIZE) else {
            break;
        };
        let Ok(raw) = mem.read_obj::<RawDescriptor>(addr) else {
            break;
        };
        let d = Descriptor::from(raw);
        if d.refers_to_indirect_table() {
            let entries = u64::from(d.len()) / DESC_SIZE;
            if indirect
                || d.len() == 0
                || !u64::from(d.len()).is_multiple_of(DESC_SIZE)
                || entries > u64::from(MAX_QUEUE_SIZE)
            {
                break;
            }
            indirect = true;
            table = d.addr();
            table_len = entries as u16;
            left = table_len;
            idx = 0;
            continue;
        }
        out.push(d);
        if !d.has_next() {
            break;
        }
        idx = d.next();
    }
    out
}

/// Run again, in the order they were taken, the requests a previous backend left in flight on
/// this queue, put them in the used ring, and continue the available ring after them.
/// Returns how many were resubmitted.
pub fn resubmit(
    queue: &mut Queue,
    mem: &GuestMem,
    worker: &mut Executor,
    track: &QueueInflight<'_>,
) -> Result<usize, virtio_queue::Error> {
    let used = queue.used_idx(mem, Ordering::Acquire)?.0;
    let heads = track.recover(used);
    if heads.is_empty() {
        return Ok(0);
    }
    let table = GuestAddress(queue.desc_table());
    let size = queue.size();
    let chains: Vec<_> = heads
        .iter()
        .map(|&h| (h, chain_at(mem, table, size, h)))
        .collect();
    let done = worker.execute(mem, chains);
    track.begin_batch(&heads);
    for c in &done {
        queue.add_used(mem, c.head, c.len)?;
    }
    track.end_batch(&heads, queue.next_used());
    // The frontend restarts the ring at the used index; what was resubmitted is skipped.
    queue.set_next_avail(used.wrapping_add(heads.len() as u16));
    tracing::info!(
        "resubmitted {} request(s) left in flight by the previous backend",
        heads.len()
    );
    Ok(heads.len())
}
