//! The daemon's request loop driven through client channels with arbitrary bytes (issue 12).
//!
//! Each input builds a `Server` over fresh objects (a 1 MiB arena, 4 slots per channel, quotas
//! small or unlimited), adds one or two local clients (`Server::add_local_client`), maps their
//! request channels as a client would, and plays a sequence of actions:
//!
//! - `Scribble`: any bytes at any offset of a request channel (header, bell, slots, ledger);
//! - `Submit`: a well-formed request in a slot (`RequestSlot::submit_with_token`, then the bell),
//!   with any operation code, flags, size, alignment, offset (raw, granule-based, or near a live
//!   block or one the daemon handed out before, with a small delta) and token, drawn so that
//!   most requests get past the field checks. The share operations (`Share`, `Open`, `Close`,
//!   `Send`, `Receive`) mostly name a share the state record shows (live, or seen before and
//!   maybe freed since), its generation (or a near miss), and its view token, its send token,
//!   0, the token with one bit flipped, or any word;
//! - `Ledger`: a block (one the daemon handed out, to this client or another, or made up) put in
//!   the ledger as cached or released, or raw words in its entries and counters;
//! - `Bell`: `rings` and `slots_hi` moved to any value;
//! - `Serve`: `Server::serve` (the channel looked at once, whatever the bell says);
//! - `Reconnect`: `Server::disconnect`, and a new client in its place;
//! - `Status`: the status document;
//! - `Lifecycle`: a share's life between two clients, step by step (allocate, share, open,
//!   send, receive, close, free, reconnect), each step a `Submit` served at once.
//!
//! After every serve and every disconnect the daemon's whole state must check out
//! (`Server::check`: heap invariants, ownership record equal to the heap's used blocks, client
//! and per-process/per-user counts, the share and view tables); every answer in the response
//! channel must carry a known status, and an `Ok` one an offset inside the arena; a request
//! written by `Submit` and left untouched must be answered under its sequence number, as its
//! fields say (an unknown operation refused, flags the operation does not define refused, an
//! allocation at least as large as asked and aligned where the client sees the arena, a share
//! of the block and length asked, with a token and a generation never seen before). The share
//! operations are checked against the share table as the state record showed it before the
//! serve: an `Open` succeeds only with the share's view or send token, a `Receive` only with
//! its send token, and both answer the share's view token and length; a `Free` or `Reallocate`
//! of a block that was shared before the serve and still is after it never succeeds. The
//! clients together hold no more than the process quota, and those of a user no more than the
//! user quota. Once every client is gone, no block, share or view may be left (status and state
//! record). Nothing may panic.
//!
//! Blocks and shares are read from the daemon's state record (`/dev/shm/NAME.state`, mapped
//! read-only here): the live ones, and every block start and share it showed after a serve
//! (since freed, some). The response
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
    self, BlockFlags, ClientBell, Ledger, LedgerBlock, Op, OwnerEntry, RequestSlot, ResponseSlot,
    SegmentHeader, ShareEntry, Status, ViewEntry, ARENA_DATA_OFFSET, BELL_OFFSET, FLAG_ZEROED,
    HEADER_FLAG_HUGE_PAGES, IDLE, LEDGER_ENTRIES, MAX_ALIGN, MAX_SHARES, MAX_VIEW_REFS,
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
/// Shares remembered for `ShareRef::Seen`, at most.
const MAX_SEEN_SHARES: usize = 128;
/// The arena segment's length, as the state record's layout counts it.
const ARENA_SEGMENT: u64 = ARENA + ARENA_DATA_OFFSET as u64;

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
    Share,
    Open,
    Close,
    Send,
    Receive,
    /// Any code (3 to 10 are the known ones).
    Raw(u32),
}

impl<'a> Arbitrary<'a> for OpCode {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0u8..=16)? {
            0..=2 => Self::Allocate,
            3..=4 => Self::Free,
            5 => Self::Reallocate,
            6..=7 => Self::Share,
            8..=9 => Self::Open,
            10..=11 => Self::Close,
            12..=13 => Self::Send,
            14..=15 => Self::Receive,
            _ => Self::Raw(u.arbitrary()?),
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Flags {
    /// Flags the operation defines: [`FLAG_ZEROED`] or not for an allocation,
    /// [`BlockFlags::OWNER`] or not for a close, 0 otherwise.
    Valid {
        zeroed: bool,
        owner: bool,
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
                owner: u.arbitrary()?,
            }
        })
    }
}

