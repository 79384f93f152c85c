//! Deterministic op streams. Every allocator replays the identical stream.

/// Operation kinds.
pub const ALLOC: u8 = 0;
/// Free the block in `slot`.
pub const FREE: u8 = 1;
/// Resize the block in `slot` to `size`.
pub const REALLOC: u8 = 2;

/// One step of a stream. Ops refer to slots of a live table; the replaying
/// harness remembers each live block's pointer, size and alignment.
#[derive(Clone, Copy, Debug)]
pub struct Op {
    /// New block size (`ALLOC`) or new size (`REALLOC`); unused for `FREE`.
    pub size: u32,
    /// Slot in the live table.
    pub slot: u32,
    /// `ALLOC`, `FREE` or `REALLOC`.
    pub kind: u8,
    /// log2 of the alignment (`ALLOC` only).
    pub align_shift: u8,
    /// Byte written into the first and last byte of the block (`ALLOC` only).
    pub tag: u8,
}

/// A generated stream plus what the report needs to know about it.
pub struct Workload {
    /// Name used by `--workload`.
    pub name: &'static str,
    /// One-line description for the report.
    pub desc: String,
    /// The stream.
    pub ops: Vec<Op>,
    /// Size of the live table (max live blocks).
    pub slots: usize,
    /// Region every region-based allocator gets for this workload.
    pub region: usize,
}

/// SplitMix64: tiny, fast, good enough for workload generation.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in `[0, n)` (n > 0); multiply-shift, bias negligible here.
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
    /// Log-uniform integer in `[lo, hi]`.
    pub fn log_uniform(&mut self, lo: usize, hi: usize) -> usize {
        let v = (lo as f64) * (hi as f64 / lo as f64).powf(self.f64());
        (v.round() as usize).clamp(lo, hi)
    }
    /// Alignment shift: 8 / 16 / 64 bytes with probability 50 / 35 / 15 %.
    pub fn align_shift(&mut self) -> u8 {
        let r = self.below(100);
        if r < 50 {
            3
        } else if r < 85 {
            4
        } else {
            6
        }
    }
}

fn tag_of(i: usize) -> u8 {
    // Never 0, so a zeroed block cannot pass the check by accident.
    ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8 | 1
}

/// Live-slot bookkeeping shared by the generators.
struct Live {
    live: Vec<u32>,
    free: Vec<u32>,
}

impl Live {
    fn new(cap: usize) -> Self {
        Live {
            live: Vec::with_capacity(cap),
            free: (0..cap as u32).rev().collect(),
        }
    }
    fn take_free(&mut self) -> u32 {
        let s = self.free.pop().expect("slot available");
        self.live.push(s);
        s
    }
    fn release_random(&mut self, rng: &mut Rng) -> u32 {
        let i = rng.below(self.live.len());
        let s = self.live.swap_remove(i);
        self.free.push(s);
        s
    }
}

/// Random alloc/free mix: first fill to `cap` live blocks, then each step
/// allocates or frees a random live block with probability 50/50 (forced
/// alloc when empty, forced free at the cap). `nops` counts the fill.
pub fn random_mix(
    name: &'static str,
    seed: u64,
    cap: usize,
    nops: usize,
    lo: usize,
    hi: usize,
) -> Workload {
    let mut rng = Rng::new(seed);
    let mut live = Live::new(cap);
    let mut ops = Vec::with_capacity(nops);
    for i in 0..nops {
        let n = live.live.len();
        let alloc = if i < cap || n == 0 {
            true
        } else if n == cap {
            false
        } else {
            rng.next_u64() & 1 == 0
        };
        if alloc {
            let size = rng.log_uniform(lo, hi) as u32;
            let align_shift = rng.align_shift();
            let slot = live.take_free();
            ops.push(Op {
                size,
                slot,
                kind: ALLOC,
                align_shift,
                tag: tag_of(i),
            });
        } else {
            let slot = live.release_random(&mut rng);
            ops.push(Op {
                size: 0,
                slot,
                kind: FREE,
                align_shift: 0,
                tag: 0,
            });
        }
    }
    let desc = format!(
        "{} ops ({} fill + alloc/free 50/50), sizes log-uniform {}–{} B, align 8/16/64 @ 50/35/15 %, ≤ {} live",
        nops,
        cap.min(nops),
        lo,
        hi,
        cap
    );
    Workload {
        name,
        desc,
        ops,
        slots: cap,
        region: 0,
    }
}

