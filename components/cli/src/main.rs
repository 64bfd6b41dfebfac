//! `spawner`: see [`spawner::main`].

// `spawner dev` runs a whole control plane in one process, allocating and freeing JSON on every
// request from many threads; glibc's allocator was about a seventh of its CPU in the spawn
// benchmark (docs/dev.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    spawner::main()
}
