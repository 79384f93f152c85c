//! The Unix-socket and memfd half of the OS layer: the instance socket the daemon listens on,
//! descriptors passed over it (`SCM_RIGHTS`), the peer's identity as the kernel reports it, and
//! memfds sealed against resizing. Built on `rustix` where it covers the call, `libc` where it
//! does not (`SO_PEERPIDFD`, `SO_PEERGROUPS`).
//!
//! The client side ([`connect`], [`recv_with_fds`], [`send_wake`]) runs inside a global
//! allocator: it never allocates, formats or panics.

use core::ffi::CStr;
use core::mem::MaybeUninit;
use core::time::Duration;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::os::{Errno, Fd};

/// The most descriptors one message carries (the handshake passes three).
pub const MAX_FDS: usize = 4;

fn errno(e: rustix::io::Errno) -> Errno {
    Errno(e.raw_os_error())
}

fn own(fd: OwnedFd) -> Fd {
    // SAFETY: `fd` was owned and is handed over whole.
    unsafe { Fd::from_raw(fd.into_raw_fd()) }
}

impl AsFd for Fd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `self` owns the descriptor, open for as long as the borrow.
        unsafe { BorrowedFd::borrow_raw(self.raw()) }
    }
}

/// Creates a memfd of `len` bytes (close-on-exec, sealable), named `name` in `/proc/PID/fd`.
pub fn memfd(name: &CStr, len: u64) -> Result<Fd, Errno> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(errno)?;
    rustix::fs::ftruncate(&fd, len).map_err(errno)?;
    Ok(own(fd))
}

/// The seals that fix a memfd's size for good: no process that holds it can shrink or grow it,
/// or remove the seals.
pub const SIZE_SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

/// Seals memfd `fd` against any change of size ([`SIZE_SEALS`]).
pub fn seal_size(fd: &Fd) -> Result<(), Errno> {
    rustix::fs::fcntl_add_seals(fd, SIZE_SEALS).map_err(errno)
}

/// Whether `fd` is a memfd whose size is sealed ([`SIZE_SEALS`]).
pub fn size_is_sealed(fd: &Fd) -> bool {
    rustix::fs::fcntl_get_seals(fd).is_ok_and(|s| s.contains(SIZE_SEALS))
}

/// A read-only descriptor of the same object as `fd` (which must be a memfd or file of ours):
/// its holder can map it read-only, not write, resize or map it writable. `fd`'s mode is set
/// to 0600 first, so that a process of another user cannot reopen it for writing through
/// `/proc/PID/fd`.
pub fn read_only_twin(fd: &Fd) -> Result<Fd, Errno> {
    rustix::fs::fchmod(fd, rustix::fs::Mode::from_raw_mode(0o600)).map_err(errno)?;
    let mut path = [0u8; 32];
    let mut n = 0;
    for b in b"/proc/self/fd/" {
        path[n] = *b;
        n += 1;
    }
    let mut digits = [0u8; 12];
    let mut d = 0;
    let mut v = fd.raw() as u32;
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        path[n] = digits[d];
        n += 1;
    }
    let path = CStr::from_bytes_until_nul(&path[..=n]).map_err(|_| Errno(libc::EINVAL))?;
    rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map(own)
    .map_err(errno)
}

/// Device and inode of `fd`'s object: how a restarted daemon recognises the arena it is handed.
pub fn identity(fd: &Fd) -> Result<(u64, u64), Errno> {
    let st = rustix::fs::fstat(fd).map_err(errno)?;
    Ok((st.st_dev, st.st_ino))
}

/// A new non-blocking, close-on-exec Unix `SOCK_SEQPACKET` socket.
fn seqpacket() -> Result<OwnedFd, Errno> {
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(errno)
}

/// A non-blocking, close-on-exec `SOCK_SEQPACKET` socket listening at `path`, with file mode
/// `mode`. A leftover at `path` is the caller's to remove first.
pub fn listen(path: &std::path::Path, mode: u32) -> Result<Fd, Errno> {
    let addr = SocketAddrUnix::new(path).map_err(errno)?;
    let sock = seqpacket()?;
    rustix::net::bind(&sock, &addr).map_err(errno)?;
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(mode)).map_err(errno)?;
    rustix::net::listen(&sock, 1024).map_err(errno)?;
    Ok(own(sock))
}

/// Accepts one waiting connection (non-blocking, close-on-exec), or `None` if none waits.
pub fn accept(listener: &Fd) -> Result<Option<Fd>, Errno> {
    match rustix::net::accept_with(listener, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
        Ok(fd) => Ok(Some(own(fd))),
        Err(rustix::io::Errno::AGAIN) => Ok(None),
        Err(e) => Err(errno(e)),
    }
}

