//! `xallocd stop` and `xallocd status`: talking to a running daemon from outside, through its
//! pidfile and its response segment, without sending it a request.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use xalloc_proto::os::{self, Mapping};
use xalloc_proto::wire::{
    self, DaemonStats, SegmentHeader, SegmentKind, StatsSnapshot, STATS_OFFSET,
};

use crate::cli::{Instance, StatusArgs, StopArgs};
use crate::detach::{self, Holder};
use crate::fail;
use crate::segments::Names;

/// What the response segment of an instance says.
struct Seen {
    /// The segment's owner.
    owner: u32,
    header: SegmentHeader,
    stats: Option<StatsSnapshot>,
}

/// Reads the response segment of `names` read-only: its header and a consistent snapshot.
fn read_response(names: &Names) -> Result<Seen, String> {
    let name = names.response;
    let fd = os::shm_open(name.as_cstr(), false).map_err(|e| match e.0 {
        libc::ENOENT => format!("not running ({name} does not exist)"),
        _ => format!("cannot open {name}: {e}"),
    })?;
    let info = os::fstat(&fd).map_err(|e| format!("fstat {name}: {e}"))?;
    let len = usize::try_from(info.len).unwrap_or(0);
    if len < size_of::<SegmentHeader>() {
        return Err(format!("{name} is too short for an xalloc segment"));
    }
    let map = Mapping::new(&fd, len, false).map_err(|e| format!("mmap {name}: {e}"))?;
    let header = SegmentHeader::load(map.header().expect("checked: longer than a header"));
    header
        .check(SegmentKind::Response, len)
        .map_err(|e| format!("{name}: {e}"))?;
    // SAFETY: `check` proved the segment holds the stats block at its 64-aligned offset.
    let stats: &DaemonStats = unsafe { map.at(STATS_OFFSET) };
    Ok(Seen {
        owner: info.uid,
        header,
        stats: (0..1000).find_map(|_| {
            let s = stats.load(100);
            if s.is_none() {
                std::thread::yield_now();
            }
            s
        }),
    })
}

/// The pid of the running daemon of `instance`: from its pidfile, else from its segments.
fn daemon_pid(instance: &Instance, names: &Names) -> Option<u32> {
    let path = instance
        .pidfile
        .clone()
        .unwrap_or_else(|| detach::default_pidfile(&instance.name));
    match detach::holder(&path) {
        Holder::Daemon(Some(pid)) => return Some(pid),
        Holder::Refused(why) => eprintln!("xallocd: ignoring the pidfile: {why}"),
        _ => {}
    }
    // Without a pidfile, the pid in the response segment's header, if the segment is this
    // user's: one planted by another user must not pick the process `stop` signals.
    read_response(names)
        .ok()
        .filter(|s| s.owner == os::euid())
        .map(|s| s.header.daemon_pid)
        .filter(|&p| os::process_alive(p))
}

/// `xallocd stop`: SIGTERM, then wait for the process to exit and the segments to go.
pub fn stop(args: &StopArgs) -> ExitCode {
    let name = &args.instance.name;
    let Some(names) = Names::new(name) else {
        return fail(format!("instance name {name:?} is too long"));
    };
    let Some(pid) = daemon_pid(&args.instance, &names) else {
        if names.any_exists() {
            // Leftovers of a daemon that died without cleaning up.
            return match crate::segments::clear_leftovers(&names, false) {
                Ok(removed) => {
                    for n in removed {
                        eprintln!("xallocd: removed {n}, left by a dead daemon");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            };
        }
        return fail(format!("instance {name} is not running"));
    };
    // The pidfd pins the process: the signal cannot reach a new process that reused the pid.
    let pidfd = match os::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => return fail(format!("instance {name} (pid {pid}): {e}")),
    };
    // SAFETY: plain system call on an open pidfd; no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.raw(),
            libc::SIGTERM,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return fail(format!("cannot signal pid {pid}: {e}"));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while !os::pidfd_exited(&pidfd) || names.any_exists() {
        if Instant::now() > deadline {
            return fail(format!(
                "pid {pid} did not exit within {} s (it may be stuck; `kill -9 {pid}`, then \
                 `xallocd stop --name {name}` removes what it left)",
                args.timeout
            ));
        }
        if os::pidfd_exited(&pidfd) && names.any_exists() {
            // Exited without removing its segments (killed during shutdown).
            if let Err(e) = crate::segments::clear_leftovers(&names, false) {
                return fail(e);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    ExitCode::SUCCESS
}

/// `xallocd status`: a table, or one JSON object.
pub fn status(args: &StatusArgs) -> ExitCode {
    let name = &args.instance.name;
    let Some(names) = Names::new(name) else {
        return fail(format!("instance name {name:?} is too long"));
    };
    let seen = match read_response(&names) {
        Ok(s) => s,
        Err(e) => return fail(format!("instance {name}: {e}")),
    };
    let pid = seen.header.daemon_pid;
    if !os::process_alive(pid) {
        return fail(format!(
            "instance {name}: its daemon (pid {pid}) is dead; `xallocd stop --name {name}` \
             removes its segments"
        ));
    }
    let Some(s) = seen.stats else {
        return fail(format!(
            "instance {name}: statistics are being rewritten; try again"
        ));
    };
    let state = match s.state {
        wire::STATE_RUNNING => "running",
        wire::STATE_STOPPING => "stopping",
        _ => "starting",
    };
    let huge = seen.header.flags & wire::HEADER_FLAG_HUGE_PAGES != 0;
    if args.json {
        println!(
            "{{\"name\":\"{name}\",\"state\":\"{state}\",\"pid\":{},\"arena_bytes\":{},\
             \"used_bytes\":{},\"free_bytes\":{},\"largest_free_bytes\":{},\"live_blocks\":{},\
             \"clients\":{},\"slots\":{},\"slots_total\":{},\"requests\":{},\"errors\":{},\
             \"reserved_bytes\":{},\"resident_bytes\":{},\"started_unix\":{},\"huge_pages\":{}}}",
            s.pid,
            s.arena_bytes,
            s.used_bytes,
            s.free_bytes,
            s.largest_free_bytes,
            s.live_blocks,
            s.clients,
            s.slots,
            seen.header.slot_count,
            s.requests,
            s.errors,
            s.reserved_bytes,
            s.reserved_bytes,
            s.started_unix,
            huge,
        );
    } else {
        let rows: [(&str, String); 14] = [
            ("instance", name.clone()),
            ("state", state.to_owned()),
            ("pid", s.pid.to_string()),
            ("arena", bytes(s.arena_bytes)),
            ("used", bytes(s.used_bytes)),
            ("free", bytes(s.free_bytes)),
            ("largest free block", bytes(s.largest_free_bytes)),
            ("resident in /dev/shm", bytes(s.reserved_bytes)),
            (
                "huge pages",
                if huge { "asked for" } else { "off" }.to_owned(),
            ),
            ("live blocks", s.live_blocks.to_string()),
            ("clients", s.clients.to_string()),
            (
                "slots in use",
                format!("{} of {}", s.slots, seen.header.slot_count),
            ),
            ("requests", s.requests.to_string()),
            ("errors", s.errors.to_string()),
        ];
        for (k, v) in rows {
            println!("{k:<22} {v}");
        }
    }
    ExitCode::SUCCESS
}

/// `1234567 (1.2 MiB)`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{n} ({v:.1} {})", UNITS[u])
    }
}
