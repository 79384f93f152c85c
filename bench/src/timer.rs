//! Cheap per-op timestamps: the TSC on x86_64, `Instant` elsewhere.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[cfg(target_arch = "x86_64")]
/// Raw timestamp in ticks.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: rdtsc is available on every x86_64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
/// Raw timestamp in ticks (nanoseconds since the first call).
#[inline(always)]
pub fn now() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

static TICKS_PER_NS: OnceLock<f64> = OnceLock::new();

/// Measures ticks per nanosecond against `Instant` (once, ~100 ms).
pub fn calibrate() -> f64 {
    *TICKS_PER_NS.get_or_init(|| {
        if cfg!(not(target_arch = "x86_64")) {
            return 1.0;
        }
        // Median of a few short spins, to shrug off a preemption.
        let mut r: Vec<f64> = (0..5)
            .map(|_| {
                let (i0, t0) = (Instant::now(), now());
                while i0.elapsed() < Duration::from_millis(20) {}
                let (t1, el) = (now(), i0.elapsed());
                (t1 - t0) as f64 / el.as_nanos() as f64
            })
            .collect();
        r.sort_by(f64::total_cmp);
        r[2]
    })
}

/// Ticks to nanoseconds.
pub fn to_ns(ticks: u64) -> f64 {
    ticks as f64 / calibrate()
}

/// Median cost of an empty timed region, in ticks.
pub fn overhead() -> u64 {
    let mut v: Vec<u64> = (0..10_001)
        .map(|_| {
            let t = now();
            now().wrapping_sub(t)
        })
        .collect();
    v.sort_unstable();
    v[v.len() / 2]
}
