//! [`LockedHeap`]: a [`Heap`](crate::Heap) behind a lock, for `#[global_allocator]` on bare metal.
//!
//! # The lock
//!
//! One of two, chosen by cargo feature when the crate is built:
//!
//! - **`critical-section`**: every operation runs inside `critical_section::with` (the
//!   [`critical-section`](https://docs.rs/critical-section) crate, the embedded ecosystem's
//!   convention). On a single-core microcontroller that masks interrupts, so an interrupt handler
//!   may allocate: it cannot preempt an operation in progress. It needs no compare-and-swap, so it
//!   is the lock for Cortex-M0/M0+ (`thumbv6m-none-eabi`). The program links one implementation
//!   (e.g. `cortex-m`'s feature `critical-section-single-core`, or the `std` one on a host).
//! - otherwise, **`spin`** (a default feature): a spin lock (the `spin` crate). Right for
//!   threads on a host and for firmware that never allocates in an interrupt handler; an
//!   interrupt handler that allocates while the code it preempted holds the lock spins forever.
//!   It needs compare-and-swap, so it is not available on `thumbv6m-none-eabi`.
//!
//! When both features are on, the critical section wins (cargo features add up: a crate that
//! asks for `critical-section` gets it even if another leaves the defaults on). With neither,
//! or with only `spin` on a target without compare-and-swap, there is no `LockedHeap` (the
//! heaps themselves, [`Heap`](crate::Heap) and the others, are always there).
//!
//! # Re-entry
//!
//! The heap is never entered twice at once. A call back into the same heap from inside
//! [`LockedHeap::with`]'s closure (for example by allocating through the global allocator, if
//! this heap is it) deadlocks with the spin lock. With the critical section, which the same
//! context may enter again, a `RefCell` catches it instead: such an allocation returns null, such
//! a free leaks its block, and a nested `with` panics. The critical section does not mask
//! non-maskable interrupts or faults: do not allocate in their handlers.

use core::alloc::{GlobalAlloc, Layout};
use core::mem::MaybeUninit;
use core::ptr::{self, NonNull};

use crate::store::InBand;
use crate::tlsf::{self, Tlsf};
use crate::{InitError, Stats};

/// The critical-section lock: a `RefCell` inside a `critical_section::Mutex`.
#[cfg(feature = "critical-section")]
mod lock {
    use core::cell::RefCell;

    pub(super) struct Lock<T>(critical_section::Mutex<RefCell<T>>);

    impl<T> Lock<T> {
        pub(super) const fn new(value: T) -> Self {
            Self(critical_section::Mutex::new(RefCell::new(value)))
        }

        /// Runs `f` on the value inside a critical section, or returns `None` without running it
        /// when the value is already borrowed: a re-entry from inside `f` (the critical section
        /// itself lets the same context in again).
        #[inline]
        pub(super) fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
            critical_section::with(|cs| {
                let mut value = self.0.borrow(cs).try_borrow_mut().ok()?;
                Some(f(&mut value))
            })
        }
    }
}

/// The spin lock.
#[cfg(all(
    not(feature = "critical-section"),
    feature = "spin",
    target_has_atomic = "8"
))]
mod lock {
    pub(super) struct Lock<T>(spin::Mutex<T>);

    impl<T> Lock<T> {
        pub(super) const fn new(value: T) -> Self {
            Self(spin::Mutex::new(value))
        }

        /// Runs `f` on the value under the lock. Always `Some`: a re-entry spins forever.
        #[inline]
        pub(super) fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
            Some(f(&mut self.0.lock()))
        }
    }
}

