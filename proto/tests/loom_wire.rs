//! Model check of the slot protocol in `xalloc_proto::wire` with loom: a client and the daemon,
//! each sleeping on a futex when it has nothing to do, exchange requests. loom explores every
//! interleaving (up to its preemption bound) and fails on a deadlock, which is what a lost
//! wake-up or a lost request would cause here, and the assertions check that every answer
//! belongs to its request.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p xalloc-proto --test loom_wire --release`
//! (`scripts/test.sh` does, with `LOOM_MAX_PREEMPTIONS=3`).
#![cfg(loom)]

use loom::sync::atomic::{AtomicU32, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use xalloc_proto::wire::{Doorbell, Op, RequestSlot, Response, ResponseSlot, Status};

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

struct Shared {
    slot: RequestSlot,
    resp: ResponseSlot,
    bell: Doorbell,
    daemon_futex: Futex,
    client_futex: Futex,
}

const REQUESTS: u64 = 2;

fn serve(sh: &Shared, req: xalloc_proto::wire::Request) {
    let answer = Response {
        status: Status::Ok as u32,
        flags: 0,
        offset: req.size * 100,
        size: req.size,
    };
    if sh.resp.publish(&sh.slot, req.seq, answer) {
        sh.client_futex.wake();
    }
}

fn daemon(sh: &Shared) {
    let mut served = 0;
    while served < REQUESTS {
        if let Some(req) = sh.slot.take() {
            serve(sh, req);
            served += 1;
            continue;
        }
        let seen = sh.bell.prepare_sleep();
        // One more look after announcing the sleep: a request submitted before the
        // announcement is seen here, one submitted after rings the futex.
        if let Some(req) = sh.slot.take() {
            sh.bell.woke();
            serve(sh, req);
            served += 1;
            continue;
        }
        sh.daemon_futex.wait(&sh.bell.rings, seen);
        sh.bell.woke();
    }
}

fn client(sh: &Shared) {
    for size in 1..=REQUESTS {
        let before = sh.resp.seq.load(Ordering::SeqCst);
        let seq = sh.slot.submit(Op::Allocate, 0, size, 16, 0);
        if sh.bell.ring() {
            sh.daemon_futex.wake();
        }
        let answer = loop {
            if let Some(a) = sh.resp.read(seq) {
                break a;
            }
            sh.slot.prepare_sleep();
            if let Some(a) = sh.resp.read(seq) {
                sh.slot.woke();
                break a;
            }
            sh.client_futex.wait(&sh.resp.seq, before);
            sh.slot.woke();
        };
        assert_eq!(answer.size, size);
        assert_eq!(answer.offset, size * 100);
        assert_eq!(answer.status, Status::Ok as u32);
    }
}

#[test]
fn no_lost_request_or_wake_up() {
    loom::model(|| {
        let sh = Arc::new(Shared {
            slot: RequestSlot::new(),
            resp: ResponseSlot::new(),
            bell: Doorbell::new(),
            daemon_futex: Futex::new(),
            client_futex: Futex::new(),
        });
        assert!(sh.slot.try_claim(1));
        let d = {
            let sh = Arc::clone(&sh);
            thread::spawn(move || daemon(&sh))
        };
        client(&sh);
        d.join().unwrap();
    });
}
