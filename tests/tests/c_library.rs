//! The C library (`capi/`, `xalloc.h`, the root `Makefile`) from the outside:
//!
//! - `tests/c/exercise.c`, linked with `lib/libxalloc.a`, checks every function of the header
//!   (threads, alignments, realloc across the threshold, calloc of reused blocks, stats,
//!   double frees, fork, fork amid threads, quotas), with a daemon and without one;
//! - the header compiles as pedantic C99 and as C++, and links from C++;
//! - the static library exports the header's functions only (and clashes with no symbol of a
//!   program), the shared one those plus the malloc family;
//! - unmodified programs (Python, GNU sort, a C++ program, a C program of the malloc family)
//!   under `LD_PRELOAD=lib/libxalloc.so` print exactly what they print without it, with a
//!   daemon (which sees their blocks and holds none once they exit) and without one;
//! - `make`, `make install` with pkg-config (shared and static), `make uninstall`, and the
//!   `./xalloc` demo.
//!
//! The programs are in `tests/c/`. Each test binary runs `make -s lib xalloc` once; every
//! program is compiled into a directory of the test's own, removed after it.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use common::*;

/// The functions `xalloc.h` declares.
const HEADER_FUNCTIONS: [&str; 17] = [
    "xalloc_malloc",
    "xalloc_calloc",
    "xalloc_realloc",
    "xalloc_aligned_alloc",
    "xalloc_free",
    "xalloc_is_shared",
    "xalloc_usable_size",
    "xalloc_stats",
    "xalloc_shared_new",
    "xalloc_shared_data",
    "xalloc_shared_writable",
    "xalloc_shared_size",
    "xalloc_shared_handle",
    "xalloc_shared_open",
    "xalloc_shared_close",
    "xalloc_shared_send",
    "xalloc_shared_receive",
];

/// What `lib/libxalloc.so` exports besides the header's functions, for `LD_PRELOAD`.
const MALLOC_FAMILY: [&str; 11] = [
    "malloc",
    "free",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "malloc_usable_size",
];

/// The warnings every C file of the repository is held to (the Makefile's `WARN`).
const C_WARN: [&str; 5] = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"];

/// What a static link with `lib/libxalloc.a` needs from the system (the Makefile's
/// `STATIC_LIBS`).
const STATIC_LIBS: [&str; 5] = ["-lutil", "-lrt", "-lpthread", "-lm", "-ldl"];

/// The sections of `tests/c/exercise.c`, in order; `double_free` runs only with a daemon.
const SECTIONS: [&str; 9] = [
    "basics",
    "threads",
    "align",
    "realloc",
    "calloc",
    "stats",
    "double_free",
    "fork",
    "fork_threads",
];

/// Children `exercise`'s `fork_threads` forks while four threads allocate.
const FORKS: usize = 12;

// ---------------------------------------------------------------------------------------------
// Building

/// `lib/` of the repository, where `make lib` leaves the libraries and the header.
fn lib_dir() -> PathBuf {
    repo().join("lib")
}

/// A source of `tests/c/`.
fn c_source(name: &str) -> PathBuf {
    repo().join("tests").join("c").join(name)
}

/// Held while `make` runs or `./xalloc` (which `make` relinks) runs.
fn make_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Panics with a clear message if `tool` cannot be run.
fn need(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "`{tool}` is needed by the C library's tests and cannot be run here; install it \
         (CI's .ci/run does)"
    );
}

/// Runs `cmd` to its end and panics, with everything it printed, unless it succeeded.
fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `make ARGS` in the repository (cargo's target directory is the repository's own, the one
/// the Makefile copies from).
fn make(args: &[&str]) -> Output {
    need("make");
    run_ok(
        command("make")
            .args(args)
            .current_dir(repo())
            .env_remove("CARGO_TARGET_DIR"),
    )
}

/// Runs `make -s lib xalloc` once per test binary: `lib/libxalloc.a`, `lib/libxalloc.so`,
/// `lib/xalloc.h` and `./xalloc`, from the working tree as it is.
fn built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        need("cc");
        let _make = make_lock();
        make(&["-s", "lib", "xalloc"]);
        for f in ["libxalloc.a", "libxalloc.so", "xalloc.h"] {
            assert!(lib_dir().join(f).is_file(), "make lib left no lib/{f}");
        }
        assert!(repo().join("xalloc").is_file(), "make left no ./xalloc");
    });
}

/// A directory of one test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        Self(temp_dir(&unique_name(tag)))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Compiles `tests/c/SOURCE` with `cc` (C99, the repository's warnings) into `out`, linked
/// statically with `lib/libxalloc.a`.
fn static_c_program(source: &str, out: &Path) {
    built();
    run_ok(
        command("cc")
            .args(C_WARN)
            .args(["-O2", "-g", "-pthread"])
            .arg("-I")
            .arg(lib_dir())
            .arg("-o")
            .arg(out)
            .arg(c_source(source))
            .arg(lib_dir().join("libxalloc.a"))
            .args(STATIC_LIBS),
    );
}

/// Compiles `tests/c/SOURCE` into `out` as an unmodified program (no xalloc in it: it runs
/// under `LD_PRELOAD`), with `libs`.
fn plain_c_program(source: &str, out: &Path, libs: &[&str]) {
    run_ok(
        command("cc")
            .args(["-Wall", "-Wextra", "-Werror", "-O2", "-o"])
            .arg(out)
            .arg(c_source(source))
            .args(libs),
    );
}

/// A program that prints a few lines, then waits for a line on its stdin while the test looks
/// at the daemon.
struct Paused {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Paused {
    /// Starts `cmd` with its stdin and stdout piped.
    fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Self { child, out }
    }

