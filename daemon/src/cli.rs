//! Command line of `xallocd`: the flags named in the design's contract table, and sizes written
//! as `4096`, `64K`, `256M` or `1G`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The default arena size, in the syntax `--arena-size` takes.
pub const DEFAULT_ARENA_SIZE: &str = "256M";

/// Default number of request slots per client (one per thread of the client that talks to the
/// daemon at once).
pub const DEFAULT_SLOTS: u32 = 64;

/// Default `--spin-us`: see the README's "Tuning the spin" for the measurement behind it.
pub const DEFAULT_SPIN_US: u64 = 50;

/// xallocd: the xalloc daemon. Hosts a shared-memory arena and serves allocation requests from
/// other processes: each connects to the socket /dev/shm/NAME.socket and gets its own
/// shared-memory channel and the arena over it.
#[derive(Debug, Parser)]
#[command(name = "xallocd", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a daemon: detach, create the segments, serve until `xallocd stop` (or SIGTERM).
    ///
    /// Returns once the daemon serves requests (exit 0), or exits non-zero with the reason.
    Start(StartArgs),
    /// Stop a daemon: send SIGTERM and wait until it has exited and its segments are gone.
    Stop(StopArgs),
    /// Print a daemon's statistics (and, with --clients, its clients), asked over its socket.
    Status(StatusArgs),
    /// The keeper process a daemon starts to hold its arena and channels across a crash (not
    /// for direct use).
    #[command(hide = true)]
    Keeper(KeeperArgs),
}

/// `xallocd keeper` (started by the daemon).
#[derive(Debug, Args)]
pub struct KeeperArgs {
    /// Instance name.
    #[arg(long, value_parser = parse_name)]
    pub name: String,
}

/// The instance a command addresses.
#[derive(Debug, Args, Clone)]
pub struct Instance {
    /// Instance name: clients connect to /dev/shm/NAME.socket; the daemon's record is
    /// /dev/shm/NAME.state.
    #[arg(long, env = "XALLOC_NAME", default_value = "xalloc", value_parser = parse_name)]
    pub name: String,

    /// Pidfile, locked for the daemon's life. Default: /run/xalloc/NAME.pid for root,
    /// else $XDG_RUNTIME_DIR/xalloc/NAME.pid, else /tmp/xalloc-UID/NAME.pid; that directory is
    /// created 0700 and refused unless it is yours and neither group nor others may write it.
    /// A pidfile that is a symbolic link, or another user's file, is refused.
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,
}

