//! The `coffre` binary: parse, then one call.

/// mimalloc rather than glibc's malloc: the request path allocates small,
/// short-lived buffers on every thread, where glibc's arenas spent ~15 % of
/// the server's CPU (profile in BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    coffre::cli::main()
}
