//! A program whose global allocator is `XallocGlobal` with a 4 KiB threshold, for the
//! multi-process tests. The daemon instance comes from `XALLOC_NAME`.
//!
//! ```text
//! xalloc-global-client work THREADS MILLIS
//!     std-heavy work on THREADS threads for MILLIS ms (MILLIS 0: until stdin closes, and each
//!     line read makes every thread check and free all it keeps): maps of strings to vectors,
//!     strings, vectors grown and shrunk across the threshold, zeroed buffers, threads that hand
//!     buffers to each other; every content is checked. Prints
//!     `ok forwarded=N fallbacks=N reentries=N arena_bytes=N ... over_quota=N connections=N` and
//!     exits 0, or prints what went wrong and exits 1.
//! xalloc-global-client fork
//!     Allocates a shared buffer, forks; the child allocates and frees large buffers of its own,
//!     writes into and frees the inherited buffer, and exits; the parent checks that its buffer
//!     is unchanged and the child succeeded. Prints `ok ...` as above.
//! xalloc-global-client free-then-wait COUNT SIZE
//!     Allocates COUNT blocks of SIZE bytes (each filled with its own byte), frees them all,
//!     prints `freed cached_bytes=N arena_bytes=N`, and waits for a line on stdin, making no
//!     request meanwhile; then allocates COUNT blocks of SIZE bytes again, checks and frees
//!     them, and prints `ok ...` as above.
//! xalloc-global-client fork-while-connecting
//!     One thread prints `tid TID` and, on `go` (stdin), makes a large allocation, which
//!     connects; the test stops that thread inside the connection attempt (ptrace) and says
//!     `fork`. The main thread forks: the child must connect by itself within 4 s (exit 0;
//!     4 if it only fell back; killed after 8 s if it hangs). Prints `child exit=N` (or
//!     `child hung`), waits for `done` (the test let the thread go on), and prints `ok ...`.
//! xalloc-global-client alloc-in-fork-handler
//!     Registers a `pthread_atfork` prepare handler that makes the first large allocation,
//!     then forks: that allocation connects from inside `fork`. Prints `ok ...` if it was
//!     forwarded.
//! xalloc-global-client restarts
//!     Reads commands on stdin, one a line, while the test restarts the daemon in between:
//!     `alloc GEN hold|free` frees the block of the previous command if that one said `free`,
//!     then makes 1 MiB allocations (filled with a pattern of GEN) until one is served by a
//!     daemon round trip (shared, counted as forwarded, not a cache hit), for at most 10 s; it
//!     keeps that block and prints `served gen=GEN connections=N`, or prints `error: ...` and
//!     exits 1. `check` checks that every block kept with `hold` still holds its pattern and
//!     lies in an arena, frees them, and prints `ok ... connections=N`.
//! xalloc-global-client hold-wait COUNT SIZE
//!     Allocates COUNT blocks of SIZE bytes (each filled with its own byte) and keeps them;
//!     prints `held shared=S over_quota=Q fallbacks=F arena_bytes=B` (S: how many are in the
//!     arena), waits for a line on stdin, checks and frees them, and prints `ok ...`.
//! xalloc-global-client hold-then-exec SIZE PROGRAM [ARG...]
//!     Allocates SIZE bytes (written), prints `held shared=S arena_bytes=B`, then replaces
//!     itself with PROGRAM (`execvp`), holding the block until the exec: the connection is
//!     close-on-exec, so the daemon frees the block while PROGRAM runs. Prints `error: ...` and
//!     exits 1 if the exec fails.
//! ```
//!
//! The global allocator is wrapped in a counter of nesting depth: if `XallocGlobal` ever
//! allocated through the global allocator while serving a request, the depth would reach 2 and
//! `reentries` would be non-zero.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use xalloc_global::XallocGlobal;
use xalloc_tests::Rng;

/// `XallocGlobal`, counting how often it is entered while already inside it on this thread.
struct NestingCounter(XallocGlobal);

static REENTRIES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // `const` initialiser, no destructor: using it never allocates.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

