//! Deliberate bugs for the simulator's proof that it catches them (feature `sim-mutants`, off
//! by default and enabled only by `spawner-sim`). Switches are per thread: a turmoil world runs
//! every host on the thread that steps it, so one test's mutant never leaks into another's.

#[cfg(feature = "sim-mutants")]
thread_local! {
    static ACCEPT_TOKENS_FOR_ANY_BACKEND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Mutant: a token is checked against the backend it names itself, not the one the request is
/// routed to, so a token for backend A opens backend B.
#[cfg(feature = "sim-mutants")]
pub fn accept_tokens_for_any_backend(on: bool) {
    ACCEPT_TOKENS_FOR_ANY_BACKEND.with(|f| f.set(on));
}

/// The backend `token` is checked against for a request routed to `backend`.
pub(crate) fn backend_to_check<'a>(token: &'a str, backend: &'a str) -> &'a str {
    #[cfg(feature = "sim-mutants")]
    if ACCEPT_TOKENS_FOR_ANY_BACKEND.with(std::cell::Cell::get)
        && let Some(named) = token.split('.').nth(2)
    {
        return named;
    }
    let _ = token;
    backend
}