/// A [`Heap`](crate::Heap) behind a lock, implementing [`GlobalAlloc`]: a spin lock by default,
/// a critical section with the `critical-section` feature (see the [module docs](self)).
///
/// ```
/// use core::mem::MaybeUninit;
/// use xalloc_core::LockedHeap;
///
/// // In firmware, `#[global_allocator] static HEAP: LockedHeap = LockedHeap::empty();`
/// static HEAP: LockedHeap = LockedHeap::empty();
///
/// // Firmware takes a `static mut [MaybeUninit<u8>; N]` once (see `init_from_slice`); a test on
/// // the host can leak a box.
/// let mem: &'static mut [MaybeUninit<u8>] = Box::leak(Box::new([MaybeUninit::uninit(); 4096]));
/// HEAP.init_from_slice(mem).expect("heap memory");
///
/// let layout = core::alloc::Layout::from_size_align(100, 8).unwrap();
/// let p = HEAP.with(|heap| heap.allocate(layout)).expect("room for 100 bytes");
/// assert_eq!(HEAP.stats().live_blocks, 1);
/// // SAFETY: `p` came from this heap with `layout` and is freed once.
/// unsafe { HEAP.with(|heap| heap.deallocate(p, layout)) };
/// assert_eq!(HEAP.stats().live_blocks, 0);
/// ```
///
/// Out of memory returns null (the `alloc` crate then calls the allocation error handler); an
/// allocation before the heap has memory does the same.
///
/// `FL` and `SL` choose the heap's size classes as for [`Tlsf`]: the defaults are those of
/// [`Heap`](crate::Heap); [`SmallLockedHeap`] has those of [`SmallHeap`](crate::SmallHeap).
///
/// # Time complexity
/// Each operation holds the lock (with the critical section: keeps interrupts masked) for the
/// [`Tlsf`] operation it forwards to: O(1) for allocate and free; a reallocation that moves its
/// block also copies it under the lock.
pub struct LockedHeap<
    const FL: usize = { tlsf::FL },
    const SL: usize = { tlsf::SL },
    const SB: usize = { tlsf::SIZE_BINS },
>(lock::Lock<Tlsf<InBand, FL, SL, SB>>);

/// A [`LockedHeap`] over a [`SmallHeap`](crate::SmallHeap): state under 1 KiB, blocks of up to
/// 128 KiB (a larger region is cut into regions of that size).
pub type SmallLockedHeap = LockedHeap<{ tlsf::SMALL_FL }, { tlsf::SMALL_SL }, 0>;

impl<const FL: usize, const SL: usize, const SB: usize> LockedHeap<FL, SL, SB> {
    /// A heap with no memory: every allocation fails until one of the `init` functions.
    pub const fn empty() -> Self {
        Self(lock::Lock::new(Tlsf::<InBand, FL, SL, SB>::empty()))
    }

    /// Gives the heap `mem` as its memory, for good: the safe way to initialise it.
    ///
    /// The slice is `'static` and exclusive, so nothing else can ever reach those bytes. Firmware
    /// gets one from a `static mut` array, once (or from a crate such as `static_cell`):
    ///
    /// ```
    /// use core::mem::MaybeUninit;
    /// use xalloc_core::LockedHeap;
    ///
    /// static HEAP: LockedHeap = LockedHeap::empty();
    ///
    /// /// Call once, first thing in the entry function.
    /// fn init_heap() {
    ///     const HEAP_SIZE: usize = 16 * 1024;
    ///     static mut HEAP_MEM: [MaybeUninit<u8>; HEAP_SIZE] = [MaybeUninit::uninit(); HEAP_SIZE];
    ///     // SAFETY: this function runs once, so this is the only reference to HEAP_MEM ever made.
    ///     let mem = unsafe { &mut *core::ptr::addr_of_mut!(HEAP_MEM) };
    ///     HEAP.init_from_slice(mem).expect("heap memory");
    /// }
    ///
    /// init_heap();
    /// assert!(HEAP.stats().free_bytes > 16 * 1024 - 64);
    /// ```
    ///
    /// # Errors
    /// As [`Tlsf::try_init`]: [`InitError::AlreadyInitialized`] when the heap already has memory
    /// (a second call; the heap is unchanged and `mem` stays unused for good), or
    /// [`InitError::TooSmall`] when `mem` cannot hold one block.
    pub fn init_from_slice(&self, mem: &'static mut [MaybeUninit<u8>]) -> Result<(), InitError> {
        let (start, size) = (mem.as_mut_ptr().cast::<u8>(), mem.len());
        // SAFETY: 1. `mem` is valid for reads and writes for `'static`; 2. the `&'static mut`
        // was handed over, so nothing else accesses those bytes, ever.
        unsafe { self.try_init(start, size) }
    }

