//! What the daemon benchmark programs share (through `#[path]`, since each is its own binary):
//! CPU placement (pinning the calling thread, reading which CPUs a process may use) and flag
//! values.

#![allow(dead_code)] // Each binary uses its own subset.

/// A CPU set holding just `cpu`.
pub fn cpu_set_of(cpu: usize) -> Result<libc::cpu_set_t, String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!("CPU {cpu} is out of range"));
    }
    // SAFETY: `cpu_set_t` is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu < CPU_SETSIZE` (checked above), so the bit lies inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    Ok(set)
}

/// Whether this process may run on `cpu` (it is in the affinity mask it started with).
pub fn cpu_allowed(cpu: usize) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: as in `cpu_set_of`: all zeroes is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable `cpu_set_t` of the size passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    // SAFETY: `cpu < CPU_SETSIZE` (checked above).
    rc == 0 && unsafe { libc::CPU_ISSET(cpu, &set) }
}

/// Pins the calling thread to `cpu` and checks that it now runs there.
pub fn pin_to(cpu: usize) -> Result<(), String> {
    let set = cpu_set_of(cpu)?;
    // SAFETY: `set` is a valid `cpu_set_t` of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(format!(
            "cannot pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // The kernel migrates the caller before `sched_setaffinity` returns.
    // SAFETY: a plain query without arguments.
    let now = unsafe { libc::sched_getcpu() };
    if usize::try_from(now).ok() != Some(cpu) {
        return Err(format!("pinned to CPU {cpu} but running on CPU {now}"));
    }
    Ok(())
}

/// The `Cpus_allowed_list` line of process `pid`.
pub fn cpus_allowed_list(pid: u32) -> Result<String, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
        .ok_or(format!("{path} has no Cpus_allowed_list"))
}

/// The value after `flag` as a number.
pub fn number<T: std::str::FromStr>(v: Option<String>, flag: &str) -> Result<T, String> {
    let v = v.ok_or(format!("{flag} needs a value"))?;
    v.parse()
        .map_err(|_| format!("{flag} needs a non-negative integer, not {v:?}"))
}
