//! One minimal Cortex-M4F firmware per allocator (`src/bin/*.rs`, built by `scripts/code-size.sh`):
//! every binary is the same program, [`firmware!`], and differs from the others only in its
//! `#[global_allocator]`, so the difference of `.text` to the `baseline` binary (whose allocator
//! does nothing) is the code that the allocator adds.
//!
//! The program initialises the heap and then allocates, reallocates and frees through
//! `alloc::alloc::{alloc, realloc, dealloc}` with sizes and alignments hidden from the compiler by
//! [`core::hint::black_box`], so the whole of each of the three paths is kept (nothing folds to a
//! constant size class). With the `init-only` feature it initialises the heap and nothing else:
//! the difference between the two builds is what `alloc`, `dealloc` and `realloc` add beyond
//! `init`.
//!
//! Locks: xalloc's own `LockedHeap` types; talc's own `TalcLock`/`Talck` with [`CsRawMutex`]; the
//! two embedded-alloc heaps as they are (a `critical_section::Mutex<RefCell<_>>` inside); rlsf
//! and linked_list_allocator, which have no bare-metal global allocator type, in [`CsHeap`] (a
//! `critical_section::Mutex<RefCell<_>>`, as embedded-alloc does). The critical section is
//! cortex-m's `critical-section-single-core` (interrupts masked through PRIMASK).
#![no_std]

use core::alloc::{GlobalAlloc, Layout};
use core::cell::{Cell, RefCell};
use core::hint::black_box;
use core::ptr::{self, NonNull};

pub use cortex_m_rt;

/// Bytes of heap memory the firmware gives its allocator (its address and size are hidden from
/// the compiler, so `init` is not specialised to them).
pub const HEAP_SIZE: usize = 16 * 1024;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    cortex_m::asm::udf()
}

/// The program: `$heap` is the global allocator's type, `$new` its constant initialiser, and
/// `$init` the expression that gives it `$mem: &'static mut [MaybeUninit<u8>]` (`HEAP_SIZE` bytes).
#[macro_export]
macro_rules! firmware {
    ($heap:ty = $new:expr, |$mem:ident| $init:expr) => {
        #[global_allocator]
        static HEAP: $heap = $new;

        #[$crate::cortex_m_rt::entry]
        fn main() -> ! {
            static mut MEM: [::core::mem::MaybeUninit<u8>; $crate::HEAP_SIZE] =
                [::core::mem::MaybeUninit::uninit(); $crate::HEAP_SIZE];
            {
                let $mem: &'static mut [::core::mem::MaybeUninit<u8>] =
                    ::core::hint::black_box(MEM);
                $init;
            }
            $crate::run(&HEAP)
        }
    };
}

/// After `init`: allocate, grow or shrink, free, forever (or, with `init-only`, nothing but keep
/// the heap observable).
#[inline(always)]
pub fn run<H>(heap: &'static H) -> ! {
    mem_functions();
    #[cfg(feature = "init-only")]
    loop {
        black_box(heap);
    }
    #[cfg(not(feature = "init-only"))]
    {
        let _ = heap;
        loop {
            let layout = black_box(Layout::new::<[u32; 4]>());
            // SAFETY: a non-zero size; the pointers passed back are live blocks of the allocator
            // with the layouts they were given. Each returned pointer goes through `black_box`
            // (it escapes), or the compiler may remove an allocation it sees unused.
            unsafe {
                let p = black_box(alloc::alloc::alloc(layout));
                if p.is_null() {
                    continue;
                }
                let new_size = black_box(64usize);
                let q = black_box(alloc::alloc::realloc(p, layout, new_size));
                let (block, block_layout) = if q.is_null() {
                    (p, layout)
                } else {
                    (
                        q,
                        Layout::from_size_align_unchecked(new_size, layout.align()),
                    )
                };
                alloc::alloc::dealloc(black_box(block), black_box(block_layout));
            }
        }
    }
}

/// Every firmware that moves data links compiler-builtins' `memcpy`, `memmove` and `memset`
/// (about 2.5 KiB together on this target): the common program calls them, so they are in the
/// baseline and not charged to the first allocator that happens to copy or fill.
#[inline(always)]
fn mem_functions() {
    static mut SCRATCH: [u8; 64] = [0; 64];
    let base: *mut u8 = black_box(&raw mut SCRATCH).cast();
    let (dst, src) = (black_box(base), black_box(base.wrapping_add(32)));
    let (len, byte) = (black_box(16usize), black_box(0xa5u8));
    // SAFETY: `dst` and `src` are 32 bytes apart in a 64-byte buffer and `len` is 16 (hidden
    // from the compiler only so that it calls the library functions).
    unsafe {
        ptr::copy_nonoverlapping(src, dst, len);
        black_box(dst);
        ptr::copy(src, dst, len);
        black_box(dst);
        ptr::write_bytes(dst, byte, len);
        black_box(dst);
        ptr::write_bytes(dst, 0, len);
        black_box(dst);
    }
}

extern crate alloc;

/// The baseline's allocator: no heap, no code beyond the calls (each method only passes its
/// arguments to `black_box` and returns a black-boxed fixed pointer).
pub struct NoHeap;

