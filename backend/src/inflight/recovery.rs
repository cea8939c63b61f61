//! Recovery after a restart: the chains a previous backend left marked in flight are read
//! from the descriptor table and executed again, in the order they were taken, then put in
//! the used ring; the available ring continues after them.

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::region::QueueInflight;
use crate::io::{Executor, GuestMem};

/// The descriptors of the chain whose head is `head`, read from the descriptor table the way
/// the executor reads them (`crate::io::guest::walk`).
pub fn chain_at(mem: &GuestMem, desc_table: GuestAddress, size: u16, head: u16) -> Vec<Descriptor> {
    crate::io::guest::walk(mem, desc_table, size, head).collect()
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
    // The ring position comes from the used ring and the region, not from SET_VRING_BASE, as
    // in libvhost-user: a previous backend that completed requests after its frontend saw it
    // disconnect left the used index past the base the frontend sends, and the requests
    // between them must not run (and reach the used ring) a second time.
    queue.set_next_used(used);
    let size = queue.size();
    // The region may name heads past this ring (a region of a larger queue, or garbage):
    // they cannot be completed, so they are not run either.
    let recovered = track.recover(used);
    let taken = recovered.len();
    let heads: Vec<u16> = recovered.into_iter().filter(|&h| h < size).collect();
    if heads.is_empty() {
        // The available ring continues after what was taken.
        queue.set_next_avail(used.wrapping_add(taken as u16));
        return Ok(0);
    }
    let table = GuestAddress(queue.desc_table());
    let chains: Vec<_> = heads
        .iter()
        .map(|&h| (h, chain_at(mem, table, size, h)))
        .collect();
    // A stop ends the resubmission early: the requests not run stay in flight in the region,
    // for the next backend.
    let done = worker.execute(mem, chains);
    let heads = &heads[..done.len()];
    track.begin_batch(heads);
    // A used ring the queue cannot write ends the batch early; the region records the heads
    // that reached it, and keeps the others in flight.
    let mut added = 0;
    let result = done.iter().try_for_each(|c| {
        queue.add_used(mem, c.head, c.len)?;
        added += 1;
        Ok(())
    });
    track.end_batch(&heads[..added], queue.next_used());
    result?;
    // The available ring continues after what was taken (and is now resubmitted).
    queue.set_next_avail(used.wrapping_add(taken as u16));
    Ok(heads.len())
}
