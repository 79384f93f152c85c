//! The default pidfile directory: `$XDG_RUNTIME_DIR/xalloc`, `/tmp/xalloc-UID`, and root's
//! `/run/xalloc`. `start` creates it 0700 and refuses it when another user owns it, when its
//! group or others may write it, or when it is a symbolic link; a pidfile that is a symbolic
//! link (or another user's file) is never written, and `stop` never signals a pid read from a
//! pidfile another user could have planted.
//!
//! Each test runs xallocd as a user of its own ([`USER`], or root for `/run/xalloc`) against a
//! private copy of the directory's parent: `$XDG_RUNTIME_DIR` pointed at a private directory, or
//! a private directory bind-mounted on /tmp or /run in a private mount namespace (one per
//! command; the daemon keeps its own). The real /tmp/xalloc-UID and /run/xalloc are never
//! touched. Needs root (to switch users and mount); CI runs as root, where a missing privilege
//! fails the test instead of skipping it.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// The user that runs xallocd in the per-user forms (no passwd entry needed).
const USER: u32 = 4243;
/// Another user, who plants directories and files.
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    common::is_root("to run xallocd as another user in a private /tmp")
}

/// Which default directory a case exercises.
#[derive(Clone, Copy, Debug)]
enum Form {
    /// `$XDG_RUNTIME_DIR/xalloc`, run as [`USER`].
    Xdg,
    /// `/tmp/xalloc-UID`, run as [`USER`] with no `$XDG_RUNTIME_DIR`.
    Tmp,
    /// `/run/xalloc`, run as root.
    Run,
}

const FORMS: [Form; 3] = [Form::Xdg, Form::Tmp, Form::Run];

/// One instance, its private directory, and the form of default directory it uses. Dropping
/// it kills (by pidfd) any daemon and keeper of its instance name, then removes its objects and
/// directory.
struct Case {
    form: Form,
    guard: Cleanup,
}

impl Case {
    fn new(tag: &str, form: Form) -> Self {
        let guard = Cleanup::new(tag);
        // Traversable by USER whatever the test's umask.
        set_mode(&guard.dir, 0o755);
        let case = Self { form, guard };
        let parent = case.parent_host();
        std::fs::create_dir(&parent).unwrap();
        match form {
            Form::Xdg => {
                chown(&parent, USER);
                set_mode(&parent, 0o700);
            }
            Form::Tmp => set_mode(&parent, 0o1777),
            Form::Run => set_mode(&parent, 0o755),
        }
        case
    }

    fn name(&self) -> &str {
        &self.guard.name
    }

    /// The user that runs xallocd.
    fn uid(&self) -> u32 {
        match self.form {
            Form::Xdg | Form::Tmp => USER,
            Form::Run => 0,
        }
    }

    /// The default directory's parent, as this test sees it.
    fn parent_host(&self) -> PathBuf {
        self.guard.dir.join(match self.form {
            Form::Xdg => "xdg-runtime",
            Form::Tmp => "tmp",
            Form::Run => "run",
        })
    }

    /// The default directory's parent, as xallocd sees it.
    fn parent_seen(&self) -> PathBuf {
        match self.form {
            Form::Xdg => self.parent_host(),
            Form::Tmp => PathBuf::from("/tmp"),
            Form::Run => PathBuf::from("/run"),
        }
    }

    fn leaf(&self) -> String {
        match self.form {
            Form::Xdg | Form::Run => "xalloc".to_owned(),
            Form::Tmp => format!("xalloc-{USER}"),
        }
    }

    /// The default directory, as this test sees it.
    fn dir_host(&self) -> PathBuf {
        self.parent_host().join(self.leaf())
    }

    /// The default directory, as xallocd sees it (and names it in messages).
    fn dir_seen(&self) -> String {
        self.parent_seen().join(self.leaf()).display().to_string()
    }

