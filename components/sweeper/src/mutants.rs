//! Deliberate bugs for the simulator's proof that it catches them (feature `sim-mutants`, off
//! by default and enabled only by `spawner-sim`). Switches are per thread: a turmoil world runs
//! every host on the thread that steps it, so one test's mutant never leaks into another's.

use std::cell::Cell;

thread_local! {
    static SWEEP_ON_LOST_STREAM: Cell<bool> = const { Cell::new(false) };
}

/// Mutant: a broken event stream is taken as evidence of idleness and the backend is swept.
pub fn sweep_on_lost_stream(on: bool) {
    SWEEP_ON_LOST_STREAM.with(|f| f.set(on));
}

pub(crate) fn sweeps_on_lost_stream() -> bool {
    SWEEP_ON_LOST_STREAM.with(Cell::get)
}
