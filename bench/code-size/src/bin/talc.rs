//! talc 5: its own `TalcLock` (a `lock_api` mutex, here a critical section) with a `Manual`
//! source, given its memory by `claim`.
#![no_std]
#![no_main]

use talc::source::Manual;
use talc::TalcLock;
use xalloc_code_size::CsRawMutex;

xalloc_code_size::firmware!(TalcLock<CsRawMutex, Manual> = TalcLock::new(Manual), |mem| {
    // SAFETY: `mem` is the heap's alone.
    unsafe { core::hint::black_box(HEAP.lock().claim(mem.as_mut_ptr().cast(), mem.len())) }
});