/// Connects to the `SOCK_SEQPACKET` socket at `path` (a `/`-rooted path of at most 107 bytes).
/// The socket is close-on-exec and non-blocking: a daemon whose backlog is full refuses at
/// once (`EAGAIN`) rather than making the caller wait.
pub fn connect(path: &CStr) -> Result<Fd, Errno> {
    let addr = SocketAddrUnix::new(path).map_err(errno)?;
    let sock = seqpacket()?;
    rustix::net::connect(&sock, &addr).map_err(errno)?;
    Ok(own(sock))
}

/// Sends `bytes` as one message with `fds` attached, without blocking and without SIGPIPE.
pub fn send_with_fds(sock: &Fd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if fds.len() > MAX_FDS
        || (!fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)))
    {
        return Err(Errno(libc::EINVAL));
    }
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
    let sent =
        rustix::net::sendmsg(sock, &[IoSlice::new(bytes)], &mut control, flags).map_err(errno)?;
    if sent != bytes.len() {
        return Err(Errno(libc::EMSGSIZE));
    }
    Ok(())
}

/// A message received by [`recv_with_fds`].
#[derive(Debug)]
pub struct Received {
    /// Bytes of the message copied into the buffer.
    pub len: usize,
    /// The message was longer than the buffer (the rest is lost).
    pub truncated: bool,
    /// Descriptors that came with it, in order (close-on-exec); extra ones beyond
    /// [`MAX_FDS`] are closed by the kernel and `fds_truncated` is set.
    pub fds: [Option<Fd>; MAX_FDS],
    /// More descriptors were sent than [`MAX_FDS`].
    pub fds_truncated: bool,
}

/// Waits up to `timeout` for one message on `sock` and receives it into `buf`, with its
/// descriptors. `Ok(None)` when the peer closed the connection; `Err(EAGAIN)` on timeout.
pub fn recv_with_fds(
    sock: &Fd,
    buf: &mut [u8],
    timeout: Duration,
) -> Result<Option<Received>, Errno> {
    let mut pfd = [rustix::event::PollFd::new(
        sock,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::event::Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match rustix::event::poll(&mut pfd, Some(&ts)) {
        Ok(0) => return Err(Errno(libc::EAGAIN)),
        Ok(_) => {}
        Err(e) => return Err(errno(e)),
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    )
    .map_err(errno)?;
    let mut out = Received {
        len: msg.bytes.min(buf.len()),
        truncated: msg.flags.contains(ReturnFlags::TRUNC),
        fds: [const { None }; MAX_FDS],
        fds_truncated: msg.flags.contains(ReturnFlags::CTRUNC),
    };
    let mut n = 0;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for fd in fds {
                if n < MAX_FDS {
                    out.fds[n] = Some(own(fd));
                    n += 1;
                } else {
                    out.fds_truncated = true;
                }
            }
        }
    }
    if msg.bytes == 0 && n == 0 && !out.truncated {
        // The daemon never sends an empty message: this is the end of the connection.
        return Ok(None);
    }
    Ok(Some(out))
}

/// Client side: sends one [`WAKE`](crate::wire::WAKE) byte to the daemon, without blocking. A
/// full socket buffer is fine: the daemon has wake-ups to read already. Returns whether the
/// connection still stands.
pub fn send_wake(sock: &Fd) -> bool {
    match rustix::net::send(
        sock,
        &[crate::wire::WAKE],
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    ) {
        Ok(_) | Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => true,
        Err(_) => false,
    }
}

/// Daemon side: reads and drops the messages waiting on a client's socket, at most 64 (the
/// rest wait for the next call: a client that floods its socket cannot keep the caller here).
/// Returns how many there were, and whether the connection failed. An empty message is a
/// message: whether the peer hung up is for the caller's poll to say (`EPOLLHUP`,
/// `EPOLLRDHUP`), since a zero-length read cannot tell the two apart.
pub fn drain(sock: &Fd) -> (usize, bool) {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 64 {
        match rustix::net::recv(sock, &mut buf, RecvFlags::DONTWAIT) {
            Ok(_) => n += 1,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => return (n, false),
            Err(_) => return (n, true),
        }
    }
    (n, false)
}

/// Client side: says goodbye ([`crate::wire::BYE`]) before closing the socket on purpose.
/// Waits for nothing; a full socket just loses the goodbye.
pub fn send_bye(sock: &Fd) {
    let _ = rustix::net::send(
        sock,
        &[crate::wire::BYE],
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    );
}

