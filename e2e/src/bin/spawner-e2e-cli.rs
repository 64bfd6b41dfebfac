//! The `spawner` command, built by this crate so that `cargo test -p spawner-e2e` always has a
//! current binary to start as a separate process (`spawner dev`, `spawner demo-backend`): an
//! integration test only gets `CARGO_BIN_EXE_*` for its own package's binaries. The same
//! `main` as `components/cli/src/main.rs`, allocator included; nothing here is test-specific.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    spawner::main()
}
