//! Deliberate bugs for the simulator's proof that it catches them (feature `sim-mutants`, off
//! by default and enabled only by `spawner-sim`). Switches are per thread: a turmoil world runs
//! every host on the thread that steps it, so one test's mutant never leaks into another's.

#[cfg(feature = "sim-mutants")]
thread_local! {
    static ONLY_RELAYED_BYTES_HEARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Mutant: a client is heard only when it sends bytes that are relayed, so the pongs it
/// answers the relay's pings with (which the relay removes) do not count: an idle client that
/// answers every ping is dropped as dead.
#[cfg(feature = "sim-mutants")]
pub fn only_relayed_bytes_heard(on: bool) {
    ONLY_RELAYED_BYTES_HEARD.with(|f| f.set(on));
}

/// Whether a read from the client, of which `relayed` bytes were passed on upstream, counts as
/// hearing from it.
pub(crate) fn hears_client(relayed: usize) -> bool {
    #[cfg(feature = "sim-mutants")]
    if ONLY_RELAYED_BYTES_HEARD.with(std::cell::Cell::get) {
        return relayed > 0;
    }
    let _ = relayed;
    true
}