/// Fill `cap` blocks (sizes log-uniform `lo..=hi`), then `steps` times resize
/// a random one by a factor log-uniform in ×0.5–×2, clamped to `lo..=hi`.
pub fn realloc_walk(
    name: &'static str,
    seed: u64,
    cap: usize,
    steps: usize,
    lo: usize,
    hi: usize,
) -> Workload {
    let mut rng = Rng::new(seed);
    let mut ops = Vec::with_capacity(cap + steps);
    let mut sizes = vec![0usize; cap];
    for (i, size) in sizes.iter_mut().enumerate() {
        *size = rng.log_uniform(lo, hi);
        let align_shift = rng.align_shift();
        ops.push(Op {
            size: *size as u32,
            slot: i as u32,
            kind: ALLOC,
            align_shift,
            tag: tag_of(i),
        });
    }
    for _ in 0..steps {
        let slot = rng.below(cap);
        let factor = 2f64.powf(rng.f64() * 2.0 - 1.0);
        let new = ((sizes[slot] as f64 * factor).round() as usize).clamp(lo, hi);
        sizes[slot] = new;
        ops.push(Op {
            size: new as u32,
            slot: slot as u32,
            kind: REALLOC,
            align_shift: 0,
            tag: 0,
        });
    }
    let desc = format!(
        "{} ops ({} fill + {} reallocs by ×0.5–×2 log-uniform, clamped {}–{} B), align 8/16/64 @ 50/35/15 %",
        cap + steps,
        cap,
        steps,
        lo,
        hi
    );
    Workload {
        name,
        desc,
        ops,
        slots: cap,
        region: 0,
    }
}

/// Peak of the sum of requested sizes of live blocks over `ops`.
pub fn peak_live(ops: &[Op], slots: usize) -> usize {
    let mut size = vec![0usize; slots];
    let (mut cur, mut peak) = (0usize, 0usize);
    for op in ops {
        let s = op.slot as usize;
        match op.kind {
            ALLOC => {
                size[s] = op.size as usize;
                cur += size[s];
            }
            FREE => cur -= size[s],
            _ => {
                cur = cur - size[s] + op.size as usize;
                size[s] = op.size as usize;
            }
        }
        peak = peak.max(cur);
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays the slot bookkeeping and checks every op is valid.
    fn check_stream(wl: &Workload, cap: usize) {
        let mut live = vec![false; wl.slots];
        let mut n = 0usize;
        for op in &wl.ops {
            let s = op.slot as usize;
            match op.kind {
                ALLOC => {
                    assert!(!live[s], "alloc into a live slot");
                    live[s] = true;
                    n += 1;
                    assert!(n <= cap);
                    assert!(matches!(op.align_shift, 3 | 4 | 6));
                    assert_ne!(op.tag, 0);
                }
                _ => {
                    assert!(live[s], "free/realloc of a dead slot");
                    if op.kind == FREE {
                        live[s] = false;
                        n -= 1;
                    }
                }
            }
        }
    }

    #[test]
    fn random_mix_is_deterministic_and_valid() {
        let a = random_mix("t", 7, 100, 20_000, 16, 4096);
        let b = random_mix("t", 7, 100, 20_000, 16, 4096);
        assert!(a
            .ops
            .iter()
            .zip(&b.ops)
            .all(|(x, y)| (x.size, x.slot, x.kind) == (y.size, y.slot, y.kind)));
        check_stream(&a, 100);
        assert!(a
            .ops
            .iter()
            .filter(|o| o.kind == ALLOC)
            .all(|o| (16..=4096).contains(&o.size)));
        assert!(peak_live(&a.ops, a.slots) <= 100 * 4096);
    }

    #[test]
    fn realloc_walk_is_valid() {
        let w = realloc_walk("t", 9, 50, 10_000, 16, 65536);
        check_stream(&w, 50);
        assert!(w.ops.iter().all(|o| (16..=65536).contains(&o.size)));
        assert_eq!(w.ops.iter().filter(|o| o.kind == REALLOC).count(), 10_000);
    }
}