    /// Gives the heap its memory, `size` bytes at `start` ([`Tlsf::init`]);
    /// [`init_from_slice`](Self::init_from_slice) is the safe form.
    ///
    /// Misuse (a second call, a region too small for one block, or with the critical-section
    /// lock a call from inside [`with`](Self::with)'s closure, which the spin lock cannot tell
    /// from another thread's and waits for) fails a debug assertion whose message says what to
    /// do. Without
    /// debug assertions it leaves the heap as it was: a heap without memory then fails every
    /// allocation. [`try_init`](Self::try_init) returns the error instead.
    ///
    /// # Safety
    /// As for [`Tlsf::init`]:
    /// - `start..start + size` is valid for reads and writes for as long as the heap is used;
    /// - nothing else accesses that memory, except through blocks this heap hands out.
    pub unsafe fn init(&self, start: *mut u8, size: usize) {
        // Not through `with`, whose panic on re-entry would be code in every firmware: a
        // re-entry is misuse like the others.
        let result = self.0.try_with(|heap| {
            // SAFETY: forwarded contract.
            unsafe { heap.try_init(start, size) }
        });
        // The assertion fires outside the lock.
        let Some(result) = result else {
            debug_assert!(
                false,
                "LockedHeap::init called while the heap is in use by the same context"
            );
            return;
        };
        if let Err(e) = result {
            let what_to_do = match e {
                InitError::AlreadyInitialized => {
                    "initialise it once; to give it more memory, call `add_region` through \
                     `LockedHeap::with`"
                }
                InitError::TooSmall => "give it a larger region",
                _ => "check the region's start and size",
            };
            debug_assert!(
                false,
                "LockedHeap::init({start:p}, {size}) refused the region ({e}): {what_to_do}"
            );
        }
    }

    /// [`init`](Self::init), returning why the region was refused instead of asserting.
    ///
    /// # Errors
    /// As [`Tlsf::try_init`]; on error the heap is unchanged.
    ///
    /// # Safety
    /// As for [`init`](Self::init).
    pub unsafe fn try_init(&self, start: *mut u8, size: usize) -> Result<(), InitError> {
        // SAFETY: forwarded contract.
        self.with(|heap| unsafe { heap.0.try_init(start, size) })
    }

    /// Runs `f` on the heap under the lock, and returns what it returns: for statistics, for
    /// `add_region`, or to allocate with the [`Tlsf`] API.
    ///
    /// With the critical section, `f` runs with interrupts masked: keep it short. `f` must not
    /// use this heap again (no allocation through the global allocator, if this heap is it; no
    /// nested `with`): that deadlocks with the spin lock, and with the critical section makes
    /// allocations fail, leaks frees and panics on a nested `with` (see the
    /// [module docs](self#re-entry)).
    ///
    /// # Panics
    /// With the critical section, when called from inside `f` of another `with` on the same heap.
    pub fn with<R>(&self, f: impl FnOnce(&mut HeapRef<'_, FL, SL, SB>) -> R) -> R {
        match self.0.try_with(|heap| f(&mut HeapRef(heap))) {
            Some(r) => r,
            None => panic!("LockedHeap::with called while the heap is in use by the same context"),
        }
    }

    /// The heap's counters ([`Tlsf::stats`]), read under the lock.
    pub fn stats(&self) -> Stats {
        self.with(|heap| heap.stats())
    }
}

/// The heap of a [`LockedHeap`], lent to the closure of [`LockedHeap::with`]: every reading
/// method of [`Tlsf`] (through `Deref`) and the ones below, but no `&mut Tlsf`. With one, safe
/// code could swap the heap for another (`core::mem::replace`) under blocks that the global
/// allocator handed out, and a later `dealloc` of one of them would free it into a heap that never
/// had it.
///
/// ```compile_fail,E0596
/// use xalloc_core::{Heap, LockedHeap};
/// static HEAP: LockedHeap = LockedHeap::empty();
/// // Taking the heap out from under its blocks does not compile: there is no `&mut Tlsf`.
/// let _old = HEAP.with(|heap| core::mem::replace(&mut **heap, Heap::empty()));
/// ```
pub struct HeapRef<'a, const FL: usize, const SL: usize, const SB: usize>(
    &'a mut Tlsf<InBand, FL, SL, SB>,
);