impl NestingCounter {
    fn enter<T>(&self, f: impl FnOnce(&XallocGlobal) -> T) -> T {
        let depth = DEPTH.with(|d| {
            let v = d.get() + 1;
            d.set(v);
            v
        });
        if depth > 1 {
            REENTRIES.fetch_add(1, Ordering::Relaxed);
        }
        let r = f(&self.0);
        DEPTH.with(|d| d.set(d.get() - 1));
        r
    }
}

// SAFETY: forwards every call unchanged to `XallocGlobal`, which upholds the contract.
unsafe impl GlobalAlloc for NestingCounter {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        self.enter(|a| unsafe { a.alloc(l) })
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        self.enter(|a| unsafe { a.alloc_zeroed(l) })
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded contract.
        self.enter(|a| unsafe { a.dealloc(p, l) })
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        self.enter(|a| unsafe { a.realloc(p, l, n) })
    }
}

#[global_allocator]
static A: NestingCounter = NestingCounter(XallocGlobal::new().with_threshold(4096));

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

fn check(what: &str, seed: u64, v: &[u8]) -> Result<(), String> {
    if v != pattern(seed, v.len()) {
        return Err(format!(
            "{what}: contents of a {}-byte buffer changed",
            v.len()
        ));
    }
    Ok(())
}

/// Set when `work` with MILLIS 0 finds stdin closed.
static STOP: AtomicBool = AtomicBool::new(false);
/// Lines `work` with MILLIS 0 has read: each makes the workers free all they keep.
static LINES: AtomicU64 = AtomicU64::new(0);

fn worker(t: u64, millis: u64, tx: mpsc::Sender<Vec<u64>>) -> Result<u64, String> {
    let deadline = Instant::now()
        + if millis == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(millis)
        };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
    // Each value remembers the seed of its pattern, so that it can be checked.
    let mut map: HashMap<String, (u64, Vec<u8>)> = HashMap::new();
    let mut tree: BTreeMap<u64, String> = BTreeMap::new();
    let mut ops = 0u64;
    let mut lines = 0;
    while Instant::now() < deadline && !STOP.load(Ordering::Relaxed) {
        if LINES.load(Ordering::Relaxed) != lines {
            lines = LINES.load(Ordering::Relaxed);
            for (seed, v) in map.values() {
                check("map value", *seed, v)?;
            }
            map.clear();
            map.shrink_to_fit();
            tree.clear();
        }
        let k = rng.next_u64();
        // Sizes from a few bytes to 512 KiB: both sides of the 4 KiB threshold.
        let len = match k % 4 {
            0 => (k >> 8) as usize % 256,
            1 => 2048 + (k >> 8) as usize % 8192,
            2 => 4096 + (k >> 8) as usize % (64 << 10),
            _ => (k >> 8) as usize % (512 << 10),
        };
        let key = format!("t{t}-{}", k % 64);
        if let Some((seed, old)) = map.insert(key, (k, pattern(k, len))) {
            check("map value", seed, &old)?;
        }
        // Grow and shrink across the threshold (realloc both ways, in place or moving).
        let mut grow: Vec<u64> = Vec::new();
        for i in 0..(k % 2000) {
            grow.push(i ^ k);
        }
        if grow.iter().enumerate().any(|(i, &x)| x != i as u64 ^ k) {
            return Err("vector contents changed while growing".into());
        }
        grow.truncate(10);
        grow.shrink_to_fit();
        if grow.iter().enumerate().any(|(i, &x)| x != i as u64 ^ k) {
            return Err("vector contents changed while shrinking".into());
        }
        // Zeroed memory must be zero, in the arena or not.
        let z = vec![0u64; (k % 100_000) as usize];
        if z.iter().any(|&x| x != 0) {
            return Err(format!("vec![0; {}] not zeroed", z.len()));
        }
        let text = "y".repeat((k % 9000) as usize);
        if let Some(old) = tree.insert(k % 500, text) {
            if old.bytes().any(|b| b != b'y') {
                return Err("string contents changed".into());
            }
        }
        if ops.is_multiple_of(50) {
            // Hand a big buffer to another thread, which checks and frees it.
            let _ = tx.send(vec![k; 2048]);
        }
        ops += 1;
    }
    for (seed, v) in map.values() {
        check("map value at the end", *seed, v)?;
    }
    Ok(ops)
}