// SAFETY: never run; the benchmark only measures code size.
unsafe impl GlobalAlloc for NoHeap {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        black_box(layout);
        black_box(ptr::without_provenance_mut(0x2000_0000))
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        black_box((ptr, layout));
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        black_box((layout, new_size));
        black_box(ptr)
    }
}

/// A `lock_api` raw mutex that is a critical section (what `critical_section::Mutex<RefCell<_>>`
/// does, for crates whose locked type takes a `lock_api::RawMutex`): `lock` enters a critical
/// section and, like `RefCell::borrow_mut`, panics if the mutex is already held.
pub struct CsRawMutex {
    locked: Cell<bool>,
    restore: Cell<critical_section::RestoreState>,
}

// SAFETY: the cells are only touched inside the critical section.
unsafe impl Sync for CsRawMutex {}

// SAFETY: `lock` returns inside a critical section (no other context runs until `unlock`) and
// refuses a second holder.
unsafe impl lock_api::RawMutex for CsRawMutex {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = Self {
        locked: Cell::new(false),
        restore: Cell::new(critical_section::RestoreState::invalid()),
    };
    type GuardMarker = lock_api::GuardNoSend;

    fn lock(&self) {
        if !self.try_lock() {
            panic!("CsRawMutex: already locked");
        }
    }

    fn try_lock(&self) -> bool {
        // SAFETY: released in `unlock`, or below when the mutex is held.
        let state = unsafe { critical_section::acquire() };
        if self.locked.replace(true) {
            // SAFETY: the state that `acquire` just returned.
            unsafe { critical_section::release(state) };
            return false;
        }
        self.restore.set(state);
        true
    }

    unsafe fn unlock(&self) {
        self.locked.set(false);
        // SAFETY: the state of the `acquire` of the matching `lock`.
        unsafe { critical_section::release(self.restore.get()) }
    }
}

/// A heap behind `critical_section::Mutex<RefCell<_>>` (embedded-alloc's lock), for the crates
/// that have no bare-metal locked type of their own.
pub struct CsHeap<H>(critical_section::Mutex<RefCell<H>>);

impl<H> CsHeap<H> {
    /// Wraps `heap`.
    pub const fn new(heap: H) -> Self {
        Self(critical_section::Mutex::new(RefCell::new(heap)))
    }

    /// Runs `f` on the heap inside a critical section.
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(&mut H) -> R) -> R {
        critical_section::with(|cs| f(&mut self.0.borrow_ref_mut(cs)))
    }
}

/// rlsf's `Tlsf` as rlsf's own `GlobalTlsf` configures it (`usize` bitmaps, 32 first-level and
/// 32 second-level classes on a 32-bit target), with `GlobalTlsf`'s realloc (rlsf's
/// `reallocate`, its default `ENABLE_REALLOCATION`).
pub type Rlsf =
    rlsf::Tlsf<'static, usize, usize, { usize::BITS as usize }, { usize::BITS as usize }>;

/// [`Rlsf`] behind a critical section.
pub struct RlsfHeap(pub CsHeap<Rlsf>);

impl RlsfHeap {
    /// A heap with no memory.
    pub const fn empty() -> Self {
        Self(CsHeap::new(Rlsf::new()))
    }

    /// Gives the heap `size` bytes at `start`.
    ///
    /// # Safety
    /// The memory is the heap's alone from now on.
    pub unsafe fn init(&self, start: *mut u8, size: usize) {
        self.0.with(|h| {
            let block = NonNull::slice_from_raw_parts(NonNull::new(start).unwrap(), size);
            // SAFETY: forwarded.
            unsafe { h.insert_free_block_ptr(block) };
        });
    }
}

// SAFETY: forwards to rlsf under the lock, as rlsf's `GlobalTlsf` does.
unsafe impl GlobalAlloc for RlsfHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0
            .with(|h| h.allocate(layout))
            .map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `GlobalAlloc`'s contract.
        self.0
            .with(|h| unsafe { h.deallocate(NonNull::new_unchecked(ptr), layout.align()) })
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.0
            .with(|h| {
                // SAFETY: `GlobalAlloc`'s contract.
                unsafe {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    h.reallocate(NonNull::new_unchecked(ptr), new_layout)
                }
            })
            .map_or(ptr::null_mut(), NonNull::as_ptr)
    }
}

/// linked_list_allocator's `Heap` behind a critical section, with `GlobalAlloc`'s default
/// realloc (allocate, copy, free), as its own `LockedHeap` has.
pub struct LlaHeap(pub CsHeap<linked_list_allocator::Heap>);

impl LlaHeap {
    /// A heap with no memory.
    pub const fn empty() -> Self {
        Self(CsHeap::new(linked_list_allocator::Heap::empty()))
    }

    /// Gives the heap `size` bytes at `start`.
    ///
    /// # Safety
    /// The memory is the heap's alone from now on.
    pub unsafe fn init(&self, start: *mut u8, size: usize) {
        // SAFETY: forwarded.
        self.0.with(|h| unsafe { h.init(start, size) })
    }
}

// SAFETY: forwards to linked_list_allocator under the lock, as its `LockedHeap` does.
unsafe impl GlobalAlloc for LlaHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0
            .with(|h| h.allocate_first_fit(layout))
            .map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `GlobalAlloc`'s contract.
        self.0
            .with(|h| unsafe { h.deallocate(NonNull::new_unchecked(ptr), layout) })
    }
}
