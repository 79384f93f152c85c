//! `xallocd stop` and `xallocd status`: talking to a running daemon from outside, through its
//! pidfile and its socket.

use std::ffi::CString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use xalloc_proto::os;
use xalloc_proto::unix;
use xalloc_proto::wire::{Hello, HelloKind};

use crate::cli::{Instance, StatusArgs, StopArgs};
use crate::detach::{self, Holder};
use crate::fail;
use crate::segments::Names;

/// How long `status` waits for the daemon's answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the daemon of `names` for its status document over its socket.
pub fn ask_status(names: &Names) -> Result<serde_json::Value, String> {
    let path = &names.socket;
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| "bad path")?;
    let sock = unix::connect(&c).map_err(|e| match e.0 {
        libc::ENOENT | libc::ECONNREFUSED => {
            format!("not running ({} does not answer)", path.display())
        }
        libc::EACCES => format!(
            "permission denied on {} (see `xallocd start --group`)",
            path.display()
        ),
        _ => format!("cannot connect to {}: {e}", path.display()),
    })?;
    let hello = Hello {
        kind: HelloKind::Status,
        client_id: 0,
    };
    unix::send_with_fds(&sock, &hello.encode(), &[]).map_err(|e| format!("send: {e}"))?;
    let deadline = Instant::now() + STATUS_TIMEOUT;
    let mut text = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match unix::recv_with_fds(&sock, &mut buf, left) {
            Ok(Some(r)) => text.extend_from_slice(&buf[..r.len]),
            Ok(None) => break,
            Err(e) if e.0 == libc::EAGAIN => return Err("no answer within 5 s".into()),
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
    if let Ok((w, reason)) = xalloc_proto::wire::Welcome::decode(&text) {
        return Err(format!("refused (code {}): {reason}", w.refusal));
    }
    serde_json::from_slice(&text).map_err(|e| format!("bad status document: {e}"))
}

/// The pid of the running daemon of `instance`: from its pidfile, else from the peer
/// credentials of its socket, if the socket is this user's.
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
    // Without a pidfile: whoever answers on the socket, if the socket is this user's (one
    // planted by another user must not pick the process `stop` signals).
    use std::os::unix::fs::MetadataExt;
    let meta = names.socket.symlink_metadata().ok()?;
    if meta.uid() != os::euid() {
        return None;
    }
    let c = CString::new(names.socket.as_os_str().as_encoded_bytes()).ok()?;
    let sock = unix::connect(&c).ok()?;
    let peer = unix::peer(&sock).ok()?;
    (peer.uid == os::euid()).then_some(peer.pid)
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
    match os::pidfd_terminate(&pidfd) {
        Ok(()) | Err(os::Errno(libc::ESRCH)) => {}
        Err(e) => return fail(format!("cannot signal pid {pid}: {e}")),
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

/// `xallocd status`: a table, or one JSON object; with `--clients`, the clients.
pub fn status(args: &StatusArgs) -> ExitCode {
    let name = &args.instance.name;
    let Some(names) = Names::new(name) else {
        return fail(format!("instance name {name:?} is too long"));
    };
    let doc = match ask_status(&names) {
        Ok(d) => d,
        Err(e) => return fail(format!("instance {name}: {e}")),
    };
    let empty = Vec::new();
    let list = doc["client_list"].as_array().unwrap_or(&empty);
    if args.clients {
        if args.json {
            println!("{}", serde_json::Value::Array(list.clone()));
            return ExitCode::SUCCESS;
        }
        println!(
            "{:>6} {:>8} {:>6} {:<16} {:>14} {:>7} {:>14} {:>10} {:>7} {:>6}",
            "id",
            "pid",
            "user",
            "command",
            "bytes",
            "blocks",
            "cached",
            "requests",
            "shared",
            "views"
        );
        for c in list {
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            println!(
                "{:>6} {:>8} {:>6} {:<16} {:>14} {:>7} {:>14} {:>10} {:>7} {:>6}",
                n("id"),
                n("pid"),
                n("uid"),
                c["command"].as_str().unwrap_or("?"),
                n("bytes"),
                n("blocks"),
                n("cached_bytes"),
                n("requests"),
                n("shared_blocks"),
                n("views")
            );
        }
        return ExitCode::SUCCESS;
    }
    if args.json {
        let mut d = doc.clone();
        if let Some(o) = d.as_object_mut() {
            o.remove("client_list");
        }
        println!("{d}");
        return ExitCode::SUCCESS;
    }
    let n = |k: &str| doc[k].as_u64().unwrap_or(0);
    let quota = |k: &str| doc[k].as_u64().map_or("unlimited".to_owned(), bytes);
    let rows: [(&str, String); 17] = [
        ("instance", name.clone()),
        ("state", doc["state"].as_str().unwrap_or("?").to_owned()),
        ("pid", n("pid").to_string()),
        ("keeper pid", doc["keeper_pid"].to_string()),
        ("arena", bytes(n("arena_bytes"))),
        ("used", bytes(n("used_bytes"))),
        ("free", bytes(n("free_bytes"))),
        ("largest free block", bytes(n("largest_free_bytes"))),
        ("resident", bytes(n("reserved_bytes"))),
        (
            "huge pages",
            if doc["huge_pages"] == true {
                "asked for"
            } else {
                "off"
            }
            .to_owned(),
        ),
        ("live blocks", n("live_blocks").to_string()),
        (
            "shared blocks",
            format!(
                "{} ({}), {} views open, {} kept by views alone",
                n("shared_blocks"),
                bytes(n("shared_bytes")),
                n("views"),
                n("orphaned_shares")
            ),
        ),
        (
            "clients",
            format!("{} ({} processes)", n("clients"), n("processes")),
        ),
        (
            "quotas",
            format!(
                "{} per process, {} per user",
                quota("client_quota"),
                quota("user_quota")
            ),
        ),
        ("slots per client", n("slots_per_client").to_string()),
        ("requests", n("requests").to_string()),
        ("errors", n("errors").to_string()),
    ];
    for (k, v) in rows {
        println!("{k:<22} {v}");
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
