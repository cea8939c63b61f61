//! Ctrl-C and SIGTERM: once [`install`]ed, the signals only set a flag, which the loops that
//! watch a guest poll ([`requested`]); they then stop the guest and its backends and remove
//! what the run created, instead of the process dying with children left behind.

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The signal received, 0 for none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    RECEIVED.store(sig, Ordering::SeqCst);
}

/// Errors of installing the handlers.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// sigaction(2) failed.
    #[error("cannot handle {0}")]
    Install(Signal, #[source] nix::Error),
}

/// Catches SIGINT and SIGTERM from now on.
pub fn install() -> Result<(), InterruptError> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe { signal::sigaction(sig, &action) }.map_err(|e| InterruptError::Install(sig, e))?;
    }
    Ok(())
}

/// The signal that asked the run to stop, if one did.
pub fn requested() -> Option<Signal> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        n => Signal::try_from(n).ok(),
    }
}

/// The exit status of a process ended by `sig`, by the shell's convention (128 + number).
pub fn exit_status(sig: Signal) -> u8 {
    u8::try_from(128 + sig as i32).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_follow_the_shell() {
        assert_eq!(exit_status(Signal::SIGINT), 130);
        assert_eq!(exit_status(Signal::SIGTERM), 143);
    }
}