    /// What the program printed up to and including the line `last`.
    fn until(&mut self, last: &str) -> String {
        use std::io::BufRead;
        let mut lines = String::new();
        while !lines.ends_with(&format!("{last}\n")) {
            assert!(self.out.read_line(&mut lines).unwrap() > 0, "{lines}");
        }
        lines
    }

    /// Lets the program go on, and returns the rest of what it printed once it exited 0.
    fn go(mut self) -> String {
        use std::io::{Read, Write};
        self.child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        assert!(self.child.wait().unwrap().success(), "{rest}");
        rest
    }
}

/// The absolute path of `lib/libxalloc.so`, for `LD_PRELOAD`.
fn preload_lib() -> PathBuf {
    built();
    lib_dir().join("libxalloc.so")
}

// ---------------------------------------------------------------------------------------------
// Reading what the programs print

/// The numbers of the line `PREFIX k=v k=v ...` of `stdout` (the first such line), by key.
fn facts(stdout: &str, prefix: &str) -> HashMap<String, u64> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no line `{prefix} ...` in:\n{stdout}"));
    line.split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Asserts that `exercise` exited 0, said `ok` for each of `sections` and counted no
/// failure.
fn assert_sections(out: &Output, sections: &[&str]) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "exercise failed ({:?}):\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for s in sections {
        assert!(
            stdout.lines().any(|l| l == format!("ok {s}")),
            "no `ok {s}` in:\n{stdout}"
        );
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("result failures=0\n"), "{stdout}");
    stdout
}

/// The pids of the processes the daemon's log says connected.
fn connected_pids(d: &TestDaemon) -> BTreeSet<u32> {
    d.log()
        .lines()
        .filter_map(|l| {
            l.split(" connected: pid ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Waits until the daemon holds nothing for any client.
fn wait_all_reclaimed(d: &TestDaemon) {
    let took = d.wait_for(Duration::from_secs(10), || {
        let s = d.status();
        s["used_bytes"] == "0" && s["clients"] == "0" && s["live_blocks"] == "0"
    });
    assert!(
        took.is_some(),
        "the daemon still holds blocks after its clients exited: {:?}\n{:?}",
        d.status(),
        d.clients()
    );
}

/// The names of the functions `header` declares: lines that start a declaration (`void
/// *xalloc_malloc(size_t size);`), the identifier right before the `(`.
fn header_functions(header: &str) -> BTreeSet<String> {
    header
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_alphabetic()) && l.contains('('))
        .filter_map(|l| {
            let before = l.split('(').next()?;
            let name = before
                .rsplit(|c: char| c.is_whitespace() || c == '*')
                .next()?;
            name.starts_with("xalloc_").then(|| name.to_owned())
        })
        .collect()
}

/// The defined global symbols of `file` (an archive, or the dynamic symbols of a shared
/// library): `nm -g --defined-only` (`nm -D` for dynamic ones), or, where GNU nm cannot read
/// the objects (an LLVM linker plugin of binutils aborts on Rust's objects on some machines),
/// `readelf`.
fn defined_globals(file: &Path, dynamic: bool) -> BTreeSet<String> {
    let mut nm = command("nm");
    nm.arg(if dynamic { "-D" } else { "-g" })
        .arg("--defined-only")
        .arg(file);
    if let Ok(out) = nm.output() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() && !stderr.contains("LLVM ERROR") {
            return String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    // `ADDRESS TYPE NAME`; archive member headers and blank lines have fewer.
                    (f.len() == 3).then(|| strip_version(f[2]).to_owned())
                })
                .collect();
        }
        eprintln!(
            "nm cannot read {} ({stderr}); using readelf",
            file.display()
        );
    }
    need("readelf");
    let out = run_ok(
        command("readelf")
            .arg(if dynamic { "--dyn-syms" } else { "--syms" })
            .arg("-W")
            .arg(file),
    );
    readelf_symbols(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .filter(|s| s.global && s.defined)
        .map(|s| s.name)
        .collect()
}

/// Asserts `got == want`, naming (at most 20 of) the names one has and the other lacks.
fn assert_same_names(what: &str, got: &BTreeSet<String>, want: &BTreeSet<String>) {
    let extra: Vec<&String> = got.difference(want).take(20).collect();
    let missing: Vec<&String> = want.difference(got).take(20).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{what}: {} names too many ({extra:?}...), {} missing ({missing:?})",
        got.difference(want).count(),
        want.difference(got).count()
    );
}

/// `NAME@VERSION` or `NAME@@VERSION` without its version.
fn strip_version(name: &str) -> &str {
    name.split('@').next().unwrap_or(name)
}

/// One symbol of `readelf -sW`.
struct Symbol {
    name: String,
    global: bool,
    defined: bool,
    /// A function or data object (not a section, a file, a no-type label).
    code_or_data: bool,
}

