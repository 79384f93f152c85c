//! `pipeline`: a producer process hands large frames to a consumer process, once by share
//! handle and once by copying the frames through a pipe, and prints what each way achieves.
//!
//! ```sh
//! scripts/start.sh                      # a daemon, instance "xalloc" (or: xallocd start --name NAME,
//!                                       # then run the example with XALLOC_NAME=NAME)
//! cargo run --release -p xalloc-examples --bin pipeline                    # 200 frames of 8 MiB, both modes
//! cargo run --release -p xalloc-examples --bin pipeline -- --frames 1000 --frame-mib 16 --mode handle
//! ```
//!
//! The producer (this process) fills each frame with a pattern that depends on the frame's
//! number and passes it to the consumer (this program again, started as its child with
//! `consume`) over the consumer's standard input; the consumer checksums every byte of the
//! frame, drops it, and answers with the checksum on its standard output, which the producer
//! compares with its own. At most [`WINDOW`] frames are on their way at once (the producer waits
//! for the answer to frame `i - WINDOW` before it sends frame `i`), so a slow consumer never
//! makes the producer fill the arena.
//!
//! - **handle**: the frame is an ordinary `Vec<u8>`: under [`XallocGlobal`] a vector of
//!   8 MiB lives in the daemon's shared arena, so [`SharedBuf::from_vec`] takes its block over
//!   as it is, without a copy. [`SharedBuf::send`] gives it up and returns a transfer handle,
//!   and only its 32-byte form ([`Handle::to_bytes`]) goes through the pipe; the consumer
//!   [`SharedBuf::receive`]s the block (one round trip to the daemon, whatever the size),
//!   reads it where the producer wrote it, and drops it, which frees it.
//! - **copy**: the same frames, written through the pipe whole; the consumer reads each into a
//!   buffer of its own, then checksums it the same way.
//!
//! Both modes do the same work otherwise (the same fill, the same checksum on both sides), so
//! the difference is what handing the frame over costs. The handle mode needs a daemon: without
//! one the program says how to start one and exits with status 1 (`--mode copy` runs without).
//! Options: `--frames N` (default 200), `--frame-mib M` (default 8), `--mode handle|copy|both`
//! (default both).

use std::io::{BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use xalloc_global::{Handle, ShareError, SharedBuf, XallocGlobal};

/// Allocations of 256 KiB and more go to the daemon's arena: the frames are arena blocks, which
/// [`SharedBuf::from_vec`] shares without copying them.
#[global_allocator]
static A: XallocGlobal = XallocGlobal::new();

/// Frames on their way at once (sent and not yet answered).
const WINDOW: usize = 4;

/// What the consumer writes once it is ready, before the first frame.
const READY: [u8; 8] = *b"ready\0\0\0";

const USAGE: &str = "\
usage: pipeline [--frames N] [--frame-mib M] [--mode handle|copy|both]

  --frames N      frames per mode (default 200)
  --frame-mib M   MiB per frame (default 8)
  --mode MODE     handle (share handles through the pipe), copy (the bytes through the pipe)
                  or both (default), side by side

XALLOC_NAME names the xallocd instance (default xalloc); the handle mode needs its daemon.
";

/// How a frame goes from the producer to the consumer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A transfer handle through the pipe; the block itself stays where it is.
    Handle,
    /// The frame's bytes through the pipe.
    Copy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Handle => "handle",
            Mode::Copy => "copy",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "handle" => Some(Mode::Handle),
            "copy" => Some(Mode::Copy),
            _ => None,
        }
    }
}

/// What the producer was asked to do.
struct Config {
    frames: usize,
    frame_bytes: usize,
    modes: Vec<Mode>,
}