    /// The default pidfile, as this test sees it.
    fn pidfile_host(&self) -> PathBuf {
        self.dir_host().join(format!("{}.pid", self.name()))
    }

    /// The default pidfile, as xallocd sees it.
    fn pidfile_seen(&self) -> String {
        format!("{}/{}.pid", self.dir_seen(), self.name())
    }

    /// Runs `xallocd ARGS --name NAME` as [`Case::uid`] with umask 022, in its form's world.
    fn xallocd(&self, args: &[&str]) -> Output {
        let setpriv = match self.uid() {
            0 => String::new(),
            u => format!("setpriv --reuid {u} --regid {u} --clear-groups "),
        };
        // The private directory covers /tmp (or /run). If the daemon's binary lives below it
        // (a checkout in /tmp), it is bound to the same path inside the private directory
        // first, and the directory is bound recursively, so that the path still works.
        let cover = |top: &str| {
            format!(
                r#"case "$1" in {top}/*) rel="${{1#{top}}}" && mkdir -p "$0$(dirname "$rel")" && \
                   touch "$0$rel" && mount --bind "$1" "$0$rel";; esac && \
                   mount --rbind "$0" {top} && "#
            )
        };
        let mount = match self.form {
            Form::Xdg => String::new(),
            Form::Tmp => cover("/tmp"),
            Form::Run => cover("/run"),
        };
        let script = format!(r#"umask 022 && {mount}exec {setpriv}"$@""#);
        let mut cmd = match self.form {
            Form::Xdg => Command::new("sh"),
            Form::Tmp | Form::Run => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh"]);
                c
            }
        };
        cmd.arg("-c")
            .arg(script)
            .arg(self.parent_host())
            .arg(XALLOCD)
            .args(args)
            .arg("--name")
            .arg(self.name())
            .current_dir("/");
        match self.form {
            Form::Xdg => cmd.env("XDG_RUNTIME_DIR", self.parent_host()),
            Form::Tmp | Form::Run => cmd.env_remove("XDG_RUNTIME_DIR"),
        };
        cmd.output().expect("run xallocd")
    }

    /// `xallocd start` with a small arena, logging nowhere, plus `extra`.
    fn start(&self, extra: &[&str]) -> Output {
        let mut args = vec![
            "start",
            "--arena-size",
            "1M",
            "--syslog-socket",
            "/dev/null/no-syslog",
        ];
        args.extend_from_slice(extra);
        self.xallocd(&args)
    }

    /// Makes the default directory, owned by `uid`, with `mode`.
    fn make_dir(&self, uid: u32, mode: u32) {
        std::fs::create_dir(self.dir_host()).unwrap();
        chown(&self.dir_host(), uid);
        set_mode(&self.dir_host(), mode);
    }

    /// Why what `start` or `stop` left is wrong: a daemon, a keeper or objects of this
    /// instance. (A refused daemon exits right after it reported its error to `start`: it is
    /// given a moment.)
    fn leftovers(&self) -> Option<String> {
        let t = Instant::now();
        while !instance_processes(self.name()).is_empty() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let processes = instance_processes(self.name());
        let objects = segments_left(self.name());
        (!processes.is_empty() || !objects.is_empty())
            .then(|| format!("left processes {processes:?} and objects {objects:?}"))
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        // Daemons and keepers alike (a keeper outlives a killed daemon); `guard` then removes
        // the objects and the directory.
        kill_instance_processes(self.name());
    }
}

/// The daemon processes (`xallocd start`) of instance `name`.
fn daemons_of(name: &str) -> Vec<u32> {
    pids_of(name, Role::Daemon)
}

/// The processes of instance `name` in `role`.
fn pids_of(name: &str, role: Role) -> Vec<u32> {
    instance_processes(name)
        .into_iter()
        .filter(|&(_, r)| r == role)
        .map(|(pid, _)| pid)
        .collect()
}

