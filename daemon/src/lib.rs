//! `xallocd`: the xalloc daemon, as a library so that test packages can build the same binary
//! (`xalloc_daemon::main`) and unit-test its parts.
//!
//! - [`cli`]: the command line.
//! - [`detach`]: daemon(7) detaching, the readiness pipe, the pidfile, sd_notify.
//! - [`logging`]: syslog with reconnect, through the `log` facade.
//! - [`segments`]: the instance's objects (socket, arena, state record).
//! - [`keeper`]: the process that holds the arena and the channels across a daemon crash.
//! - [`server`]: the request loop, connections, validation, ownership, quotas and liveness.
//! - [`status`]: `stop` and `status`, which talk to a running daemon from outside.

pub mod cli;
pub mod detach;
pub mod keeper;
pub mod logging;
pub mod segments;
pub mod server;
pub mod status;

use std::process::ExitCode;

use clap::Parser;
use xalloc_proto::{os, wire};

use cli::{Cli, Command, HugePages, StartArgs};
use detach::{Detached, Pidfile, Readiness};
use segments::{Access, Names};
use server::{Policy, Server, GRANULE};

/// The `xallocd` command: parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Start(args) => start(&args),
        Command::Stop(args) => status::stop(&args),
        Command::Status(args) => status::status(&args),
        Command::Keeper(args) => keeper::run_keeper(&args.name),
    }
}

/// Prints `msg` as the daemon's error and fails.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("xallocd: {msg}");
    ExitCode::FAILURE
}

/// The arena size rounded up to whole pages, if it is usable.
fn arena_bytes(requested: u64) -> Result<u64, String> {
    const MIN: u64 = 64 << 10;
    if requested < MIN {
        return Err(format!(
            "--arena-size {requested} is too small; give at least 64K"
        ));
    }
    let max = (u64::from(u32::MAX >> 2) / 2) * GRANULE as u64;
    if requested > max {
        return Err(format!(
            "--arena-size {requested} is too large; at most {}G",
            max >> 30
        ));
    }
    Ok(requested.div_ceil(GRANULE as u64) * GRANULE as u64)
}

fn start(args: &StartArgs) -> ExitCode {
    let name = &args.instance.name;
    let arena = match arena_bytes(args.arena_size) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let gid = match args.group.as_deref().map(segments::group_id).transpose() {
        Ok(g) => g,
        Err(e) => return fail(e),
    };
    let Some(names) = Names::new(name) else {
        return fail(format!(
            "instance name {name:?} is too long (at most 90 bytes: /dev/shm/NAME.socket must \
             fit a socket address)"
        ));
    };
    let pidfile_path = args
        .instance
        .pidfile
        .clone()
        .unwrap_or_else(|| detach::default_pidfile(name));
    let mut pidfile = match Pidfile::lock(&pidfile_path) {
        Ok(p) => p,
        Err(e) => return fail(format!("instance {name}: {e}")),
    };
    let syslog_ok = logging::syslog_answers(&args.syslog_socket);
    if !syslog_ok {
        let to = match &args.log_file {
            Some(f) => format!("logging to {} instead", f.display()),
            None if args.foreground => "logging to stderr instead".to_owned(),
            None => "logging nowhere (give --log-file PATH to keep the lines)".to_owned(),
        };
        eprintln!(
            "xallocd: no syslog server answers on {} ({to}); lines go to syslog again once it \
             answers",
            args.syslog_socket.display()
        );
    }
    let readiness = if args.foreground {
        Readiness::Foreground
    } else {
        match detach::detach(&[pidfile.raw_fd()]) {
            Ok(Detached::Caller(code)) => {
                // The daemon holds the pidfile's lock and removes the file; this process must
                // not.
                std::mem::forget(pidfile);
                return ExitCode::from(code as u8);
            }
            Ok(Detached::Daemon(r)) => r,
            Err(e) => return fail(format!("cannot detach: {e}")),
        }
    };
    let log = match logging::DaemonLog::new(
        &args.syslog_socket,
        args.log_file.as_deref(),
        args.foreground,
    ) {
        Ok(l) => Box::leak(Box::new(l)),
        Err(e) => {
            let msg = format!("cannot open log file: {e}");
            readiness.failed(&msg);
            return ExitCode::FAILURE;
        }
    };
    logging::install(log);
    let pid = os::pid();
    if let Err(e) = pidfile.write_pid(pid) {
        let msg = format!("cannot write pidfile: {e}");
        readiness.failed(&msg);
        return ExitCode::FAILURE;
    }
    match serve(args, names, arena, gid, readiness) {
        Ok(()) => ExitCode::SUCCESS,
        Err(()) => ExitCode::FAILURE,
    }
}

