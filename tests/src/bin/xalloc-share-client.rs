//! A program that uses the share API of `xalloc-global` ([`SharedBuf`], [`SharedView`],
//! [`Handle`]), for the multi-process tests of share handles (`tests/tests/sharing.rs`). Its
//! global allocator is `XallocGlobal` with a 2 MiB threshold (so that only the vectors of
//! `from-vec` reach the arena); the daemon instance comes from `XALLOC_NAME`.
//!
//! ```text
//! xalloc-share-client COMMAND [ARG...]
//! ```
//!
//! runs one command from its arguments; if it fails, prints `error: E` and exits with the
//! code of `E` (below). If it succeeds, it prints the command's line, then reads further
//! commands on stdin, one a line, answering each with one line (`error: E` on failure, and it
//! goes on), until stdin closes: then it drops everything it holds and exits 0.
//!
//! The process holds a list of owned buffers and a list of views; "the buffer" is the last
//! of the first, "the view" the last of the second, "the target" the view if there is one,
//! else the buffer. Patterns are `xalloc_tests::pattern_byte(SEED, i)` at byte `i`; sums are
//! FNV-1a of the bytes, in hex.
//!
//! ```text
//! new LEN SEED          SharedBuf::new, filled with pattern SEED       -> handle H
//! new-many COUNT LEN [print]
//!                       COUNT SharedBuf::new until one fails           -> made N error=E|none [H...]
//! from-vec LEN SEED     a Vec<u8> of LEN (pattern SEED) to from_vec    -> handle H copied=0|1 arena=0|1
//!                       (copied=0: the buffer's first byte is the vector's; arena=1: the vector
//!                       was an arena block)
//! open H [SEED]         SharedBuf::open (checking pattern SEED)       -> opened len=N sum=S
//! open-many H...        opens each until one fails                     -> opened N error=E|none
//! clone                 clones the view                                -> cloned
//! close                 drops the view                                 -> closed
//! drop                  drops the buffer                               -> dropped
//! send                  sends the buffer                               -> sent H
//! receive H [SEED]      SharedBuf::receive (checking pattern SEED)     -> received len=N sum=S
//! check SEED            the target holds pattern SEED                  -> ok
//! fill SEED             writes pattern SEED into the buffer            -> ok
//! sum                   the target's length and sum                    -> len=N sum=S
//! handle                the target's handle                            -> handle H
//! parse TEXT            parses a handle, prints its fields             -> parsed kind=K instance=I offset=O generation=G
//! counters              xalloc_global::counters()                      -> arena_bytes=N arena_blocks=N
//! fork SEED             forks; the child checks that the target it inherited holds pattern
//!                       SEED (else exits 3), opens the target's handle itself and checks the
//!                       view (exits 100 + the error's code if the open fails, 5 if the view
//!                       differs), drops everything it inherited and exits 0 (`_exit`); the
//!                       parent waits                                   -> child exit=N
//! exit                  exits at once (status 0), dropping nothing
//! forge-free LEN        raw protocol (see below)
//! forge OFFSET GEN      raw protocol (see below)
//! ```
//!
//! `forge-free LEN` makes a connection of its own (`xalloc_global::client::Connection`),
//! allocates LEN bytes, shares the block with a raw `Share` request, then tries to free it
//! with `Free`, resize it with `Reallocate`, share it again, and release it through its
//! ledger (waiting up to 5 s for the daemon to sweep the entry); prints
//! `forged offset=O generation=G free=R realloc=R share=R ledger=swept|kept`, each R
//! `Ok` or the request's error (`Refused(Shared)`: refused as it should be). Then, on a line on
//! stdin, closes its ownership (`Close` with the owner flag) and prints `closed R`, then a
//! `Free` of the same offset: `free-after R`.
//!
//! `forge OFFSET GEN`: a connection of its own, with no reference to the share at OFFSET of
//! generation GEN, sends `Close` (owner), `Close` (view), `Send`, `Free`, `Reallocate`,
//! `Open` with token 0 and with a made-up token, `Receive` with a made-up token; prints
//! `forge close_owner=R close_view=R send=R free=R realloc=R open0=R open=R receive=R`.
//!
//! Exit codes: 10 `NoDaemon`, 11 `OtherInstance`, 12 `NotFound`, 13 `NotTransfer`,
//! 14 `BadHandle`, 15 `OutOfMemory`, 16 `OverQuota`, 17 `TooMany`, 18 `Request(_)`,
//! 20 `OwnedHere`, 21 `ViewedHere`, 19 another `ShareError`; 1 anything else (usage, a pattern
//! that does not match).

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use xalloc_global::client::{Connection, RequestError};
use xalloc_global::{Handle, ShareError, SharedBuf, SharedView, XallocGlobal};
use xalloc_proto::wire::{BlockFlags, LedgerBlock, Op};
use xalloc_tests::pattern_byte;

