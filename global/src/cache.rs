//! The client-side cache of freed arena blocks: a freed block is kept (still allocated to this
//! process at the daemon) and handed out again to the next allocation of the same size, so that
//! the common free-then-allocate cycle of large buffers needs no round trip to the daemon.
//!
//! - Blocks are matched by exact size in granules, so a block is reused only for a request it
//!   fits without waste, and its true size is always known.
//! - Bounded in bytes (`XALLOC_CACHE`, default [`DEFAULT_CACHE_BYTES`]) and in entries
//!   ([`ENTRIES`]); a block that does not fit goes back to the daemon.
//! - One per process, in [`SHARDS`] shards picked by the CPU a thread runs on, so that threads
//!   on different CPUs rarely meet; each shard is behind a spin lock held only for a scan of
//!   its [`ENTRIES`] entries (never for a round trip). No allocation, no std lock, so the global
//!   allocator can use it. A thread looks in its own shard first, then in the others.
//! - The daemon still counts cached blocks as this process's: they come back when the process
//!   exits (the daemon reclaims everything it held), when the daemon's arena runs low (the
//!   client drains its cache), and never to another process while cached.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Entries a shard holds at most.
pub const ENTRIES: usize = 16;

/// Shards of [`Caches`].
pub const SHARDS: usize = 4;

/// Bytes the cache holds at most, unless `XALLOC_CACHE` says otherwise (`0` turns it off).
pub const DEFAULT_CACHE_BYTES: u64 = 128 << 20;

/// One cached block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Index of the connection (`0` marks an empty entry; the connection is `conn - 1`).
    pub conn: u32,
    /// Offset of the block in that connection's arena.
    pub offset: u64,
    /// Its length in granules.
    pub granules: u32,
}

/// The cache.
pub struct Cache {
    lock: AtomicBool,
    entries: UnsafeCell<[Entry; ENTRIES]>,
    bytes: AtomicU64,
}

// SAFETY: `entries` is only accessed while `lock` is held (Acquire on taking it, Release on
// giving it back); everything else is atomic.
unsafe impl Sync for Cache {}

impl Cache {
    /// An empty cache.
    pub const fn new() -> Self {
        Self {
            lock: AtomicBool::new(false),
            entries: UnsafeCell::new(
                [Entry {
                    conn: 0,
                    offset: 0,
                    granules: 0,
                }; ENTRIES],
            ),
            bytes: AtomicU64::new(0),
        }
    }