/// Creates the segments, reports readiness, serves until told to stop, and cleans up.
// The segment errors carry fixed-size names (no allocation); they happen once, at start.
#[allow(clippy::result_large_err)]
fn serve(
    args: &StartArgs,
    names: Names,
    arena: u64,
    gid: Option<u32>,
    readiness: Readiness,
) -> Result<(), ()> {
    let fail = |readiness: Readiness, msg: String| {
        log::error!("{msg}");
        readiness.failed(&msg);
        Err(())
    };
    server::block_signals();
    let name = &args.instance.name;
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(os::pid()) << 40);
    let huge_pages = match args.huge_pages {
        HugePages::Off => false,
        HugePages::Auto => server::huge_pages_allowed().is_ok(),
        HugePages::On => {
            if let Err(why) = server::huge_pages_allowed() {
                log::warn!("--huge-pages on: {why}; the arena keeps 4 KiB pages");
            }
            true
        }
    };
    let flags = if huge_pages {
        wire::HEADER_FLAG_HUGE_PAGES
    } else {
        0
    };
    // With the pidfile ours, any objects of this name were left by a daemon that died: its
    // keeper still holds the arena and the channels, which are re-attached (keeping what live
    // clients hold) unless --fresh or unusable; then they are replaced. Another user's
    // objects are refused.
    let create = |why: Option<&str>| {
        let removed = segments::clear_leftovers(&names, args.fresh)?;
        for n in &removed {
            log::warn!(
                "removed {n}, left by a daemon that is no longer running ({})",
                why.unwrap_or("not re-attached")
            );
        }
        segments::create(&names, args.slots, arena, GRANULE as u32, generation, flags)
    };
    // Before the keeper hands over a descriptor per channel, and before clients connect: one
    // descriptor per client (its socket) plus its pidfd.
    let raised = xalloc_proto::unix::raise_fd_limit();
    let link = if args.fresh {
        None
    } else {
        match keeper::KeeperLink::connect(name) {
            Ok(l) => l,
            Err(why) => {
                let e = segments::SegmentError::Squatted {
                    name: names.keeper.display().to_string(),
                    why,
                };
                return fail(readiness, e.to_string());
            }
        }
    };
    let mut kept_channels = Vec::new();
    let mut keeper = None;
    let seg = match link.map(|l| (l.take(), l)) {
        Some((Ok(kept), l)) => {
            let keeper::Kept {
                arena: arena_fd,
                generation,
                channels,
            } = kept;
            match segments::reattach(&names, arena_fd, generation) {
                Ok(seg) => {
                    if seg.arena_bytes != arena || seg.slots != args.slots {
                        log::warn!(
                            "kept the re-attached arena of {} bytes and {} slots per client \
                             (asked: {arena} bytes, {} slots); `start --fresh` discards it",
                            seg.arena_bytes,
                            seg.slots,
                            args.slots
                        );
                    }
                    kept_channels = channels;
                    keeper = Some(l);
                    Ok(seg)
                }
                Err(why) => {
                    log::warn!("cannot re-attach: {why}; starting afresh");
                    drop(l);
                    create(Some(&why))
                }
            }
        }
        Some((Err(why), l)) => {
            log::warn!("the keeper did not hand over the arena: {why}; starting afresh");
            drop(l);
            create(Some(&why))
        }
        None => create(args.fresh.then_some("--fresh")),
    };
    let seg = match seg {
        Ok(s) => s,
        Err(e) => return fail(readiness, e.to_string()),
    };
    let (arena, slots) = (seg.arena_bytes, seg.slots);
    let keeper = match keeper {
        Some(k) => k,
        None => match keeper::KeeperLink::spawn(name, &seg.arena_fd, seg.generation) {
            Ok(k) => k,
            Err(e) => {
                names.unlink_all();
                return fail(readiness, format!("cannot start the keeper process: {e}"));
            }
        },
    };
    let listener = match bind_socket(&names, Access { gid }) {
        Ok(l) => l,
        Err(e) => {
            names.unlink_all();
            let _ = keeper.quit();
            return fail(readiness, e);
        }
    };
    let policy = Policy {
        access: Access { gid },
        client_quota: args.client_quota.unwrap_or(u64::MAX),
        user_quota: args.user_quota.unwrap_or(u64::MAX),
        max_clients_per_user: args.max_clients_per_user,
    };
    let mut server = match Server::new(seg, name, listener, Some(keeper), kept_channels, policy) {
        Ok(s) => s
            .with_retention(args.retain, args.decay)
            .with_spin(std::time::Duration::from_micros(args.spin_us)),
        Err(e) => {
            names.unlink_all();
            return fail(readiness, e);
        }
    };
    log::info!(
        "started: instance {}, arena {} bytes, clients connect to {} ({} slots each, up to \
         about {} clients by the descriptor limit), keeper pid {}",
        args.instance.name,
        arena,
        names.socket.display(),
        slots,
        raised / 2,
        server.keeper_pid().unwrap_or(0)
    );
    readiness.ready();
    server.run();
    names.unlink_all();
    if let Some(k) = server.take_keeper() {
        if let Err(e) = k.quit() {
            log::warn!("the keeper did not quit: {e}");
        }
    }
    log::info!("stopped: {}", server.stats_line());
    log::logger().flush();
    Ok(())
}

/// Binds the instance socket (replacing a leftover of this user's, refusing anything else),
/// with the mode and group `access` asks for.
fn bind_socket(names: &Names, access: Access) -> Result<xalloc_proto::os::Fd, String> {
    segments::check_socket(&names.socket).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&names.socket);
    let listener = xalloc_proto::unix::listen(&names.socket, access.socket_mode())
        .map_err(|e| format!("cannot listen on {}: {e}", names.socket.display()))?;
    if let Some(gid) = access.gid {
        std::os::unix::fs::chown(&names.socket, None, Some(gid))
            .map_err(|e| format!("chown {}: {e}", names.socket.display()))?;
    }
    Ok(listener)
}