/// The symbols of `readelf -sW` output: `Num: Value Size Type Bind Vis Ndx Name`.
fn readelf_symbols(out: &str) -> Vec<Symbol> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 || !f[0].ends_with(':') || f[0] == "Num:" {
                return None;
            }
            Some(Symbol {
                name: strip_version(f[7]).to_owned(),
                global: matches!(f[4], "GLOBAL" | "WEAK" | "UNIQUE"),
                defined: f[6] != "UND",
                code_or_data: matches!(f[3], "FUNC" | "OBJECT"),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Every function of xalloc.h from C

#[test]
fn a_c_program_exercises_every_function_against_a_daemon() {
    let d = TestDaemon::start("capi", &["--arena-size", "1G"]);
    let exe = d.dir.join("exercise");
    static_c_program("exercise.c", &exe);

    let out = run_ok(command(&exe).arg("daemon").env("XALLOC_NAME", &d.name));
    let stdout = assert_sections(&out, &SECTIONS);
    let s = facts(&stdout, "stats");
    assert_eq!(s["threshold"], 256 << 10, "{stdout}");
    assert_eq!(s["daemon_pid"], u64::from(d.pid), "{stdout}");
    assert_eq!(s["daemon_arena_bytes"], 1 << 30, "{stdout}");
    assert_eq!(
        s["connections"], 1,
        "one connection for all threads: {stdout}"
    );
    assert!(s["forwarded"] > 250, "{stdout}");
    // One block larger than the whole arena, and nothing else, went to the system allocator.
    assert_eq!(s["fallbacks"], 1, "{stdout}");
    assert_eq!(s["over_quota"], 0, "{stdout}");
    // realloc(p, 0) then free(p); a second free; a pointer inside a block.
    assert_eq!(s["bad_frees"], 3, "{stdout}");
    assert!(
        stdout.contains(&format!("threshold=262144 struct_size={}", 13 * 8)),
        "{stdout}"
    );
    let t = facts(&stdout, "threads");
    assert!(t["large_shared"] >= 200, "{stdout}");
    assert_eq!(t["large_system"], 0, "{stdout}");
    // The forked child made a connection of its own and worked on it, and so did each child
    // forked while other threads were allocating.
    let child = facts(&stdout, "child");
    assert!(child["forwarded"] >= 9, "{stdout}");
    assert_eq!(child["fallbacks"], 0, "{stdout}");
    assert_eq!(child["connections"], 2, "{stdout}");
    assert_eq!(facts(&stdout, "fork_threads")["forks"], FORKS as u64);
    let pids = connected_pids(&d);
    assert!(
        pids.contains(&(child["pid"] as u32)) && pids.len() == 2 + FORKS,
        "the parent and each child connected: {pids:?}\n{}",
        d.log()
    );
    wait_all_reclaimed(&d);

    // In a fresh process, a block freed into the cache and asked for again zeroed comes back
    // zeroed (exercise checks every byte), from the cache.
    let out = run_ok(
        command(&exe)
            .args(["daemon", "calloc"])
            .env("XALLOC_NAME", &d.name),
    );
    let stdout = assert_sections(&out, &["calloc"]);
    assert_eq!(facts(&stdout, "calloc")["reused"], 4, "{stdout}");
    assert!(facts(&stdout, "stats")["cache_hits"] >= 4, "{stdout}");

    // The same with the cache off: every free and every zeroed block goes through the daemon.
    let out = run_ok(
        command(&exe)
            .arg("daemon")
            .env("XALLOC_NAME", &d.name)
            .env("XALLOC_CACHE", "0"),
    );
    let stdout = assert_sections(&out, &SECTIONS);
    let s = facts(&stdout, "stats");
    assert_eq!(s["cache_hits"], 0, "{stdout}");
    assert_eq!(s["cached_bytes"], 0, "{stdout}");
    assert_eq!(s["fallbacks"], 1, "{stdout}");
    wait_all_reclaimed(&d);
    let line = d.stats_line();
    assert!(line.contains("heap check ok"), "{line}");
}

#[test]
fn a_c_program_without_a_daemon_gets_everything_from_the_system_allocator() {
    let scratch = Scratch::new("capi-none");
    let exe = scratch.path("exercise");
    static_c_program("exercise.c", &exe);
    let absent = unique_name("absent");
    let out = run_ok(command(&exe).arg("none").env("XALLOC_NAME", &absent));
    let sections: Vec<&str> = SECTIONS
        .into_iter()
        .filter(|s| *s != "double_free")
        .collect();
    let stdout = assert_sections(&out, &sections);
    assert!(stdout.contains("skip double_free (no arena)"), "{stdout}");
    let s = facts(&stdout, "stats");
    assert_eq!(s["forwarded"], 0, "{stdout}");
    assert!(
        s["fallbacks"] >= 250,
        "every large block is a fallback: {stdout}"
    );
    assert_eq!(s["connections"], 0, "{stdout}");
    assert_eq!(s["daemon_pid"], 0, "{stdout}");
    assert_eq!(s["arena_bytes"], 0, "{stdout}");
    assert_eq!(s["bad_frees"], 0, "{stdout}");
    assert_eq!(s["threshold"], 256 << 10, "{stdout}");
    let t = facts(&stdout, "threads");
    assert_eq!(t["large_shared"], 0, "{stdout}");
    assert!(t["large_system"] >= 200, "{stdout}");
    let child = facts(&stdout, "child");
    assert_eq!(child["forwarded"], 0, "{stdout}");
    assert!(child["fallbacks"] >= 8, "{stdout}");
}

#[test]
fn the_threshold_comes_from_xalloc_threshold() {
    let d = TestDaemon::start("capi-thr", &[]);
    let exe = d.dir.join("exercise");
    static_c_program("exercise.c", &exe);
    // basics checks that threshold - 1 bytes stay small and threshold bytes are shared.
    let out = run_ok(
        command(&exe)
            .args(["daemon", "basics", "stats"])
            .env("XALLOC_NAME", &d.name)
            .env("XALLOC_THRESHOLD", "1M"),
    );
    let stdout = assert_sections(&out, &["basics", "stats"]);
    assert_eq!(facts(&stdout, "stats")["threshold"], 1 << 20, "{stdout}");
    wait_all_reclaimed(&d);
}

#[test]
fn refusals_over_quota_are_counted_and_served_by_malloc() {
    let d = TestDaemon::start("capi-quota", &["--client-quota", "4M"]);
    let exe = d.dir.join("exercise");
    static_c_program("exercise.c", &exe);
    for cache in ["128M", "0"] {
        let out = run_ok(
            command(&exe)
                .args(["daemon", "quota"])
                .env("XALLOC_NAME", &d.name)
                .env("XALLOC_CACHE", cache),
        );
        let stdout = assert_sections(&out, &["quota"]);
        // Eight blocks of 1 MiB held at once: four fit the quota, four are refused.
        let q = facts(&stdout, "quota");
        assert_eq!((q["shared"], q["over_quota"]), (4, 4), "{stdout}");
        let s = facts(&stdout, "stats");
        assert_eq!((s["forwarded"], s["fallbacks"], s["over_quota"]), (4, 4, 4));
        wait_all_reclaimed(&d);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The header

#[test]
fn the_header_compiles_as_c99_and_as_cxx_and_links_from_cxx() {
    built();
    need("g++");
    let scratch = Scratch::new("capi-header");
    let header = std::fs::read(lib_dir().join("xalloc.h")).unwrap();
    assert_eq!(
        header,
        std::fs::read(repo().join("capi/include/xalloc.h")).unwrap(),
        "lib/xalloc.h is capi/include/xalloc.h"
    );
    // The header alone, first in its file, under more warnings than the repository's.
    for std in ["-std=c99", "-std=c11"] {
        run_ok(
            command("cc")
                .arg(std)
                .args(["-Wall", "-Wextra", "-Werror", "-pedantic"])
                .args([
                    "-Wstrict-prototypes",
                    "-Wmissing-prototypes",
                    "-Wold-style-definition",
                ])
                .args(["-Wundef", "-Wshadow", "-Wcast-qual", "-Wconversion", "-c"])
                .arg("-I")
                .arg(lib_dir())
                .arg("-o")
                .arg(scratch.path("header_only.o"))
                .arg(c_source("header_only.c")),
        );
    }
    for std in ["-std=c++98", "-std=c++17"] {
        run_ok(
            command("g++")
                .args([
                    "-x",
                    "c++",
                    std,
                    "-Wall",
                    "-Wextra",
                    "-Werror",
                    "-pedantic",
                    "-c",
                ])
                .arg("-I")
                .arg(lib_dir())
                .arg("-o")
                .arg(scratch.path("header_only_cxx.o"))
                .arg(c_source("header_only.c")),
        );
    }
    // A C++ program calling every function, linked with the static library: the names link
    // (extern "C") and work.
    let exe = scratch.path("cxx_check");
    run_ok(
        command("g++")
            .args([
                "-std=c++11",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pedantic",
                "-O2",
            ])
            .arg("-I")
            .arg(lib_dir())
            .arg("-o")
            .arg(&exe)
            .arg(c_source("cxx_check.cpp"))
            .arg(lib_dir().join("libxalloc.a"))
            .args(STATIC_LIBS),
    );
    let out = run_ok(
        command(&exe)
            .arg("none")
            .env("XALLOC_NAME", unique_name("absent")),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("cxx shared=0 forwarded=0 fallbacks=3\ncxx ok\n"),
        "{stdout}"
    );
    // The static link line the header itself gives: `cc prog.c -Ilib -Llib -l:libxalloc.a
    // -lpthread -ldl -lm`.
    let documented = scratch.path("documented");
    run_ok(
        command("cc")
            .args(C_WARN)
            .arg(c_source("pkg_hello.c"))
            .arg("-I")
            .arg(lib_dir())
            .arg("-L")
            .arg(lib_dir())
            .args(["-l:libxalloc.a", "-lpthread", "-ldl", "-lm", "-o"])
            .arg(&documented),
    );
    let d = TestDaemon::start("capi-cxx", &[]);
    let out = run_ok(command(&exe).arg("daemon").env("XALLOC_NAME", &d.name));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("cxx shared=1 forwarded=3 fallbacks=0\ncxx ok\n"),
        "{stdout}"
    );
    let out = run_ok(
        command(&documented)
            .arg("daemon")
            .env("XALLOC_NAME", &d.name),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "pkg ok shared=1 stats_size=104\n"
    );
    wait_all_reclaimed(&d);
}

// ---------------------------------------------------------------------------------------------
// 3. Symbols

#[test]
fn the_libraries_export_the_header_functions_and_the_shared_one_the_malloc_family() {
    built();
    let header = std::fs::read_to_string(lib_dir().join("xalloc.h")).unwrap();
    let declared = header_functions(&header);
    let expected: BTreeSet<String> = HEADER_FUNCTIONS.iter().map(|s| s.to_string()).collect();
    assert_eq!(declared, expected, "the functions xalloc.h declares");

    let a = defined_globals(&lib_dir().join("libxalloc.a"), false);
    assert_same_names(
        "the globals lib/libxalloc.a defines (exactly the header's functions)",
        &a,
        &declared,
    );
    for f in MALLOC_FAMILY {
        assert!(!a.contains(f), "lib/libxalloc.a defines {f}");
    }

    let so = defined_globals(&lib_dir().join("libxalloc.so"), true);
    let mut want = declared.clone();
    want.extend(MALLOC_FAMILY.iter().map(|s| s.to_string()));
    assert_same_names(
        "what lib/libxalloc.so exports (the header's functions and the malloc family)",
        &so,
        &want,
    );
}

/// A program that defines, itself, every function and object name of the Rust code inside
/// `lib/libxalloc.a` (its std, its crates, `rust_eh_personality`...) links with it and runs:
/// the archive keeps all of them local, so it never clashes with the program or with another
/// Rust library linked beside it.
#[test]
fn a_static_link_does_not_clash_with_the_programs_own_symbols() {
    built();
    need("readelf");
    let out = run_ok(
        command("readelf")
            .arg("-sW")
            .arg(lib_dir().join("libxalloc.a")),
    );
    let names: BTreeSet<String> = readelf_symbols(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .filter(|s| s.defined && s.code_or_data && !s.global)
        .map(|s| s.name)
        .filter(|n| {
            (n.starts_with("_ZN")
                || n.starts_with("_R")
                || n.starts_with("rust_")
                || n.starts_with("__rust_"))
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.$".contains(c))
        })
        .collect();
    assert!(
        names.len() > 100 && names.contains("rust_eh_personality"),
        "the Rust code's symbols, made local: {} of them",
        names.len()
    );
    let mut src = String::from("#include \"xalloc.h\"\n#include <stdio.h>\n");
    for (i, n) in names.iter().enumerate() {
        src += &format!("char clash_{i} __asm__(\"{n}\");\nchar clash_{i} = 1;\n");
    }
    src += &[
        "int main(void)",
        "{",
        "    unsigned char *p = xalloc_malloc(1 << 20);",
        "    if (p == NULL)",
        "        return 1;",
        "    p[0] = 1;",
        "    xalloc_free(p);",
        &format!(
            "    printf(\"clash ok %d\\n\", clash_0 + clash_{});",
            names.len() - 1
        ),
        "    return 0;",
        "}",
        "",
    ]
    .join("\n");
    let scratch = Scratch::new("capi-clash");
    std::fs::write(scratch.path("clash.c"), src).unwrap();
    let exe = scratch.path("clash");
    run_ok(
        command("cc")
            .args(C_WARN)
            .arg("-I")
            .arg(lib_dir())
            .arg("-o")
            .arg(&exe)
            .arg(scratch.path("clash.c"))
            .arg(lib_dir().join("libxalloc.a"))
            .args(STATIC_LIBS),
    );
    let out = run_ok(command(&exe).env("XALLOC_NAME", unique_name("absent")));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "clash ok 2\n");
}

#[test]
fn libxalloc_a_links_beside_another_rust_static_library() {
    built();
    need("rustc");
    let d = TestDaemon::start("capi-tworust", &[]);
    let other = d.dir.join("libother.a");
    run_ok(
        command("rustc")
            .args(["--edition", "2021", "-O", "--crate-type", "staticlib", "-o"])
            .arg(&other)
            .arg(c_source("other_rust.rs")),
    );
    let archives = [lib_dir().join("libxalloc.a"), other];
    // Both link orders, position-independent or not: the two standard libraries' personality
    // routines must not be folded into one (the other's panic is caught either way).
    for (i, reverse) in [false, true].into_iter().enumerate() {
        for pie in ["-pie", "-no-pie"] {
            let exe = d.dir.join(format!("two-{i}{pie}"));
            let mut cc = command("cc");
            cc.args(C_WARN)
                .arg(pie)
                .arg("-I")
                .arg(lib_dir())
                .arg("-o")
                .arg(&exe)
                .arg(c_source("two_rust_libs.c"));
            if reverse {
                cc.args(archives.iter().rev());
            } else {
                cc.args(&archives);
            }
            run_ok(cc.args(STATIC_LIBS));
            let out = command(&exe).env("XALLOC_NAME", &d.name).output().unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "two 46 1021 shared=1\n",
                "order {i} {pie}: {out:?}"
            );
            assert!(out.status.success(), "order {i} {pie}: {out:?}");
        }
    }
}

#[test]
fn realloc_moves_a_glibc_block_whatever_the_link_order_and_shrinking_gives_memory_back() {
    built();
    let d = TestDaemon::start("capi-edges", &["--arena-size", "256M"]);
    let src = c_source("realloc_edges.c");
    // Linked with the shared library after libc (its malloc then is glibc's), before it (its
    // malloc is the interposer's), and statically.
    let links: [(&str, Vec<OsString>); 3] = [
        (
            "libc-first",
            ["-Wl,--no-as-needed", "-lc", "-L"]
                .map(OsString::from)
                .into_iter()
                .chain([lib_dir().into_os_string(), "-lxalloc".into()])
                .collect(),
        ),
        (
            "xalloc-first",
            vec!["-L".into(), lib_dir().into_os_string(), "-lxalloc".into()],
        ),
        (
            "static",
            std::iter::once(lib_dir().join("libxalloc.a").into_os_string())
                .chain(STATIC_LIBS.map(OsString::from))
                .collect(),
        ),
    ];
    for (how, args) in links {
        let exe = d.dir.join(format!("edges-{how}"));
        run_ok(
            command("cc")
                .args(C_WARN)
                .arg("-I")
                .arg(lib_dir())
                .arg("-o")
                .arg(&exe)
                .arg(&src)
                .args(&args),
        );
        let out = command(&exe)
            .env("XALLOC_NAME", &d.name)
            .env("LD_LIBRARY_PATH", lib_dir())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{how}: {stdout}");
        assert_eq!(stdout, "ok order\nok shrink\nedges shared=4\n", "{how}");
    }
    wait_all_reclaimed(&d);
}

#[test]
fn blocks_of_a_daemon_that_stopped_stay_readable_and_are_uncounted_once_freed() {
    built();
    let d = TestDaemon::start("capi-dead", &["--arena-size", "256M"]);
    let exe = d.dir.join("dead_daemon");
    static_c_program("dead_daemon.c", &exe);
    let mut program = Paused::spawn(command(&exe).env("XALLOC_NAME", &d.name));
    assert_eq!(program.until("held"), "held\n");
    let stop = d.xallocd(&["stop"]);
    assert!(stop.status.success(), "{stop:?}");
    assert_eq!(program.go(), "dead blocks=0 bytes=0 kept=1\n");
}

// ---------------------------------------------------------------------------------------------
// 4. LD_PRELOAD into unmodified programs

/// How a program runs: on its own, preloaded with a daemon, preloaded without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Plain,
    Daemon,
    NoDaemon,
}

/// `program ARGS` as `variant` (`daemon` names the instance for [`Variant::Daemon`]).
fn preloaded(program: &Path, args: &[&OsStr], variant: Variant, daemon: &str) -> Command {
    let mut c = command(program);
    c.args(args);
    match variant {
        Variant::Plain => {}
        Variant::Daemon => {
            c.env("LD_PRELOAD", preload_lib())
                .env("XALLOC_NAME", daemon);
        }
        Variant::NoDaemon => {
            c.env("LD_PRELOAD", preload_lib())
                .env("XALLOC_NAME", unique_name("absent"));
        }
    }
    c
}

/// Runs `program ARGS` plainly, preloaded against a daemon of its own and preloaded without a
/// daemon, and returns `result` of each run (what it printed, or what it wrote) and the
/// daemon, after checking that the preloaded run made at least
/// `min_requests` requests of the daemon, that the program's own process connected, and that
/// the daemon holds nothing once it exited.
fn three_ways(
    tag: &str,
    program: &Path,
    args: &[&OsStr],
    min_requests: u64,
    mut result: impl FnMut(Variant, &Output) -> Vec<u8>,
) -> ([Vec<u8>; 3], TestDaemon) {
    let d = TestDaemon::start(tag, &["--arena-size", "512M"]);
    let mut results: [Vec<u8>; 3] = Default::default();
    for (i, variant) in [Variant::Plain, Variant::Daemon, Variant::NoDaemon]
        .into_iter()
        .enumerate()
    {
        let before = d.stat("requests");
        let child = preloaded(program, args, variant, &d.name)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{} {args:?} ({variant:?}) failed ({:?}):\n{}\n--- stderr\n{}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let requests = d.stat("requests") - before;
        if variant == Variant::Daemon {
            assert!(
                requests >= min_requests,
                "{} made {requests} requests of the daemon, expected at least {min_requests}",
                program.display()
            );
            assert!(
                connected_pids(&d).contains(&pid),
                "process {pid} ({}) never connected:\n{}",
                program.display(),
                d.log()
            );
            wait_all_reclaimed(&d);
        } else {
            assert_eq!(requests, 0, "{variant:?} reached the daemon");
        }
        results[i] = result(variant, &out);
    }
    (results, d)
}

/// Asserts the three results are byte for byte the same.
fn assert_same(what: &str, r: &[Vec<u8>; 3]) {
    assert!(!r[0].is_empty(), "{what}: the plain run printed nothing");
    assert!(
        r[1] == r[0],
        "{what} under LD_PRELOAD with a daemon printed\n{}\ninstead of\n{}",
        String::from_utf8_lossy(&r[1]),
        String::from_utf8_lossy(&r[0])
    );
    assert!(
        r[2] == r[0],
        "{what} under LD_PRELOAD without a daemon printed\n{}\ninstead of\n{}",
        String::from_utf8_lossy(&r[2]),
        String::from_utf8_lossy(&r[0])
    );
}

/// The Python interpreter itself (not a wrapper script such as pyenv's shim, which would be
/// the process preloaded first).
fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            need("python3");
            let out = run_ok(command("python3").args(["-c", "import sys; print(sys.executable)"]));
            PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        })
        .clone()
}

