//! The agent's steps, by family: [`disk`] (format, mount, write, verify...) and [`exec`]
//! (copy in, run a command, copy out, over the data port); [`sys`] wraps the system calls
//! both use. [`io`] is the I/O tool a command can run (`/init io PLAN`), not a step.

pub mod disk;
pub mod exec;
pub mod io;
pub mod sys;

/// A step's result: what happened, or why it failed.
pub type Res<T> = Result<T, String>;
