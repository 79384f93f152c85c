//! A program whose global allocator is `XallocGlobal` (256 KiB threshold), for the tests of the
//! arena's edges. The daemon instance comes from `XALLOC_NAME`.
//!
//! ```text
//! xalloc-edge-client align DAEMON_PID
//!     Connects, then checks that its mapping of the arena is not at the daemon's address modulo
//!     256 MiB (exits 3 if it is, so that the test runs it again in a fresh address space).
//!     Then allocates every size from 256 KiB to 4 MiB (powers of two) at every alignment from
//!     4 KiB to 256 MiB, twice (the second round is served partly from the cache of freed
//!     blocks), and checks that each block is in the arena and aligned. Prints
//!     `ok aligned=N mapping_delta=D cache_hits=H` and exits 0, or says what went wrong and
//!     exits 1.
//! xalloc-edge-client plant-ledger
//!     Connects, then writes cached-block entries that lie outside the arena into every slot's
//!     ledger of the instance (as any process that can write the request segment could), then
//!     makes zeroed allocations of their size. Each must come from inside the arena, zeroed;
//!     the entries must be counted as bad. Then sets every ledger's count of cached granules
//!     near `u64::MAX` and allocates, frees and reads the counters. Prints
//!     `ok bad_ledger_entries=N` and exits 0, or says what went wrong and exits 1.
//! ```

use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::process::ExitCode;

use xalloc_proto::wire::LedgerBlock;
use xalloc_global::client::Connection;
use xalloc_global::{counters, is_shared, XallocGlobal};

#[global_allocator]
static A: XallocGlobal = XallocGlobal::new();

/// The start of the first mapping of `/dev/shm/NAME.arena` in process `pid`'s address space.
fn arena_mapping(pid: &str, name: &str) -> Result<usize, String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
    let path = format!("/dev/shm/{name}.arena");
    maps.lines()
        .filter(|l| l.ends_with(&path))
        .filter_map(|l| usize::from_str_radix(l.split('-').next()?, 16).ok())
        .min()
        .ok_or_else(|| format!("no mapping of {path} in process {pid}"))
}

/// Allocates and frees one block of `layout` through the global allocator, checking where it
/// went and its alignment.
fn one(layout: Layout) -> Result<(), String> {
    // SAFETY: the layout's size is non-zero.
    let p = unsafe { alloc(layout) };
    if p.is_null() {
        return Err(format!("{layout:?}: allocation failed"));
    }
    let shared = is_shared(p);
    let aligned = p.addr().is_multiple_of(layout.align());
    // SAFETY: `p` holds `layout.size()` bytes.
    unsafe {
        p.write(1);
        p.add(layout.size() - 1).write(2);
    }
    // SAFETY: allocated above with `layout`.
    unsafe { dealloc(p, layout) };
    match (shared, aligned) {
        (true, true) => Ok(()),
        (false, _) => Err(format!("{layout:?}: not served from the arena")),
        (true, false) => Err(format!("{layout:?}: arena block at {p:p} is misaligned")),
    }
}

fn align(daemon_pid: &str) -> Result<String, (u8, String)> {
    let name = std::env::var("XALLOC_NAME").map_err(|_| (1, "XALLOC_NAME not set".into()))?;
    one(Layout::from_size_align(1 << 20, 1).unwrap()).map_err(|e| (1, e))?;
    let mine = arena_mapping("self", &name).map_err(|e| (1, e))?;
    let daemons = arena_mapping(daemon_pid, &name).map_err(|e| (1, e))?;
    let delta = mine.wrapping_sub(daemons) % (256 << 20);
    if delta == 0 {
        return Err((
            3,
            "arena mapped at the daemon's address modulo 256 MiB".into(),
        ));
    }
    let mut n = 0;
    for _round in 0..2 {
        for size_shift in 18..=22 {
            for align_shift in 12..=28 {
                let l = Layout::from_size_align(1 << size_shift, 1 << align_shift).unwrap();
                one(l).map_err(|e| (1, e))?;
                n += 1;
            }
        }
    }
    Ok(format!(
        "ok aligned={n} mapping_delta={delta} cache_hits={}",
        counters().cache_hits
    ))
}

fn plant_ledger() -> Result<String, (u8, String)> {
    let name = std::env::var("XALLOC_NAME").map_err(|_| (1, "XALLOC_NAME not set".into()))?;
    // Connects the global allocator (and registers its home slot).
    one(Layout::from_size_align(1 << 20, 1).unwrap()).map_err(|e| (1, e))?;
    let conn = Connection::connect(&name).map_err(|e| (1, format!("connect: {e}")))?;
    let granule = conn.granule();
    let size = 2 << 20;
    let granules = (size / granule) as u32;
    let arena_granules = (conn.arena_len() / granule) as u32;
    // Just past the end, and far past it.
    let bogus = [arena_granules - granules + 1, u32::MAX - granules];
    let mut planted = 0;
    for i in 0..conn.slot_count() {
        let ledger = conn.ledger(i).expect("slot in range");
        for offset in bogus {
            let block = LedgerBlock {
                offset,
                granules,
                released: false,
            };
            planted += u64::from(ledger.put(block, 0));
        }
    }
    if planted == 0 {
        return Err((1, "no ledger entry could be planted".into()));
    }
    // Held until all are made, so that no block freed meanwhile is found in the cache first.
    let l = Layout::from_size_align(size, granule).unwrap();
    let mut held = Vec::new();
    let mut result = Ok(());
    for _ in 0..bogus.len() {
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(l) };
        if p.is_null() || !is_shared(p) {
            result = Err((1, "zeroed allocation not served from the arena".into()));
            break;
        }
        held.push(p);
        // SAFETY: `p` holds `size` bytes.
        if !unsafe { std::slice::from_raw_parts(p, size) }
            .iter()
            .all(|&b| b == 0)
        {
            result = Err((1, "zeroed allocation holds non-zero bytes".into()));
            break;
        }
    }
    for p in held {
        // SAFETY: allocated above with `l`, freed once.
        unsafe { dealloc(p, l) };
    }
    result?;
    // A cached-granule count no `put` made: freeing, and reading the counters, must go on.
    for i in 0..conn.slot_count() {
        let ledger = conn.ledger(i).expect("slot in range");
        ledger
            .cached_granules
            .store(u64::MAX - 3, std::sync::atomic::Ordering::Relaxed);
    }
    one(Layout::from_size_align(size, granule).unwrap()).map_err(|e| (1, e))?;
    let _ = counters().cached_bytes;
    let bad = counters().bad_ledger_entries;
    if bad < bogus.len() as u64 {
        return Err((
            1,
            format!("{bad} bad ledger entries counted, expected {}", bogus.len()),
        ));
    }
    Ok(format!("ok bad_ledger_entries={bad}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match args.as_slice() {
        ["align", pid] => align(pid),
        ["plant-ledger"] => plant_ledger(),
        _ => Err((
            2,
            "usage: xalloc-edge-client align DAEMON_PID | plant-ledger".into(),
        )),
    };
    match r {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err((code, msg)) => {
            eprintln!("xalloc-edge-client: {msg}");
            ExitCode::from(code)
        }
    }
}
