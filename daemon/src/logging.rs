//! The daemon's log: syslog (ident `xalloc`, facility `daemon`) through the `log` facade, with
//! a reconnect and a file fallback.
//!
//! Lines are formatted by the `syslog` crate's RFC 3164 formatter and sent on a Unix datagram
//! socket. When a send fails (the syslog server restarted and its socket is a new one, or it is
//! down), the logger reconnects and sends again at once; if that fails too, the line goes to the
//! `--log-file` (or stderr in the foreground), and the next line tries syslog again. The
//! `syslog` crate's own `BasicLogger` keeps its first socket forever, so every line after a
//! `service rsyslog restart` would be lost.
//!
//! Levels: `error` is a failure the operator must act on, `warn` something refused or degraded
//! (a full `/dev/shm`), `info` the life cycle (start, stop, clients coming and going, statistics
//! lines), `debug` detail for development. Nothing is logged per request.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use syslog::{Facility, Formatter3164, LogFormat, Severity};

/// The ident (program name) of every line: rsyslog's `programname` property.
pub const IDENT: &str = "xalloc";

/// The logger installed with [`install`].
pub struct DaemonLog {
    inner: Mutex<Inner>,
}

struct Inner {
    socket_path: PathBuf,
    socket: Option<UnixDatagram>,
    formatter: Formatter3164,
    file: Option<File>,
    stderr: bool,
    buf: Vec<u8>,
}

/// Whether a syslog server answers on `path` (a datagram socket we can connect to).
pub fn syslog_answers(path: &Path) -> bool {
    connect(path).is_some()
}

fn connect(path: &Path) -> Option<UnixDatagram> {
    let s = UnixDatagram::unbound().ok()?;
    s.connect(path).ok()?;
    Some(s)
}

impl DaemonLog {
    /// A logger for syslog socket `socket_path`, falling back to `file` and, if `stderr`, to
    /// standard error.
    pub fn new(socket_path: &Path, file: Option<&Path>, stderr: bool) -> std::io::Result<Self> {
        let file = match file {
            Some(p) => Some(OpenOptions::new().create(true).append(true).open(p)?),
            None => None,
        };
        Ok(Self {
            inner: Mutex::new(Inner {
                socket_path: socket_path.to_owned(),
                socket: connect(socket_path),
                formatter: Formatter3164 {
                    facility: Facility::LOG_DAEMON,
                    hostname: None,
                    process: IDENT.to_owned(),
                    pid: std::process::id(),
                },
                file,
                stderr,
                buf: Vec::with_capacity(512),
            }),
        })
    }
}

impl Inner {
    fn write(&mut self, level: log::Level, msg: &str) {
        let severity = match level {
            log::Level::Error => Severity::LOG_ERR,
            log::Level::Warn => Severity::LOG_WARNING,
            log::Level::Info => Severity::LOG_INFO,
            log::Level::Debug | log::Level::Trace => Severity::LOG_DEBUG,
        };
        self.buf.clear();
        if self.formatter.format(&mut self.buf, severity, msg).is_err() {
            return;
        }
        if self.send() {
            return;
        }
        // The syslog server is down or came back on a new socket: reconnect once per line.
        self.socket = connect(&self.socket_path);
        if self.send() {
            return;
        }
        let line = format!("{} {}[{}]: {msg}\n", level, IDENT, self.formatter.pid);
        if let Some(f) = self.file.as_mut() {
            let _ = f.write_all(line.as_bytes());
        }
        if self.stderr {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn send(&mut self) -> bool {
        match &self.socket {
            Some(s) => s.send(&self.buf).is_ok(),
            None => false,
        }
    }
}

impl log::Log for DaemonLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let msg = record.args().to_string();
        if let Ok(mut g) = self.inner.lock() {
            g.write(record.level(), &msg);
        }
    }

    fn flush(&self) {
        if let Ok(mut g) = self.inner.lock() {
            if let Some(f) = g.file.as_mut() {
                let _ = f.flush();
            }
        }
    }
}

/// Installs `log` as the global logger at level `info`.
pub fn install(log: &'static DaemonLog) {
    // Only fails if a logger is installed already, which `main` does once.
    let _ = log::set_logger(log);
    log::set_max_level(log::LevelFilter::Info);
}
