//! The core heaps under arbitrary action sequences, against a shadow model: `Heap` (in band)
//! with allocate, free and reallocate; `OobHeap` with the checked entry points that take
//! offsets from untrusted parties (`deallocate_at`, `resize_at`, `allocate_at`) at arbitrary
//! offsets. After every action: no two live blocks overlap, every block keeps its contents,
//! the heap's invariants hold, and its counters agree with the model.
#![no_main]

use std::alloc::Layout;
use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use xalloc_core::{Heap, MetaEntry, OobHeap};

#[derive(Arbitrary, Debug)]
enum Action {
    Alloc {
        size: u16,
        align_log: u8,
    },
    Free {
        index: u8,
    },
    Realloc {
        index: u8,
        size: u16,
    },
    FreeAt {
        offset: u32,
    },
    ResizeAt {
        offset: u32,
        size: u16,
    },
    AllocateAt {
        offset: u32,
        size: u16,
    },
    /// Out of band only: a block aligned for a process that maps the region at `view`.
    AllocFor {
        size: u16,
        align_log: u8,
        view: u64,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    region_kib: u8,
    actions: Vec<Action>,
}

const GRANULE: usize = 64;

fn fill(p: *mut u8, len: usize, tag: u8) {
    // SAFETY: the caller owns `len` bytes at `p`.
    unsafe { p.write_bytes(tag, len) };
}

fn check(p: *const u8, len: usize, tag: u8) {
    // SAFETY: the caller owns `len` bytes at `p`.
    let s = unsafe { std::slice::from_raw_parts(p, len) };
    assert!(s.iter().all(|&b| b == tag), "block contents changed");
}

fuzz_target!(|input: Input| {
    let size = (usize::from(input.region_kib) + 1) * 1024;
    // In band: live blocks by address -> (len, align, tag).
    let mut region = vec![0u8; size + 64];
    let mut heap = Heap::empty();
    // SAFETY: the region outlives the heap and is used by nothing else.
    unsafe { heap.init(region.as_mut_ptr(), size) };
    let mut live: BTreeMap<usize, (usize, usize, u8)> = BTreeMap::new();
    // Out of band: live blocks by offset -> bytes.
    let mut oregion = vec![0u8; size];
    let mut table = vec![MetaEntry::default(); OobHeap::table_entries(size, GRANULE)];
    // SAFETY: as above; the table outlives the heap.
    let mut oob = unsafe {
        OobHeap::new(
            oregion.as_mut_ptr(),
            size,
            GRANULE,
            table.as_mut_ptr(),
            table.len(),
        )
    }
    .unwrap();
    let mut olive: BTreeMap<usize, usize> = BTreeMap::new();
    let mut tag = 0u8;
    for action in input.actions.iter().take(500) {
        tag = tag.wrapping_add(1);
        match *action {
            Action::Alloc { size, align_log } => {
                let align = 1usize << (align_log % 13);
                let Ok(layout) = Layout::from_size_align(usize::from(size).max(1), align) else {
                    continue;
                };
                if let Some(p) = heap.allocate(layout) {
                    let a = p.as_ptr().addr();
                    assert_eq!(a % align, 0, "misaligned");
                    fill(p.as_ptr(), layout.size(), tag);
                    live.insert(a, (layout.size(), align, tag));
                }
                if let Some(p) = oob.allocate(layout) {
                    let off = oob.offset_of(p);
                    olive.insert(off, oob.block_size_at(off).unwrap());
                }
            }
            Action::AllocFor {
                size,
                align_log,
                view,
            } => {
                let align = 1usize << (align_log % 64);
                let Ok(layout) = Layout::from_size_align(usize::from(size), align) else {
                    continue;
                };
                let before = oob.stats();
                // Half the views on the granule (served), half anywhere (refused when off it).
                let view = if view & 1 == 0 {
                    view as usize & !(GRANULE - 1)
                } else {
                    view as usize
                };
                match oob.allocate_offset(layout, view) {
                    Some(_) if view % GRANULE != 0 => panic!("a view off the granule was served"),
                    Some(off) => {
                        assert_eq!(view.wrapping_add(off) % align, 0, "misaligned");
                        let len = oob.block_size_at(off).unwrap();
                        assert!(len >= layout.size() && off + len <= oob.stats().region_bytes);
                        olive.insert(off, len);
                    }
                    None => {
                        assert_eq!(oob.stats(), before, "a refused allocation changed the heap")
                    }
                }
            }
            Action::Free { index } if !live.is_empty() => {
                let (&a, &(len, align, t)) =
                    live.iter().nth(usize::from(index) % live.len()).unwrap();
                check(a as *const u8, len, t);
                let p = std::ptr::NonNull::new(a as *mut u8).unwrap();
                // SAFETY: a live block of this heap with this layout.
                unsafe { heap.deallocate(p, Layout::from_size_align(len, align).unwrap()) };
                live.remove(&a);
            }
            Action::Realloc { index, size } if !live.is_empty() => {
                let (&a, &(len, align, t)) =
                    live.iter().nth(usize::from(index) % live.len()).unwrap();
                let new_len = usize::from(size).max(1);
                let p = std::ptr::NonNull::new(a as *mut u8).unwrap();
                // SAFETY: a live block of this heap with this layout.
                let r = unsafe {
                    heap.reallocate(p, Layout::from_size_align(len, align).unwrap(), new_len)
                };
                if let Some(q) = r {
                    check(q.as_ptr(), len.min(new_len), t);
                    fill(q.as_ptr(), new_len, t);
                    live.remove(&a);
                    live.insert(q.as_ptr().addr(), (new_len, align, t));
                } else {
                    check(a as *const u8, len, t);
                }
            }
            Action::Free { .. } | Action::Realloc { .. } => {}
            Action::FreeAt { offset } => {
                let off = offset as usize % (size + 256);
                let before = oob.stats();
                match oob.deallocate_at(off) {
                    Ok(bytes) => assert_eq!(olive.remove(&off), Some(bytes)),
                    Err(_) => {
                        assert!(!olive.contains_key(&off), "refused a live block");
                        assert_eq!(oob.stats(), before);
                    }
                }
            }
            Action::ResizeAt { offset, size: n } => {
                let off = offset as usize % (size + 256);
                let before = oob.stats();
                match oob.resize_at(off, usize::from(n)) {
                    Ok(bytes) => {
                        assert!(olive.contains_key(&off));
                        olive.insert(off, bytes);
                    }
                    Err(_) => assert_eq!(oob.stats(), before),
                }
            }
            Action::AllocateAt { offset, size: n } => {
                let off = offset as usize % (size + 256);
                let before = oob.stats();
                match oob.allocate_at(off, usize::from(n)) {
                    Ok(()) => {
                        olive.insert(off, usize::from(n).div_ceil(GRANULE) * GRANULE);
                    }
                    Err(_) => assert_eq!(oob.stats(), before),
                }
            }
        }
        // No overlap, contents kept (first and last byte of each block), invariants, counters.
        let mut end = 0;
        for (&a, &(len, _, t)) in &live {
            assert!(a >= end, "in-band blocks overlap");
            end = a + len;
            check(a as *const u8, 1, t);
            check((a + len - 1) as *const u8, 1, t);
        }
        let mut oend = 0;
        for (&o, &b) in &olive {
            assert!(o >= oend, "out-of-band blocks overlap");
            oend = o + b;
        }
        heap.check_invariants().unwrap();
        oob.check_invariants().unwrap();
        assert_eq!(heap.stats().live_blocks, live.len());
        assert_eq!(oob.stats().live_blocks, olive.len());
        assert_eq!(oob.stats().used_bytes, olive.values().sum::<usize>());
    }
});
