//! `aswa-merge`: see `aswa_merge::cli` for the flags and the library for everything else.

fn main() -> std::process::ExitCode {
    aswa_merge::cli::main()
}