#[global_allocator]
static A: XallocGlobal = XallocGlobal::new().with_threshold(2 << 20);

/// Why a command failed.
enum Failure {
    Share(ShareError),
    Other(String),
}

impl From<ShareError> for Failure {
    fn from(e: ShareError) -> Self {
        Self::Share(e)
    }
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Self::Other(e)
    }
}

impl Failure {
    fn line(&self) -> String {
        match self {
            Self::Share(e) => format!("error: {e:?}"),
            Self::Other(e) => format!("error: {e}"),
        }
    }

    fn code(&self) -> u8 {
        match self {
            Self::Share(e) => share_code(e),
            Self::Other(_) => 1,
        }
    }
}

/// The exit code of a share error (see the module docs).
fn share_code(e: &ShareError) -> u8 {
    match e {
        ShareError::NoDaemon => 10,
        ShareError::OtherInstance => 11,
        ShareError::NotFound => 12,
        ShareError::NotTransfer => 13,
        ShareError::BadHandle => 14,
        ShareError::OutOfMemory => 15,
        ShareError::OverQuota => 16,
        ShareError::TooMany => 17,
        ShareError::Request(_) => 18,
        ShareError::OwnedHere => 20,
        ShareError::ViewedHere => 21,
        _ => 19,
    }
}

/// FNV-1a of `b`.
fn sum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn fill(b: &mut [u8], seed: u64) {
    for (i, x) in b.iter_mut().enumerate() {
        *x = pattern_byte(seed, i);
    }
}

fn check(b: &[u8], seed: u64) -> Result<(), Failure> {
    match b
        .iter()
        .enumerate()
        .position(|(i, &x)| x != pattern_byte(seed, i))
    {
        None => Ok(()),
        Some(i) => Err(Failure::Other(format!(
            "mismatch at byte {i} of {}: {:#04x}, pattern {seed} has {:#04x}",
            b.len(),
            b[i],
            pattern_byte(seed, i)
        ))),
    }
}

/// What the process holds.
#[derive(Default)]
struct State {
    bufs: Vec<SharedBuf>,
    views: Vec<SharedView>,
}

impl State {
    fn target(&self) -> Result<&[u8], Failure> {
        if let Some(v) = self.views.last() {
            Ok(v)
        } else if let Some(b) = self.bufs.last() {
            Ok(b)
        } else {
            Err(Failure::Other("no buffer or view held".into()))
        }
    }

    fn target_handle(&self) -> Result<Handle, Failure> {
        if let Some(v) = self.views.last() {
            Ok(v.handle())
        } else if let Some(b) = self.bufs.last() {
            Ok(b.handle())
        } else {
            Err(Failure::Other("no buffer or view held".into()))
        }
    }
}

fn num(words: &[&str], i: usize, what: &str) -> Result<u64, Failure> {
    let w = words
        .get(i)
        .ok_or_else(|| Failure::Other(format!("missing {what}")))?;
    let parsed = if let Some(hex) = w.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()
    } else {
        w.parse().ok()
    };
    parsed.ok_or_else(|| Failure::Other(format!("bad {what}: {w:?}")))
}

fn handle(words: &[&str], i: usize) -> Result<Handle, Failure> {
    let w = words
        .get(i)
        .ok_or_else(|| Failure::Other("missing handle".into()))?;
    Ok(w.parse::<Handle>()?)
}

