//! What the benchmarks share.

/// Pins this process, and so every process it starts, to CPU 0: on a 2-vCPU VM a cross-CPU
/// wake-up costs tens of microseconds and the scheduler's placement swings from run to run, so
/// round-trip figures are taken on one core.
pub fn pin_to_cpu0() {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it; sched_setaffinity
    // reads it for this process (pid 0). Children inherit the mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!(
                "warning: cannot pin to CPU 0: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