fn parse(args: impl Iterator<Item = String>) -> Result<Config, String> {
    let mut args = args;
    let mut cfg = Config {
        frames: 200,
        frame_bytes: 8 << 20,
        modes: vec![Mode::Handle, Mode::Copy],
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--frames" => {
                cfg.frames = value()?
                    .parse()
                    .map_err(|_| "--frames needs a number".to_owned())?
            }
            "--frame-mib" => {
                let mib: usize = value()?
                    .parse()
                    .map_err(|_| "--frame-mib needs a number".to_owned())?;
                cfg.frame_bytes = mib.checked_mul(1 << 20).ok_or("--frame-mib is too large")?;
            }
            "--mode" => {
                cfg.modes = match value()?.as_str() {
                    "both" => vec![Mode::Handle, Mode::Copy],
                    m => vec![Mode::parse(m).ok_or(format!("--mode {m:?}: handle, copy or both"))?],
                }
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?}\n\n{USAGE}")),
        }
    }
    if cfg.frames == 0 || cfg.frame_bytes == 0 {
        return Err("--frames and --frame-mib must be positive".to_owned());
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    let result = if args.peek().map(String::as_str) == Some("consume") {
        args.next();
        consume(args)
    } else {
        parse(args).and_then(|cfg| produce(&cfg))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipeline: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The frames: a pattern per frame number, and the checksum both sides compute.

/// The 8-byte word at index `i` of frame `frame`.
#[inline(always)]
fn word(frame: u64, i: u64) -> u64 {
    (frame + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_mul(0x0000_0100_0000_01b3)
}

/// The checksum of a frame: the wrapping sum and the xor of its little-endian 8-byte words (a
/// last partial word padded with zeros), and its length. Reads every byte once.
fn checksum(bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut xor = 0u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().unwrap_or_default());
        sum = sum.wrapping_add(w);
        xor ^= w;
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        let w = u64::from_le_bytes(last);
        sum = sum.wrapping_add(w);
        xor ^= w;
    }
    sum ^ xor.rotate_left(32) ^ bytes.len() as u64
}

/// Appends frame `frame`'s `len` bytes to the empty vector `v` (of at least that capacity)
/// without zeroing it first, and returns their [`checksum`], computed on the way.
fn fill(v: &mut Vec<u8>, frame: u64, len: usize) -> u64 {
    v.clear();
    v.reserve(len);
    let (mut sum, mut xor) = (0u64, 0u64);
    let spare = &mut v.spare_capacity_mut()[..len];
    let mut chunks = spare.chunks_exact_mut(8);
    for (i, dst) in (&mut chunks).enumerate() {
        let w = word(frame, i as u64);
        sum = sum.wrapping_add(w);
        xor ^= w;
        for (d, s) in dst.iter_mut().zip(w.to_le_bytes()) {
            d.write(s);
        }
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let w = word(frame, (len / 8) as u64).to_le_bytes();
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(&w[..rest.len()]);
        let w = u64::from_le_bytes(last);
        sum = sum.wrapping_add(w);
        xor ^= w;
        for (d, s) in rest.iter_mut().zip(last) {
            d.write(s);
        }
    }
    // SAFETY: the first `len` bytes of the spare capacity were all written above (whole words,
    // then the remainder), and `len <= capacity` (reserved).
    unsafe { v.set_len(len) };
    sum ^ xor.rotate_left(32) ^ len as u64
}

// ---------------------------------------------------------------------------------------------
// The producer.

/// How one mode went.
struct Outcome {
    mode: Mode,
    elapsed: Duration,
    matched: usize,
    /// Frames whose vector was not an arena block (from_vec copied them; handle mode only).
    copied: usize,
    /// The pipe's buffer size.
    pipe_bytes: Option<usize>,
}

fn produce(cfg: &Config) -> Result<(), String> {
    let name = std::env::var("XALLOC_NAME").unwrap_or_else(|_| "xalloc".to_owned());
    if cfg.modes.contains(&Mode::Handle) {
        check_daemon(&name)?;
    }
    println!(
        "pipeline: {} frames of {} per mode, at most {WINDOW} on their way; producer pid {}{}",
        cfg.frames,
        size_label(cfg.frame_bytes),
        std::process::id(),
        if cfg.modes.contains(&Mode::Handle) {
            format!(", xallocd instance {name:?}")
        } else {
            String::new()
        }
    );
    let mut outcomes = Vec::new();
    for &mode in &cfg.modes {
        let o = run_mode(cfg, mode)?;
        outcomes.push(o);
    }
    report(cfg, &outcomes);
    if outcomes.iter().any(|o| o.matched != cfg.frames) {
        return Err("the consumer's checksums differ from the producer's".to_owned());
    }
    Ok(())
}

/// Makes sure a daemon answers share requests, or says how to start one.
fn check_daemon(name: &str) -> Result<(), String> {
    match SharedBuf::new(0) {
        Ok(probe) => {
            drop(probe);
            Ok(())
        }
        Err(ShareError::NoDaemon) => Err(format!(
            "no xallocd daemon answers for instance {name:?}, and the handle mode needs one.\n\
             Start one, then run this again:\n\
             \n    scripts/start.sh                       # instance \"xalloc\"\n\
             \n  or, for an instance of another name:\n\
             \n    xallocd start --name NAME\n    XALLOC_NAME=NAME cargo run --release -p \
             xalloc-examples --bin pipeline\n\
             \n(--mode copy runs without a daemon)"
        )),
        Err(e) => Err(format!(
            "the daemon of instance {name:?} refused a shared block: {e}"
        )),
    }
}

/// Starts the consumer for `mode` and waits until it is ready.
fn spawn_consumer(cfg: &Config, mode: Mode) -> Result<(Child, ChildStdin, ChildStdout), String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut child = Command::new(exe)
        .args([
            "consume",
            mode.name(),
            &cfg.frame_bytes.to_string(),
            &cfg.frames.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn of the consumer: {e}"))?;
    let (Some(stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("the consumer has no pipes".to_owned());
    };
    let mut ready = [0u8; 8];
    if stdout.read_exact(&mut ready).is_err() || ready != READY {
        let status = child.wait().map_err(|e| format!("wait: {e}"))?;
        return Err(format!("the consumer did not start ({status})"));
    }
    Ok((child, stdin, stdout))
}

fn run_mode(cfg: &Config, mode: Mode) -> Result<Outcome, String> {
    let (mut child, mut to, stdout) = spawn_consumer(cfg, mode)?;
    let pipe_bytes = widen_pipe(&to);
    let mut from = BufReader::new(stdout);
    let mut expected = std::collections::VecDeque::with_capacity(WINDOW);
    let mut matched = 0;
    let mut copied = 0;
    // The copy mode's one frame buffer (the pipe copies it out before it is filled again).
    let mut frame_buf: Vec<u8> = Vec::new();
    let started = Instant::now();
    let mut take_answer = |expected: &mut std::collections::VecDeque<u64>| -> Result<(), String> {
        let mut answer = [0u8; 8];
        from.read_exact(&mut answer)
            .map_err(|e| format!("{} mode: the consumer's answer: {e}", mode.name()))?;
        let want = expected.pop_front().unwrap_or_default();
        if u64::from_le_bytes(answer) == want {
            matched += 1;
        }
        Ok(())
    };
    for frame in 0..cfg.frames as u64 {
        if expected.len() == WINDOW {
            take_answer(&mut expected)?;
        }
        let sent = match mode {
            Mode::Handle => {
                // A fresh vector per frame: the consumer takes each block over.
                let mut v = Vec::with_capacity(cfg.frame_bytes);
                let sum = fill(&mut v, frame, cfg.frame_bytes);
                if !xalloc_global::is_shared(v.as_ptr()) {
                    copied += 1;
                }
                let buf = SharedBuf::from_vec(v).map_err(|e| match e {
                    ShareError::OutOfMemory | ShareError::OverQuota => format!(
                        "frame {frame}: {e}: up to {} frames of {} are in the arena at once; \
                         start the daemon with a larger --arena-size",
                        WINDOW + 1,
                        size_label(cfg.frame_bytes)
                    ),
                    e => format!("frame {frame}: {e}"),
                })?;
                let handle = buf
                    .send()
                    .map_err(|(_, e)| format!("frame {frame}: send: {e}"))?;
                to.write_all(&handle.to_bytes()).map(|()| sum)
            }
            Mode::Copy => {
                let sum = fill(&mut frame_buf, frame, cfg.frame_bytes);
                // The pipe takes the frame in pieces as the consumer reads them.
                to.write_all(&frame_buf).map(|()| sum)
            }
        };
        let sum = sent.map_err(|e| format!("{} mode: frame {frame}: {e}", mode.name()))?;
        expected.push_back(sum);
    }
    while !expected.is_empty() {
        take_answer(&mut expected)?;
    }
    let elapsed = started.elapsed();
    drop(to);
    let status = child.wait().map_err(|e| format!("wait: {e}"))?;
    if !status.success() {
        return Err(format!("the {} consumer failed: {status}", mode.name()));
    }
    Ok(Outcome {
        mode,
        elapsed,
        matched,
        copied,
        pipe_bytes,
    })
}

/// Gives the pipe to the consumer the largest buffer an unprivileged process may ask for
/// (`/proc/sys/fs/pipe-max-size`, usually 1 MiB, instead of 64 KiB): the copy mode's best case,
/// with 16 times fewer hand-overs between the processes per frame. Returns the pipe's size.
fn widen_pipe(pipe: &ChildStdin) -> Option<usize> {
    let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_int>().ok())
        .unwrap_or(1 << 20);
    let fd = pipe.as_raw_fd();
    // SAFETY: fcntl on a pipe descriptor this process holds; F_SETPIPE_SZ changes its buffer
    // size only (it fails, changing nothing, if the size is not allowed).
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, max) };
    // SAFETY: as above; F_GETPIPE_SZ only reads the size.
    let size = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    usize::try_from(size).ok()
}