/// A short form of a raw request's result.
fn outcome<T>(r: &Result<T, RequestError>) -> String {
    match r {
        Ok(_) => "Ok".into(),
        Err(e) => format!("{e:?}"),
    }
}

fn instance_name() -> String {
    std::env::var("XALLOC_NAME").unwrap_or_else(|_| "xalloc".into())
}

fn connect() -> Result<Connection, Failure> {
    Connection::connect(&instance_name()).map_err(|e| Failure::Other(format!("connect: {e}")))
}

/// `forge-free LEN` (see the module docs).
fn forge_free(len: u64) -> Result<String, Failure> {
    let conn = connect()?;
    let mut slot = conn
        .claim()
        .map_err(|e| Failure::Other(format!("claim: {e}")))?;
    let i = slot.index();
    let b = slot
        .allocate(len, 4096, false)
        .map_err(|e| Failure::Other(format!("allocate: {e}")))?;
    let r = conn
        .request_with_token(i, Op::Share, 0, len, 0, b.offset, 0)
        .map_err(|e| Failure::Other(format!("share: {e:?}")))?;
    let generation = r.tag as u32;
    let free = outcome(&slot.free(b.offset));
    let realloc = outcome(&slot.resize(b.offset, len / 2));
    let share = outcome(&conn.request_with_token(i, Op::Share, 0, len, 0, b.offset, 0));
    let ledger = conn
        .ledger()
        .ok_or_else(|| Failure::Other("no ledger".into()))?;
    let g = conn.granule() as u64;
    let put = ledger.put(
        LedgerBlock {
            offset: (b.offset / g) as u32,
            granules: (b.size / g) as u32,
            released: true,
        },
        0,
    );
    if !put {
        return Err(Failure::Other("ledger put refused".into()));
    }
    conn.ring();
    let t = Instant::now();
    let swept = loop {
        if ledger
            .entries
            .iter()
            .all(|e| e.load(std::sync::atomic::Ordering::Acquire) == 0)
        {
            break true;
        }
        if t.elapsed() > Duration::from_secs(5) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    println!(
        "forged offset={} generation={generation} free={free} realloc={realloc} share={share} \
         ledger={}",
        b.offset,
        if swept { "swept" } else { "kept" }
    );
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let closed = conn.request_with_token(
        i,
        Op::Close,
        BlockFlags::OWNER.bits(),
        u64::from(generation),
        0,
        b.offset,
        0,
    );
    println!("closed {}", outcome(&closed));
    let after = slot.free(b.offset);
    Ok(format!("free-after {}", outcome(&after)))
}

/// `forge OFFSET GEN` (see the module docs).
fn forge(offset: u64, generation: u64) -> Result<String, Failure> {
    let conn = connect()?;
    let slot = conn
        .claim()
        .map_err(|e| Failure::Other(format!("claim: {e}")))?;
    let i = slot.index();
    let rq = |op: Op, flags: u32, size: u64, token: u64| {
        outcome(&conn.request_with_token(i, op, flags, size, 0, offset, token))
    };
    let made_up = 0x5eed_f00d_dead_beef;
    Ok(format!(
        "forge close_owner={} close_view={} send={} free={} realloc={} open0={} open={} \
         receive={}",
        rq(Op::Close, BlockFlags::OWNER.bits(), generation, 0),
        rq(Op::Close, 0, generation, 0),
        rq(Op::Send, 0, generation, 0),
        rq(Op::Free, 0, 0, 0),
        rq(Op::Reallocate, 0, 4096, 0),
        rq(Op::Open, 0, generation, 0),
        rq(Op::Open, 0, generation, made_up),
        rq(Op::Receive, 0, generation, made_up),
    ))
}

/// `fork SEED` (see the module docs).
fn fork(state: &mut State, seed: u64) -> Result<String, Failure> {
    let handle = state.target_handle()?;
    let _ = std::io::stdout().flush();
    // SAFETY: this program has one thread; the child only reads memory, makes share requests
    // (a connection of its own) and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Failure::Other("fork failed".into()));
    }
    if pid == 0 {
        let code = if state.target().map_or(true, |t| check(t, seed).is_err()) {
            3
        } else {
            match SharedBuf::open(handle) {
                Ok(v) if check(&v, seed).is_err() => 5,
                Ok(_) => 0,
                Err(e) => 100 + i32::from(share_code(&e)),
            }
        };
        // What the child inherited is the parent's: dropping it must close nothing.
        drop(std::mem::take(state));
        // SAFETY: leaving the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if !libc::WIFEXITED(status) {
        return Err(Failure::Other(format!("child status {status:#x}")));
    }
    Ok(format!("child exit={}", libc::WEXITSTATUS(status)))
}

