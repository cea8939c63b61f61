//! The slow path of one queue: requests the engine cannot run as plain reads and writes
//! (qcow2 cluster allocation and copy-on-write, compressed clusters, the metadata updates of
//! discard, write-zeroes and flush) run on a thread of their own, so the queue's other
//! requests are not stalled while they wait for I/O. The queue's engine waits on the slow
//! path's eventfd beside its ring, so a worker sleeps in one place for both.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::op::Iovecs;

/// Work for the slow path: runs once on its thread.
pub type Work = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// Guest buffers handed to the slow path.
pub struct GuestBuffers(pub Iovecs);

// SAFETY: the iovecs point into guest memory that stays mapped for the whole process while a
// request is in flight (the executor completes every request, slow ones included, before its
// call returns), and only the slow path's thread touches them until the request completes.
unsafe impl Send for GuestBuffers {}

impl GuestBuffers {
    /// The buffers as slices to read into.
    ///
    /// # Safety
    /// Only while the request they belong to is in flight, from the one thread that serves it.
    pub unsafe fn as_mut_slices(&mut self) -> Vec<io::IoSliceMut<'_>> {
        self.0
            .iter()
            .map(|v| {
                // SAFETY: each iovec covers `iov_len` bytes of mapped guest memory (the
                // caller's contract), and no other reference to them exists meanwhile.
                io::IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len)
                })
            })
            .collect()
    }

    /// The buffers as slices to write from.
    ///
    /// # Safety
    /// As [`GuestBuffers::as_mut_slices`].
    pub unsafe fn as_slices(&self) -> Vec<io::IoSlice<'_>> {
        self.0
            .iter()
            .map(|v| {
                // SAFETY: as in `as_mut_slices`.
                io::IoSlice::new(unsafe {
                    std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
                })
            })
            .collect()
    }
}

/// Completions of the slow path: (request id, result).
type Done = (u32, io::Result<()>);

/// The slow path of one queue.
pub struct SlowPath {
    queue: u16,
    jobs: Option<Sender<(u32, Work)>>,
    /// Given up once the thread runs with its clone: once that thread is gone, `done` says so.
    done_tx: Option<Sender<Done>>,
    done: Receiver<Done>,
    /// A work panicked.
    panicked: Arc<AtomicBool>,
    event: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    in_flight: usize,
}

impl std::fmt::Debug for SlowPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlowPath")
            .field("queue", &self.queue)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl SlowPath {
    /// The slow path of queue `queue`; its thread starts with the first work.
    pub fn new(queue: u16) -> io::Result<SlowPath> {
        let (done_tx, done) = mpsc::channel();
        Ok(SlowPath {
            queue,
            jobs: None,
            done_tx: Some(done_tx),
            done,
            panicked: Arc::new(AtomicBool::new(false)),
            event: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            thread: None,
            in_flight: 0,
        })
    }

    /// Work in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether a work panicked (its request failed with EIO).
    pub fn panicked(&self) -> bool {
        self.panicked.load(Ordering::Relaxed)
    }

    /// The eventfd written after each completion.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Run `work` for request `id` on the slow path's thread.
    pub fn submit(&mut self, id: u32, work: Work) -> io::Result<()> {
        if self.jobs.is_none() {
            let Some(done) = self.done_tx.clone() else {
                return Err(io::Error::other("the slow path thread is gone"));
            };
            let (tx, rx) = mpsc::channel::<(u32, Work)>();
            let event = self.event.clone();
            let panicked = self.panicked.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vloop-slow-{}", self.queue))
                .spawn(move || {
                    while let Ok((id, work)) = rx.recv() {
                        // A panic in the work fails its request: the thread goes on, and the
                        // worker, which waits for every request it sent here, is not left
                        // waiting for one that never completes. The worker fails the image
                        // (SlowPath::panicked): the work may have left it half updated.
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                            .unwrap_or_else(|_| {
                                panicked.store(true, Ordering::Relaxed);
                                Err(io::Error::from_raw_os_error(libc::EIO))
                            });
                        if done.send((id, r)).is_err() {
                            return;
                        }
                        let _ = event.write(1);
                    }
                })?;
            // The thread holds the only sender now: its end disconnects `done`. (Kept until
            // the thread runs, so a failed spawn can be tried again.)
            self.done_tx = None;
            self.jobs = Some(tx);
            self.thread = Some(thread);
        }
        let sent = self.jobs.as_ref().map(|tx| tx.send((id, work)));
        match sent {
            Some(Ok(())) => {
                self.in_flight += 1;
                Ok(())
            }
            _ => Err(io::Error::other("the slow path thread is gone")),
        }
    }

    /// Move the completions available into `out`; with `wait`, block for at least one while
    /// anything is in flight.
    pub fn collect(&mut self, out: &mut Vec<Done>, wait: bool) {
        let before = out.len();
        if wait && self.in_flight > 0 {
            match self.done.recv() {
                Ok(d) => out.push(d),
                // The thread is gone (it cannot be, short of a bug): what it had will not
                // complete, and waiting for it would hang the queue.
                Err(_) => {
                    self.in_flight = 0;
                    return;
                }
            }
        }
        // The eventfd first, the channel second: a completion sent after the drain writes the
        // eventfd after this read, so the engine's watch still sees it.
        let _ = self.event.read();
        out.extend(self.done.try_iter());
        self.in_flight -= (out.len() - before).min(self.in_flight);
    }
}

