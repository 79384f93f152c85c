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
//!     Connects, then writes cached-block entries that lie outside the arena into the ledger of
//!     the global allocator's own channel (no other client can write it; this stands for a
//!     stray write of the process itself), then makes zeroed allocations of their size. Each
//!     must come from inside the arena, zeroed; the entries must be counted as bad. Then sets
//!     the ledger's count of cached granules near `u64::MAX` and allocates, frees and reads
//!     the counters. Prints `ok bad_ledger_entries=N` and exits 0, or says what went wrong and
//!     exits 1.
//! ```
//!
//! The arena is a memfd without a name in `/dev/shm`: its mappings are found by the object's
//! device and inode, those of the mapping that holds a block of the global allocator.

use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::process::ExitCode;

use xalloc_global::global::with_newest_connection;
use xalloc_global::{counters, is_shared, XallocGlobal};
use xalloc_proto::wire::LedgerBlock;

#[global_allocator]
static A: XallocGlobal = XallocGlobal::new();

/// One line of `/proc/PID/maps`: start, end, file offset, device and inode.
struct Vma {
    start: usize,
    end: usize,
    offset: usize,
    object: (String, u64),
}

/// The file-backed mappings of process `pid`.
fn vmas(pid: &str) -> Result<Vec<Vma>, String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
    Ok(maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (start, end) = f.next()?.split_once('-')?;
            let _perms = f.next()?;
            let offset = usize::from_str_radix(f.next()?, 16).ok()?;
            let dev = f.next()?.to_owned();
            let inode: u64 = f.next()?.parse().ok()?;
            (inode != 0).then_some(())?;
            Some(Vma {
                start: usize::from_str_radix(start, 16).ok()?,
                end: usize::from_str_radix(end, 16).ok()?,
                offset,
                object: (dev, inode),
            })
        })
        .collect())
}

/// The object (device, inode) mapped at `addr` in this process.
fn object_at(addr: usize) -> Result<(String, u64), String> {
    vmas("self")?
        .into_iter()
        .find(|v| (v.start..v.end).contains(&addr))
        .map(|v| v.object)
        .ok_or_else(|| format!("nothing mapped at {addr:#x}"))
}

/// Where offset 0 of `object` is mapped in process `pid` (its first mapping).
fn arena_mapping(pid: &str, object: &(String, u64)) -> Result<usize, String> {
    vmas(pid)?
        .into_iter()
        .filter(|v| &v.object == object)
        .map(|v| v.start.wrapping_sub(v.offset))
        .min()
        .ok_or_else(|| format!("no mapping of the arena in process {pid}"))
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
    std::env::var("XALLOC_NAME").map_err(|_| (1, "XALLOC_NAME not set".into()))?;
    let l = Layout::from_size_align(1 << 20, 1).unwrap();
    // SAFETY: non-zero size.
    let p = unsafe { alloc(l) };
    if p.is_null() || !is_shared(p) {
        return Err((1, "1 MiB not served from the arena".into()));
    }
    let object = object_at(p.addr());
    // SAFETY: allocated above with `l`.
    unsafe { dealloc(p, l) };
    let object = object.map_err(|e| (1, e))?;
    let mine = arena_mapping("self", &object).map_err(|e| (1, e))?;
    let daemons = arena_mapping(daemon_pid, &object).map_err(|e| (1, e))?;
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
    std::env::var("XALLOC_NAME").map_err(|_| (1, "XALLOC_NAME not set".into()))?;
    // Connects the global allocator.
    one(Layout::from_size_align(1 << 20, 1).unwrap()).map_err(|e| (1, e))?;
    let (granule, arena_len) = with_newest_connection(|c| (c.granule(), c.arena_len()))
        .ok_or((1, "the global allocator has no connection".to_owned()))?;
    let size = 2 << 20;
    let granules = (size / granule) as u32;
    let arena_granules = (arena_len / granule) as u32;
    // Just past the end, and far past it.
    let bogus = [arena_granules - granules + 1, u32::MAX - granules];
    let planted = with_newest_connection(|c| {
        let Some(ledger) = c.ledger() else {
            return 0;
        };
        bogus
            .iter()
            .map(|&offset| {
                let block = LedgerBlock {
                    offset,
                    granules,
                    released: false,
                };
                u64::from(ledger.put(block, 0))
            })
            .sum::<u64>()
    })
    .unwrap_or(0);
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
    with_newest_connection(|c| {
        if let Some(ledger) = c.ledger() {
            ledger
                .cached_granules
                .store(u64::MAX - 3, std::sync::atomic::Ordering::Relaxed);
        }
    });
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