fn work(threads: u64, millis: u64) -> Result<(), String> {
    if millis == 0 {
        std::thread::spawn(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
                LINES.fetch_add(1, Ordering::Relaxed);
                line.clear();
            }
            STOP.store(true, Ordering::Relaxed);
        });
    }
    let (tx, rx) = mpsc::channel::<Vec<u64>>();
    let sink = std::thread::spawn(move || {
        let mut n = 0u64;
        for v in rx {
            if v.iter().any(|&x| x != v[0]) {
                return Err("handed-over buffer changed".to_owned());
            }
            n += 1;
        }
        Ok(n)
    });
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let tx = tx.clone();
            std::thread::spawn(move || worker(t, millis, tx))
        })
        .collect();
    drop(tx);
    let mut ops = 0;
    for h in handles {
        ops += h.join().map_err(|_| "worker panicked".to_owned())??;
    }
    sink.join().map_err(|_| "sink panicked".to_owned())??;
    if ops == 0 {
        return Err("no work done".into());
    }
    Ok(())
}

fn fork_test() -> Result<(), String> {
    let mut mine = pattern(42, 1 << 20);
    let expected = mine.clone();
    let shared_before = xalloc_global::is_shared(mine.as_ptr());
    // SAFETY: the child only allocates, writes its memory and exits with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("fork failed".into());
    }
    if pid == 0 {
        // Child: its own connection; the inherited buffer is written and freed.
        let mut ok = true;
        for i in 0..20u64 {
            let v = pattern(i, 300 << 10);
            ok &= v == pattern(i, 300 << 10);
        }
        mine.iter_mut().for_each(|b| *b = 0xee);
        drop(mine);
        let c = xalloc_global::counters();
        ok &= c.forwarded >= 20 || !shared_before;
        // SAFETY: leaving the child without running the parent's exit handlers.
        unsafe { libc::_exit(if ok { 0 } else { 3 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("child failed: status {status:#x}"));
    }
    if mine != expected {
        return Err("the child's writes reached the parent's buffer".into());
    }
    // The parent's connection still works.
    let again = pattern(7, 2 << 20);
    if again != pattern(7, 2 << 20) {
        return Err("allocation after fork broken".into());
    }
    Ok(())
}

fn free_then_wait(count: usize, size: usize) -> Result<(), String> {
    let fill = |round: usize| -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| vec![(round * count + i) as u8; size])
            .collect()
    };
    let check = |blocks: &[Vec<u8>], round: usize| -> Result<(), String> {
        for (i, b) in blocks.iter().enumerate() {
            let want = (round * count + i) as u8;
            if b.iter().any(|&x| x != want) {
                return Err(format!("block {i} of round {round} lost its contents"));
            }
        }
        Ok(())
    };
    let first = fill(0);
    check(&first, 0)?;
    drop(first);
    let c = xalloc_global::counters();
    println!(
        "freed cached_bytes={} arena_bytes={}",
        c.cached_bytes, c.arena_bytes
    );
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let second = fill(1);
    check(&second, 1)
}