impl Drop for SlowPath {
    fn drop(&mut self) {
        // The thread ends once its queue is empty.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the interleaving of a completion with a drain, either the drain returns it or
    /// the eventfd is left readable for the next wait.
    #[test]
    fn no_completion_is_left_without_a_wake_up() {
        let mut s = SlowPath::new(0).unwrap();
        let mut done = Vec::new();
        for i in 0..2000u32 {
            s.submit(i, Box::new(|| Ok(()))).unwrap();
            let mut spins = 0u32;
            loop {
                s.collect(&mut done, false);
                if s.in_flight() == 0 {
                    break;
                }
                // Not collected yet: the wake-up must be pending (or come), never lost.
                let mut p = libc::pollfd {
                    fd: s.event_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one live pollfd for the duration of the call.
                let r = unsafe { libc::poll(&mut p, 1, 5000) };
                assert_eq!(r, 1, "completion {i} in flight with no wake-up pending");
                spins += 1;
                assert!(spins < 1000);
            }
        }
        assert_eq!(done.len(), 2000);
    }

    #[test]
    fn work_runs_off_the_thread_and_completes() {
        let mut s = SlowPath::new(0).unwrap();
        let me = std::thread::current().id();
        s.submit(
            7,
            Box::new(move || {
                assert_ne!(std::thread::current().id(), me);
                Ok(())
            }),
        )
        .unwrap();
        s.submit(8, Box::new(|| Err(io::Error::other("no"))))
            .unwrap();
        let mut done = Vec::new();
        while done.len() < 2 {
            s.collect(&mut done, true);
        }
        assert_eq!(s.in_flight(), 0);
        assert_eq!(done[0].0, 7);
        assert!(done[0].1.is_ok());
        assert!(done[1].1.is_err());
    }

    #[test]
    fn a_work_that_panics_fails_its_request_and_the_thread_goes_on() {
        let mut s = SlowPath::new(0).unwrap();
        s.submit(1, Box::new(|| panic!("a bug in the slow path")))
            .unwrap();
        s.submit(2, Box::new(|| Ok(()))).unwrap();
        let mut done = Vec::new();
        for _ in 0..2 {
            s.collect(&mut done, true);
        }
        assert_eq!(done.len(), 2, "the thread died with the work");
        assert!(s.panicked());
        assert_eq!(done[0].0, 1);
        assert_eq!(
            done[0].1.as_ref().unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert_eq!(done[1].0, 2);
        assert!(done[1].1.is_ok());
    }
}