/// Daemon side: reads what waits on a hung-up client's socket (at most 64 messages) and
/// says whether the client said goodbye ([`send_bye`]).
pub fn said_goodbye(sock: &Fd) -> bool {
    let mut buf = [0u8; 64];
    for _ in 0..64 {
        match rustix::net::recv(sock, &mut buf, RecvFlags::DONTWAIT) {
            Ok((n, _)) if n > 0 && buf[0] == crate::wire::BYE => return true,
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
    false
}

/// Sends `text` as messages of at most `chunk` bytes (blocking up to `timeout` per message):
/// for replies longer than one datagram, such as a status document.
pub fn send_text(sock: &Fd, text: &[u8], chunk: usize, timeout: Duration) -> Result<(), Errno> {
    for part in text.chunks(chunk.max(1)) {
        loop {
            match rustix::net::send(sock, part, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
                Ok(_) => break,
                Err(rustix::io::Errno::AGAIN) => {
                    let mut pfd = [rustix::event::PollFd::new(
                        sock,
                        rustix::event::PollFlags::OUT,
                    )];
                    let ts = rustix::event::Timespec {
                        tv_sec: timeout.as_secs() as i64,
                        tv_nsec: i64::from(timeout.subsec_nanos()),
                    };
                    if rustix::event::poll(&mut pfd, Some(&ts)).map_err(errno)? == 0 {
                        return Err(Errno(libc::ETIMEDOUT));
                    }
                }
                Err(e) => return Err(errno(e)),
            }
        }
    }
    Ok(())
}

/// Who is at the other end of a Unix socket, as the kernel recorded it when the connection was
/// made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Process id.
    pub pid: u32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// The peer of `sock` (`SO_PEERCRED`).
pub fn peer(sock: &Fd) -> Result<Peer, Errno> {
    let c = rustix::net::sockopt::socket_peercred(sock).map_err(errno)?;
    Ok(Peer {
        pid: c.pid.as_raw_nonzero().get() as u32,
        uid: c.uid.as_raw(),
        gid: c.gid.as_raw(),
    })
}

/// A pidfd for the peer of `sock`: `SO_PEERPIDFD` (Linux 6.5 and later), which names the very
/// process that connected even if it has exited since; else `pidfd_open` of the peer's pid.
pub fn peer_pidfd(sock: &Fd, peer: &Peer) -> Result<Fd, Errno> {
    /// `SO_PEERPIDFD` from `<asm-generic/socket.h>`.
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` and `len` are valid for writing an int and its length.
    let rc = unsafe {
        libc::getsockopt(
            sock.raw(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    if rc == 0 && fd >= 0 {
        // SAFETY: a fresh descriptor the kernel gave us.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        return Ok(own(owned));
    }
    crate::os::pidfd_open(peer.pid)
}

/// The supplementary groups of the peer of `sock` (`SO_PEERGROUPS`), at most 64.
pub fn peer_groups(sock: &Fd) -> Result<([u32; 64], usize), Errno> {
    let mut groups = [0u32; 64];
    let mut len = size_of_val(&groups) as libc::socklen_t;
    // SAFETY: `groups` is writable for `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.raw(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Errno::last());
    }
    Ok((groups, len as usize / size_of::<u32>()))
}

/// Raises this process's soft limit on open descriptors to its hard limit; returns the limit
/// now in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_memfd_cannot_change_size_and_its_twin_cannot_write() {
        let fd = memfd(c"xalloc-test", 8192).unwrap();
        assert!(!size_is_sealed(&fd));
        seal_size(&fd).unwrap();
        assert!(size_is_sealed(&fd));
        assert!(rustix::fs::ftruncate(&fd, 4096).is_err());
        assert!(rustix::fs::ftruncate(&fd, 16384).is_err());
        let twin = read_only_twin(&fd).unwrap();
        assert_eq!(identity(&twin).unwrap(), identity(&fd).unwrap());
        assert!(rustix::io::write(&twin, b"x").is_err());
        assert!(rustix::fs::ftruncate(&twin, 0).is_err());
    }

    #[test]
    fn descriptors_and_credentials_cross_a_socket() {
        let dir = std::env::temp_dir().join(format!("xalloc-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = listen(&path, 0o600).unwrap();
        let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        let client = connect(&cpath).unwrap();
        let server = accept(&listener).unwrap().unwrap();
        assert!(accept(&listener).unwrap().is_none());
        let me = peer(&server).unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(peer_pidfd(&server, &me).is_ok());
        let mfd = memfd(c"xalloc-test", 4096).unwrap();
        send_with_fds(&server, b"hello", &[mfd.as_fd(), mfd.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let r = recv_with_fds(&client, &mut buf, Duration::from_secs(1))
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        assert!(r.fds[0].is_some() && r.fds[1].is_some() && r.fds[2].is_none());
        assert_eq!(
            identity(r.fds[1].as_ref().unwrap()).unwrap(),
            identity(&mfd).unwrap()
        );
        assert!(send_wake(&client));
        assert!(send_wake(&client));
        assert_eq!(drain(&server), (2, false));
        assert_eq!(
            recv_with_fds(&client, &mut buf, Duration::from_millis(10)).err(),
            Some(Errno(libc::EAGAIN))
        );
        drop(client);
        // A hang-up is for poll to report; the reads themselves end at the bound.
        let mut pfd = [rustix::event::PollFd::new(
            &server,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(&mut pfd, None).unwrap();
        assert!(pfd[0].revents().contains(rustix::event::PollFlags::HUP));
        assert_eq!(drain(&server), (64, false));
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
