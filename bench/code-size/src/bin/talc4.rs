//! talc 4: its own `Talck` (a `lock_api` mutex, here a critical section) with `ErrOnOom`, given
//! its memory by `claim`.
#![no_std]
#![no_main]

use talc4::{ErrOnOom, Span, Talc, Talck};
use xalloc_code_size::CsRawMutex;

xalloc_code_size::firmware!(Talck<CsRawMutex, ErrOnOom> = Talc::new(ErrOnOom).lock(), |mem| {
    let span = Span::from_base_size(mem.as_mut_ptr().cast(), mem.len());
    // SAFETY: `mem` is the heap's alone.
    let _ = unsafe { core::hint::black_box(HEAP.lock().claim(span)) };
});
