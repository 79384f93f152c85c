//! SKELETON — being written; API fixed, bodies pending.
#![no_std]
use core::alloc::Layout;
use core::ptr::NonNull;

/// Statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// bytes in managed regions
    pub region_bytes: usize,
    /// bytes in used blocks (including per-block overhead)
    pub used_bytes: usize,
    /// bytes in free blocks
    pub free_bytes: usize,
    /// largest allocation that would succeed with alignment <= 16
    pub largest_free_bytes: usize,
    /// live blocks
    pub live_blocks: usize,
    /// free blocks
    pub free_blocks: usize,
}

/// The common interface.
pub trait RegionAllocator {
    /// allocate
    fn allocate(&mut self, layout: Layout) -> Option<NonNull<u8>>;
    /// # Safety
    /// ptr from allocate with layout
    unsafe fn deallocate(&mut self, ptr: NonNull<u8>, layout: Layout);
    /// # Safety
    /// ptr from allocate with layout
    unsafe fn reallocate(&mut self, ptr: NonNull<u8>, layout: Layout, new_size: usize) -> Option<NonNull<u8>>;
    /// stats
    fn stats(&self) -> Stats;
}

/// Heap.
pub struct Heap;
impl Heap {
    /// empty
    pub const fn empty() -> Self { Heap }
    /// # Safety
    /// region valid
    pub unsafe fn init(&mut self, _start: *mut u8, _size: usize) { todo!() }
    /// allocate
    pub fn allocate(&mut self, _layout: Layout) -> Option<NonNull<u8>> { todo!() }
    /// # Safety
    /// x
    pub unsafe fn deallocate(&mut self, _ptr: NonNull<u8>, _layout: Layout) { todo!() }
    /// # Safety
    /// x
    pub unsafe fn reallocate(&mut self, _ptr: NonNull<u8>, _layout: Layout, _new_size: usize) -> Option<NonNull<u8>> { todo!() }
    /// stats
    pub fn stats(&self) -> Stats { todo!() }
}
/// LockedHeap
pub struct LockedHeap(spin::Mutex<Heap>);
impl LockedHeap {
    /// empty
    pub const fn empty() -> Self { LockedHeap(spin::Mutex::new(Heap::empty())) }
    /// # Safety
    /// x
    pub unsafe fn init(&self, start: *mut u8, size: usize) { unsafe { self.0.lock().init(start, size) } }
}
// SAFETY: skeleton
unsafe impl core::alloc::GlobalAlloc for LockedHeap {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 { self.0.lock().allocate(l).map_or(core::ptr::null_mut(), |p| p.as_ptr()) }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) { unsafe { self.0.lock().deallocate(NonNull::new_unchecked(p), l) } }
}
