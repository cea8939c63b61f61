//! The requests of one worker that are in flight: parsed, waiting for the engine, or in it.
//!
//! Requests live in boxed chunks that never move once allocated, because the kernel holds
//! pointers to the iovecs of requests in flight; the store grows a chunk at a time up to the
//! queue size and reuses ids, so the data path allocates nothing once it has warmed up.

use vm_memory::GuestAddress;

use super::engine::Op;

/// Requests per chunk.
const CHUNK: usize = 32;

/// Where a request is on its way to the used ring.
#[derive(Debug)]
pub enum Stage {
    /// Parsed; its op waits for the next launch.
    Parsed(Op),
    /// Its op is in the engine.
    InEngine(Op),
}

impl Stage {
    /// The request's op.
    pub fn op(&self) -> &Op {
        match self {
            Stage::Parsed(op) | Stage::InEngine(op) => op,
        }
    }

    /// Move a parsed op to the engine stage and return it, to be started where it now lies
    /// (an op must not move once the engine has it).
    pub fn enter_engine(&mut self) -> &mut Op {
        if let Stage::Parsed(_) = self {
            if let Stage::Parsed(op) = std::mem::replace(self, Stage::InEngine(Op::sync(-1))) {
                *self = Stage::InEngine(op);
            }
        }
        self.op_mut()
    }

    /// The request's op, to start or complete.
    pub fn op_mut(&mut self) -> &mut Op {
        match self {
            Stage::Parsed(op) | Stage::InEngine(op) => op,
        }
    }
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
            offset: 0,
            stage: Stage::Parsed(Op::sync(-1)),
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
