//! The daemon's request handling under arbitrary requests: any slot, any owner field, any
//! operation code, flags, size, alignment and offset (raw, or near an offset the daemon handed
//! out). After every request the daemon's whole state must check out (`Server::check`: heap
//! invariants, ownership record equal to the heap's used blocks, client counts), and nothing
//! may panic.
#![no_main]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use xalloc_proto::os::{self, Fd};
use xalloc_proto::wire::Request;
use xalloc_daemon::segments::{self, Access, Names};
use xalloc_daemon::server::{Mailbox, Server, GRANULE};

#[derive(Arbitrary, Debug)]
enum Owner {
    Me,
    Zero,
    Init,
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Offset {
    Raw(u64),
    Handed { index: u8, delta: i16 },
}

#[derive(Arbitrary, Debug)]
struct Req {
    slot: u8,
    owner: Owner,
    op: u8,
    flags: u32,
    size: u32,
    align_log: u8,
    offset: Offset,
}

static N: AtomicU32 = AtomicU32::new(0);

fuzz_target!(|reqs: Vec<Req>| {
    let name = format!("xfuzz-{}-{}", os::pid(), N.fetch_add(1, Ordering::Relaxed));
    let names = Names::new(&name).unwrap();
    let seg = segments::create(names, 4, 1 << 20, GRANULE as u32, Access { gid: None }, 1, 0)
        .expect("segments");
    // SAFETY: plain call; the descriptor is owned at once.
    let epoll = Arc::new(unsafe { Fd::from_raw(libc::epoll_create1(libc::EPOLL_CLOEXEC)) });
    let mut server = Server::new(seg, Arc::new(Mailbox::default()), epoll).unwrap();
    let me = os::pid();
    let mut handed: Vec<u64> = Vec::new();
    for r in reqs.iter().take(300) {
        let offset = match r.offset {
            Offset::Raw(o) => o,
            Offset::Handed { index, delta } if !handed.is_empty() => {
                let base = handed[usize::from(index) % handed.len()];
                base.wrapping_add_signed(i64::from(delta))
            }
            Offset::Handed { .. } => 0,
        };
        let req = Request {
            owner: match r.owner {
                Owner::Me => me,
                Owner::Zero => 0,
                Owner::Init => 1,
                Owner::Raw(p) => p,
            },
            seq: 1,
            op: u32::from(r.op % 8),
            flags: r.flags,
            cpu: 0,
            size: u64::from(r.size),
            align: 1u64.checked_shl(u32::from(r.align_log % 70)).unwrap_or(0),
            offset,
        };
        let resp = server.handle(u32::from(r.slot % 4), &req);
        if resp.status == 0 && req.op == 3 {
            handed.push(resp.offset);
        }
        if let Err(e) = server.check() {
            panic!("after {req:?} -> {resp:?}: {e}");
        }
    }
    drop(server);
    names.unlink_all();
});
