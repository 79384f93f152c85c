//! Several processes sharing one daemon: each child allocates large buffers through
//! `XallocGlobal`, fills them with its own pattern, and checks them while the others do the
//! same in the same arena; the parent shows the daemon's view while they hold their buffers and
//! after they exit (their memory is back at once, however they exit).
//!
//! ```sh
//! scripts/start.sh
//! cargo run --release -p xalloc-examples --bin multi_process     # 4 children
//! ```

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use xalloc_global::XallocGlobal;

#[global_allocator]
static A: XallocGlobal = XallocGlobal::new();

const CHILDREN: usize = 4;

fn child(id: u8) {
    let mut bufs: Vec<Vec<u8>> = (0..4)
        .map(|k| vec![id ^ k; (k as usize + 1) << 20])
        .collect();
    let shared = bufs
        .iter()
        .filter(|b| xalloc_global::is_shared(b.as_ptr()))
        .count();
    println!(
        "child {id} (pid {}): {shared} of {} buffers in the shared arena",
        std::process::id(),
        bufs.len()
    );
    println!("holding");
    std::io::stdout().flush().unwrap();
    // Wait for the parent's go, then check that no one else wrote into our buffers.
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    for (k, b) in bufs.iter_mut().enumerate() {
        assert!(
            b.iter().all(|&x| x == id ^ k as u8),
            "child {id}: buffer {k} changed"
        );
    }
    println!("child {id}: buffers intact");
}

fn status(title: &str) {
    let exe = std::env::current_exe().unwrap().with_file_name("xallocd");
    let name = std::env::var("XALLOC_NAME").unwrap_or_else(|_| "xalloc".into());
    let out = Command::new(&exe)
        .args(["status", "--name", &name, "--json"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            println!("{title}: {}", String::from_utf8_lossy(&o.stdout).trim())
        }
        _ => println!("{title}: (no daemon status; is xallocd built and running?)"),
    }
}

fn main() {
    if let Some(id) = std::env::args().nth(1).and_then(|a| a.parse().ok()) {
        return child(id);
    }
    let exe = std::env::current_exe().unwrap();
    let mut kids: Vec<_> = (0..CHILDREN)
        .map(|i| {
            Command::new(&exe)
                .arg((i + 1).to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    for k in &mut kids {
        let mut out = BufReader::new(k.stdout.as_mut().unwrap());
        let mut line = String::new();
        while out.read_line(&mut line).unwrap() > 0 && !line.contains("holding") {
            print!("{line}");
            line.clear();
        }
    }
    status("while the children hold their buffers");
    for k in &mut kids {
        writeln!(k.stdin.as_mut().unwrap()).unwrap();
    }
    for k in kids {
        let out = k.wait_with_output().unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
        assert!(out.status.success());
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    status("after they exited");
}
