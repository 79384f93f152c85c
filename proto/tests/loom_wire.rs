//! Model check of the channel protocol in `xalloc_proto::wire` with loom: clients and the
//! daemon, each sleeping when it has nothing to do, exchange requests and released blocks
//! through a client's channel ([`ClientBell`], [`DaemonBell`], [`RequestSlot`],
//! [`ResponseSlot`], [`Ledger`]). loom explores every interleaving (up to its preemption bound)
//! and fails on a deadlock, which is what a lost wake-up or a lost request causes here (every
//! wait below is unbounded, on purpose: a timeout would hide the bug), and the assertions check
//! that every answer belongs to its request and every released block is freed exactly once.
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 CARGO_TARGET_DIR=target/loom cargo test
//! -p xalloc-proto --test loom_wire --release` (as `scripts/test.sh` does; the five tests take
//! about 8 s on two cores, after the build).
//!
//! # What is modelled
//!
//! - The *client's* wait for its answer: a bounded spin on [`ResponseSlot::read`], then the
//!   sleep handshake as `global/src/client.rs` does it ([`RequestSlot::prepare_sleep`], one more
//!   look at the response's `seq`, a futex wait on it, [`RequestSlot::woke`]); the daemon wakes
//!   the futex when [`ResponseSlot::publish`] says the client sleeps. A client thread claims its
//!   slot first ([`RequestSlot::try_claim`], [`ClientBell::note_claim`]).
//! - The *daemon's* wait for work, in the order of `daemon/src/server.rs`: per channel it is
//!   either watching ([`DaemonBell::watch`]: it polls `rings` a bounded number of times) or
//!   not. Before it sleeps it unwatches every channel it watched ([`DaemonBell::unwatch`]); a
//!   channel whose `rings` moved since it last served it is served and watched again, and the
//!   daemon stays awake; otherwise it blocks until a client's socket is readable, drains the
//!   [`WAKE`](xalloc_proto::wire::WAKE) bytes, watches the channels that were readable and
//!   serves them. A client sends a wake byte when [`ClientBell::ring`] says the daemon does not
//!   watch its channel.
//! - Serving a channel: read `rings` (nothing to do if it did not move), take the request of
//!   every slot below `slots_hi` ([`RequestSlot::take`]), publish the answers, and sweep the
//!   released blocks of the client's [`Ledger`] ([`Ledger::sweep`]).
//!
//! The tests: one client thread making requests in a row; one releasing blocks around a
//! request; two threads of one client in two slots; and two clients, one of which lies (never
//! sends its wake byte, or stops sending it after its first request), which stalls only
//! itself: the daemon still serves, and stops for, the honest client next to it.
//!
//! Checked when this model was written: it deadlocks if the daemon sleeps without its last
//! look after `unwatch`, if `unwatch` or `prepare_sleep` lose their fence, if the client reads
//! `watching` before it rings, if the client sleeps without `prepare_sleep`, if the daemon does
//! not wake the futex when `publish` says so, if it takes as served a `rings` read after the
//! slots rather than before, if a client thread skips `note_claim`, or if the daemon goes to
//! sleep after a last look that found the bell rung but answered no request (the channel is
//! watched again then, so the next ring sends no wake byte: `released_blocks_are_freed_once`
//! shows it with a ring that only released a block).
//!
//! # Simplifications
//!
//! - The futex is a `Mutex` + `Condvar` whose `wait` sleeps only if the word still holds the
//!   expected value, checked under the lock `wake` takes: as atomic with respect to `wake` as the
//!   kernel's. It has no spurious wake-ups and no timeout (the real client's `SLEEP_SLICE` and
//!   daemon-liveness checks are left out: here they could only hide a lost wake-up).
//! - A socket is a byte count under a `Mutex`; the daemon's epoll is one `Condvar` over all the
//!   counts, level-triggered (a socket stays readable until the daemon drains it). Connection
//!   ends, the pidfds and the handshake on the instance socket are not modelled.
//! - Spins and polls are bounded by one look each (`SPINS`, `POLLS`): the protocol must be right
//!   for any bound, and every extra look multiplies loom's work. The daemon's spin budget,
//!   `unwatch_idle` and its timers are left out (they only make it look more often).
//! - The ledger's `pending` flag is not modelled: the daemon sweeps every time it serves the
//!   channel. A daemon that sweeps only when `pending` is set must clear it with a swap (a load
//!   and a store of 0 can erase the flag of a block released in between, which then waits for
//!   the next release), but loom 0.7 lets another thread's plain store fall between the read
//!   and the write of a read-modify-write (tokio-rs/loom#254, #389), so a model with the swap
//!   reports a deadlock (`pending` read as 0 after the client set it) that no real execution
//!   has. Sweeping every time still checks that every released block is freed once and that
//!   the ring that follows a release is never lost.
//! - Validation of the request, the allocator itself, the `cpu` hints,
//!   [`Ledger::take`]/[`Ledger::reclaim`] (cached blocks) and the daemon's `state` are left out.
//!   `wire.rs`'s own tests cover the ledger's cached-block races without loom.
//! - loom treats `SeqCst` loads and stores as acquire/release but models `SeqCst` fences
//!   exactly; the protocol relies on the fences only (see the module doc of `wire`).
//! - Three threads at most, and few requests: loom's cost grows steeply with each. One more
//!   request for the honest client of `a_client_that_stops_waking_the_daemon_stalls_only_itself`
//!   takes about 17 s on its own; one more for a thread of
//!   `two_threads_of_a_client_share_its_channel` (which would let a later request meet a
//!   daemon whose last look found nothing to answer) about 50 s.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU32, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use xalloc_proto::wire::{
    ClientBell, DaemonBell, Ledger, LedgerBlock, Op, Request, RequestSlot, Response, ResponseSlot,
    Status,
};

