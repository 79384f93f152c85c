//! Multi-process tests of xalloc. The tests live in `tests/`; this crate holds the programs
//! they run: `xallocd-under-test` (the daemon: `xallocd` under another name),
//! `xalloc-test-client` (a protocol client that churns or holds blocks) and
//! `xalloc-global-client` (a std program whose global allocator is `XallocGlobal`); usage in
//! each one's source.

/// xorshift64*: a small, deterministic generator for test workloads.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The byte that test clients write at offset `i` of a block tagged `tag`.
pub fn pattern_byte(tag: u64, i: usize) -> u8 {
    (tag.wrapping_mul(31).wrapping_add(i as u64 * 7) >> 3) as u8
}