/// `own-race THREADS ITERS`: each thread makes a 64 KiB buffer, opens a view of its own
/// handle (which must be refused: this process owns the block), and drops the buffer, over and
/// over, so that blocks are freed and handed out again at the same offsets across threads.
/// Prints how many opens were refused and how many gave a view beside a live buffer.
fn own_race(threads: u64, iters: u64) -> Result<String, Failure> {
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || -> Result<(u64, u64), ShareError> {
                let (mut refused, mut both) = (0, 0);
                for _ in 0..iters {
                    let buf = SharedBuf::new(64 << 10)?;
                    match SharedBuf::open(buf.handle()) {
                        Err(ShareError::OwnedHere) => refused += 1,
                        Ok(_) => both += 1,
                        Err(e) => return Err(e),
                    }
                }
                Ok((refused, both))
            })
        })
        .collect();
    let (mut refused, mut both) = (0, 0);
    for w in workers {
        let (r, b) = w
            .join()
            .map_err(|_| Failure::Other("a thread panicked".into()))??;
        refused += r;
        both += b;
    }
    Ok(format!("refused={refused} both={both}"))
}

/// `unchecked-then-safe`: a buffer, a view of it opened with `open_unchecked` (read through
/// raw pointers only) and dropped; then the safe `open` of the buffer's own handle must still
/// be refused.
fn unchecked_then_safe() -> Result<String, Failure> {
    let buf = SharedBuf::new(4096)?;
    // SAFETY: the view is only dropped; no reference to its bytes is made.
    let view = unsafe { SharedBuf::open_unchecked(buf.handle()) }?;
    drop(view);
    match SharedBuf::open(buf.handle()) {
        Err(e) => Ok(format!("safe open after unchecked: {e:?}")),
        Ok(_) => Ok("safe open after unchecked: a view beside the buffer".into()),
    }
}