/// Runs one model at a time: every loom execution maps a stack for each modelled thread, and
/// two models at once in one process mostly contend in the kernel (on two cores they took up to
/// three times as long as one after the other).
fn model(f: impl Fn() + Sync + Send + 'static) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loom::model(f);
}

/// Looks at the answer before the client starts its sleep handshake.
const SPINS: usize = 1;
/// Looks at a watched channel's `rings` before the daemon decides to sleep.
const POLLS: usize = 1;

/// A futex as the kernel gives it: `wait` sleeps only if the word still holds `expected`, and
/// the check and the sleep are atomic with respect to `wake`.
struct Futex {
    lock: Mutex<()>,
    cv: Condvar,
}

impl Futex {
    fn new() -> Self {
        Self {
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    fn wait(&self, word: &AtomicU32, expected: u32) {
        let guard = self.lock.lock().unwrap();
        if word.load(Ordering::SeqCst) == expected {
            drop(self.cv.wait(guard).unwrap());
        }
    }

    fn wake(&self) {
        let _guard = self.lock.lock().unwrap();
        self.cv.notify_all();
    }
}

/// The clients' sockets as the daemon's epoll sees them: a count of unread wake bytes per
/// client, and one readiness wait over all of them, level-triggered.
struct Sockets {
    unread: Mutex<Vec<u32>>,
    readable: Condvar,
}

impl Sockets {
    fn new(clients: usize) -> Self {
        Self {
            unread: Mutex::new(vec![0; clients]),
            readable: Condvar::new(),
        }
    }

    /// Client `i` sends one wake byte.
    fn send_wake(&self, i: usize) {
        let mut unread = self.unread.lock().unwrap();
        unread[i] += 1;
        self.readable.notify_all();
    }

    /// The daemon blocks until some socket is readable, drains every readable one, and returns
    /// which were.
    fn wait_and_drain(&self) -> Vec<bool> {
        let mut unread = self.unread.lock().unwrap();
        while unread.iter().all(|&n| n == 0) {
            unread = self.readable.wait(unread).unwrap();
        }
        unread
            .iter_mut()
            .map(|n| core::mem::replace(n, 0) != 0)
            .collect()
    }
}

/// A slot of a channel: its request, its answer, and the futex (on the answer's `seq`) its
/// owner sleeps on.
struct Slot {
    req: RequestSlot,
    resp: ResponseSlot,
    futex: Futex,
}

/// One client's channel: its request side (bell, slots, ledger) and its response side.
struct Channel {
    bell: ClientBell,
    slots: Vec<Slot>,
    /// Only where a test releases blocks (its 64 entries cost loom objects).
    ledger: Option<Ledger>,
    daemon_bell: DaemonBell,
}

impl Channel {
    /// A channel of `slots` slots, none of them claimed.
    fn new(slots: usize, with_ledger: bool) -> Self {
        Self {
            bell: ClientBell::new(),
            slots: (0..slots)
                .map(|_| Slot {
                    req: RequestSlot::new(),
                    resp: ResponseSlot::new(),
                    futex: Futex::new(),
                })
                .collect(),
            ledger: with_ledger.then(Ledger::new),
            daemon_bell: DaemonBell::new(),
        }
    }

    /// Client side: a thread claims slot `index` as the client does before its first request
    /// there ([`RequestSlot::try_claim`], then [`ClientBell::note_claim`]).
    fn claim(&self, index: u32) -> &Slot {
        let slot = &self.slots[index as usize];
        assert!(slot.req.try_claim(index + 1));
        self.bell.note_claim(index);
        slot
    }
}

/// The answer the daemon gives to `req` (checked by the client).
fn answer(req: &Request) -> Response {
    Response {
        status: Status::Ok as u32,
        flags: 0,
        offset: req.size * 100,
        size: req.size,
        ..Response::default()
    }
}

/// What the daemon did, per channel.
#[derive(Default)]
struct Tally {
    answered: Vec<u32>,
    freed: Vec<Vec<LedgerBlock>>,
}

/// The daemon's view of one channel.
#[derive(Clone, Copy)]
struct Seen {
    watching: bool,
    /// `rings` as of the last time the daemon served the channel.
    served: u32,
}

/// The daemon, in the order of `daemon/src/server.rs` (`run`, `serve_watched`, `unwatch_all`,
/// `serve_client`, and its wake-byte event): serves `chans` until `done` says it may stop.
///
/// It starts asleep, watching no channel, as after its channels went idle. (The real daemon
/// watches a channel as soon as its client connects: the same state as after a wake byte,
/// which every test reaches, at a cost in loom's time when it is the start.)
fn daemon(chans: &[Arc<Channel>], sockets: &Sockets, done: impl Fn(&Tally) -> bool) -> Tally {
    let mut tally = Tally {
        answered: vec![0; chans.len()],
        freed: vec![Vec::new(); chans.len()],
    };
    let mut seen = vec![
        Seen {
            watching: false,
            served: 0,
        };
        chans.len()
    ];
    // Looks at channel `i` if its bell rang since the last look; returns whether it had.
    let serve = |i: usize, seen: &mut [Seen], tally: &mut Tally| {
        let ch = &chans[i];
        let rings = ch.bell.rings.load(Ordering::Acquire);
        if rings == seen[i].served {
            return false;
        }
        seen[i].served = rings;
        // The client's word, bounded by the channel's size whatever it says.
        let hi = ch.bell.slots_hi.load(Ordering::Acquire) as usize;
        for slot in &ch.slots[..hi.min(ch.slots.len())] {
            if let Some(req) = slot.req.take() {
                if slot.resp.publish(&slot.req, req.seq, answer(&req)) {
                    slot.futex.wake();
                }
                tally.answered[i] += 1;
            }
        }
        if let Some(ledger) = &ch.ledger {
            // Every time, not only when `pending` says so: see "Simplifications".
            ledger.sweep(|b| tally.freed[i].push(b));
        }
        true
    };
    let watch = |i: usize, seen: &mut [Seen]| {
        chans[i].daemon_bell.watch();
        seen[i].watching = true;
    };
    while !done(&tally) {
        // Awake: poll the watched channels.
        let mut rang = false;
        for _ in 0..POLLS {
            for i in 0..chans.len() {
                if seen[i].watching {
                    rang |= serve(i, &mut seen, &mut tally);
                }
            }
            if rang {
                break;
            }
        }
        if rang {
            continue;
        }
        // Going to sleep: stop watching, and look once more after the handshake's fence. A
        // channel that rang since it was served is served and watched again, and the daemon
        // stays awake: whether or not that answered a request (a ring may announce a released
        // block only, or a request already answered), the channel is watched, so its client
        // sends no wake byte for its next ring.
        for i in 0..chans.len() {
            if !seen[i].watching {
                continue;
            }
            seen[i].watching = false;
            if chans[i].daemon_bell.unwatch(&chans[i].bell) != seen[i].served {
                serve(i, &mut seen, &mut tally);
                watch(i, &mut seen);
                rang = true;
            }
        }
        if rang {
            continue;
        }
        // Asleep until a client sends a wake byte; then watch and serve the channels that did.
        let ready = sockets.wait_and_drain();
        for (i, _) in ready.iter().enumerate().filter(|(_, &r)| r) {
            watch(i, &mut seen);
            serve(i, &mut seen, &mut tally);
        }
    }
    tally
}

/// Client `i`: rings its bell, and sends a wake byte when the bell says so (unless it lies).
fn ring(ch: &Channel, sockets: &Sockets, i: usize, honest: bool) {
    if ch.bell.ring(&ch.daemon_bell) && honest {
        sockets.send_wake(i);
    }
}

/// Client `i`: asks for `size` bytes in `slot` and waits for the answer as
/// `global/src/client.rs` does (spin, then the sleep handshake on the response's `seq`).
fn request(ch: &Channel, slot: &Slot, sockets: &Sockets, i: usize, size: u64) -> Response {
    let seq = slot.req.submit(Op::Allocate, 0, size, 16, 0);
    ring(ch, sockets, i, true);
    for _ in 0..SPINS {
        if let Some(a) = slot.resp.read(seq) {
            return a;
        }
    }
    loop {
        slot.req.prepare_sleep();
        // After the fence in `prepare_sleep`: either the answer is visible here, or the daemon
        // sees `waiting` and wakes the futex.
        let now = slot.resp.seq.load(Ordering::Relaxed);
        if now != seq {
            slot.futex.wait(&slot.resp.seq, now);
        }
        slot.req.woke();
        if let Some(a) = slot.resp.read(seq) {
            return a;
        }
    }
}

fn check(a: Response, size: u64) {
    assert_eq!(a.status, Status::Ok as u32);
    assert_eq!(a.size, size);
    assert_eq!(a.offset, size * 100, "the answer to another request");
}

/// Requests the client makes in a row in `no_lost_request_or_wake_up`: three, so that a request
/// also meets a daemon that watches the channel again after its last look (the `unwatch` path),
/// not only one woken by a wake byte or still polling.
const REQUESTS: u64 = 3;
/// Requests the honest client makes in `a_client_that_never_wakes_the_daemon_stalls_only_itself`.
const HONEST_REQUESTS: u64 = 2;

/// A client makes requests one after the other; the daemon sleeps between them whenever it
/// likes. Every request is answered (no deadlock) with its own answer.
#[test]
fn no_lost_request_or_wake_up() {
    model(|| {
        let ch = Arc::new(Channel::new(1, false));
        let slot = ch.claim(0);
        let sockets = Arc::new(Sockets::new(1));
        let d = {
            let (ch, sockets) = (Arc::clone(&ch), Arc::clone(&sockets));
            thread::spawn(move || daemon(&[ch], &sockets, |t| u64::from(t.answered[0]) == REQUESTS))
        };
        for size in 1..=REQUESTS {
            check(request(&ch, slot, &sockets, 0, size), size);
        }
        let tally = d.join().unwrap();
        assert_eq!(u64::from(tally.answered[0]), REQUESTS);
        assert!(slot.req.take().is_none(), "nothing left pending");
    });
}

/// A client releases a block into its ledger without waiting for the daemon and rings, makes a
/// request, then releases another block and rings; the daemon sweeps when `rings` moved. Both
/// blocks are freed, each exactly once: the daemon stops only once it freed both and answered
/// the request, so a lost wake-up is a deadlock.
#[test]
fn released_blocks_are_freed_once() {
    let block = |offset| LedgerBlock {
        offset,
        granules: 1,
        released: true,
    };
    model(move || {
        let ch = Arc::new(Channel::new(1, true));
        let slot = ch.claim(0);
        let sockets = Arc::new(Sockets::new(1));
        let d = {
            let (ch, sockets) = (Arc::clone(&ch), Arc::clone(&sockets));
            thread::spawn(move || {
                daemon(&[ch], &sockets, |t| {
                    t.freed[0].len() >= 2 && t.answered[0] == 1
                })
            })
        };
        let ledger = ch.ledger.as_ref().unwrap();
        assert!(ledger.put(block(3), 0));
        ring(&ch, &sockets, 0, true);
        check(request(&ch, slot, &sockets, 0, 1), 1);
        assert!(ledger.put(block(5), 0));
        ring(&ch, &sockets, 0, true);
        let mut tally = d.join().unwrap();
        assert_eq!(tally.answered[0], 1);
        tally.freed[0].sort_unstable_by_key(|b| b.offset);
        assert_eq!(tally.freed[0], [block(3), block(5)], "each freed once");
        assert_eq!(ledger.sweep(|b| panic!("{b:?} left behind")), 0);
    });
}

/// Two clients, one of which never sends its wake byte even when its bell says so. The lying
/// client stalls only itself: the honest one's requests are all answered, and the daemon, which
/// waits for the honest client only, never blocks for good.
#[test]
fn a_client_that_never_wakes_the_daemon_stalls_only_itself() {
    model(|| {
        let (honest, liar) = (
            Arc::new(Channel::new(1, false)),
            Arc::new(Channel::new(1, false)),
        );
        let slot = honest.claim(0);
        let sockets = Arc::new(Sockets::new(2));
        let d = {
            let chans = [Arc::clone(&honest), Arc::clone(&liar)];
            let sockets = Arc::clone(&sockets);
            thread::spawn(move || {
                daemon(&chans, &sockets, |t| {
                    u64::from(t.answered[0]) == HONEST_REQUESTS
                })
            })
        };
        let l = {
            let (liar, sockets) = (Arc::clone(&liar), Arc::clone(&sockets));
            thread::spawn(move || {
                let seq = liar.claim(0).req.submit(Op::Allocate, 0, 7, 16, 0);
                ring(&liar, &sockets, 1, false);
                // It cannot sleep on its answer: nothing may ever come (that is its stall).
                liar.slots[0].resp.read(seq)
            })
        };
        for size in 1..=HONEST_REQUESTS {
            check(request(&honest, slot, &sockets, 0, size), size);
        }
        let tally = d.join().unwrap();
        let liar_answer = l.join().unwrap();
        assert_eq!(u64::from(tally.answered[0]), HONEST_REQUESTS);
        // The daemon never watched the liar's channel (it never heard from it), so it never
        // looked at its slot: the request is still pending, unanswered.
        assert_eq!(tally.answered[1], 0);
        assert!(liar_answer.is_none());
        assert!(
            liar.slots[0].req.take().is_some(),
            "the lie left the request pending"
        );
    });
}

/// Two clients, one of which stops sending its wake byte after its first request, even when its
/// bell says so (one honest request each: a second one costs loom too much here). The lying
/// client stalls only itself: the honest one's request is answered, and the daemon, which has
/// watched both channels and waits for the honest client (and the liar's honest first request)
/// only, never blocks for good.
#[test]
fn a_client_that_stops_waking_the_daemon_stalls_only_itself() {
    model(|| {
        let (honest, liar) = (
            Arc::new(Channel::new(1, false)),
            Arc::new(Channel::new(1, false)),
        );
        let slot = honest.claim(0);
        let sockets = Arc::new(Sockets::new(2));
        let d = {
            let chans = [Arc::clone(&honest), Arc::clone(&liar)];
            let sockets = Arc::clone(&sockets);
            thread::spawn(move || {
                daemon(&chans, &sockets, |t| {
                    t.answered[0] == 1 && t.answered[1] >= 1
                })
            })
        };
        let l = {
            let (liar, sockets) = (Arc::clone(&liar), Arc::clone(&sockets));
            thread::spawn(move || {
                let slot = liar.claim(0);
                check(request(&liar, slot, &sockets, 1, 7), 7);
                let seq = slot.req.submit(Op::Allocate, 0, 8, 16, 0);
                ring(&liar, &sockets, 1, false);
                // It cannot sleep on this answer: nothing may ever come (that is its stall).
                liar.slots[0].resp.read(seq)
            })
        };
        check(request(&honest, slot, &sockets, 0, 1), 1);
        let tally = d.join().unwrap();
        let liar_answer = l.join().unwrap();
        assert_eq!(tally.answered[0], 1);
        // The liar's second request was answered only if the daemon happened to watch its
        // channel (or look at it once more before sleeping) after it rang.
        assert!((1..=2).contains(&tally.answered[1]));
        if let Some(a) = liar_answer {
            check(a, 8);
        }
    });
}

/// Two threads of one client, each in its own slot of the channel, make a request each at the
/// same time: one ring can announce both requests, and the other ring then finds nothing left
/// to answer. Both are answered with their own answers.
#[test]
fn two_threads_of_a_client_share_its_channel() {
    model(|| {
        let ch = Arc::new(Channel::new(2, false));
        let sockets = Arc::new(Sockets::new(1));
        let d = {
            let (ch, sockets) = (Arc::clone(&ch), Arc::clone(&sockets));
            thread::spawn(move || daemon(&[ch], &sockets, |t| t.answered[0] == 2))
        };
        let other = {
            let (ch, sockets) = (Arc::clone(&ch), Arc::clone(&sockets));
            thread::spawn(move || check(request(&ch, ch.claim(1), &sockets, 0, 2), 2))
        };
        check(request(&ch, ch.claim(0), &sockets, 0, 1), 1);
        other.join().unwrap();
        assert_eq!(d.join().unwrap().answered[0], 2);
    });
}