/// The token of a share operation, for a share the record shows.
#[derive(Debug, Clone, Copy)]
enum TokenPick {
    /// The share's view token.
    View,
    /// Its send token (0 unless it is in transit).
    Send,
    Zero,
    /// The view token with bit `n % 64` flipped.
    Flip(u8),
    Raw(u64),
}

impl<'a> Arbitrary<'a> for TokenPick {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0u8..=9)? {
            0..=4 => Self::View,
            5..=6 => Self::Send,
            7 => Self::Zero,
            8 => Self::Flip(u.arbitrary()?),
            _ => Self::Raw(u.arbitrary()?),
        })
    }
}

/// The length a `Share` asks for, when its offset names a live block (else the submit's own
/// size).
#[derive(Debug, Clone, Copy)]
enum ShareLen {
    /// The block's length.
    Whole,
    /// `n / 65536` of it.
    Part(u16),
    Zero,
    /// One byte more than the block.
    Over,
    /// The submit's own size.
    Fields,
}

impl<'a> Arbitrary<'a> for ShareLen {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0u8..=9)? {
            0..=3 => Self::Whole,
            4..=6 => Self::Part(u.arbitrary()?),
            7 => Self::Zero,
            8 => Self::Over,
            _ => Self::Fields,
        })
    }
}

/// What an `Open`, `Close`, `Send` or `Receive` names (a `Share` takes the submit's own
/// offset, which mostly names a live block, and [`ShareLen`]).
#[derive(Debug, Clone, Copy)]
enum ShareRef {
    /// The submit's own offset and size (as the generation), and `token`.
    Fields { token: u64 },
    /// Share `index` (modulo their number) of the live ones (of those seen before if there is
    /// none), its offset plus `offset_delta` and its generation plus `generation_delta`.
    Live {
        index: u8,
        offset_delta: i16,
        generation_delta: i8,
        token: TokenPick,
    },
    /// Share `index` of the live ones the submitting client owns (else of any live one), as
    /// it is: what a `Send` or an owner's `Close` may succeed on.
    Owned { index: u8, token: TokenPick },
    /// Share `index` of those seen before, live or freed since (a stale handle).
    Seen { index: u8, token: TokenPick },
    /// The live share made last (the highest generation), as it is.
    Newest { token: TokenPick },
}

