//! The `coffre` binary: parse, then one call.

fn main() -> std::process::ExitCode {
    coffre::cli::main()
}