#[test]
fn python_on_big_buffers_prints_the_same_under_ld_preload() {
    let script = c_source("bigbuffers.py");
    let args = [script.as_os_str(), OsStr::new("work")];
    let (r, _d) = three_ways("capi-py", &python(), &args, 20, |_, out| out.stdout.clone());
    assert_same("python3 bigbuffers.py work", &r);
    let text = String::from_utf8_lossy(&r[0]);
    assert!(text.contains("repeat64 67108864 "), "{text}");
    assert_eq!(text.lines().count(), 12, "{text}");
}

#[test]
fn python_forking_and_executing_under_ld_preload_works() {
    need("sort");
    let script = c_source("bigbuffers.py");
    let args = [script.as_os_str(), OsStr::new("spawn")];
    let (r, d) = three_ways("capi-spawn", &python(), &args, 5, |_, out| {
        out.stdout.clone()
    });
    assert_same("python3 bigbuffers.py spawn", &r);
    let text = String::from_utf8_lossy(&r[0]);
    assert!(text.contains(" status 0\n"), "{text}");
    assert!(text.contains("fork-exec-sort status 0 "), "{text}");
    assert!(text.contains("subprocess-python 50331648\n"), "{text}");
    // Python, its forked child, the sort it executed in another child, the sort and the
    // Python that subprocess ran: each connected as a process of its own.
    let pids = connected_pids(&d);
    assert!(pids.len() >= 5, "{pids:?}\n{}", d.log());
}

