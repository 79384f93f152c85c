//! `xallocd`, the xalloc daemon; see `xallocd --help` and the crate docs.

fn main() -> std::process::ExitCode {
    xalloc_daemon::main()
}