/// The real uid of process `pid`.
fn uid_of(pid: u32) -> Option<u32> {
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Checks that `out` is a failed `start` whose message holds every one of `needles`.
fn refused(out: &Output, needles: &[&str]) -> Result<(), String> {
    let err = stderr(out);
    if out.status.success() {
        return Err(format!("start succeeded (stderr: {err:?})"));
    }
    match needles.iter().find(|n| !err.contains(*n)) {
        Some(n) => Err(format!("message lacks {n:?}: {err:?}")),
        None => Ok(()),
    }
}

/// A labelled check of one case.
type Check = (String, Box<dyn FnOnce() -> Result<(), String>>);

/// A labelled check.
fn case(label: String, check: impl FnOnce() -> Result<(), String> + 'static) -> Check {
    (label, Box::new(check))
}

/// Runs every check (each case cleans up after itself), then fails listing those that failed.
fn for_each_case(cases: Vec<Check>) {
    let failures: Vec<String> = cases
        .into_iter()
        .filter_map(|(label, check)| check().err().map(|e| format!("{label}: {e}")))
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn a_default_directory_another_user_owns_is_refused() {
    if !is_root() {
        return;
    }
    let mut checks = Vec::new();
    for form in FORMS {
        for mode in [0o777, 0o755] {
            checks.push(case(format!("{form:?} {mode:o}"), move || {
                let c = Case::new("planted", form);
                c.make_dir(NOBODY, mode);
                let out = c.start(&[]);
                let owned = format!("owned by uid {NOBODY}, not by you (uid {})", c.uid());
                refused(&out, &[&c.dir_seen(), &owned, "--pidfile"])?;
                if c.pidfile_host().exists() {
                    return Err("start made a pidfile in the planted directory".into());
                }
                c.leftovers().map_or(Ok(()), Err)
            }));
        }
    }
    for_each_case(checks);
}

#[test]
fn a_default_directory_group_or_others_may_write_is_refused() {
    if !is_root() {
        return;
    }
    let mut checks = Vec::new();
    for form in FORMS {
        for mode in [0o777, 0o770, 0o1703] {
            checks.push(case(format!("{form:?} {mode:o}"), move || {
                let c = Case::new("writable", form);
                c.make_dir(c.uid(), mode);
                let out = c.start(&[]);
                refused(&out, &[&c.dir_seen(), "writable by", "--pidfile"])?;
                c.leftovers().map_or(Ok(()), Err)
            }));
        }
    }
    for_each_case(checks);
}

#[test]
fn a_default_directory_that_is_a_symlink_is_refused() {
    if !is_root() {
        return;
    }
    let mut checks = Vec::new();
    for form in FORMS {
        checks.push(case(format!("{form:?}"), move || {
            let c = Case::new("dirlink", form);
            // A private directory of the right user, reached through a link (relative, so
            // that it resolves inside the namespace too).
            let target = c.parent_host().join("elsewhere");
            std::fs::create_dir(&target).unwrap();
            chown(&target, c.uid());
            set_mode(&target, 0o700);
            symlink("elsewhere", c.dir_host()).unwrap();
            chown(&c.dir_host(), NOBODY);
            let out = c.start(&[]);
            refused(&out, &[&c.dir_seen(), "symbolic link", "--pidfile"])?;
            if std::fs::read_dir(&target).unwrap().next().is_some() {
                return Err("start wrote into the link's target".into());
            }
            c.leftovers().map_or(Ok(()), Err)
        }));
    }
    for_each_case(checks);
}

#[test]
fn a_pidfile_that_is_a_symlink_or_another_users_file_is_never_written() {
    if !is_root() {
        return;
    }
    const PRECIOUS: &str = "precious data\n";
    let mut checks = Vec::new();
    for form in FORMS {
        // NAME.pid in the (private, correct) default directory, a link to a file of ours.
        checks.push(case(format!("{form:?} default pidfile"), move || {
            let c = Case::new("pidlink", form);
            c.make_dir(c.uid(), 0o700);
            let victim = c.parent_host().join("victim");
            std::fs::write(&victim, PRECIOUS).unwrap();
            chown(&victim, c.uid());
            symlink("../victim", c.pidfile_host()).unwrap();
            let out = c.start(&[]);
            let check = refused(&out, &[&c.pidfile_seen(), "symbolic link"]);
            let kept = std::fs::read_to_string(&victim).unwrap();
            if kept != PRECIOUS {
                return Err(format!("the link's target now holds {kept:?}; {check:?}"));
            }
            check?;
            c.leftovers().map_or(Ok(()), Err)
        }));
        // An explicit --pidfile that is a link to a file of ours.
        checks.push(case(format!("{form:?} --pidfile link"), move || {
            let c = Case::new("explicitlink", form);
            let victim = c.parent_host().join("victim");
            std::fs::write(&victim, PRECIOUS).unwrap();
            chown(&victim, c.uid());
            symlink("victim", c.parent_host().join("link.pid")).unwrap();
            let pidfile = c.parent_seen().join("link.pid").display().to_string();
            let out = c.start(&["--pidfile", &pidfile]);
            let check = refused(&out, &[&pidfile, "symbolic link"]);
            let kept = std::fs::read_to_string(&victim).unwrap();
            if kept != PRECIOUS {
                return Err(format!("the link's target now holds {kept:?}; {check:?}"));
            }
            check?;
            c.leftovers().map_or(Ok(()), Err)
        }));
        // An explicit --pidfile that another user made (world-writable).
        checks.push(case(
            format!("{form:?} --pidfile of another user"),
            move || {
                let c = Case::new("explicitother", form);
                let planted = c.parent_host().join("planted.pid");
                std::fs::write(&planted, PRECIOUS).unwrap();
                chown(&planted, NOBODY);
                set_mode(&planted, 0o666);
                let pidfile = c.parent_seen().join("planted.pid").display().to_string();
                let out = c.start(&["--pidfile", &pidfile]);
                let owned = format!("owned by uid {NOBODY}, not by you (uid {})", c.uid());
                let check = refused(&out, &[&pidfile, &owned]);
                let kept = std::fs::read_to_string(&planted).unwrap();
                if kept != PRECIOUS {
                    return Err(format!("the planted file now holds {kept:?}; {check:?}"));
                }
                check?;
                c.leftovers().map_or(Ok(()), Err)
            },
        ));
    }
    for_each_case(checks);
}

#[test]
fn a_fresh_default_directory_is_private_and_start_stop_work() {
    if !is_root() {
        return;
    }
    let mut checks = Vec::new();
    for form in FORMS {
        checks.push(case(format!("{form:?}"), move || {
            let c = Case::new("fresh", form);
            let out = c.start(&[]);
            if !out.status.success() {
                return Err(format!("start failed: {}", stderr(&out)));
            }
            let meta = std::fs::symlink_metadata(c.dir_host()).map_err(|e| e.to_string())?;
            let got = (meta.is_dir(), meta.uid(), meta.mode() & 0o7777);
            if got != (true, c.uid(), 0o700) {
                return Err(format!("directory (is dir, owner, mode) {got:?}"));
            }
            let pid: u32 = std::fs::read_to_string(c.pidfile_host())
                .map_err(|e| format!("pidfile: {e}"))?
                .trim()
                .parse()
                .map_err(|e| format!("pid in pidfile: {e}"))?;
            if daemons_of(c.name()) != [pid] {
                return Err(format!(
                    "pidfile says {pid}, daemons are {:?}",
                    daemons_of(c.name())
                ));
            }
            // One keeper, of the daemon's user, beside it.
            let keepers = pids_of(c.name(), Role::Keeper);
            let keeper_uids: Vec<_> = keepers.iter().map(|&k| uid_of(k)).collect();
            if keepers.len() != 1 || keeper_uids != [Some(c.uid())] {
                return Err(format!(
                    "keepers {keepers:?} of uids {keeper_uids:?}, expected one of uid {}",
                    c.uid()
                ));
            }
            let again = c.start(&[]);
            refused(&again, &["already running", &pid.to_string()])
                .map_err(|e| format!("second start: {e}"))?;
            let out = c.xallocd(&["stop"]);
            if !out.status.success() {
                return Err(format!("stop failed: {}", stderr(&out)));
            }
            if c.pidfile_host().exists() {
                return Err("the pidfile is left after stop".into());
            }
            c.leftovers().map_or(Ok(()), Err)
        }));
    }
    for_each_case(checks);
}

/// A pidfile planted by another user and locked by them, naming a process of ours.
struct Planted {
    /// The process named in the pidfile.
    victim: Child,
    /// Holds the lock, as the planter's daemon would.
    _lock: File,
}

impl Planted {
    /// Writes a pidfile at `path` (host side) owned by NOBODY, naming a new process of `uid`,
    /// and locks it.
    fn new(path: &Path, uid: u32) -> Self {
        let victim = Child(
            Command::new("sleep")
                .arg("60")
                .uid(uid)
                .gid(uid)
                .spawn()
                .expect("spawn sleep"),
        );
        std::fs::write(path, format!("{}\n", victim.0.id())).unwrap();
        chown(path, NOBODY);
        let lock = File::open(path).unwrap();
        // SAFETY: plain call on an open descriptor.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(rc, 0, "lock the planted pidfile");
        Self {
            victim,
            _lock: lock,
        }
    }

    /// Checks that `stop` (its output `out`) left the victim alive.
    fn survived(mut self, out: &Output) -> Result<(), String> {
        // `stop` waits for what it signalled to exit; a victim signalled late still has half a
        // second to show it, on a loaded machine.
        let mut state = self.victim.0.try_wait();
        for _ in 0..10 {
            if !matches!(state, Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            state = self.victim.0.try_wait();
        }
        match state {
            Ok(None) => Ok(()),
            r => Err(format!(
                "stop signalled the pid in the planted pidfile ({r:?}); stop said {:?}, {}",
                out.status,
                stderr(out)
            )),
        }
    }
}

#[test]
fn stop_never_signals_the_pid_of_a_planted_pidfile() {
    if !is_root() {
        return;
    }
    let mut checks = Vec::new();
    for form in FORMS {
        // The default directory planted by another user, with a pidfile of theirs.
        checks.push(case(format!("{form:?} planted directory"), move || {
            let c = Case::new("stopplanted", form);
            c.make_dir(NOBODY, 0o777);
            let planted = Planted::new(&c.pidfile_host(), c.uid());
            let out = c.xallocd(&["stop"]);
            planted.survived(&out)
        }));
        // Our default directory, holding a link to a pidfile of another user.
        checks.push(case(format!("{form:?} linked pidfile"), move || {
            let c = Case::new("stoplink", form);
            c.make_dir(c.uid(), 0o700);
            let planted = Planted::new(&c.parent_host().join("planted.pid"), c.uid());
            symlink("../planted.pid", c.pidfile_host()).unwrap();
            let out = c.xallocd(&["stop"]);
            planted.survived(&out)
        }));
        // An explicit --pidfile that is a link to a pidfile of another user.
        checks.push(case(format!("{form:?} --pidfile link"), move || {
            let c = Case::new("stopexplicit", form);
            let planted = Planted::new(&c.parent_host().join("planted.pid"), c.uid());
            symlink("planted.pid", c.parent_host().join("link.pid")).unwrap();
            let pidfile = c.parent_seen().join("link.pid").display().to_string();
            let out = c.xallocd(&["stop", "--pidfile", &pidfile]);
            planted.survived(&out)
        }));
    }
    for_each_case(checks);
}
