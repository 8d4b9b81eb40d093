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

/// Median time per iteration of `f` over batches filling about `budget` (at least 5).
#[allow(dead_code)] // not every benchmark times closures
pub fn time(budget: std::time::Duration, mut f: impl FnMut()) -> std::time::Duration {
    f();
    let mut samples = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < budget || samples.len() < 5 {
        let t = std::time::Instant::now();
        f();
        samples.push(t.elapsed());
    }
    samples.sort();
    samples[samples.len() / 2]
}

/// Median CPU time of this thread per iteration of `f` over batches filling about `budget` of
/// wall time (at least 5): what the work itself costs, whatever else shares the CPU. On a shared
/// machine a sample longer than a scheduler slice is always cut by other tasks, so the wall
/// time of long operations grows with the load while that of a short floor does not.
#[allow(dead_code)] // not every benchmark measures CPU time
pub fn cpu_time(budget: std::time::Duration, mut f: impl FnMut()) -> std::time::Duration {
    fn now() -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for clock_gettime to write into.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(r, 0, "CLOCK_THREAD_CPUTIME_ID");
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
    f();
    let mut samples = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < budget || samples.len() < 5 {
        let t = now();
        f();
        samples.push(now() - t);
    }
    samples.sort();
    samples[samples.len() / 2]
}
