//! The requests of one worker that are in flight: parsed, waiting for the engine, or in it.
//!
//! Requests live in boxed chunks that never move once allocated, because the kernel holds
//! pointers to the iovecs of requests in flight; the store grows a chunk at a time up to the
//! queue size and reuses ids, so the data path allocates nothing once it has warmed up.

use std::io;

use smallvec::SmallVec;
use vm_memory::GuestAddress;

use super::op::Op;

/// Requests per chunk.
const CHUNK: usize = 32;

/// The ops of one request: one for a raw image, one per extent for a qcow2 image.
pub type Ops = SmallVec<[Op; 1]>;

/// Where a request is on its way to the used ring.
#[derive(Debug)]
pub enum Stage {
    /// Parsed; its ops wait for the next launch.
    Parsed(Ops),
    /// Its ops are in the engine; `pending` of them have not completed, and the first error
    /// among those that did is kept.
    InEngine {
        /// The ops.
        ops: Ops,
        /// Ops not completed yet.
        pending: usize,
        /// The first error of a completed op.
        error: Option<io::Error>,
    },
    /// On the slow path.
    Slow,
}

impl Stage {
    /// The request's ops (none on the slow path).
    pub fn ops(&self) -> &[Op] {
        match self {
            Stage::Parsed(ops) | Stage::InEngine { ops, .. } => ops,
            Stage::Slow => &[],
        }
    }

    /// Move parsed ops to the engine stage and return them, to be started where they now lie
    /// (an op must not move once the engine has it); `None` on the slow path.
    pub fn enter_engine(&mut self) -> Option<&mut Ops> {
        if let Stage::Parsed(_) = self {
            if let Stage::Parsed(ops) = std::mem::replace(self, Stage::Slow) {
                let pending = ops.len();
                *self = Stage::InEngine {
                    ops,
                    pending,
                    error: None,
                };
            }
        }
        match self {
            Stage::Parsed(ops) | Stage::InEngine { ops, .. } => Some(ops),
            Stage::Slow => None,
        }
    }

    /// One of the request's ops completed with `result`: whether it was the last.
    pub fn op_done(&mut self, result: io::Result<()>) -> bool {
        if let Stage::InEngine { pending, error, .. } = self {
            *pending = pending.saturating_sub(1);
            if let Err(e) = result {
                error.get_or_insert(e);
            }
            *pending == 0
        } else {
            true
        }
    }

    /// The outcome of a request whose ops all completed.
    pub fn take_result(&mut self) -> io::Result<()> {
        match self {
            Stage::InEngine { error, .. } => error.take().map_or(Ok(()), Err),
            _ => Ok(()),
        }
    }
}

/// Which way a request moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// Into guest memory.
    Read,
    /// Out of guest memory.
    Write,
    /// No data (flush, discard, write-zeroes).
    None,
}

/// One request whose op has not completed yet.
#[derive(Debug)]
pub struct Req {
    /// Head descriptor index.
    pub head: u16,
    /// Arrival position within one [`super::Executor::execute`] call.
    pub pos: u32,
    /// Guest address of the status byte.
    pub status: GuestAddress,
    /// Bytes the request moves (the read or write length; 0 for the other kinds).
    pub data_len: u64,
    /// Which way they move.
    pub transfer: Transfer,
    /// Byte offset in the image, for messages.
    pub offset: u64,
    /// What it waits for.
    pub stage: Stage,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    chunks: Vec<Box<[Option<Req>; CHUNK]>>,
    /// Ids not in use.
    free: Vec<u32>,
    /// Most requests in the store at once.
    capacity: usize,
}

// SAFETY: the only thing that is not Send in a `Req` is the raw pointers of its iovecs, which
// point into guest memory mapped for the whole process; every request is completed before the
// worker's `process_queue`/`execute` call returns, so none is in flight when the store moves
// to another thread.
unsafe impl Send for Store {}

impl Store {
    /// A store for at most `capacity` requests at once.
    pub fn new(capacity: usize) -> Store {
        Store {
            chunks: Vec::new(),
            free: Vec::new(),
            capacity: capacity.max(1),
        }
    }

    fn allocated(&self) -> usize {
        self.chunks.len() * CHUNK
    }

    /// Requests in the store.
    pub fn len(&self) -> usize {
        self.allocated() - self.free.len()
    }

    /// True when no request is in the store.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many more requests fit.
    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(self.len())
    }

    /// Put `req` in the store; its id.
    pub fn insert(&mut self, req: Req) -> u32 {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let first = self.allocated() as u32;
                self.chunks.push(Box::new(std::array::from_fn(|_| None)));
                self.free.extend((first + 1..first + CHUNK as u32).rev());
                first
            }
        };
        if let Some(slot) = self.slot(id) {
            *slot = Some(req);
        }
        id
    }

    fn slot(&mut self, id: u32) -> Option<&mut Option<Req>> {
        let id = id as usize;
        self.chunks.get_mut(id / CHUNK).map(|c| &mut c[id % CHUNK])
    }

    /// The request `id`, if it is in the store.
    pub fn get(&self, id: u32) -> Option<&Req> {
        let id = id as usize;
        self.chunks.get(id / CHUNK)?[id % CHUNK].as_ref()
    }

    /// The request `id`, to change its stage.
    pub fn get_mut(&mut self, id: u32) -> Option<&mut Req> {
        self.slot(id)?.as_mut()
    }

    /// Take request `id` out of the store (its op completed).
    pub fn remove(&mut self, id: u32) -> Option<Req> {
        let req = self.slot(id)?.take()?;
        self.free.push(id);
        Some(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(head: u16) -> Req {
        Req {
            head,
            pos: 0,
            status: GuestAddress(0),
            data_len: 0,
            transfer: Transfer::None,
            offset: 0,
            stage: Stage::Parsed(smallvec::smallvec![Op::sync(-1)]),
        }
    }

    #[test]
    fn ids_are_reused_and_requests_do_not_move() {
        let mut s = Store::new(40);
        let ids: Vec<u32> = (0..40).map(|h| s.insert(req(h))).collect();
        assert_eq!(s.room(), 0);
        let at: *const Req = s.get(ids[3]).unwrap();
        // Growing to a second chunk left the first one where it was.
        assert_eq!(at, s.get(ids[3]).unwrap() as *const Req);
        assert_eq!(s.remove(ids[5]).unwrap().head, 5);
        assert!(s.remove(ids[5]).is_none());
        assert_eq!(s.room(), 1);
        assert_eq!(s.insert(req(99)), ids[5]);
        assert_eq!(s.get(ids[5]).unwrap().head, 99);
        assert_eq!(s.len(), 40);
        assert!(s.get(1000).is_none());
    }
}