impl<'a> Arbitrary<'a> for ShareRef {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0u8..=12)? {
            0 => Self::Fields {
                token: u.arbitrary()?,
            },
            12 => Self::Newest {
                token: u.arbitrary()?,
            },
            1..=6 => Self::Live {
                index: u.arbitrary()?,
                offset_delta: if u.ratio(1u8, 8)? { u.arbitrary()? } else { 0 },
                generation_delta: if u.ratio(1u8, 8)? { u.arbitrary()? } else { 0 },
                token: u.arbitrary()?,
            },
            7..=9 => Self::Owned {
                index: u.arbitrary()?,
                token: u.arbitrary()?,
            },
            _ => Self::Seen {
                index: u.arbitrary()?,
                token: u.arbitrary()?,
            },
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
    /// The start of a live block of the client that submits (else of any client), plus
    /// `delta`: what a `Share`, a `Free` or a `Reallocate` may succeed on.
    Own {
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
        Ok(match u.int_in_range(0u8..=11)? {
            0..=3 => Self::Live {
                index: u.arbitrary()?,
                delta: delta(u)?,
            },
            4..=6 => Self::Own {
                index: u.arbitrary()?,
                delta: delta(u)?,
            },
            7 => Self::Handed {
                index: u.arbitrary()?,
                delta: delta(u)?,
            },
            8..=9 => Self::Granule {
                granule: u.arbitrary()?,
                delta: delta(u)?,
            },
            10 => Self::View {
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
    /// For the share operations but `Share`: the share, its generation and the token.
    share: ShareRef,
    /// For `Share`: the length.
    share_len: ShareLen,
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
    /// A share's life, step by step, between client `owner` and client `other` (the same if
    /// there is one): what random submits reach only rarely.
    Lifecycle {
        owner: u8,
        other: u8,
        /// Of the blocks `Allocate` makes.
        granules: u8,
        /// First an allocation of the owner, and a share of one of its blocks (`index`) of
        /// this length; then, each if given, a view of the newest share by the other client
        /// with this token, a send of it by the owner, and a receive of it by the other client
        /// (or, with `receiver_is_owner`, the owner) with this token; then `steps`.
        index: u8,
        len: ShareLen,
        open: Option<TokenPick>,
        send: bool,
        receive: Option<TokenPick>,
        receiver_is_owner: bool,
        steps: Vec<LifeStep>,
    },
}

/// Steps of a [`Action::Lifecycle`] played at most.
const MAX_LIFE_STEPS: usize = 16;

/// One step of a [`Action::Lifecycle`]: a request in slot 0 of the owner (or, with `other`,
/// of the other client), served at once.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum LifeStep {
    /// An allocation.
    Allocate,
    /// A share of one of the owner's blocks.
    Share { index: u8, len: ShareLen },
    /// A view of the newest share.
    OpenNewest { other: bool, token: TokenPick },
    /// A receive of the newest share.
    ReceiveNewest { other: bool, token: TokenPick },
    /// A close of a view of the newest share, or (`owner`) of the ownership.
    CloseNewest { other: bool, owner: bool },
    /// A view of a live share.
    Open {
        other: bool,
        index: u8,
        token: TokenPick,
    },
    /// A send of one of the owner's shares.
    Send { index: u8 },
    /// A send of the newest share (by the owner).
    SendNewest,
    /// A receive of a live share.
    Receive {
        other: bool,
        index: u8,
        token: TokenPick,
    },
    /// A close of a view of a live share, or (`owner`) of a share the client owns.
    Close { other: bool, owner: bool, index: u8 },
    /// A free of one of the owner's blocks (refused if it is shared).
    Free { index: u8 },
    /// The client's connection ends; a new client of user `uid` takes its place.
    Reconnect { other: bool, uid: u8 },
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
    token: u64,
}

/// A share as the state record shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ShareRec {
    offset: u64,
    generation: u32,
    len: u64,
    token: u64,
    send_token: u64,
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
    /// Shares the record showed after a serve (the latest send token of each), live and freed.
    seen_shares: Vec<ShareRec>,
    /// Every share generation seen (in the record, or in an answer to `Share`).
    generations: HashSet<u32>,
    /// The live shares, as of the last serve or disconnect (nothing else changes them).
    current: Vec<ShareRec>,
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

    /// The length in bytes of the live block that starts at `offset`, if one does.
    fn length_at(&self, offset: u64) -> Option<u64> {
        let g = usize::try_from(offset / GRANULE as u64).ok()?;
        if !offset.is_multiple_of(GRANULE as u64) || g >= GRANULES {
            return None;
        }
        let e = self.entry(g);
        (e.owner.load(Ordering::Relaxed) != 0)
            .then(|| u64::from(e.granules.load(Ordering::Relaxed)) * GRANULE as u64)
    }

    /// Bytes of the live blocks of client `id`.
    fn bytes_of(&self, id: u32) -> u64 {
        (0..GRANULES)
            .filter(|&g| self.entry(g).owner.load(Ordering::Relaxed) == id)
            .map(|g| u64::from(self.entry(g).granules.load(Ordering::Relaxed)) * GRANULE as u64)
            .sum()
    }

    /// Share entry `i` of the record.
    fn share_entry(&self, i: usize) -> &ShareEntry {
        assert!(i < MAX_SHARES);
        // SAFETY: the record is `state_segment_len` long, which holds the share table after
        // the owner entries; entries are 8-aligned, atomics only.
        unsafe {
            self.record
                .at(wire::share_entry_offset(ARENA_SEGMENT, GRANULE as u32, i))
        }
    }

    /// View entry `i` of the record.
    fn view_entry(&self, i: usize) -> &ViewEntry {
        assert!(i < MAX_VIEW_REFS);
        // SAFETY: as in `share_entry`.
        unsafe {
            self.record
                .at(wire::view_entry_offset(ARENA_SEGMENT, GRANULE as u32, i))
        }
    }

    /// The live shares now.
    fn shares(&self) -> Vec<ShareRec> {
        (0..MAX_SHARES)
            .filter_map(|i| {
                let e = self.share_entry(i);
                let granule = e.granule.load(Ordering::Acquire);
                (granule != 0).then(|| ShareRec {
                    offset: u64::from(granule - 1) * GRANULE as u64,
                    generation: e.generation.load(Ordering::Relaxed),
                    len: e.len.load(Ordering::Relaxed),
                    token: e.token.load(Ordering::Relaxed),
                    send_token: e.send_token.load(Ordering::Relaxed),
                })
            })
            .collect()
    }

    /// View entries in use now.
    fn views_in_use(&self) -> usize {
        (0..MAX_VIEW_REFS)
            .filter(|&i| self.view_entry(i).share.load(Ordering::Relaxed) != 0)
            .count()
    }

    /// Reads the live shares again ([`Blocks::current`]) after a disconnect.
    fn refresh(&mut self) {
        self.current = self.shares();
    }

    /// Adds the live blocks and `shares` (the live ones now) to the history.
    fn remember(&mut self, shares: Vec<ShareRec>) {
        for (off, granules) in self.live() {
            if let Some(k) = self.history.iter().position(|(o, _)| *o == off) {
                self.history[k].1 = granules;
            } else if self.history.len() < MAX_HANDED {
                self.history.push((off, granules));
            }
        }
        self.current = shares;
        for &s in &self.current {
            self.generations.insert(s.generation);
            let same = |r: &ShareRec| (r.offset, r.generation) == (s.offset, s.generation);
            if let Some(k) = self.seen_shares.iter().position(same) {
                if s.send_token != 0 {
                    self.seen_shares[k].send_token = s.send_token;
                }
            } else if self.seen_shares.len() < MAX_SEEN_SHARES {
                self.seen_shares.push(s);
            }
        }
    }

    /// Offset, generation and token for a share operation of client `id`.
    fn share_ref(&self, r: ShareRef, id: u32, offset: u64, size: u64) -> (u64, u64, u64) {
        let token_of = |s: &ShareRec, t: TokenPick| match t {
            TokenPick::View => s.token,
            TokenPick::Send => s.send_token,
            TokenPick::Zero => 0,
            TokenPick::Flip(bit) => s.token ^ (1 << (bit % 64)),
            TokenPick::Raw(v) => v,
        };
        let pick = |list: &[ShareRec], index: u8| {
            (!list.is_empty()).then(|| list[usize::from(index) % list.len()])
        };
        match r {
            ShareRef::Fields { token } => (offset, size, token),
            ShareRef::Live {
                index,
                offset_delta,
                generation_delta,
                token,
            } => match pick(&self.current, index).or_else(|| pick(&self.seen_shares, index)) {
                Some(s) => (
                    s.offset.wrapping_add_signed(i64::from(offset_delta)),
                    u64::from(
                        s.generation
                            .wrapping_add_signed(i32::from(generation_delta)),
                    ),
                    token_of(&s, token),
                ),
                None => (offset, size, 0),
            },
            ShareRef::Owned { index, token } => {
                let owned: Vec<ShareRec> = self
                    .current
                    .iter()
                    .filter(|s| {
                        let g = (s.offset / GRANULE as u64) as usize;
                        g < GRANULES && self.entry(g).owner.load(Ordering::Relaxed) == id
                    })
                    .copied()
                    .collect();
                match pick(&owned, index).or_else(|| pick(&self.current, index)) {
                    Some(s) => (s.offset, u64::from(s.generation), token_of(&s, token)),
                    None => (offset, size, 0),
                }
            }
            ShareRef::Newest { token } => match self.current.iter().max_by_key(|s| s.generation) {
                Some(s) => (s.offset, u64::from(s.generation), token_of(s, token)),
                None => (offset, size, 0),
            },
            ShareRef::Seen { index, token } => match pick(&self.seen_shares, index) {
                Some(s) => (s.offset, u64::from(s.generation), token_of(&s, token)),
                None => (offset, size, 0),
            },
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

    /// The offset `o` names for a request of client `id`.
    fn offset(&self, o: Offset, id: u32) -> u64 {
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
            Offset::Own { index, delta } => {
                let own: Vec<u64> = (0..GRANULES)
                    .filter(|&g| self.entry(g).owner.load(Ordering::Relaxed) == id)
                    .map(|g| (g * GRANULE) as u64)
                    .collect();
                if own.is_empty() {
                    near(index, delta, false)
                } else {
                    own[usize::from(index) % own.len()].wrapping_add_signed(i64::from(delta))
                }
            }
            Offset::Handed { index, delta } => near(index, delta, true),
        }
    }
}

static N: AtomicU32 = AtomicU32::new(0);

/// Checks the answers in `c`'s response channel after a serve in which the daemon scanned the
/// slots below `hi`; `before` and `after` are the shares the record showed before and after
/// the serve, `log` the actions so far, for the message.
fn check_answers(
    c: &mut Local,
    hi: u32,
    before: &[ShareRec],
    after: &[ShareRec],
    generations: &mut HashSet<u32>,
    log: &[Action],
) {
    for i in 0..SLOTS {
        // SAFETY: `c` is still the server's client (callers check right after serving it).
        let Some(rs) = (unsafe { c.answer(i) }) else {
            return;
        };
        let (seq, status) = (
            rs.seq.load(Ordering::Acquire),
            rs.status.load(Ordering::Relaxed),
        );
        let (offset, size, token, tag) = (
            rs.offset.load(Ordering::Relaxed),
            rs.size.load(Ordering::Relaxed),
            rs.token.load(Ordering::Relaxed),
            rs.tag.load(Ordering::Relaxed),
        );
        let ok = status == Status::Ok as u32;
        let (id, sent) = (c.id, c.sent[i as usize]);
        let fail = |why: &str| -> ! {
            panic!(
                "client {id} slot {i}: {why}: answer seq {seq} status {status} offset \
                 {offset:#x} size {size:#x} token {token:#x} tag {tag:#x}, sent {sent:?}\n\
                 shares before the serve: {before:?}\nafter: {after:?}\nactions: {log:#?}"
            )
        };
        if Status::from_u32(status).is_none() {
            fail("unknown status");
        }
        // (A share's length need not be whole granules: that is checked below, per operation.)
        if ok
            && (offset.checked_add(size).is_none_or(|end| end > ARENA)
                || !offset.is_multiple_of(GRANULE as u64))
        {
            fail("an Ok answer names no granule-aligned offset inside the arena");
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
        // The share at the request's offset and generation before the serve, if any.
        let named = |list: &[ShareRec]| {
            list.iter()
                .find(|r| r.offset == s.offset && u64::from(r.generation) == s.size)
                .copied()
        };
        let shared_throughout = || {
            before.iter().any(|r| {
                r.offset == s.offset
                    && after
                        .iter()
                        .any(|a| (a.offset, a.generation) == (r.offset, r.generation))
            })
        };
        match Op::from_u32(s.op) {
            None if status != Status::UnknownOp as u32 => fail("unknown op not refused"),
            Some(op) if ok && BlockFlags::for_request(op, s.flags).is_none() => {
                fail(&format!("{op:?}: bad flags"))
            }
            Some(Op::Allocate) if ok => {
                let view = s.offset & (MAX_ALIGN - 1);
                if size < s.size || !size.is_multiple_of(GRANULE as u64) {
                    fail("allocation smaller than asked, or not whole granules");
                }
                if s.align == 0 || !(view + offset).is_multiple_of(s.align) {
                    fail("allocation not aligned where the client sees the arena");
                }
            }
            Some(Op::Free) if ok && (offset, size) != (0, 0) => fail("free answered a block"),
            Some(Op::Reallocate)
                if ok
                    && (offset != s.offset
                        || size < s.size
                        || !size.is_multiple_of(GRANULE as u64)) =>
            {
                fail("resize answered another block, or a smaller one")
            }
            Some(Op::Reallocate | Op::Free) if ok && s.flags != 0 => fail("flags not refused"),
            Some(Op::Reallocate | Op::Free) if ok && shared_throughout() => {
                fail("a shared block was freed or resized")
            }
            Some(Op::Share) if ok => {
                let generation = tag as u32;
                let block = (tag >> 32) * GRANULE as u64;
                if (offset, size) != (s.offset, s.size) {
                    fail("share answered another block or length");
                }
                if token == 0 {
                    fail("a share with token 0");
                }
                if block < size || offset + block > ARENA {
                    fail("a share's block shorter than its length, or past the arena");
                }
                if !generations.insert(generation) {
                    fail("a share generation given twice");
                }
            }
            Some(op @ (Op::Open | Op::Receive)) if ok => {
                if offset != s.offset || u64::from(tag as u32) != s.size {
                    fail("answered another share");
                }
                // Its tokens are random: a request can only know them from the record.
                let Some(r) = named(before) else {
                    fail("opened or received a share that did not exist before the serve");
                };
                let known = s.token != 0
                    && (s.token == r.send_token || (op == Op::Open && s.token == r.token));
                if !known {
                    fail("a view or the ownership without the share's token");
                }
                if token != r.token || size != r.len {
                    fail("the answer is not the share's view token and length");
                }
            }
            Some(Op::Send) if ok && token == 0 => fail("a send token of 0"),
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
    let after = blocks.shares();
    check_answers(c, hi, &blocks.current, &after, &mut blocks.generations, log);
    blocks.remember(after);
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

/// Plays a `Submit`: the request written into its slot, the bell rung (as it says), and the
/// client served and checked (as it says).
fn submit(
    server: &mut Server,
    clients: &mut [Local],
    blocks: &mut Blocks,
    policy: &Policy,
    s: &Submit,
    log: &[Action],
) {
    let nc = clients.len();
    let c = &mut clients[usize::from(s.client) % nc];
    let i = u32::from(s.slot) % SLOTS;
    let code = match s.op {
        OpCode::Allocate => Op::Allocate as u32,
        OpCode::Free => Op::Free as u32,
        OpCode::Reallocate => Op::Reallocate as u32,
        OpCode::Share => Op::Share as u32,
        OpCode::Open => Op::Open as u32,
        OpCode::Close => Op::Close as u32,
        OpCode::Send => Op::Send as u32,
        OpCode::Receive => Op::Receive as u32,
        OpCode::Raw(code) => code,
    };
    let flags = match s.flags {
        Flags::Valid { zeroed, .. } if zeroed && code == Op::Allocate as u32 => FLAG_ZEROED,
        Flags::Valid { owner, .. } if owner && code == Op::Close as u32 => BlockFlags::OWNER.bits(),
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
    let mut offset = blocks.offset(s.offset, c.id);
    let mut size = size;
    let mut token = 0;
    if matches!(
        Op::from_u32(code),
        Some(Op::Open | Op::Close | Op::Send | Op::Receive)
    ) {
        (offset, size, token) = blocks.share_ref(s.share, c.id, offset, size);
    } else if let (Some(Op::Share), Some(block)) = (Op::from_u32(code), blocks.length_at(offset)) {
        size = match s.share_len {
            ShareLen::Whole => block,
            ShareLen::Part(n) => block * u64::from(n) / 65536,
            ShareLen::Zero => 0,
            ShareLen::Over => block + 1,
            ShareLen::Fields => size,
        };
    } else if let ShareRef::Fields { token: t } = s.share {
        // Any token in any other request: the daemon must not care.
        token = t;
    }
    if s.claim {
        c.bell().note_claim(i);
    }
    let slot = c.slot(i);
    slot.cpu.store(u32::from(s.cpu), Ordering::Relaxed);
    let seq = slot.submit_with_token(
        Op::from_u32(code).unwrap_or(Op::Allocate),
        flags,
        size,
        align,
        offset,
        token,
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
        token,
    });
    if s.serve {
        serve(server, c, blocks, log);
        check_quotas(blocks, clients, policy, log);
    }
}

/// Ends client `k`'s connection (the daemon's whole state checked after), and puts a new
/// client of user `uid` in its place.
fn reconnect(
    server: &mut Server,
    clients: &mut [Local],
    blocks: &mut Blocks,
    k: usize,
    uid: u8,
    log: &[Action],
) {
    server.disconnect(clients[k].id);
    if let Err(e) = server.check() {
        panic!(
            "after disconnecting client {}: {e}\nactions: {log:#?}",
            clients[k].id
        );
    }
    blocks.refresh();
    // The old client's channel (and the daemon's mapping of it) is gone first.
    clients[k] = add_client(server, uid);
}

/// The `Submit` of one step of a `Lifecycle` (slot 0, claimed, rung and served at once).
fn life_submit(step: LifeStep, owner: u8, other: u8, granules: u8) -> Submit {
    let who = |o: bool| if o { other } else { owner };
    let mut s = Submit {
        client: owner,
        slot: 0,
        op: OpCode::Allocate,
        flags: Flags::Valid {
            zeroed: false,
            owner: false,
        },
        cpu: 0,
        size: Size::Granules(granules.max(1)),
        align: Align::Small(12),
        offset: Offset::View { granules: 0 },
        share: ShareRef::Fields { token: 0 },
        share_len: ShareLen::Whole,
        claim: true,
        ring: true,
        serve: true,
    };
    let live = |index, token| ShareRef::Live {
        index,
        offset_delta: 0,
        generation_delta: 0,
        token,
    };
    match step {
        LifeStep::Allocate => {}
        LifeStep::Share { index, len } => {
            s.op = OpCode::Share;
            s.offset = Offset::Own { index, delta: 0 };
            s.share_len = len;
        }
        LifeStep::Open {
            other,
            index,
            token,
        } => {
            s.client = who(other);
            s.op = OpCode::Open;
            s.share = live(index, token);
        }
        LifeStep::Send { index } => {
            s.op = OpCode::Send;
            s.share = ShareRef::Owned {
                index,
                token: TokenPick::Zero,
            };
        }
        LifeStep::SendNewest => {
            s.op = OpCode::Send;
            s.share = ShareRef::Newest {
                token: TokenPick::Zero,
            };
        }
        LifeStep::Receive {
            other,
            index,
            token,
        } => {
            s.client = who(other);
            s.op = OpCode::Receive;
            s.share = live(index, token);
        }
        LifeStep::Close {
            other,
            owner: as_owner,
            index,
        } => {
            s.client = who(other);
            s.op = OpCode::Close;
            s.flags = Flags::Valid {
                zeroed: false,
                owner: as_owner,
            };
            s.share = if as_owner {
                ShareRef::Owned {
                    index,
                    token: TokenPick::Zero,
                }
            } else {
                live(index, TokenPick::Zero)
            };
        }
        LifeStep::OpenNewest { other, token } => {
            s.client = who(other);
            s.op = OpCode::Open;
            s.share = ShareRef::Newest { token };
        }
        LifeStep::ReceiveNewest { other, token } => {
            s.client = who(other);
            s.op = OpCode::Receive;
            s.share = ShareRef::Newest { token };
        }
        LifeStep::CloseNewest {
            other,
            owner: as_owner,
        } => {
            s.client = who(other);
            s.op = OpCode::Close;
            s.flags = Flags::Valid {
                zeroed: false,
                owner: as_owner,
            };
            s.share = ShareRef::Newest {
                token: TokenPick::Zero,
            };
        }
        LifeStep::Free { index } => {
            s.op = OpCode::Free;
            s.offset = Offset::Own { index, delta: 0 };
        }
        LifeStep::Reconnect { .. } => unreachable!("played by the caller"),
    }
    s
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
            seen_shares: Vec::new(),
            generations: HashSet::new(),
            current: Vec::new(),
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
                submit(&mut server, &mut clients, &mut blocks, &policy, s, log);
            }
            Action::Lifecycle {
                owner,
                other,
                granules,
                index,
                len,
                open,
                send,
                receive,
                receiver_is_owner,
                steps,
            } => {
                let mut script = vec![
                    LifeStep::Allocate,
                    LifeStep::Share {
                        index: *index,
                        len: *len,
                    },
                ];
                if let Some(token) = *open {
                    script.push(LifeStep::OpenNewest { other: true, token });
                }
                if *send {
                    script.push(LifeStep::SendNewest);
                }
                if let Some(token) = *receive {
                    script.push(LifeStep::ReceiveNewest {
                        other: !receiver_is_owner,
                        token,
                    });
                }
                script.extend(steps.iter().take(MAX_LIFE_STEPS));
                for step in script {
                    if let LifeStep::Reconnect { other: o, uid } = step {
                        let k = usize::from(if o { *other } else { *owner }) % nc;
                        reconnect(&mut server, &mut clients, &mut blocks, k, uid, log);
                        continue;
                    }
                    let s = life_submit(step, *owner, *other, *granules);
                    submit(&mut server, &mut clients, &mut blocks, &policy, &s, log);
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
                reconnect(&mut server, &mut clients, &mut blocks, k, *uid, log);
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
        status["shared_blocks"].as_u64(),
        status["views"].as_u64(),
        status["orphaned_shares"].as_u64(),
    );
    assert_eq!(
        left,
        (Some(0), Some(0), Some(0), Some(0), Some(0)),
        "blocks, shares or views left once every client is gone\nactions: {actions:#?}"
    );
    let (shares, views) = (blocks.shares(), blocks.views_in_use());
    assert!(
        shares.is_empty() && views == 0,
        "the state record keeps {shares:?} and {views} view entries once every client is \
         gone\nactions: {actions:#?}"
    );
    drop(clients);
    drop(server);
    drop(blocks);
    names.unlink_all();
});
