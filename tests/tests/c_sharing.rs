//! Share handles from C (`xalloc_shared_*` of `xalloc.h`), across processes:
//! `tests/c/shared.c`, linked with `lib/libxalloc.a`, in its several modes:
//!
//! - every function in one process (`local`): zeroed new buffers, handles and their buffer
//!   sizes (`ERANGE`), views (read-only: `EPERM`), malformed (`EINVAL`) and changed (`ENOENT`)
//!   handles, send and receive, a second receive (`ENOENT`), 0 bytes;
//! - a second process opens the creator's handle and sees its bytes; the handle of a block
//!   whose references are all gone opens nothing (`ENOENT`);
//! - send and receive between two processes, the receiver's writes seen through a view the
//!   sender kept; a second receive fails (`ENOENT`);
//! - made-up, changed and malformed handles, a view handle given to receive (`EPERM`), and a
//!   handle of another daemon instance (`EXDEV`);
//! - without a daemon the share functions fail with `ENOTCONN` and the program goes on.
//!
//! After the programs exit, `xallocd status --json` must count no shared block.
//!
//! The test binary runs `make -s lib` once; every program is compiled into the daemon's (or a
//! scratch) directory, removed after the test.

mod common;

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::*;

/// The warnings every C file of the repository is held to (the Makefile's `WARN`).
const C_WARN: [&str; 5] = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"];

/// What a static link with `lib/libxalloc.a` needs from the system (the Makefile's
/// `STATIC_LIBS`).
const STATIC_LIBS: [&str; 5] = ["-lutil", "-lrt", "-lpthread", "-lm", "-ldl"];

/// Bytes of the blocks handed between processes: more than a few pages, not a round number.
const SIZE: u64 = (4 << 20) + 123;

// ---------------------------------------------------------------------------------------------
// Building and running (a small copy of `c_library.rs`'s helpers)

