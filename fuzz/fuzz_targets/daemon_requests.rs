//! The daemon's request loop driven through client channels with arbitrary bytes (issue 12).
//!
//! Each input builds a `Server` over fresh objects (a 1 MiB arena, 4 slots per channel, quotas
//! small or unlimited), adds one or two local clients (`Server::add_local_client`), maps their
//! request channels as a client would, and plays a sequence of actions:
//!
//! - `Scribble`: any bytes at any offset of a request channel (header, bell, slots, ledger);
//! - `Submit`: a well-formed request in a slot (`RequestSlot::submit`, then the bell), with any
//!   operation code, flags, size, alignment and offset (raw, granule-based, or near a live block
//!   or one the daemon handed out before, with a small delta), drawn so that most requests get
//!   past the field checks;
//! - `Ledger`: a block (one the daemon handed out, to this client or another, or made up) put in
//!   the ledger as cached or released, or raw words in its entries and counters;
//! - `Bell`: `rings` and `slots_hi` moved to any value;
//! - `Serve`: `Server::serve` (the channel looked at once, whatever the bell says);
//! - `Reconnect`: `Server::disconnect`, and a new client in its place;
//! - `Status`: the status document.
//!
//! After every serve and every disconnect the daemon's whole state must check out
//! (`Server::check`: heap invariants, ownership record equal to the heap's used blocks, client
//! and per-process/per-user counts); every answer in the response channel must carry a known
//! status, and an `Ok` one a granule-aligned block inside the arena; a request written by
//! `Submit` and left untouched must be answered under its sequence number, as its fields say
//! (an unknown operation refused, an allocation at least as large as asked and aligned where
//! the client sees the arena); the clients together hold no more than the process quota, and
//! those of a user no more than the user quota. Once every client is gone, no block may be
//! left. Nothing may panic.
//!
//! Blocks are read from the daemon's state record (`/dev/shm/NAME.state`, mapped read-only
//! here): the live ones, and every block start it showed after a serve (since freed, some). The
//! response
//! channels are not handed to local clients; the target finds the daemon's own mapping of each
//! one as the single `memfd:xalloc:response` mapping that `add_local_client` added to
//! `/proc/self/maps` (the answer checks are skipped for a client where that fails).
#![no_main]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use xalloc_daemon::segments::{self, Access, Names};
use xalloc_daemon::server::{Policy, Server, GRANULE};
use xalloc_proto::os::{self, Mapping};
use xalloc_proto::unix;
use xalloc_proto::wire::{
    self, ClientBell, Ledger, LedgerBlock, Op, OwnerEntry, RequestSlot, ResponseSlot,
    SegmentHeader, Status, ARENA_DATA_OFFSET, BELL_OFFSET, FLAG_ZEROED, HEADER_FLAG_HUGE_PAGES,
    IDLE, LEDGER_ENTRIES, MAX_ALIGN,
};

/// Slots per channel.
const SLOTS: u32 = 4;
/// Bytes of arena data.
const ARENA: u64 = 1 << 20;
/// Granules of arena data.
const GRANULES: usize = (ARENA / GRANULE as u64) as usize;
/// Actions played per input, at most.
const MAX_ACTIONS: usize = 300;
/// Block starts remembered for `Offset::Handed`, at most.
const MAX_HANDED: usize = 128;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Quota {
    Unlimited,
    /// This many granules.
    Granules(u8),
}

impl Quota {
    fn bytes(self) -> u64 {
        match self {
            Self::Unlimited => u64::MAX,
            Self::Granules(g) => u64::from(g) * GRANULE as u64,
        }
    }
}

// The fields of a `Submit` are drawn mostly valid (`Unstructured::ratio`), so that most
// requests get past the field checks and reach the heap; the rest is any value.

#[derive(Debug, Clone, Copy)]
enum OpCode {
    Allocate,
    Free,
    Reallocate,
    /// Any code (3, 4 and 5 are the known ones).
    Raw(u32),
}

