//! `XallocGlobal` in an ordinary program: large vectors live in the daemon's shared arena, small
//! ones on the system heap, and nothing changes in the code that uses them.
//!
//! ```sh
//! scripts/start.sh                                   # a daemon, instance "xalloc"
//! cargo run --release -p xalloc-examples --bin big_buffers
//! ```
//!
//! Without a daemon it runs the same, on the system allocator alone, and says so.

use std::process::Command;

use xalloc_global::XallocGlobal;

/// The one line a program adds: allocations of 256 KiB and more go to the daemon.
#[global_allocator]
static A: XallocGlobal = XallocGlobal::new();

fn place<T>(v: &[T]) -> &'static str {
    if xalloc_global::is_shared(v.as_ptr()) {
        "shared arena"
    } else {
        "system heap"
    }
}

/// Prints what `xallocd status` says, if the binary sits beside this one (cargo puts both in
/// `target/<profile>/` when xalloc-daemon is built) or is on the PATH.
fn daemon_status() {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join("xallocd")))
        .filter(|p| p.exists());
    let exe = beside.unwrap_or_else(|| "xallocd".into());
    let name = std::env::var("XALLOC_NAME").unwrap_or_else(|_| "xalloc".into());
    match Command::new(&exe)
        .args(["status", "--name", &name])
        .output()
    {
        Ok(out) if out.status.success() => {
            println!("\n$ xallocd status --name {name}");
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
        Ok(out) => println!(
            "\nxallocd status: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(_) => println!("\n(xallocd not found; build it with `cargo build -p xalloc-daemon`)"),
    }
}

fn main() {
    let small = vec![1u8; 4 << 10];
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for (i, mib) in [1usize, 4, 16, 64].into_iter().enumerate() {
        let mut buf = vec![0u8; mib << 20];
        // Touch every page, as a real program filling the buffer would.
        for page in buf.chunks_mut(4096) {
            page[0] = i as u8 + 1;
        }
        println!(
            "{:>3} MiB buffer at {:p}: {}",
            mib,
            buf.as_ptr(),
            place(&buf)
        );
        frames.push(buf);
    }
    println!(
        "  4 KiB buffer at {:p}: {} (below the threshold)",
        small.as_ptr(),
        place(&small)
    );
    // Growing a shared buffer: in place when the daemon can, else it moves.
    let before = frames[0].as_ptr();
    frames[0].resize(3 << 20, 9);
    println!(
        "grown to 3 MiB: {} ({})",
        if before == frames[0].as_ptr() {
            "in place"
        } else {
            "moved"
        },
        place(&frames[0])
    );
    let c = xalloc_global::counters();
    println!(
        "\nthis process: {} allocations forwarded, {} fell back to the system allocator, {} bytes \
         in the arena",
        c.forwarded, c.fallbacks, c.arena_bytes
    );
    if c.connections == 0 {
        println!("(no daemon answered: everything is on the system heap; start one with scripts/start.sh)");
    }
    daemon_status();
}
