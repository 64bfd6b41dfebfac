//! One seed for every source of randomness in a simulator process.
//!
//! std's `RandomState` (the `HashMap`s inside kube-runtime's controller and scheduler), `rand`
//! and every `getrandom`-based crate read the C library's `getrandom`. A simulator binary or test
//! expands [`install_entropy_hook!`](crate::install_entropy_hook) at its top level, which defines
//! a `getrandom` symbol that takes precedence over libc's and draws from [`next_bytes`], seeded
//! by [`seed`]. Production crates never contain this hook.
//!
//! std caches its hash keys per thread, so seed before creating the threads of a run, and run one
//! world per process (or serially on fresh threads).

use std::sync::Mutex;

static STATE: Mutex<u64> = Mutex::new(0x5eed_5eed_5eed_5eed);

/// Restarts the entropy stream from `seed`, and seeds `fastrand`'s thread-local generator of
/// the calling thread too (kube-runtime's watcher draws backoff jitter from it).
pub fn seed(seed: u64) {
    if let Ok(mut state) = STATE.lock() {
        *state = seed;
    }
}

/// Fills `buf` from the seeded stream (SplitMix64).
pub fn next_bytes(buf: &mut [u8]) {
    // A poisoned lock only means another thread panicked mid-draw; the state is a plain
    // integer and still usable.
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    for chunk in buf.chunks_mut(8) {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// Defines the process-wide `getrandom` symbol that feeds every randomness consumer from
/// [`next_bytes`]. Expand it once, at the top level of a simulator binary or test file.
#[macro_export]
macro_rules! install_entropy_hook {
    () => {
        /// Interposes libc's `getrandom(2)` wrapper for this process: see `spawner_sim::entropy`.
        ///
        /// # Safety
        /// Called by the C library's callers with a buffer of `len` writable bytes.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn getrandom(
            buf: *mut ::std::ffi::c_void,
            len: usize,
            _flags: ::std::ffi::c_uint,
        ) -> isize {
            if buf.is_null() {
                return -1;
            }
            // SAFETY: the caller promises `len` writable bytes at `buf`.
            let slice = unsafe { ::std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
            $crate::entropy::next_bytes(slice);
            len as isize
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes() {
        seed(42);
        let mut a = [0u8; 37];
        next_bytes(&mut a);
        seed(42);
        let mut b = [0u8; 37];
        next_bytes(&mut b);
        assert_eq!(a, b);
        seed(43);
        next_bytes(&mut b);
        assert_ne!(a, b);
    }
}