impl<'a> Arbitrary<'a> for OpCode {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0u8..=6)? {
            0..=1 => Self::Allocate,
            2..=3 => Self::Free,
            4..=5 => Self::Reallocate,
            _ => Self::Raw(u.arbitrary()?),
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Flags {
    /// Flags the operation defines: [`FLAG_ZEROED`] or not for an allocation, 0 otherwise.
    Valid {
        zeroed: bool,
    },
    Raw(u32),
}

impl<'a> Arbitrary<'a> for Flags {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(if u.ratio(1u8, 8)? {
            Self::Raw(u.arbitrary()?)
        } else {
            Self::Valid {
                zeroed: u.arbitrary()?,
            }
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Size {
    Bytes(u16),
    Granules(u8),
    Raw(u64),
}

impl<'a> Arbitrary<'a> for Size {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0u8..=7)? {
            0..=3 => Self::Bytes(u.arbitrary()?),
            4..=6 => Self::Granules(u.arbitrary()?),
            _ => Self::Raw(u.arbitrary()?),
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Align {
    /// `1 << (log % 13)`: up to a granule.
    Small(u8),
    /// `1 << (log % 32)`: up to twice [`MAX_ALIGN`].
    Log(u8),
    Raw(u64),
}

impl<'a> Arbitrary<'a> for Align {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0u8..=7)? {
            0..=4 => Self::Small(u.arbitrary()?),
            5..=6 => Self::Log(u.arbitrary()?),
            _ => Self::Raw(u.arbitrary()?),
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Offset {
    /// The start of a live block (any client's), plus `delta` (0 if there is none).
    Live {
        index: u8,
        delta: i16,
    },
    /// A block start the daemon ever handed out (live or since freed), plus `delta`.
    Handed {
        index: u8,
        delta: i16,
    },
    /// `granule * GRANULE + delta`: block starts in the arena, and near misses.
    Granule {
        granule: u8,
        delta: i16,
    },
    /// `granules * GRANULE`: a client's view of the arena (for an allocation).
    View {
        granules: u32,
    },
    Raw(u64),
}

impl<'a> Arbitrary<'a> for Offset {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let delta = |u: &mut Unstructured<'a>| -> arbitrary::Result<i16> {
            Ok(if u.ratio(1u8, 4)? { u.arbitrary()? } else { 0 })
        };
        Ok(match u.int_in_range(0u8..=9)? {
            0..=4 => Self::Live {
                index: u.arbitrary()?,
                delta: delta(u)?,
            },
            5 => Self::Handed {
                index: u.arbitrary()?,
                delta: delta(u)?,
            },
            6..=7 => Self::Granule {
                granule: u.arbitrary()?,
                delta: delta(u)?,
            },
            8 => Self::View {
                granules: u.arbitrary()?,
            },
            _ => Self::Raw(u.arbitrary()?),
        })
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Submit {
    client: u8,
    slot: u8,
    op: OpCode,
    flags: Flags,
    cpu: u8,
    size: Size,
    align: Align,
    offset: Offset,
    /// Raise `slots_hi` to cover the slot first (`ClientBell::note_claim`).
    claim: bool,
    /// Ring the bell after submitting.
    ring: bool,
    /// Serve the client right after (as `Action::Serve`).
    serve: bool,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Granules {
    /// The length of the block, as the record has it (1 if unknown).
    Exact,
    Raw(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum LedgerAction {
    /// `Ledger::put` of a live block (any client's; else one handed out before), its offset
    /// in granules plus `delta`.
    Put {
        index: u8,
        delta: i8,
        granules: Granules,
        released: bool,
        hint: u8,
    },
    /// `Ledger::put` of a made-up block.
    PutRaw {
        offset: u32,
        granules: u32,
        released: bool,
        hint: u8,
    },
    /// Any word in entry `index % LEDGER_ENTRIES`.
    Entry {
        index: u8,
        word: u64,
    },
    CachedGranules(u64),
    Pending(u32),
}

#[derive(Arbitrary, Debug, Clone)]
enum Action {
    Scribble {
        client: u8,
        at: u16,
        bytes: Vec<u8>,
    },
    Submit(Submit),
    Ledger {
        client: u8,
        action: LedgerAction,
    },
    Bell {
        client: u8,
        rings: u32,
        slots_hi: Option<u32>,
    },
    Serve {
        client: u8,
    },
    Reconnect {
        client: u8,
        uid: u8,
    },
    Status,
}

#[derive(Arbitrary, Debug)]
struct Input {
    client_quota: Quota,
    user_quota: Quota,
    huge_pages: bool,
    /// The uid of the first client, and of the second if there is one.
    uids: (u8, Option<u8>),
    actions: Vec<Action>,
}

/// A request `Submit` wrote and nothing has touched since.
#[derive(Clone, Copy, Debug)]
struct Sent {
    seq: u32,
    op: u32,
    flags: u32,
    size: u64,
    align: u64,
    offset: u64,
}

/// A local client: its id, its request channel as it maps it, and the daemon's mapping of its
/// response channel.
struct Local {
    id: u32,
    uid: u32,
    request: Mapping,
    /// Start of the daemon's mapping of the response channel (valid while the client is the
    /// server's: it goes with the client's channel).
    response: Option<usize>,
    sent: [Option<Sent>; SLOTS as usize],
}

impl Local {
    fn bell(&self) -> &ClientBell {
        // SAFETY: the mapping is `request_channel_len(SLOTS)` long; the bell is at its
        // 64-aligned offset.
        unsafe { self.request.at(BELL_OFFSET) }
    }

    fn slot(&self, i: u32) -> &RequestSlot {
        assert!(i < SLOTS);
        // SAFETY: `i < SLOTS`, and the mapping covers every slot, 64-aligned.
        unsafe { self.request.at(wire::request_slot_offset(i)) }
    }

    fn ledger(&self) -> &Ledger {
        // SAFETY: the ledger ends the mapping, at a 64-aligned offset.
        unsafe { self.request.at(wire::ledger_offset(SLOTS)) }
    }

    /// Answer slot `i`, as the daemon's mapping holds it.
    ///
    /// # Safety
    /// The client is still the server's (not disconnected), and the server not dropped.
    unsafe fn answer(&self, i: u32) -> Option<&ResponseSlot> {
        assert!(i < SLOTS);
        let base = self.response?;
        // SAFETY: `base` starts the daemon's live mapping of this client's response channel
        // (the caller's contract), `response_channel_len(SLOTS)` bytes long, page-aligned;
        // `ResponseSlot` is atomics only, valid for every bit pattern.
        Some(unsafe { &*((base + wire::response_slot_offset(i)) as *const ResponseSlot) })
    }
}

/// Start addresses of the mappings of response channels in this process.
fn response_mappings() -> HashSet<usize> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines()
        .filter(|l| l.contains("memfd:xalloc:response"))
        .filter_map(|l| usize::from_str_radix(l.split('-').next()?, 16).ok())
        .collect()
}

/// A new local client of `server` with user `uid`, its request channel mapped.
fn add_client(server: &mut Server, uid: u8) -> Local {
    let before = response_mappings();
    let uid = u32::from(uid % 3) + 1000;
    let (id, fd) = server.add_local_client(uid).expect("add_local_client");
    let request =
        Mapping::new(&fd, wire::request_channel_len(SLOTS), true).expect("map request channel");
    let added: Vec<usize> = response_mappings().difference(&before).copied().collect();
    Local {
        id,
        uid,
        request,
        response: (added.len() == 1).then(|| added[0]),
        sent: [None; SLOTS as usize],
    }
}

/// The blocks the daemon handed out, as its state record (mapped read-only) shows them.
struct Blocks {
    record: Mapping,
    /// Every block start (byte offset) the record showed after a serve, and the block's length
    /// in granules: live blocks and freed ones.
    history: Vec<(u64, u32)>,
}

impl Blocks {
    fn entry(&self, g: usize) -> &OwnerEntry {
        assert!(g < GRANULES);
        // SAFETY: the record holds one 8-byte entry per granule after its 64-byte header.
        unsafe {
            self.record
                .at(size_of::<SegmentHeader>() + g * size_of::<OwnerEntry>())
        }
    }

    /// The live blocks now: start (byte offset) and length in granules.
    fn live(&self) -> Vec<(u64, u32)> {
        (0..GRANULES)
            .filter(|&g| self.entry(g).owner.load(Ordering::Relaxed) != 0)
            .map(|g| {
                let granules = self.entry(g).granules.load(Ordering::Relaxed);
                ((g * GRANULE) as u64, granules)
            })
            .collect()
    }

    /// Bytes of the live blocks of client `id`.
    fn bytes_of(&self, id: u32) -> u64 {
        (0..GRANULES)
            .filter(|&g| self.entry(g).owner.load(Ordering::Relaxed) == id)
            .map(|g| u64::from(self.entry(g).granules.load(Ordering::Relaxed)) * GRANULE as u64)
            .sum()
    }

    /// Adds the live blocks to the history.
    fn remember(&mut self) {
        for (off, granules) in self.live() {
            if let Some(k) = self.history.iter().position(|(o, _)| *o == off) {
                self.history[k].1 = granules;
            } else if self.history.len() < MAX_HANDED {
                self.history.push((off, granules));
            }
        }
    }

    /// Block `index` (modulo their number) of the live ones, or with `freed` of the history;
    /// the other list if that one is empty.
    fn pick(&self, index: u8, freed: bool) -> Option<(u64, u32)> {
        let live = self.live();
        let (first, second) = if freed {
            (&self.history, &live)
        } else {
            (&live, &self.history)
        };
        let list = if first.is_empty() { second } else { first };
        (!list.is_empty()).then(|| list[usize::from(index) % list.len()])
    }

    fn offset(&self, o: Offset) -> u64 {
        let near = |index, delta: i16, freed| {
            self.pick(index, freed)
                .map_or(0, |(off, _)| off)
                .wrapping_add_signed(i64::from(delta))
        };
        match o {
            Offset::Raw(v) => v,
            Offset::Granule { granule, delta } => {
                (u64::from(granule) * GRANULE as u64).wrapping_add_signed(i64::from(delta))
            }
            Offset::View { granules } => u64::from(granules) * GRANULE as u64,
            Offset::Live { index, delta } => near(index, delta, false),
            Offset::Handed { index, delta } => near(index, delta, true),
        }
    }
}

static N: AtomicU32 = AtomicU32::new(0);

/// Checks the answers in `c`'s response channel after a serve in which the daemon scanned the
/// slots below `hi`; `log` is the actions so far, for the message.
fn check_answers(c: &mut Local, hi: u32, log: &[Action]) {
    for i in 0..SLOTS {
        // SAFETY: `c` is still the server's client (callers check right after serving it).
        let Some(rs) = (unsafe { c.answer(i) }) else {
            return;
        };
        let (seq, status) = (
            rs.seq.load(Ordering::Acquire),
            rs.status.load(Ordering::Relaxed),
        );
        let (offset, size) = (
            rs.offset.load(Ordering::Relaxed),
            rs.size.load(Ordering::Relaxed),
        );
        let ok = status == Status::Ok as u32;
        let (id, sent) = (c.id, c.sent[i as usize]);
        let fail = |why: &str| -> ! {
            panic!(
                "client {id} slot {i}: {why}: answer seq {seq} status {status} offset \
                 {offset:#x} size {size:#x}, sent {sent:?}\nactions: {log:#?}"
            )
        };
        if Status::from_u32(status).is_none() {
            fail("unknown status");
        }
        if ok
            && (offset.checked_add(size).is_none_or(|end| end > ARENA)
                || !offset.is_multiple_of(GRANULE as u64)
                || !size.is_multiple_of(GRANULE as u64))
        {
            fail("an Ok answer names no granule-aligned block inside the arena");
        }
        if i >= hi {
            continue;
        }
        let Some(s) = sent else {
            continue;
        };
        c.sent[i as usize] = None;
        if seq != s.seq {
            fail("a pending request was not answered under its seq");
        }
        if c.slot(i).state.load(Ordering::Relaxed) != IDLE {
            fail("a taken slot is still pending");
        }
        match Op::from_u32(s.op) {
            None if status != Status::UnknownOp as u32 => fail("unknown op not refused"),
            Some(op) if ok && s.flags & !FLAG_ZEROED != 0 => fail(&format!("{op:?}: bad flags")),
            Some(Op::Allocate) if ok => {
                let view = s.offset & (MAX_ALIGN - 1);
                if size < s.size {
                    fail("allocation smaller than asked");
                }
                if s.align == 0 || !(view + offset).is_multiple_of(s.align) {
                    fail("allocation not aligned where the client sees the arena");
                }
            }
            Some(Op::Free) if ok && (offset, size) != (0, 0) => fail("free answered a block"),
            Some(Op::Reallocate) if ok && (offset != s.offset || size < s.size) => {
                fail("resize answered another block, or a smaller one")
            }
            Some(Op::Reallocate | Op::Free) if ok && s.flags != 0 => fail("flags not refused"),
            _ => {}
        }
    }
}

/// `Server::serve` of client `c`, then the checks: the whole state, the answers; and the
/// blocks the record shows now are remembered.
fn serve(server: &mut Server, c: &mut Local, blocks: &mut Blocks, log: &[Action]) {
    let hi = c.bell().slots_hi.load(Ordering::Relaxed).min(SLOTS);
    server.serve(c.id);
    if let Err(e) = server.check() {
        panic!("after serving client {}: {e}\nactions: {log:#?}", c.id);
    }
    check_answers(c, hi, log);
    blocks.remember();
}

/// Checks that the clients hold no more than the quotas allow: every local client is this
/// process, so together they are within the process quota, and those of each user within the
/// user quota (the daemon checks each growth; nothing else adds to what a client holds).
fn check_quotas(blocks: &Blocks, clients: &[Local], policy: &Policy, log: &[Action]) {
    let held: Vec<(u32, u64)> = clients
        .iter()
        .map(|c| (c.uid, blocks.bytes_of(c.id)))
        .collect();
    let total: u64 = held.iter().map(|h| h.1).sum();
    if total > policy.client_quota {
        panic!("the process holds {total} bytes, over its quota {policy:?}\nactions: {log:#?}");
    }
    for &(uid, _) in &held {
        let of_user: u64 = held.iter().filter(|h| h.0 == uid).map(|h| h.1).sum();
        if of_user > policy.user_quota {
            panic!(
                "user {uid} holds {of_user} bytes, over its quota {policy:?}\nactions: {log:#?}"
            );
        }
    }
}

fuzz_target!(|input: Input| {
    let name = format!("xfuzz-{}-{}", os::pid(), N.fetch_add(1, Ordering::Relaxed));
    let names = Names::new(&name).expect("names");
    // A leftover of an earlier process with this pid (killed mid-input) is not ours to keep.
    names.unlink_all();
    let flags = if input.huge_pages {
        HEADER_FLAG_HUGE_PAGES
    } else {
        0
    };
    let seg = segments::create(&names, SLOTS, ARENA, GRANULE as u32, 1, flags).expect("segments");
    let listener = unix::listen(&names.socket, 0o600).expect("listen");
    let policy = Policy {
        access: Access { gid: None },
        client_quota: input.client_quota.bytes(),
        user_quota: input.user_quota.bytes(),
        // Counts connections; local clients have none.
        max_clients_per_user: usize::MAX,
    };
    let mut server = Server::new(seg, &name, listener, None, vec![], policy).expect("server");
    let mut blocks = {
        let fd = os::shm_open(names.state.as_cstr(), false).expect("open the state record");
        let len = wire::state_segment_len(ARENA + ARENA_DATA_OFFSET as u64, GRANULE as u32);
        Blocks {
            record: Mapping::new(&fd, len, false).expect("map the state record"),
            history: Vec::new(),
        }
    };

    let mut clients = vec![add_client(&mut server, input.uids.0)];
    if let Some(uid) = input.uids.1 {
        clients.push(add_client(&mut server, uid));
    }
    let chan_len = wire::request_channel_len(SLOTS);
    let actions = &input.actions[..input.actions.len().min(MAX_ACTIONS)];
    for (step, action) in actions.iter().enumerate() {
        let log = &actions[..=step];
        let nc = clients.len();
        match action {
            Action::Scribble { client, at, bytes } => {
                let c = &mut clients[usize::from(*client) % nc];
                let at = usize::from(*at) % chan_len;
                let n = bytes.len().min(chan_len - at);
                // SAFETY: `[at, at + n)` lies inside the mapping; this thread is the only one,
                // and no reference into the channel is in use while the bytes are copied (the
                // daemon makes its references per call, and every type there is atomics only).
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), c.request.as_ptr().add(at), n)
                };
                c.sent = [None; SLOTS as usize];
            }
            Action::Submit(s) => {
                let c = &mut clients[usize::from(s.client) % nc];
                let i = u32::from(s.slot) % SLOTS;
                let code = match s.op {
                    OpCode::Allocate => Op::Allocate as u32,
                    OpCode::Free => Op::Free as u32,
                    OpCode::Reallocate => Op::Reallocate as u32,
                    OpCode::Raw(code) => code,
                };
                let flags = match s.flags {
                    Flags::Valid { zeroed } if zeroed && code == Op::Allocate as u32 => FLAG_ZEROED,
                    Flags::Valid { .. } => 0,
                    Flags::Raw(f) => f,
                };
                let size = match s.size {
                    Size::Bytes(b) => u64::from(b),
                    Size::Granules(g) => u64::from(g) * GRANULE as u64,
                    Size::Raw(v) => v,
                };
                let align = match s.align {
                    Align::Small(l) => 1 << (l % 13),
                    Align::Log(l) => 1 << (l % 32),
                    Align::Raw(v) => v,
                };
                let offset = blocks.offset(s.offset);
                if s.claim {
                    c.bell().note_claim(i);
                }
                let slot = c.slot(i);
                slot.cpu.store(u32::from(s.cpu), Ordering::Relaxed);
                let seq = slot.submit(
                    Op::from_u32(code).unwrap_or(Op::Allocate),
                    flags,
                    size,
                    align,
                    offset,
                );
                // An unknown code: written over the one `submit` stored (no one reads between).
                slot.op.store(code, Ordering::Relaxed);
                if s.ring {
                    c.bell().rings.fetch_add(1, Ordering::Release);
                }
                c.sent[i as usize] = Some(Sent {
                    seq,
                    op: code,
                    flags,
                    size,
                    align,
                    offset,
                });
                if s.serve {
                    serve(&mut server, c, &mut blocks, log);
                    check_quotas(&blocks, &clients, &policy, log);
                }
            }
            Action::Ledger { client, action } => {
                let c = &clients[usize::from(*client) % nc];
                let ledger = c.ledger();
                match *action {
                    LedgerAction::Put {
                        index,
                        delta,
                        granules,
                        released,
                        hint,
                    } => {
                        let (off, len) = blocks.pick(index, false).unwrap_or((0, 1));
                        let block = LedgerBlock {
                            offset: ((off / GRANULE as u64) as u32)
                                .wrapping_add_signed(i32::from(delta)),
                            granules: match granules {
                                Granules::Exact => len.max(1),
                                Granules::Raw(g) => u32::from(g),
                            },
                            released,
                        };
                        ledger.put(block, usize::from(hint));
                    }
                    LedgerAction::PutRaw {
                        offset,
                        granules,
                        released,
                        hint,
                    } => {
                        let block = LedgerBlock {
                            offset,
                            granules,
                            released,
                        };
                        ledger.put(block, usize::from(hint));
                    }
                    LedgerAction::Entry { index, word } => ledger.entries
                        [usize::from(index) % LEDGER_ENTRIES]
                        .store(word, Ordering::Release),
                    LedgerAction::CachedGranules(v) => {
                        ledger.cached_granules.store(v, Ordering::Relaxed)
                    }
                    LedgerAction::Pending(v) => ledger.pending.store(v, Ordering::Release),
                }
            }
            Action::Bell {
                client,
                rings,
                slots_hi,
            } => {
                let c = &clients[usize::from(*client) % nc];
                c.bell().rings.fetch_add(*rings, Ordering::Release);
                if let Some(hi) = slots_hi {
                    c.bell().slots_hi.store(*hi, Ordering::Release);
                }
            }
            Action::Serve { client } => {
                let c = &mut clients[usize::from(*client) % nc];
                serve(&mut server, c, &mut blocks, log);
                check_quotas(&blocks, &clients, &policy, log);
            }
            Action::Reconnect { client, uid } => {
                let k = usize::from(*client) % nc;
                server.disconnect(clients[k].id);
                if let Err(e) = server.check() {
                    panic!(
                        "after disconnecting client {}: {e}\nactions: {log:#?}",
                        clients[k].id
                    );
                }
                // The old client's channel (and the daemon's mapping of it) is gone first.
                clients[k] = add_client(&mut server, *uid);
            }
            Action::Status => {
                let status = server.status_json();
                let _ = (status.to_string(), server.stats_line());
            }
        }
    }
    for c in &clients {
        server.disconnect(c.id);
    }
    if let Err(e) = server.check() {
        panic!("after disconnecting everyone: {e}\nactions: {actions:#?}");
    }
    let status = server.status_json();
    let left = (
        status["live_blocks"].as_u64(),
        status["used_bytes"].as_u64(),
    );
    assert_eq!(
        left,
        (Some(0), Some(0)),
        "blocks left once every client is gone\nactions: {actions:#?}"
    );
    drop(clients);
    drop(server);
    drop(blocks);
    names.unlink_all();
});