fn report(cfg: &Config, outcomes: &[Outcome]) {
    let bytes = (cfg.frames * cfg.frame_bytes) as f64;
    println!();
    println!("| mode | frames/s | GB/s | seconds | checksums |");
    println!("|---|---:|---:|---:|---|");
    for o in outcomes {
        let s = o.elapsed.as_secs_f64();
        let how = match o.mode {
            Mode::Handle => "handle (32-byte transfer handle through the pipe)",
            Mode::Copy => &format!(
                "copy (the frame through the pipe, {} buffer)",
                o.pipe_bytes.map_or("?".to_owned(), size_label)
            ),
        };
        println!(
            "| {how} | {:.0} | {:.2} | {s:.3} | {}/{} match |",
            cfg.frames as f64 / s,
            bytes / s / 1e9,
            o.matched,
            cfg.frames
        );
    }
    if let [a, b] = outcomes {
        let (h, c) = if a.mode == Mode::Handle {
            (a, b)
        } else {
            (b, a)
        };
        println!(
            "\nhandle ÷ copy: {:.2}× the frames per second",
            c.elapsed.as_secs_f64() / h.elapsed.as_secs_f64()
        );
    }
    for o in outcomes.iter().filter(|o| o.copied > 0) {
        println!(
            "note: {} of the {} frames were not arena blocks (XALLOC_THRESHOLD above the \
             frame size?): SharedBuf::from_vec copied them",
            o.copied, cfg.frames
        );
    }
}

