//! vhost-user-blk backend processes: the command line that exports one image with each backend
//! program the project knows (vloop-blk, qemu-storage-daemon, or any program described by a
//! command template), and a running backend that is killed when dropped, so a failing test,
//! benchmark or guest run never leaves one behind.
//!
//! Parts, bottom up (each imports only from the ones before it):
//! - `export`: what one backend serves ([`Export`], [`ImageFormat`]);
//! - `template`: command templates for any backend program ([`Template`], [`TemplateError`]);
//! - `spec`: the programs and their command lines ([`Program`], [`BackendSpec`],
//!   [`qemu_escape`]); pure, nothing is started;
//! - `process`: a running backend ([`BackendProcess`], [`BackendError`], [`tail`]) and finding
//!   programs ([`on_path`], [`which`], [`sibling_binary`]).

mod export;
mod process;
mod spec;
mod template;

pub use export::{Export, ImageFormat};
pub use process::{on_path, sibling_binary, tail, which, BackendError, BackendProcess};
pub use spec::{qemu_escape, BackendSpec, Program};
pub use template::{Template, TemplateError};