    /// Bytes cached now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn locked<T>(&self, f: impl FnOnce(&mut [Entry; ENTRIES]) -> T) -> T {
        while self.lock.swap(true, Ordering::Acquire) {
            while self.lock.load(Ordering::Relaxed) {
                core::hint::spin_loop();
            }
        }
        // SAFETY: the lock is held, so this is the only reference to the entries.
        let r = f(unsafe { &mut *self.entries.get() });
        self.lock.store(false, Ordering::Release);
        r
    }

    /// Takes a cached block of connection `conn` that is `granules` long and whose offset is a
    /// multiple of `align`; returns its offset.
    pub fn take(&self, conn: usize, granules: u32, align: u64, granule: usize) -> Option<u64> {
        let key = conn as u32 + 1;
        let taken = self.locked(|es| {
            let e = es.iter_mut().find(|e| {
                e.conn == key && e.granules == granules && e.offset.is_multiple_of(align.max(1))
            })?;
            let off = e.offset;
            *e = Entry::default();
            Some(off)
        })?;
        self.bytes
            .fetch_sub(u64::from(granules) * granule as u64, Ordering::Relaxed);
        Some(taken)
    }

    /// Keeps the block at `offset` of connection `conn`, `granules` long, if the cache has
    /// room for it within `cap` bytes; whether it did.
    pub fn put(&self, conn: usize, offset: u64, granules: u32, granule: usize, cap: u64) -> bool {
        let bytes = u64::from(granules) * granule as u64;
        if self.bytes.load(Ordering::Relaxed) + bytes > cap {
            return false;
        }
        let kept = self.locked(|es| {
            let Some(e) = es.iter_mut().find(|e| e.conn == 0) else {
                return false;
            };
            *e = Entry {
                conn: conn as u32 + 1,
                offset,
                granules,
            };
            true
        });
        if kept {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        kept
    }

    /// Empties the cache and returns what it held (connection index, offset, granules), so
    /// that the caller gives the blocks back to their daemon.
    pub fn drain(
        &self,
        granule_of: impl Fn(usize) -> usize,
    ) -> [Option<(usize, u64, u32)>; ENTRIES] {
        let out = self.locked(|es| {
            let mut out = [None; ENTRIES];
            for (o, e) in out.iter_mut().zip(es.iter_mut()) {
                if e.conn != 0 {
                    *o = Some((e.conn as usize - 1, e.offset, e.granules));
                    *e = Entry::default();
                }
            }
            out
        });
        let bytes: u64 = out
            .iter()
            .flatten()
            .map(|&(c, _, g)| u64::from(g) * granule_of(c) as u64)
            .sum();
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        out
    }

    /// Forgets every entry (in a forked child: the blocks are the parent's).
    pub fn clear(&self) {
        // The child has one thread; a lock held by a vanished parent thread is broken here.
        self.lock.store(false, Ordering::Relaxed);
        self.locked(|es| *es = [Entry::default(); ENTRIES]);
        self.bytes.store(0, Ordering::Relaxed);
    }
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's cache: [`SHARDS`] [`Cache`]s, one per group of CPUs.
pub struct Caches {
    shards: [Cache; SHARDS],
}

impl Caches {
    /// Empty.
    pub const fn new() -> Self {
        Self {
            shards: [const { Cache::new() }; SHARDS],
        }
    }

    fn home() -> usize {
        xalloc_core::os::current_cpu() as usize % SHARDS
    }

    /// The shards, the calling thread's first.
    fn in_order(&self) -> impl Iterator<Item = &Cache> {
        let h = Self::home();
        (0..SHARDS).map(move |i| &self.shards[(h + i) % SHARDS])
    }

    /// Bytes cached now, in all shards.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(Cache::bytes).sum()
    }

    /// [`Cache::take`] from the calling thread's shard, else from any.
    pub fn take(&self, conn: usize, granules: u32, align: u64, granule: usize) -> Option<u64> {
        self.in_order()
            .find_map(|c| c.take(conn, granules, align, granule))
    }

    /// [`Cache::put`] into the calling thread's shard, else any with a free entry, if all
    /// shards together stay within `cap` bytes.
    pub fn put(&self, conn: usize, offset: u64, granules: u32, granule: usize, cap: u64) -> bool {
        let bytes = u64::from(granules) * granule as u64;
        if self.bytes().saturating_add(bytes) > cap {
            return false;
        }
        self.in_order()
            .any(|c| c.put(conn, offset, granules, granule, u64::MAX))
    }

    /// Empties every shard, calling `f` with each block it held (connection, offset, granules).
    pub fn drain(&self, granule_of: impl Fn(usize) -> usize, mut f: impl FnMut(usize, u64, u32)) {
        for shard in &self.shards {
            for (conn, offset, granules) in shard.drain(&granule_of).into_iter().flatten() {
                f(conn, offset, granules);
            }
        }
    }

    /// [`Cache::clear`] on every shard.
    pub fn clear(&self) {
        self.shards.iter().for_each(Cache::clear);
    }
}

impl Default for Caches {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_size_and_alignment_match_and_the_byte_bound_holds() {
        let c = Cache::new();
        assert!(c.put(0, 8192, 2, 4096, 1 << 20));
        assert!(c.put(0, 4096 * 16, 4, 4096, 1 << 20));
        assert_eq!(c.bytes(), 6 * 4096);
        assert_eq!(c.take(0, 3, 1, 4096), None, "no block of 3 granules");
        assert_eq!(c.take(1, 2, 1, 4096), None, "another connection's");
        assert_eq!(c.take(0, 2, 65536, 4096), None, "not aligned to 64 KiB");
        assert_eq!(c.take(0, 4, 65536, 4096), Some(4096 * 16));
        assert_eq!(c.take(0, 2, 4096, 4096), Some(8192));
        assert_eq!(c.take(0, 2, 4096, 4096), None, "taken once");
        assert_eq!(c.bytes(), 0);
        assert!(!c.put(0, 0, 300, 4096, 1 << 20), "over the byte bound");
        let all = Caches::new();
        assert!(all.put(0, 0, 256, 4096, 1 << 20));
        assert!(
            !all.put(0, 1 << 20, 1, 4096, 1 << 20),
            "the bound holds across shards"
        );
        assert_eq!(all.take(0, 256, 1, 4096), Some(0));
        for i in 0..(SHARDS * ENTRIES) as u64 {
            assert!(
                all.put(0, i * 4096, 1, 4096, 1 << 30),
                "entry {i}: shards fill in turn"
            );
        }
        assert!(!all.put(0, 1 << 30, 1, 4096, 1 << 30));
        let mut n = 0;
        all.drain(|_| 4096, |_, _, _| n += 1);
        assert_eq!((n, all.bytes()), (SHARDS * ENTRIES, 0));
        for i in 0..ENTRIES as u64 {
            assert!(c.put(0, i * 4096, 1, 4096, 1 << 30));
        }
        assert!(!c.put(0, 1 << 30, 1, 4096, 1 << 30), "over the entry bound");
        let drained = c.drain(|_| 4096);
        assert_eq!(drained.iter().flatten().count(), ENTRIES);
        assert_eq!(c.bytes(), 0);
        c.put(0, 0, 1, 4096, 1 << 20);
        c.clear();
        assert_eq!((c.bytes(), c.take(0, 1, 1, 4096)), (0, None));
    }
}
