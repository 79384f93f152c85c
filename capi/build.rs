//! Gives `libxalloc.so` a SONAME, so that a program linked against it by any path records
//! `libxalloc.so` as what it needs, found through the library path like any other.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libxalloc.so");
}
