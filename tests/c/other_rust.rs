//! Another Rust static library, linked into one C program beside `libxalloc.a`
//! (`c_library::libxalloc_a_links_beside_another_rust_static_library`): its own standard
//! library, its own panic runtime, a panic it catches.

/// The sum of `0..n`, plus 1, or plus 1000 when `n` is 7 (a panic, caught).
#[no_mangle]
pub extern "C" fn other_sum(n: u32) -> u64 {
    let v: Vec<u64> = (0..u64::from(n)).collect();
    let r = std::panic::catch_unwind(|| if n == 7 { panic!("seven") } else { 1u64 });
    v.iter().sum::<u64>() + r.unwrap_or(1000)
}