#[test]
fn gnu_sort_of_200_mib_sorts_the_same_under_ld_preload() {
    need("sort");
    need("sha256sum");
    let scratch = Scratch::new("capi-sort");
    let gen = scratch.path("gen_lines");
    static_c_program("gen_lines.c", &gen);
    let input = scratch.path("input");
    run_ok(command(&gen).arg(&input).arg("200"));
    let tmp = scratch.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let output = scratch.path("sorted");
    let sort = PathBuf::from("sort");
    let args = [
        OsStr::new("-S"),
        OsStr::new("64M"),
        OsStr::new("-T"),
        tmp.as_os_str(),
        OsStr::new("-o"),
        output.as_os_str(),
        input.as_os_str(),
    ];
    let (r, _d) = three_ways("capi-sort", &sort, &args, 1, |_, _| {
        let out = run_ok(command("sha256sum").arg(&output));
        std::fs::remove_file(&output).unwrap();
        out.stdout.split(|&b| b == b' ').next().unwrap().to_vec()
    });
    assert_same("sort -S 64M (sha256 of its output)", &r);
    assert_eq!(r[0].len(), 64, "{}", String::from_utf8_lossy(&r[0]));
}

#[test]
fn a_cxx_program_growing_vectors_in_threads_prints_the_same_under_ld_preload() {
    built();
    need("g++");
    let scratch = Scratch::new("capi-vectors");
    let exe = scratch.path("vectors");
    run_ok(
        command("g++")
            .args(["-O2", "-pthread", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&exe)
            .arg(c_source("vectors.cpp")),
    );
    let (r, _d) = three_ways("capi-vectors", &exe, &[OsStr::new("4")], 20, |_, out| {
        out.stdout.clone()
    });
    assert_same("vectors 4", &r);
    let text = String::from_utf8_lossy(&r[0]);
    assert_eq!(text.matches(" checksum ").count(), 5, "{text}");
}

/// C's malloc family as an unmodified C program calls it (`tests/c/family.c`): the same
/// checks hold with glibc's and with the interposer's, with a daemon (large blocks in the
/// arena, found through the preloaded `xalloc_is_shared`) and without one.
#[test]
fn the_malloc_family_under_ld_preload_keeps_glibcs_contract() {
    built();
    let d = TestDaemon::start("capi-family", &["--arena-size", "256M"]);
    let exe = d.dir.join("family");
    run_ok(
        command("cc")
            .args(C_WARN)
            .args(["-O2", "-g", "-pthread", "-o"])
            .arg(&exe)
            .arg(c_source("family.c"))
            .arg("-ldl"),
    );
    let sections = ["malloc", "calloc", "realloc", "aligned", "threads", "fork"];
    let out = run_ok(&mut preloaded(
        &exe,
        &[OsStr::new("plain")],
        Variant::Plain,
        &d.name,
    ));
    let stdout = assert_sections(&out, &sections);
    assert!(stdout.contains("family shared=0 system=0\n"), "{stdout}");

    let child = preloaded(&exe, &[OsStr::new("daemon")], Variant::Daemon, &d.name)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = assert_sections(&out, &sections);
    assert!(stdout.contains("ok double_free\n"), "{stdout}");
    let f = facts(&stdout, "family");
    assert!(f["shared"] >= 200, "{stdout}");
    assert_eq!(f["system"], 0, "{stdout}");
    assert!(connected_pids(&d).contains(&pid), "{}", d.log());
    wait_all_reclaimed(&d);

    let out = run_ok(&mut preloaded(
        &exe,
        &[OsStr::new("none")],
        Variant::NoDaemon,
        &d.name,
    ));
    let stdout = assert_sections(&out, &sections);
    let f = facts(&stdout, "family");
    assert_eq!(f["shared"], 0, "{stdout}");
    assert!(f["system"] >= 200, "{stdout}");
}

#[test]
fn a_constructor_that_runs_before_the_interposers_own_allocates_through_it() {
    built();
    let d = TestDaemon::start("capi-early", &["--arena-size", "256M"]);
    let early = d.dir.join("libearly.so");
    run_ok(
        command("cc")
            .args([
                "-Wall", "-Wextra", "-Werror", "-O2", "-shared", "-fPIC", "-o",
            ])
            .arg(&early)
            .arg(c_source("early.c"))
            .arg("-ldl"),
    );
    let xalloc = preload_lib();
    // Both orders: the dynamic linker runs the constructors of unrelated preloaded libraries
    // in reverse load order, so one of them runs early.c's before libxalloc.so's.
    for order in [[&early, &xalloc], [&xalloc, &early]] {
        let preload = format!("{} {}", order[0].display(), order[1].display());
        for (name, want_shared) in [(d.name.clone(), 8), (unique_name("absent"), 0)] {
            let out = run_ok(
                command("sh")
                    .args(["-c", "echo hello"])
                    .env("LD_PRELOAD", &preload)
                    .env("XALLOC_NAME", &name),
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.stdout, b"hello\n", "{preload}: {stderr}");
            assert!(
                stderr.contains(&format!("early shared={want_shared} ok=1\n")),
                "{preload} (instance {name}): {stderr}"
            );
        }
    }
    wait_all_reclaimed(&d);
}

#[test]
fn children_made_without_fork_handlers_use_connections_of_their_own() {
    built();
    let d = TestDaemon::start("capi-rawfork", &["--arena-size", "256M"]);
    let exe = d.dir.join("raw_fork");
    plain_c_program("raw_fork.c", &exe, &["-ldl"]);
    let out = preloaded(&exe, &[], Variant::Daemon, &d.name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout,
        "rawfork mode=0 child_shared=8 parent_ok=1\nrawfork mode=1 child_shared=8 parent_ok=1\n"
    );
    wait_all_reclaimed(&d);
}

#[test]
fn a_program_that_closes_every_descriptor_keeps_its_blocks_and_files() {
    built();
    let d = TestDaemon::start("capi-closefds", &["--arena-size", "256M"]);
    let exe = d.dir.join("close_fds");
    plain_c_program("close_fds.c", &exe, &[]);
    let mut program = Paused::spawn(&mut preloaded(&exe, &[], Variant::Daemon, &d.name));
    let lines = program.until("ready");
    assert!(
        lines.starts_with("closefds held=1 injected=0 child_ok=1 private=1 shared_after=20\n"),
        "{lines}"
    );
    // The process lives, with its 8 MiB block: the daemon kept what it holds, though its
    // connection was closed under it.
    assert!(d.stat("used_bytes") >= 8 << 20, "{}", d.log());
    assert!(
        d.log()
            .contains("closed its connection but its process lives"),
        "{}",
        d.log()
    );
    assert_eq!(program.go(), "closefds held_at_end=1\n");
    wait_all_reclaimed(&d);

    // Closing every descriptor, then exec: the new program does not map the channel. The
    // daemon sees that when it handles the hang-up after the exec, or, if it handled it in
    // between (the process still mapped its channel), when it looks again at such clients
    // (every second): either way, while the new program runs.
    let mut program = Paused::spawn(&mut preloaded(
        &exe,
        &[OsStr::new("exec"), OsStr::new("sleep"), OsStr::new("5")],
        Variant::Daemon,
        &d.name,
    ));
    assert_eq!(program.until("holding"), "holding\n");
    let freed = d.wait_for(Duration::from_secs(4), || d.stat("used_bytes") == 0);
    assert!(
        freed.is_some() && program.child.try_wait().unwrap().is_none(),
        "not reclaimed while the new program ran: {}",
        d.log()
    );
    program.child.wait().unwrap();
}

// ---------------------------------------------------------------------------------------------
// 5. make, make install, pkg-config, make uninstall, ./xalloc

#[test]
fn make_install_pkg_config_and_uninstall() {
    built();
    need("pkg-config");
    need("readelf");
    let prefix = Scratch::new("capi-prefix");
    let p = &prefix.0;
    {
        let _make = make_lock();
        make(&["-s"]);
        for f in [
            "lib/libxalloc.a",
            "lib/libxalloc.so",
            "lib/xalloc.h",
            "xalloc",
        ] {
            assert!(repo().join(f).is_file(), "make left no {f}");
        }
        make(&["-s", "install", &format!("PREFIX={}", p.display())]);
    }
    let installed = [
        "include/xalloc.h",
        "lib/libxalloc.a",
        "lib/libxalloc.so",
        "lib/pkgconfig/xalloc.pc",
        "lib/pkgconfig/xalloc-static.pc",
        "bin/xallocd",
        "lib/systemd/system/xallocd.service",
    ];
    for f in installed {
        assert!(p.join(f).is_file(), "make install left no {f}");
    }
    assert_eq!(
        std::fs::read(p.join("include/xalloc.h")).unwrap(),
        std::fs::read(lib_dir().join("xalloc.h")).unwrap()
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| std::fs::metadata(p.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("bin/xallocd"), 0o755);
        assert_eq!(mode("lib/libxalloc.so"), 0o755);
        assert_eq!(mode("include/xalloc.h"), 0o644);
    }
    let help = run_ok(command(p.join("bin/xallocd")).args(["start", "--help"]));
    assert!(!help.stdout.is_empty());
    let unit = std::fs::read_to_string(p.join("lib/systemd/system/xallocd.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("no ExecStart in the unit:\n{unit}"));
    assert!(
        exec.starts_with(&format!("{}/bin/xallocd start ", p.display())),
        "ExecStart={exec}"
    );

    let pkg_config = |package: &str| -> Vec<String> {
        let out = run_ok(
            command("pkg-config")
                .args(["--cflags", "--libs", package])
                .env("PKG_CONFIG_PATH", p.join("lib/pkgconfig")),
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let needed = |exe: &Path| -> String {
        let out = run_ok(command("readelf").arg("-dW").arg(exe));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("(NEEDED)"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let d = TestDaemon::start("capi-pkg", &[]);

    // Shared: -lxalloc is the installed libxalloc.so.
    let flags = pkg_config("xalloc");
    assert!(
        flags.contains(&format!("-I{}/include", p.display()))
            && flags.contains(&"-lxalloc".to_owned()),
        "{flags:?}"
    );
    let shared = prefix.path("hello-shared");
    run_ok(
        command("cc")
            .args(C_WARN)
            .arg("-o")
            .arg(&shared)
            .arg(c_source("pkg_hello.c"))
            .args(&flags),
    );
    assert!(
        needed(&shared).contains("[libxalloc.so]"),
        "{}",
        needed(&shared)
    );
    let out = run_ok(
        command(&shared)
            .arg("daemon")
            .env("LD_LIBRARY_PATH", p.join("lib"))
            .env("XALLOC_NAME", &d.name),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "pkg ok shared=1 stats_size=104\n"
    );

    // Static: xalloc-static names the archive itself, so that the linker takes it and not the
    // shared library beside it, and adds what the archive needs.
    let flags = pkg_config("xalloc-static");
    let archive = format!("{}/lib/libxalloc.a", p.display());
    assert!(flags.contains(&archive), "{flags:?}");
    let fixed = prefix.path("hello-static");
    run_ok(
        command("cc")
            .args(C_WARN)
            .arg("-o")
            .arg(&fixed)
            .arg(c_source("pkg_hello.c"))
            .args(&flags),
    );
    assert!(!needed(&fixed).contains("libxalloc"), "{}", needed(&fixed));
    let out = run_ok(command(&fixed).arg("daemon").env("XALLOC_NAME", &d.name));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "pkg ok shared=1 stats_size=104\n"
    );
    let out = run_ok(
        command(&fixed)
            .arg("none")
            .env("XALLOC_NAME", unique_name("absent")),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "pkg ok shared=0 stats_size=104\n"
    );
    wait_all_reclaimed(&d);

    make(&["-s", "uninstall", &format!("PREFIX={}", p.display())]);
    for f in installed {
        assert!(!p.join(f).exists(), "make uninstall left {f}");
    }
}

#[test]
fn the_demo_finds_the_daemon_or_exits_2() {
    built();
    let xalloc = repo().join("xalloc");
    let d = TestDaemon::start("capi-demo", &[]);
    let out = {
        let _make = make_lock();
        run_ok(
            command(&xalloc)
                .arg("--require-daemon")
                .env("XALLOC_NAME", &d.name),
        )
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("xalloc: daemon '{}' found (pid {}", d.name, d.pid)),
        "{stdout}"
    );
    assert!(
        stdout.contains("xalloc: every block held its bytes"),
        "{stdout}"
    );
    wait_all_reclaimed(&d);

    let absent = unique_name("absent");
    let out = {
        let _make = make_lock();
        command(&xalloc)
            .arg("--require-daemon")
            .env("XALLOC_NAME", &absent)
            .output()
            .unwrap()
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains(&format!("no daemon answers for instance '{absent}'")),
        "{stdout}"
    );
}