/// A large allocation on another thread is stopped inside its connection attempt (by the
/// test, with ptrace); a child forked meanwhile must still allocate, and exit.
fn fork_while_connecting() -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let connecting = std::thread::spawn(move || {
        // SAFETY: plain system call.
        let _ = tx.send(unsafe { libc::gettid() });
        if go_rx.recv().is_err() {
            return false;
        }
        let v = vec![1u8; 1 << 20];
        v.iter().all(|&b| b == 1)
    });
    let tid = rx.recv().map_err(|e| e.to_string())?;
    println!("tid {tid}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // Lines are read with `read(2)` into a small buffer: std's stdin would allocate an 8 KiB
    // buffer, a large allocation here, and connect from this thread first.
    let expect = |word: &str| -> Result<(), String> {
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < buf.len() {
            // SAFETY: reads one byte into `buf[n]`, which is in bounds.
            let r = unsafe { libc::read(0, buf.as_mut_ptr().add(n).cast(), 1) };
            if r <= 0 {
                return Err(format!("stdin closed before `{word}`"));
            }
            if buf[n] == b'\n' {
                break;
            }
            n += 1;
        }
        if &buf[..n] == word.as_bytes() {
            Ok(())
        } else {
            Err(format!("expected `{word}` on stdin, got {:?}", &buf[..n]))
        }
    };
    expect("go")?;
    go_tx.send(()).map_err(|e| e.to_string())?;
    // The test stops the thread inside its connection attempt, then says `fork`.
    expect("fork")?;
    // SAFETY: the child only allocates, checks its memory and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("fork failed".into());
    }
    if pid == 0 {
        // A connection of its own (the parent's last attempt was less than a second ago, so
        // the first tries fall back), within 4 s.
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut code = 4;
        while Instant::now() < deadline {
            let v = pattern(7, 512 << 10);
            if v != pattern(7, 512 << 10) {
                code = 3;
                break;
            }
            if xalloc_global::counters().forwarded > 0 {
                code = 0;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: leaving the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut status = 0;
    let hung = loop {
        // SAFETY: polling our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break false;
        }
        if Instant::now() > deadline {
            // SAFETY: our own child, not yet reaped, so the pid is still its.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            break true;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let child = if hung {
        "hung".to_owned()
    } else if libc::WIFEXITED(status) {
        format!("exit={}", libc::WEXITSTATUS(status))
    } else {
        format!("status={status:#x}")
    };
    println!("child {child}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // The test lets the stopped thread go on.
    expect("done")?;
    let filled = connecting
        .join()
        .map_err(|_| "the connecting thread panicked".to_owned())?;
    if child != "exit=0" {
        return Err(format!(
            "the child forked while another thread connected did not connect itself: {child} \
             (exit 4: fell back for 4 s; hung: killed after 8 s)"
        ));
    }
    if !filled {
        return Err("the connecting thread's buffer lost its contents".into());
    }
    Ok(())
}

/// Registers a fork handler that makes the process's first large allocation, then forks: the
/// allocator connects from inside `fork`, while glibc holds its lock of fork handlers.
fn alloc_in_fork_handler() -> Result<(), String> {
    unsafe extern "C" fn prepare() {
        let v = vec![5u8; 1 << 20];
        std::hint::black_box(&v);
    }
    // SAFETY: `prepare` allocates, which glibc allows in a prepare handler (the process still
    // has all its threads; only fork's own locks are held).
    if unsafe { libc::pthread_atfork(Some(prepare), None, None) } != 0 {
        return Err("pthread_atfork failed".into());
    }
    // SAFETY: the child leaves at once with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("fork failed".into());
    }
    if pid == 0 {
        // SAFETY: leaving the child without running the parent's exit handlers.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if xalloc_global::counters().forwarded == 0 {
        return Err("the allocation in the fork handler was not forwarded".into());
    }
    Ok(())
}

/// Serves `alloc` and `check` commands from stdin (see the module docs).
fn restarts() -> Result<(), String> {
    const SIZE: usize = 1 << 20;
    let mut held: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut last: Option<Vec<u8>> = None;
    let mut line = String::new();
    loop {
        line.clear();
        if std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("stdin closed before `check`".into());
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["alloc", gen, mode] => {
                let gen: u64 = gen.parse().map_err(|_| format!("bad gen {gen}"))?;
                drop(last.take());
                // Blocks that came from a cache or the system are kept until one came from a
                // daemon, so that the loop drains the cache instead of cycling through it.
                let mut tries = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(10);
                let block = loop {
                    let before = xalloc_global::counters();
                    let v = pattern(gen, SIZE);
                    let after = xalloc_global::counters();
                    let served = xalloc_global::is_shared(v.as_ptr())
                        && after.forwarded > before.forwarded
                        && after.cache_hits == before.cache_hits;
                    if served {
                        break v;
                    }
                    if Instant::now() > deadline {
                        return Err(format!(
                            "no block from a daemon for gen {gen} within 10 s: {after:?}"
                        ));
                    }
                    tries.push(v);
                    std::thread::sleep(Duration::from_millis(20));
                };
                drop(tries);
                match *mode {
                    "hold" => held.push((gen, block)),
                    _ => last = Some(block),
                }
                println!(
                    "served gen={gen} connections={}",
                    xalloc_global::counters().connections
                );
            }
            ["check"] => {
                drop(last.take());
                for (gen, v) in &held {
                    check(&format!("block of gen {gen}"), *gen, v)?;
                    if !xalloc_global::is_shared(v.as_ptr()) {
                        return Err(format!("the block of gen {gen} left its arena"));
                    }
                }
                drop(held);
                return Ok(());
            }
            _ => return Err(format!("unknown command {line:?}")),
        }
    }
}

/// Allocates `count` blocks of `size` bytes and keeps them until a line on stdin (see the module
/// docs).
fn hold_wait(count: usize, size: usize) -> Result<(), String> {
    let blocks: Vec<Vec<u8>> = (0..count).map(|i| vec![i as u8; size]).collect();
    let shared = blocks
        .iter()
        .filter(|b| xalloc_global::is_shared(b.as_ptr()))
        .count();
    let c = xalloc_global::counters();
    println!(
        "held shared={shared} over_quota={} fallbacks={} arena_bytes={}",
        c.over_quota, c.fallbacks, c.arena_bytes
    );
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    for (i, b) in blocks.iter().enumerate() {
        if b.iter().any(|&x| x != i as u8) {
            return Err(format!("block {i} lost its contents"));
        }
    }
    Ok(())
}

/// Holds `size` bytes, then execs `argv` (see the module docs).
fn hold_then_exec(size: usize, argv: &[String]) -> Result<(), String> {
    let block = vec![0x5au8; size];
    let c = xalloc_global::counters();
    println!(
        "held shared={} arena_bytes={}",
        u8::from(xalloc_global::is_shared(block.as_ptr())),
        c.arena_bytes
    );
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let args: Vec<std::ffi::CString> = argv
        .iter()
        .map(|a| std::ffi::CString::new(a.as_str()).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: `ptrs` is a null-terminated array of NUL-terminated strings that outlive the
    // call; on success the call does not return.
    unsafe { libc::execvp(ptrs[0], ptrs.as_ptr()) };
    std::hint::black_box(&block);
    Err(format!(
        "exec {}: {}",
        argv[0],
        std::io::Error::last_os_error()
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| args.get(i).and_then(|s| s.parse::<u64>().ok());
    let result = match args.first().map(String::as_str) {
        Some("work") => match (num(1), num(2)) {
            (Some(t), Some(ms)) => work(t, ms),
            _ => Err("usage: work THREADS MILLIS".into()),
        },
        Some("fork") => fork_test(),
        Some("free-then-wait") => match (num(1), num(2)) {
            (Some(n), Some(size)) => free_then_wait(n as usize, size as usize),
            _ => Err("usage: free-then-wait COUNT SIZE".into()),
        },
        Some("fork-while-connecting") => fork_while_connecting(),
        Some("alloc-in-fork-handler") => alloc_in_fork_handler(),
        Some("restarts") => restarts(),
        Some("hold-wait") => match (num(1), num(2)) {
            (Some(n), Some(size)) => hold_wait(n as usize, size as usize),
            _ => Err("usage: hold-wait COUNT SIZE".into()),
        },
        Some("hold-then-exec") => match (num(1), args.get(2..)) {
            (Some(size), Some(argv)) if !argv.is_empty() => hold_then_exec(size as usize, argv),
            _ => Err("usage: hold-then-exec SIZE PROGRAM [ARG...]".into()),
        },
        _ => Err("usage: xalloc-global-client work THREADS MILLIS | fork | \
                  free-then-wait COUNT SIZE | fork-while-connecting | alloc-in-fork-handler | \
                  restarts | hold-wait COUNT SIZE | hold-then-exec SIZE PROGRAM [ARG...]"
            .into()),
    };
    let c = xalloc_global::counters();
    match result {
        Ok(()) => {
            println!(
                "ok forwarded={} fallbacks={} reentries={} arena_bytes={} cache_hits={} \
                 cached_bytes={} over_quota={} connections={}",
                c.forwarded,
                c.fallbacks,
                REENTRIES.load(Ordering::Relaxed),
                c.arena_bytes,
                c.cache_hits,
                c.cached_bytes,
                c.over_quota,
                c.connections
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
