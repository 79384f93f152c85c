//! `xallocd`, built in this package so that its tests can locate it.

fn main() -> std::process::ExitCode {
    xalloc_daemon::main()
}