/// `xallocd start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The instance addressed.
    #[command(flatten)]
    pub instance: Instance,

    /// Bytes of shared arena (4096, 64K, 256M, 1G).
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_ARENA_SIZE, value_parser = parse_size)]
    pub arena_size: u64,

    /// Request slots per client: how many threads of one client can talk to the daemon at once
    /// (each client has its own channel; the number of clients is bounded by descriptors only).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SLOTS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(xalloc_proto::wire::MAX_SLOTS)))]
    pub slots: u32,

    /// Stay attached to the terminal (for systemd Type=notify: readiness goes to
    /// $NOTIFY_SOCKET).
    #[arg(long)]
    pub foreground: bool,

    /// Syslog socket to log to.
    #[arg(long, value_name = "PATH", default_value = "/dev/log")]
    pub syslog_socket: PathBuf,

    /// Also log to this file whenever the syslog socket does not answer.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Idle arena pages kept reserved however long they are idle (4096, 64K, 256M, 1G).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub retain: u64,

    /// Seconds an idle 2 MiB chunk of the arena beyond --retain stays reserved before its
    /// pages go back to the kernel (fractions allowed).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    pub decay: std::time::Duration,

    /// Microseconds the daemon keeps polling for requests after its last one before it sleeps
    /// (a request that finds it asleep pays a wake-up, tens of µs); 0 never polls. It never
    /// polls on a machine with one CPU, nor while a client shares its CPU.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = DEFAULT_SPIN_US,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub spin_us: u64,

    /// Discard the arena and record a daemon of this name left when it died (held by its
    /// keeper process), instead of re-attaching to them (by default a restarted daemon keeps
    /// the blocks and channels of the clients that still run).
    #[arg(long)]
    pub fresh: bool,

    /// 2 MiB huge pages for the arena (MADV_HUGEPAGE): fewer TLB misses and page faults on
    /// large blocks. `auto` asks for them where the kernel allows them for shared memory
    /// (/sys/kernel/mm/transparent_hugepage/shmem_enabled is advise, within_size, always or
    /// force); `on` asks anyway, with a warning.
    #[arg(long, value_name = "WHEN", value_enum, default_value_t = HugePages::Auto)]
    pub huge_pages: HugePages,

    /// Let members of GROUP use the daemon: the socket is 0660 and group GROUP, and the daemon
    /// accepts peers whose primary or supplementary groups include it (default: the daemon's
    /// user only, socket 0600). Members can read and write each other's blocks' data (see
    /// the README's trust model).
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Arena bytes one process may hold, over all its connections, blocks it keeps cached
    /// included (4096, 64K, 256M, 1G; default: unlimited). Past it, allocations are refused
    /// with OverQuota (XallocGlobal then uses the system allocator).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub client_quota: Option<u64>,

    /// Arena bytes all processes of one user may hold together (as --client-quota; default:
    /// unlimited).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub user_quota: Option<u64>,

    /// Connections one user may have open at once (XallocGlobal keeps one per process, and a
    /// few more across daemon restarts). Keeps one user from taking every descriptor of the
    /// daemon.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub max_clients_per_user: usize,
}

/// `xallocd start --huge-pages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HugePages {
    /// Where /dev/shm allows them.
    Auto,
    /// Always ask (they still need /dev/shm to allow them).
    On,
    /// Never ask.
    Off,
}

/// `xallocd stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// The instance addressed.
    #[command(flatten)]
    pub instance: Instance,

    /// Seconds to wait for the daemon to exit.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub timeout: u64,
}

/// `xallocd status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The instance addressed.
    #[command(flatten)]
    pub instance: Instance,

    /// Print one JSON object instead of a table (with --clients: one JSON array).
    #[arg(long)]
    pub json: bool,

    /// List the clients: id, pid, user, command, bytes and blocks held, bytes cached, requests.
    #[arg(long)]
    pub clients: bool,
}

/// Parses a size: digits, optionally followed by K, M, G or T (powers of 1024; a trailing `B`
/// or `iB` is accepted too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let body = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (digits, shift) = match body.chars().last() {
        Some('K') => (&body[..body.len() - 1], 10),
        Some('M') => (&body[..body.len() - 1], 20),
        Some('G') => (&body[..body.len() - 1], 30),
        Some('T') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write e.g. 4096, 64K, 256M or 1G"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses a non-negative number of seconds (`10`, `0.5`).
pub fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .and_then(|v| std::time::Duration::try_from_secs_f64(v).ok())
        .ok_or_else(|| format!("`{s}` is not a number of seconds; write e.g. 10 or 0.5"))
}

/// Checks an instance name: it becomes part of file names in /dev/shm.
pub fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && !s.starts_with('.');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{s}` is not a valid instance name: use 1-200 letters, digits, '-', '_' or '.', \
             not starting with '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("8MB"), Ok(8 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("10"), Ok(std::time::Duration::from_secs(10)));
        assert_eq!(
            parse_seconds("0.25"),
            Ok(std::time::Duration::from_millis(250))
        );
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
    }

    #[test]
    fn names() {
        assert!(parse_name("xalloc").is_ok());
        assert!(parse_name("test-1.a_b").is_ok());
        for bad in ["", "a/b", ".hidden", "sp ace", "x\0y"] {
            assert!(parse_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
