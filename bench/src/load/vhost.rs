//! The workload through a vhost-user-blk backend: a `vloop_frontend::client` connected to its
//! socket, one virtqueue per queue of the workload, each driven by the loop of `drive`, with
//! the backend's CPU read before and after when its PID is known.

use std::path::Path;
use std::time::{Duration, Instant};

use vloop_frontend::blk::{SECTOR_SIZE, S_OK};
use vloop_frontend::client::{Client, ClientOptions, Completion, Queue, QueueStats, Request};

use super::drive::{drive, run_queues, Engine};
use super::result::{LoadError, RunResult};
use super::workload::Workload;
use crate::procfs::CpuSample;

/// Client options that fit workload `w`.
pub fn client_options(w: &Workload) -> ClientOptions {
    let need = (u32::from(w.iodepth) * 3).next_power_of_two().max(256);
    ClientOptions {
        queues: Some(w.queues),
        queue_size: u16::try_from(need).unwrap_or(32768),
        slots: w.iodepth,
        slot_data_size: w.bs,
        scratch_size: 4096,
        ..ClientOptions::default()
    }
}

/// Runs `w` through the vhost-user-blk backend listening on `socket`; `backend_pid`
/// enables the CPU-per-I/O figure.
pub fn run_vhost(
    socket: &Path,
    w: &Workload,
    backend_pid: Option<u32>,
) -> Result<RunResult, LoadError> {
    run_vhost_with(socket, w, backend_pid, |_| {})
}

/// [`run_vhost`] with client options adjusted by `tweak` (e.g. no EVENT_IDX).
pub fn run_vhost_with(
    socket: &Path,
    w: &Workload,
    backend_pid: Option<u32>,
    tweak: impl FnOnce(&mut ClientOptions),
) -> Result<RunResult, LoadError> {
    let mut opts = client_options(w);
    tweak(&mut opts);
    if u32::from(w.iodepth) * 3 > 32768 {
        return Err(LoadError::Workload(format!(
            "iodepth {} needs more than 32768 descriptors",
            w.iodepth
        )));
    }
    let mut client = Client::connect(socket, &opts)?;
    let capacity = client.config().capacity_bytes();
    w.check(capacity)?;
    let queues = client.take_queues();
    let backend0 = backend_pid.map(CpuSample::read);
    let wl = *w;
    let ran = run_queues("vhost-q", w.runtime, queues, move |q, qi, end| {
        drive(QueueEngine::new(q, &wl)?, &wl, qi, capacity, end)
    })?;
    let backend = backend_pid
        .zip(backend0)
        .map(|(p, b0)| b0.until(&CpuSample::read(p)));
    drop(client);
    Ok(RunResult::build(ran, w.bs, backend))
}

/// A virtqueue of the client as an [`Engine`].
struct QueueEngine {
    q: Queue,
    /// Bytes per request.
    bs: u32,
    /// Completions reaped, before they are handed on.
    reaped: Vec<Completion>,
}

/// How long to wait for a completion before looking again.
const WAIT: Duration = Duration::from_secs(10);

impl QueueEngine {
    /// The engine of `q` for `w`; the slots of a workload that writes hold a fill pattern.
    fn new(q: Queue, w: &Workload) -> Result<Self, LoadError> {
        if w.pattern.writes() {
            let fill = vec![0xa5u8; w.bs as usize];
            for s in 0..q.slots() {
                q.fill_slot(s, &fill)?;
            }
        }
        Ok(Self {
            reaped: Vec::with_capacity(usize::from(q.slots())),
            q,
            bs: w.bs,
        })
    }
}

impl Engine for QueueEngine {
    fn slots(&self) -> usize {
        usize::from(self.q.slots())
    }

    fn free_slot(&mut self) -> Option<u16> {
        self.q.next_free_slot()
    }

    fn submit(&mut self, slot: u16, read: bool, offset: u64) -> Result<(), LoadError> {
        let (sector, len) = (offset / SECTOR_SIZE, self.bs);
        let req = if read {
            Request::Read { sector, len }
        } else {
            Request::Write { sector, len }
        };
        Ok(self.q.submit_in(slot, req)?)
    }

    fn kick(&mut self) -> Result<(), LoadError> {
        Ok(self.q.kick()?)
    }

    fn in_flight(&self) -> usize {
        self.q.in_flight()
    }

    fn complete(&mut self, done: &mut Vec<(u16, bool)>) -> Result<(), LoadError> {
        self.reaped.clear();
        if self.q.reap(&mut self.reaped) == 0 {
            self.q.wait(Instant::now() + WAIT)?;
            return Ok(());
        }
        done.extend(self.reaped.iter().map(|c| (c.slot, c.status == S_OK)));
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<(u16, bool)>) -> Result<(), LoadError> {
        self.reaped.clear();
        self.q.reap(&mut self.reaped);
        done.extend(self.reaped.iter().map(|c| (c.slot, c.status == S_OK)));
        Ok(())
    }

    fn stats(&self) -> QueueStats {
        self.q.stats()
    }
}
