//! Scale of one daemon: 1024 idle instances on 16 parents, created and removed through the mdev
//! tree as mdevctl does it (a UUID written to `create`, `1` to `remove`).
//! Run as root with FUSE: `cargo bench --bench scale` (`-- --instances N` for another count).
//!
//! Prints, against the goals: resident memory, threads and descriptors added per
//! instance; CPU used by the daemon over 5 idle seconds; create latency (p50, p99, worst); and
//! whether removals stall the tree (the worst latency of reading another parent's
//! `available_instances` while instances are removed, against the same reads with nothing
//! happening); then memory across 3000 create/remove cycles of one instance (the daemon must
//! not grow with the number of instances it has ever served).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vgpu-emu");
/// EMU-16M: 64 per 4 GiB `emu` parent.
const PER_PARENT: usize = 64;
const TYPE_DIR: &str = "vgpu_emu-emu_16m-v1";

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn proc_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q) as usize]
}

fn uuid(i: usize) -> String {
    format!("5ca1e000-0000-4000-8000-{i:012x}")
}

fn type_dir(sys: &Path, parent: usize) -> PathBuf {
    sys.join(format!(
        "class/mdev_bus/emu{parent}/mdev_supported_types/{TYPE_DIR}"
    ))
}

/// Latencies (ms) of reading `file` until `stop`.
fn read_loop(file: PathBuf, stop: Arc<AtomicBool>) -> Vec<f64> {
    let mut v = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        std::fs::read_to_string(&file).unwrap();
        v.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(1));
    }
    v
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--instances")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let parents = n.div_ceil(PER_PARENT);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("daemon").arg("--root").arg(dir.path());
    for p in 0..parents {
        cmd.args(["--parent", &format!("emu{p}=emu")]);
    }
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.starts_with("vgpu-emu daemon:"), "{ready:?}");
    let daemon = Daemon(child);
    let pid = daemon.0.id();
    let sys = dir.path().join("sys");
    // Settle: one create and remove (lazy allocations, the first thread of each kind).
    std::fs::write(type_dir(&sys, 0).join("create"), uuid(1 << 40)).unwrap();
    let dev = |u: &str| sys.join("bus/mdev/devices").join(u);
    std::fs::write(dev(&uuid(1 << 40)).join("remove"), "1").unwrap();
    let (rss0, thr0, fd0) = (
        proc_field(pid, "VmRSS:"),
        proc_field(pid, "Threads:"),
        fds(pid),
    );

    let mut create = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        std::fs::write(type_dir(&sys, i / PER_PARENT).join("create"), uuid(i)).unwrap();
        create.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (rss1, thr1, fd1) = (
        proc_field(pid, "VmRSS:"),
        proc_field(pid, "Threads:"),
        fds(pid),
    );
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(5));
    let idle_ticks = cpu_ticks(pid) - t0;

    // Reads of the last parent's tree, first with nothing happening, then while the first
    // parent's instances are removed.
    let probe = type_dir(&sys, parents - 1).join("available_instances");
    let stop = Arc::new(AtomicBool::new(false));
    let quiet = {
        let (f, s) = (probe.clone(), stop.clone());
        std::thread::spawn(move || read_loop(f, s))
    };
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let mut quiet = quiet.join().unwrap();
    stop.store(false, Ordering::Relaxed);
    let busy = {
        let (f, s) = (probe.clone(), stop.clone());
        std::thread::spawn(move || read_loop(f, s))
    };
    let batch = n.min(PER_PARENT);
    let mut remove = Vec::with_capacity(n);
    for i in 0..batch {
        let t = Instant::now();
        std::fs::write(dev(&uuid(i)).join("remove"), "1").unwrap();
        remove.push(t.elapsed().as_secs_f64() * 1e3);
    }
    stop.store(true, Ordering::Relaxed);
    let mut busy = busy.join().unwrap();
    for i in batch..n {
        let t = Instant::now();
        std::fs::write(dev(&uuid(i)).join("remove"), "1").unwrap();
        remove.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (rss2, thr2, fd2) = (
        proc_field(pid, "VmRSS:"),
        proc_field(pid, "Threads:"),
        fds(pid),
    );

    // Churn: instances come and go for the daemon's whole life.
    const CYCLES: usize = 3000;
    let anon = || proc_field(pid, "RssAnon:");
    let churn = |from: usize, to: usize| {
        for i in from..to {
            let u = uuid((1 << 41) + i);
            std::fs::write(type_dir(&sys, 0).join("create"), &u).unwrap();
            std::fs::read_to_string(dev(&u).join("frame_rate_limiter")).unwrap();
            std::fs::write(dev(&u).join("remove"), "1").unwrap();
        }
    };
    churn(0, 500);
    let anon0 = anon();
    churn(500, 500 + CYCLES);
    let anon1 = anon();

    let per = |a: u64, b: u64| (b as f64 - a as f64) / n as f64;
    println!("vgpu-emu daemon at scale: {n} idle EMU-16M instances on {parents} parents\n");
    println!(
        "resident memory   {:8.1} MiB -> {:8.1} MiB   +{:6.1} KiB per instance (goal <= 64)",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        per(rss0, rss1)
    );
    println!(
        "threads           {thr0:8} -> {thr1:8}       +{:6.2} per instance",
        per(thr0, thr1)
    );
    println!(
        "descriptors       {fd0:8} -> {fd1:8}       +{:6.2} per instance",
        per(fd0, fd1)
    );
    println!(
        "idle CPU over 5 s {idle_ticks:8} ticks ({:.2}% of one core; goal 0)",
        idle_ticks as f64 / (5.0 * 100.0) * 100.0
    );
    println!(
        "create            p50 {:6.2} ms   p99 {:6.2} ms   worst {:7.2} ms (goal p99 <= 20)",
        quantile(&mut create, 0.5),
        quantile(&mut create, 0.99),
        quantile(&mut create, 1.0)
    );
    println!(
        "remove            p50 {:6.2} ms   p99 {:6.2} ms   worst {:7.2} ms",
        quantile(&mut remove, 0.5),
        quantile(&mut remove, 0.99),
        quantile(&mut remove, 1.0)
    );
    println!(
        "tree read         quiet worst {:6.2} ms ({} reads); during {batch} removals worst {:6.2} ms ({} reads)",
        quantile(&mut quiet, 1.0),
        quiet.len(),
        quantile(&mut busy, 1.0),
        busy.len()
    );
    println!(
        "after removing all: {:.1} MiB, {thr2} threads, {fd2} descriptors",
        rss2 as f64 / 1024.0
    );
    println!(
        "churn             {CYCLES} create/remove cycles after 500: private memory {anon0} -> {anon1} KiB ({:+.1} KiB per 1000 cycles; goal 0)",
        (anon1 as f64 - anon0 as f64) * 1000.0 / CYCLES as f64
    );
}