/// `8 MiB`, `64 KiB`, or bytes.
fn size_label(bytes: usize) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

// ---------------------------------------------------------------------------------------------
// The consumer: `pipeline consume MODE FRAME_BYTES FRAMES`, frames on stdin, answers on stdout.

fn consume(mut args: impl Iterator<Item = String>) -> Result<(), String> {
    let usage = || "usage: pipeline consume handle|copy FRAME_BYTES FRAMES".to_owned();
    let mode = args
        .next()
        .as_deref()
        .and_then(Mode::parse)
        .ok_or_else(usage)?;
    let frame_bytes: usize = args.next().and_then(|v| v.parse().ok()).ok_or_else(usage)?;
    let frames: usize = args.next().and_then(|v| v.parse().ok()).ok_or_else(usage)?;
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    let mut own = Vec::new();
    if mode == Mode::Copy {
        own.resize(frame_bytes, 0);
    } else {
        // Connects to the daemon now rather than at the first frame.
        drop(SharedBuf::new(0).map_err(|e| format!("consumer: {e}"))?);
    }
    output
        .write_all(&READY)
        .and_then(|()| output.flush())
        .map_err(|e| format!("consumer: {e}"))?;
    for frame in 0..frames {
        let sum = match mode {
            Mode::Handle => {
                let mut bytes = [0u8; Handle::BYTES];
                input
                    .read_exact(&mut bytes)
                    .map_err(|e| format!("consumer: frame {frame}: {e}"))?;
                let handle = Handle::from_bytes(&bytes)
                    .map_err(|e| format!("consumer: frame {frame}: {e}"))?;
                let buf = SharedBuf::receive(handle)
                    .map_err(|e| format!("consumer: frame {frame}: receive: {e}"))?;
                if buf.len() != frame_bytes {
                    return Err(format!(
                        "consumer: frame {frame} is {} bytes, not {frame_bytes}",
                        buf.len()
                    ));
                }
                checksum(&buf)
                // `buf` drops here: the block is freed.
            }
            Mode::Copy => {
                input
                    .read_exact(&mut own)
                    .map_err(|e| format!("consumer: frame {frame}: {e}"))?;
                checksum(&own)
            }
        };
        output
            .write_all(&sum.to_le_bytes())
            .and_then(|()| output.flush())
            .map_err(|e| format!("consumer: answer {frame}: {e}"))?;
    }
    Ok(())
}