impl<const FL: usize, const SL: usize, const SB: usize> core::ops::Deref
    for HeapRef<'_, FL, SL, SB>
{
    type Target = Tlsf<InBand, FL, SL, SB>;

    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl<const FL: usize, const SL: usize, const SB: usize> HeapRef<'_, FL, SL, SB> {
    /// [`Tlsf::allocate`].
    pub fn allocate(&mut self, layout: Layout) -> Option<NonNull<u8>> {
        self.0.allocate(layout)
    }

    /// [`Tlsf::deallocate`].
    ///
    /// # Safety
    /// As for [`Tlsf::deallocate`].
    pub unsafe fn deallocate(&mut self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.0.deallocate(ptr, layout) }
    }

    /// [`Tlsf::reallocate`].
    ///
    /// # Safety
    /// As for [`Tlsf::reallocate`].
    pub unsafe fn reallocate(
        &mut self,
        ptr: NonNull<u8>,
        layout: Layout,
        new_size: usize,
    ) -> Option<NonNull<u8>> {
        // SAFETY: forwarded contract.
        unsafe { self.0.reallocate(ptr, layout, new_size) }
    }

    /// [`Tlsf::add_region`]: more memory for the heap.
    ///
    /// # Safety
    /// As for [`Tlsf::add_region`].
    pub unsafe fn add_region(&mut self, start: *mut u8, size: usize) -> Result<(), InitError> {
        // SAFETY: forwarded contract.
        unsafe { self.0.add_region(start, size) }
    }

    /// [`Tlsf::set_compact_above`].
    pub fn set_compact_above(&mut self, percent: u8) {
        self.0.set_compact_above(percent);
    }

    /// [`Tlsf::set_size_bins`].
    pub fn set_size_bins(&mut self, percent: u8) {
        self.0.set_size_bins(percent);
    }

    /// [`Tlsf::trim`]: the blocks held on the quick lists and in the size bins back to the free
    /// lists.
    pub fn trim(&mut self) {
        self.0.trim();
    }
}

// SAFETY: every method forwards to `Tlsf` under the lock, which returns blocks that are aligned,
// large enough and disjoint (the `Tlsf` contract), or null on failure. A re-entry (which only the
// critical section lets through, and the `RefCell` refuses) returns null or leaves the block
// allocated: never two `&mut Tlsf` at once. Nothing here panics, allocates or formats.
unsafe impl<const FL: usize, const SL: usize, const SB: usize> GlobalAlloc
    for LockedHeap<FL, SL, SB>
{
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0
            .try_with(|heap| heap.allocate(layout))
            .flatten()
            .map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // A re-entry leaks the block: freeing it would need the heap that is in use.
        let _ = self.0.try_with(|heap| {
            // SAFETY: `GlobalAlloc::dealloc`'s contract: `ptr` came from this allocator with
            // `layout`, so it is non-null and live.
            unsafe { heap.deallocate(NonNull::new_unchecked(ptr), layout) }
        });
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.0
            .try_with(|heap| {
                // SAFETY: `GlobalAlloc::realloc`'s contract: `ptr` is a live block of this
                // allocator with `layout`, and `new_size` rounded to the alignment does not
                // overflow.
                unsafe { heap.reallocate(NonNull::new_unchecked(ptr), layout, new_size) }
            })
            .flatten()
            .map_or(ptr::null_mut(), NonNull::as_ptr)
    }
}