/// Runs `cmd` to its end; panics if it cannot be started.
fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd` to its end and panics, with everything it printed, unless it succeeded.
fn run_ok(cmd: &mut Command) -> Output {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `make -s lib` once per test binary: `lib/libxalloc.a` and `lib/xalloc.h`, from the
/// working tree as it is.
fn built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        for tool in ["make", "cc"] {
            let found = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            assert!(found, "`{tool}` is needed by the C library's tests");
        }
        run_ok(
            command("make")
                .args(["-s", "lib"])
                .current_dir(repo())
                .env_remove("CARGO_TARGET_DIR"),
        );
        for f in ["libxalloc.a", "xalloc.h"] {
            assert!(
                repo().join("lib").join(f).is_file(),
                "make lib left no lib/{f}"
            );
        }
    });
}

/// `tests/c/shared.c` compiled with `cc` (C99, the repository's warnings) into `dir/shared`,
/// linked statically with `lib/libxalloc.a`.
fn shared_program(dir: &Path) -> PathBuf {
    built();
    let lib = repo().join("lib");
    let exe = dir.join("shared");
    run_ok(
        command("cc")
            .args(C_WARN)
            .args(["-O2", "-g", "-pthread"])
            .arg("-I")
            .arg(&lib)
            .arg("-o")
            .arg(&exe)
            .arg(repo().join("tests").join("c").join("shared.c"))
            .arg(lib.join("libxalloc.a"))
            .args(STATIC_LIBS),
    );
    exe
}

/// `tests/c/shared.c` compiled into `dir/shared-so`, linked with `lib/libxalloc.so` (which
/// also replaces the program's `malloc`), found through the executable's run path.
fn shared_program_dynamic(dir: &Path) -> PathBuf {
    built();
    let lib = repo().join("lib");
    assert!(
        lib.join("libxalloc.so").is_file(),
        "make lib left no lib/libxalloc.so"
    );
    let exe = dir.join("shared-so");
    run_ok(
        command("cc")
            .args(C_WARN)
            .args(["-O2", "-g", "-pthread"])
            .arg("-I")
            .arg(&lib)
            .arg("-o")
            .arg(&exe)
            .arg(repo().join("tests").join("c").join("shared.c"))
            .arg("-L")
            .arg(&lib)
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .arg("-lxalloc"),
    );
    exe
}

/// `shared ARGS` run to its end by a client of instance `name`.
fn shared(exe: &Path, name: &str, args: &[&str]) -> Output {
    output(command(exe).args(args).env("XALLOC_NAME", name))
}

/// Asserts that `out` exited 0 and printed exactly `want`.
fn assert_printed(out: &Output, want: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout == want,
        "exit {:?}, wanted {want:?}:\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `shared expect OP HANDLE ERRNO` by a client of `name`: the call fails with `errno`.
fn expect_error(exe: &Path, name: &str, op: &str, handle: &str, errno: &str) {
    let out = shared(exe, name, &["expect", op, handle, errno]);
    assert_printed(&out, &format!("{op} errno={errno}\n"));
}

/// A `shared` process that prints a line, then waits for a line on its stdin; killed if the
/// test fails before it ends.
struct Paused {
    child: Option<std::process::Child>,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Paused {
    fn spawn(exe: &Path, name: &str, args: &[&str]) -> Self {
        let mut child = command(exe)
            .args(args)
            .env("XALLOC_NAME", name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Self {
            child: Some(child),
            out,
        }
    }

    /// The word after `KEY ` on the next line the program prints (a handle).
    fn value(&mut self, key: &str) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.strip_prefix(key)
            .and_then(|l| l.strip_prefix(' '))
            .map(|v| v.trim_end().to_owned())
            .unwrap_or_else(|| panic!("wanted `{key} ...`, the program printed {line:?}"))
    }

    /// Lets the program go on; asserts that it exits 0 having printed `rest`.
    fn go(mut self, rest: &str) {
        let mut child = self.child.take().unwrap();
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let mut printed = String::new();
        self.out.read_to_string(&mut printed).unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success() && printed == rest,
            "exit {status:?}, wanted {rest:?}, printed {printed:?}"
        );
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon's side

/// `xallocd status --json`'s `shared_blocks`; panics if the status has no such field.
fn shared_blocks(d: &TestDaemon) -> u64 {
    let out = d.xallocd(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON object");
    status["shared_blocks"]
        .as_u64()
        .unwrap_or_else(|| panic!("`xallocd status --json` has no shared_blocks: {status}"))
}

/// Waits (at most 5 s) until the daemon counts no shared block and no client.
fn wait_no_shares(d: &TestDaemon) {
    let took = d.wait_for(Duration::from_secs(5), || {
        shared_blocks(d) == 0 && d.stat("clients") == 0
    });
    assert!(
        took.is_some(),
        "shared blocks left after every client exited: {:?}\n{}",
        d.status(),
        d.log()
    );
    assert_eq!(d.stat("used_bytes"), 0, "{:?}", d.status());
}

/// The 16 hex digits of the instance a handle's text names.
fn instance_of(handle: &str) -> &str {
    &handle[4..20]
}

/// `handle` with the last digit of its token changed.
fn with_changed_token(handle: &str) -> String {
    let (head, last) = handle.split_at(handle.len() - 1);
    format!("{head}{}", if last == "0" { '1' } else { '0' })
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_share_function_in_one_process() {
    let d = TestDaemon::start("csh-local", &[]);
    for exe in [shared_program(&d.dir), shared_program_dynamic(&d.dir)] {
        local_checks(&d, &exe);
    }
}

/// `shared local` by a client of `d`: every check holds, the handles printed are well formed.
fn local_checks(d: &TestDaemon, exe: &Path) {
    // `cargo test` puts its own directories (with a `libxalloc.so` of cargo's, without the
    // interposer, of whatever build) first in LD_LIBRARY_PATH, which a run path does not
    // override: the repository's is named here.
    let out = run_ok(
        command(exe)
            .arg("local")
            .env("XALLOC_NAME", &d.name)
            .env("LD_LIBRARY_PATH", repo().join("lib")),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let view = lines[0].strip_prefix("handle ").expect("handle line");
    let transfer = lines[1].strip_prefix("transfer ").expect("transfer line");
    assert_eq!(lines[2], "ok local", "{stdout}");
    assert!(view.len() == 63 && view.starts_with("xsv-"), "{view}");
    assert!(
        transfer.len() == 63 && transfer.starts_with("xst-"),
        "{transfer}"
    );
    // Both name the same block of the same instance, with another token.
    assert_eq!(view[3..46], transfer[3..46]);
    assert_ne!(view[47..], transfer[47..]);
    wait_no_shares(d);
}

#[test]
fn another_process_opens_the_handle_and_sees_the_creators_bytes() {
    let d = TestDaemon::start("csh-view", &[]);
    let exe = shared_program(&d.dir);
    let size = SIZE.to_string();
    let mut creator = Paused::spawn(&exe, &d.name, &["create", &size, "7"]);
    let handle = creator.value("handle");
    assert!(handle.len() == 63 && handle.starts_with("xsv-"), "{handle}");
    assert_eq!(shared_blocks(&d), 1);

    // Two viewers, one after the other: the same bytes each time, and the block stays.
    for _ in 0..2 {
        let out = shared(&exe, &d.name, &["view", &handle, &size, "7"]);
        assert_printed(&out, &format!("view ok size={SIZE}\n"));
    }
    // Another pattern does not hold: the viewer's check can fail.
    let out = shared(&exe, &d.name, &["view", &handle, &size, "8"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stdout).contains("FAIL"),
        "{out:?}"
    );
    assert_eq!(shared_blocks(&d), 1);

    creator.go("closed\n");
    wait_no_shares(&d);
    // Its owner and every view gone, the block was freed: the handle opens nothing.
    expect_error(&exe, &d.name, "open", &handle, "ENOENT");
    wait_no_shares(&d);
}

#[test]
fn ownership_moves_to_exactly_one_receiving_process() {
    let d = TestDaemon::start("csh-send", &[]);
    let exe = shared_program(&d.dir);
    let size = SIZE.to_string();
    let mut sender = Paused::spawn(&exe, &d.name, &["send", &size, "3", "9"]);
    let transfer = sender.value("transfer");
    assert!(
        transfer.len() == 63 && transfer.starts_with("xst-"),
        "{transfer}"
    );
    // A transfer handle opens views too.
    let out = shared(&exe, &d.name, &["view", &transfer, &size, "3"]);
    assert_printed(&out, &format!("view ok size={SIZE}\n"));

    // The receiver sees the sender's bytes and writes its own.
    let out = shared(&exe, &d.name, &["receive", &transfer, &size, "3", "9"]);
    assert_printed(&out, &format!("received ok size={SIZE}\n"));
    // Once only.
    expect_error(&exe, &d.name, "receive", &transfer, "ENOENT");

    // The receiver exited (giving the block up); the view the sender kept holds the block,
    // with the receiver's bytes.
    assert_eq!(shared_blocks(&d), 1);
    sender.go("sender view ok\n");
    wait_no_shares(&d);
}

#[test]
fn made_up_changed_malformed_and_other_instance_handles_fail() {
    let d = TestDaemon::start("csh-bad", &[]);
    let other = TestDaemon::start("csh-other", &[]);
    let exe = shared_program(&d.dir);
    let size = SIZE.to_string();
    let mut creator = Paused::spawn(&exe, &d.name, &["create", &size, "5"]);
    let handle = creator.value("handle");
    let instance = instance_of(&handle);

    // Made up, for this instance: no such share.
    let made_up = format!(
        "xsv-{instance}-{:016x}-{:08x}-{:016x}",
        0, 1, 0x5eed_f00d_u64
    );
    expect_error(&exe, &d.name, "open", &made_up, "ENOENT");
    let made_up_transfer = format!("xst{}", &made_up[3..]);
    expect_error(&exe, &d.name, "receive", &made_up_transfer, "ENOENT");
    // The real handle with a changed token.
    expect_error(
        &exe,
        &d.name,
        "open",
        &with_changed_token(&handle),
        "ENOENT",
    );
    // A view handle does not transfer.
    expect_error(&exe, &d.name, "receive", &handle, "EPERM");
    // Not handles at all.
    for bad in [
        &handle[..62],
        &format!("{handle}0"),
        &handle.to_uppercase(),
        &handle.replace('-', "_"),
        "xsv-not-a-handle",
    ] {
        expect_error(&exe, &d.name, "open", bad, "EINVAL");
        expect_error(&exe, &d.name, "receive", bad, "EINVAL");
    }
    // A handle of another instance, used by a client of that one.
    expect_error(&exe, &other.name, "open", &handle, "EXDEV");
    expect_error(&exe, &other.name, "open", &made_up, "EXDEV");

    // None of that disturbed the block.
    let out = shared(&exe, &d.name, &["view", &handle, &size, "5"]);
    assert_printed(&out, &format!("view ok size={SIZE}\n"));
    creator.go("closed\n");
    wait_no_shares(&d);
    wait_no_shares(&other);
}

#[test]
fn a_buffer_too_small_for_the_handle_is_erange() {
    let d = TestDaemon::start("csh-range", &[]);
    let exe = shared_program(&d.dir);
    let out = shared(&exe, &d.name, &["range"]);
    assert_printed(
        &out,
        "handle cap=0 rc=-1 errno=ERANGE untouched=1\n\
         send cap=0 rc=-1 errno=ERANGE untouched=1 owned=1\n\
         handle cap=63 rc=-1 errno=ERANGE untouched=1\n\
         send cap=63 rc=-1 errno=ERANGE untouched=1 owned=1\n\
         handle cap=64 rc=0 length=63\n\
         send cap=64 rc=0 length=63\n",
    );
    // The block was sent and never received: it went with its sender.
    wait_no_shares(&d);
}

#[test]
fn without_a_daemon_the_share_functions_fail_with_enotconn() {
    // No daemon runs for this instance name; the directory goes when `none` is dropped.
    let none = Cleanup::new("csh-none");
    let exe = shared_program(&none.dir);
    let out = shared(&exe, &none.name, &["none"]);
    assert_printed(&out, "none ok new_errno=ENOTCONN\n");
}