/// Runs one command; its output line.
fn run(state: &mut State, words: &[&str]) -> Result<String, Failure> {
    match words.first().copied().unwrap_or("") {
        "new" => {
            let (len, seed) = (num(words, 1, "LEN")?, num(words, 2, "SEED")?);
            let mut b = SharedBuf::new(len as usize)?;
            fill(&mut b, seed);
            let h = b.handle();
            state.bufs.push(b);
            Ok(format!("handle {h}"))
        }
        "new-many" => {
            let (count, len) = (num(words, 1, "COUNT")?, num(words, 2, "LEN")?);
            let print = words.get(3) == Some(&"print");
            let mut handles = String::new();
            let mut made = 0;
            let mut error = "none".to_owned();
            for _ in 0..count {
                match SharedBuf::new(len as usize) {
                    Ok(b) => {
                        if print {
                            handles.push_str(&format!(" {}", b.handle()));
                        }
                        state.bufs.push(b);
                        made += 1;
                    }
                    Err(e) => {
                        error = format!("{e:?}");
                        break;
                    }
                }
            }
            Ok(format!("made {made} error={error}{handles}"))
        }
        "from-vec" => {
            let (len, seed) = (num(words, 1, "LEN")?, num(words, 2, "SEED")?);
            let mut v = vec![0u8; len as usize];
            fill(&mut v, seed);
            let p = v.as_ptr();
            let arena = xalloc_global::is_shared(p);
            let b = SharedBuf::from_vec(v)?;
            check(&b, seed)?;
            let copied = b.as_ptr() != p;
            let h = b.handle();
            state.bufs.push(b);
            Ok(format!(
                "handle {h} copied={} arena={}",
                u8::from(copied),
                u8::from(arena)
            ))
        }
        "open" => {
            let v = SharedBuf::open(handle(words, 1)?)?;
            if words.len() > 2 {
                check(&v, num(words, 2, "SEED")?)?;
            }
            let line = format!("opened len={} sum={:016x}", v.len(), sum(&v));
            state.views.push(v);
            Ok(line)
        }
        "open-many" => {
            let mut opened = 0;
            let mut error = "none".to_owned();
            for w in &words[1..] {
                match w
                    .parse::<Handle>()
                    .and_then(SharedBuf::open)
                    .map(|v| state.views.push(v))
                {
                    Ok(()) => opened += 1,
                    Err(e) => {
                        error = format!("{e:?}");
                        break;
                    }
                }
            }
            Ok(format!("opened {opened} error={error}"))
        }
        "clone" => {
            let v = state
                .views
                .last()
                .ok_or_else(|| Failure::Other("no view".into()))?
                .clone();
            state.views.push(v);
            Ok("cloned".into())
        }
        "close" => {
            state
                .views
                .pop()
                .ok_or_else(|| Failure::Other("no view".into()))?;
            Ok("closed".into())
        }
        "drop" => {
            state
                .bufs
                .pop()
                .ok_or_else(|| Failure::Other("no buffer".into()))?;
            Ok("dropped".into())
        }
        "send" => {
            let b = state
                .bufs
                .pop()
                .ok_or_else(|| Failure::Other("no buffer".into()))?;
            match b.send() {
                Ok(h) => Ok(format!("sent {h}")),
                Err((b, e)) => {
                    state.bufs.push(b);
                    Err(e.into())
                }
            }
        }
        "receive" => {
            let b = SharedBuf::receive(handle(words, 1)?)?;
            if words.len() > 2 {
                check(&b, num(words, 2, "SEED")?)?;
            }
            let line = format!("received len={} sum={:016x}", b.len(), sum(&b));
            state.bufs.push(b);
            Ok(line)
        }
        "check" => {
            check(state.target()?, num(words, 1, "SEED")?)?;
            Ok("ok".into())
        }
        "fill" => {
            let seed = num(words, 1, "SEED")?;
            let b = state
                .bufs
                .last_mut()
                .ok_or_else(|| Failure::Other("no buffer".into()))?;
            fill(b, seed);
            Ok("ok".into())
        }
        "sum" => {
            let t = state.target()?;
            Ok(format!("len={} sum={:016x}", t.len(), sum(t)))
        }
        "handle" => Ok(format!("handle {}", state.target_handle()?)),
        "parse" => {
            let h = handle(words, 1)?;
            Ok(format!(
                "parsed kind={:?} instance={:016x} offset={} generation={}",
                h.kind(),
                h.instance(),
                h.offset(),
                h.generation()
            ))
        }
        "counters" => {
            let c = xalloc_global::counters();
            Ok(format!(
                "arena_bytes={} arena_blocks={}",
                c.arena_bytes, c.arena_blocks
            ))
        }
        "fork" => fork(state, num(words, 1, "SEED")?),
        "exit" => {
            let _ = std::io::stdout().flush();
            std::process::exit(0)
        }
        "own-race" => own_race(num(words, 1, "THREADS")?, num(words, 2, "ITERS")?),
        "unchecked-then-safe" => unchecked_then_safe(),
        "forge-free" => forge_free(num(words, 1, "LEN")?),
        "forge" => forge(num(words, 1, "OFFSET")?, num(words, 2, "GEN")?),
        other => Err(Failure::Other(format!("unknown command {other:?}"))),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut state = State::default();
    match run(&mut state, &words) {
        Ok(line) => println!("{line}"),
        Err(f) => {
            println!("{}", f.line());
            return ExitCode::from(f.code());
        }
    }
    let _ = std::io::stdout().flush();
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        match run(&mut state, &words) {
            Ok(out) => println!("{out}"),
            Err(f) => println!("{}", f.line()),
        }
        let _ = std::io::stdout().flush();
    }
    drop(state);
    ExitCode::SUCCESS
}
