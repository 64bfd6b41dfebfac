//! Deliberate bugs for the simulator's proof that it catches them (feature `sim-mutants`, off
//! by default and enabled only by `spawner-sim`). Switches are per thread: a turmoil world runs
//! every host on the thread that steps it, so one test's mutant never leaks into another's.

use crate::monitor::LiveGuard;

#[cfg(feature = "sim-mutants")]
thread_local! {
    static FORGET_ABNORMAL_COUNTDOWN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Mutant: a WebSocket that ended abnormally (reset, dead client) is never counted down.
#[cfg(feature = "sim-mutants")]
pub fn forget_abnormal_countdown(on: bool) {
    FORGET_ABNORMAL_COUNTDOWN.with(|f| f.set(on));
}

/// Ends a relayed connection's liveness.
pub(crate) fn count_down(guard: LiveGuard, ended_cleanly: bool) {
    #[cfg(feature = "sim-mutants")]
    if !ended_cleanly && FORGET_ABNORMAL_COUNTDOWN.with(std::cell::Cell::get) {
        std::mem::forget(guard);
        return;
    }
    let _ = ended_cleanly;
    drop(guard);
}
