//! Page flips of a stock Linux guest on our virtio-gpu personality: paced by the frame-rate
//! limiter (against the type's FRL, at rest and with both cores busy), idle, and with the limiter
//! off as a ratio against QEMU's own in-process `virtio-gpu-pci` flipping in the same VM, all in
//! one run. Run: `cargo bench --bench flip` (boots a guest: QEMU and the guest image are
//! provisioned by qemu-scripts, as for the guest tests).
//!
//! One guest boots with two M60-2Q instances (60 fps, four heads), each served by its own
//! `vgpu-emu serve` (card 0: instance A, card 1: instance B), and QEMU's
//! `virtio-gpu-pci,max_outputs=4` (card 2). The guest's `flip` command (`vgpu-guest flip`) flips
//! every head of one card between two dumb buffers as fast as each head's flip events come back,
//! at 1024x768, and reports each head's rate from the events' timestamps. On our device Linux
//! `virtio_gpu` uses guest-memory blobs and waits for a fence per flip, which the limiter
//! completes on the instance's tick; on QEMU's, without blob support, it flips 2D buffers (a
//! TRANSFER_TO_HOST_2D of the whole buffer per flip) without waiting.
//!
//! The instance's tick lateness p50/p99 in `status` is cumulative over the instance's life, so
//! each paced round has a fresh instance of its own (A at rest, B under load); the ticks each one
//! ran before its round (while the guest booted) are printed beside the figures.
//!
//! 1. Paced, at rest: `flip 0` on A. Flips/s per head against the FRL, A's tick lateness
//!    p50/p99/max, the counters' presented frames and runtime wake-ups over the round, vgpu-emu's
//!    CPU per second and per presented frame (utime + stime of /proc/PID/stat, and the
//!    scheduler's nanoseconds summed over /proc/PID/task/*/schedstat). The floor for the
//!    lateness: a thread of this benchmark sleeping on its own absolute timerfd at the same 60 Hz
//!    over the same window, i.e. what any thread of this machine gets from a timer.
//! 2. Paced, under load: the same, `flip 1` on B, while two busy-looping threads of this
//!    benchmark (unpinned, default priority) keep both cores busy.
//! 3. Idle: both instances, the guest attached and not flipping, for a few seconds: runtime
//!    wake-ups and vgpu-emu CPU.
//! 4. Limiter off: `vgpu-emu set frame_rate_limiter=0` on A, then `flip 0` and `flip 2` (QEMU's) in
//!    alternating rounds (three times), so the load of a shared machine moves both sides of a
//!    round; per round the rates summed over the heads, ours / QEMU's, CPU per flip of vgpu-emu
//!    and QEMU, vfio-user messages and kicks per flip; then the medians per head and overall.
//!
//! `FLIP_TICK_SCHED=fifo|slice` (an experiment, not what vgpu-emu does) changes the scheduling of
//! both instances' tick threads before the rounds: see [`tick_sched`].

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vgpu-emu");
const TYPE: &str = "M60-2Q";
const HEADS: usize = 4;
const MODE: &str = "1024x768";
/// Flips per head of a limiter-off round.
const FLIPS: usize = 300;
/// Flips per head of a paced round: 10 s at 60 fps, 600 ticks (the p99 is the 6th-worst).
const PACED_FLIPS: usize = 600;
/// The type's frame-rate limit.
const FRL: f64 = 60.0;
/// Busy-looping threads of the paced round under load (one per core of the 2-core machine).
const BUSY: usize = 2;
/// The idle window, and the pause after the last flip before it starts.
const IDLE: Duration = Duration::from_secs(5);
const SETTLE: Duration = Duration::from_secs(1);
/// Alternating rounds of ours and QEMU's: the machine's load moves both sides of a round.
const ROUNDS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(300);

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu-scripts")
}

/// Runs a provisioning script and returns its trimmed stdout.
fn run_script(name: &str) -> String {
    let out = Command::new(scripts().join(name))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run qemu-scripts/{name}: {e}"));
    assert!(
        out.status.success(),
        "qemu-scripts/{name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may hold spaces) in parentheses; utime and stime are
    // fields 14 and 15, i.e. the 12th and 13th after the closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[0] + f[1]) as f64 / hz
}

/// `vgpu-emu status --json` of the instance.
fn status(socket: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "status: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The guest: QEMU (run-guest execs it) and its serial console's lines.
struct Guest {
    qemu: Killed,
    stdin: ChildStdin,
    lines: Receiver<String>,
    console: Vec<String>,
}

impl Guest {
    fn boot(args: &[&str]) -> Guest {
        let mut child = Command::new(scripts().join("run-guest"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start run-guest");
        let (tx, lines) = channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                    let line = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_string();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        let mut guest = Guest {
            qemu: Killed(child),
            stdin,
            lines,
            console: Vec::new(),
        };
        guest.until("VGPU: ready");
        guest
    }

    /// Waits for a line starting with `prefix`; returns the `VGPU:` lines seen meanwhile.
    fn until(&mut self, prefix: &str) -> Vec<String> {
        let deadline = Instant::now() + TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|e| {
                panic!("no `{prefix}` ({e}); console:\n{}", self.console.join("\n"))
            });
            self.console.push(line.clone());
            let Some(i) = line.find("VGPU: ") else {
                continue;
            };
            let line = &line[i..];
            assert!(
                !line.starts_with("VGPU: flip failed") && !line.starts_with("VGPU: error"),
                "{line}; console:\n{}",
                self.console.join("\n")
            );
            seen.push(line.to_string());
            if line.starts_with(prefix) {
                return seen;
            }
        }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("guest console");
    }
}

/// One head's `flips` line.
#[derive(Debug)]
struct Head {
    rate: f64,
    count: usize,
    avg_ms: f64,
    max_ms: f64,
}

/// CPU time of a process's threads from the scheduler, in seconds (nanosecond resolution; the
/// first field of each /proc/PID/task/TID/schedstat).
fn sched_seconds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>() as f64
        / 1e9
}

/// What one `flip` run measured: the heads in head order, per watched process the CPU seconds
/// (stat, schedstat) spent between the tool's `flipping` and `flipped` lines, and the instance's
/// status read at those lines (just outside the CPU window).
struct Run {
    heads: Vec<Head>,
    cpu: Vec<(f64, f64)>,
    /// Seconds between the two lines, as this process saw them.
    wall: f64,
    /// `status --json` of the instance at the `flipping` and `flipped` lines.
    status: (serde_json::Value, serde_json::Value),
}

/// Runs `flip CARD MODE COUNT`, reading the CPU time of `pids` and the status of the instance
/// behind `socket` as the flips start and end.
fn flip(guest: &mut Guest, card: u32, count: usize, socket: &Path, pids: &[u32]) -> Run {
    let cpu = || -> Vec<(f64, f64)> {
        pids.iter()
            .map(|&p| (cpu_seconds(p), sched_seconds(p)))
            .collect()
    };
    guest.send(&format!("flip {card} {MODE} {count}"));
    guest.until(&format!("VGPU: flipping card={card}"));
    let first = status(socket);
    let start = cpu();
    let t0 = Instant::now();
    let lines = guest.until(&format!("VGPU: flipped card={card}"));
    let end = cpu();
    let wall = t0.elapsed().as_secs_f64();
    let last = status(socket);
    let mut heads: Vec<(usize, Head)> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("VGPU: flips "))
        .map(|l| {
            let f: HashMap<&str, &str> = l
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .collect();
            assert_eq!(f["card"], card.to_string(), "{l}");
            let head = Head {
                rate: f["rate"].parse().unwrap(),
                count: f["count"].parse().unwrap(),
                avg_ms: f["avg_ms"].parse().unwrap(),
                max_ms: f["max_ms"].parse().unwrap(),
            };
            assert_eq!(head.count, count, "{l}");
            (f["head"].parse().unwrap(), head)
        })
        .collect();
    heads.sort_by_key(|(i, _)| *i);
    assert_eq!(heads.len(), HEADS, "{lines:?}");
    Run {
        heads: heads.into_iter().map(|(_, h)| h).collect(),
        cpu: start
            .iter()
            .zip(&end)
            .map(|(a, b)| (b.0 - a.0, b.1 - a.1))
            .collect(),
        wall,
        status: (first, last),
    }
}

/// One `vgpu-emu serve` of an M60-2Q instance.
struct Served {
    process: Killed,
    socket: PathBuf,
}

impl Served {
    fn start(dir: &Path, name: &str) -> Served {
        let socket = dir.join(format!("{name}.sock"));
        let process = Killed(
            Command::new(BIN)
                .args(["serve", "--type", TYPE, "--socket"])
                .arg(&socket)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn vgpu-emu"),
        );
        let mut ctl = socket.as_os_str().to_owned();
        ctl.push(".ctl");
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&ctl).is_err() {
            assert!(Instant::now() < deadline, "vgpu-emu did not come up");
            std::thread::sleep(Duration::from_millis(5));
        }
        Served { process, socket }
    }

    fn pid(&self) -> u32 {
        self.process.0.id()
    }

    fn status(&self) -> serde_json::Value {
        status(&self.socket)
    }

    /// `vgpu-emu set --socket S SETTING`.
    fn set(&self, setting: &str) {
        let out = Command::new(BIN)
            .args(["set", "--socket"])
            .arg(&self.socket)
            .arg(setting)
            .output()
            .unwrap();
        assert!(out.status.success(), "set {setting}: {out:?}");
    }
}

/// The task directory of a process's frame-rate limiter thread (the one named `frl-...`).
fn tick_task(pid: u32) -> PathBuf {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.starts_with("frl-") {
            return path;
        }
    }
    panic!("vgpu-emu {pid} has no frl- thread");
}

/// The scheduler's figures of a process's frame-rate limiter thread: CPU nanoseconds,
/// nanoseconds waited on a run queue, time slices run.
fn tick_thread(pid: u32) -> [u64; 3] {
    let s = std::fs::read_to_string(tick_task(pid).join("schedstat")).unwrap();
    let f: Vec<u64> = s.split_whitespace().map(|v| v.parse().unwrap()).collect();
    [f[0], f[1], f[2]]
}

/// `sched_attr` of sched_setattr(2) (the first, 48-byte version).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// An experiment, not what vgpu-emu does: with `FLIP_TICK_SCHED=fifo` the benchmark puts each
/// instance's tick thread in SCHED_FIFO (priority 1), with `FLIP_TICK_SCHED=slice` it leaves it in
/// SCHED_OTHER but asks for a 100 us slice (sched_setattr's `sched_runtime`, which EEVDF kernels
/// since 6.12 take as the task's slice: a short-slice task preempts on wake-up). Needs the
/// privilege to change another process's scheduling (root does).
fn tick_sched(pid: u32, how: &str) {
    let tid: i32 = tick_task(pid)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut attr = SchedAttr {
        size: size_of::<SchedAttr>() as u32,
        ..SchedAttr::default()
    };
    match how {
        "fifo" => {
            attr.policy = libc::SCHED_FIFO as u32;
            attr.priority = 1;
        }
        "slice" => {
            attr.policy = libc::SCHED_OTHER as u32;
            attr.runtime = 100_000;
        }
        _ => panic!("FLIP_TICK_SCHED takes fifo or slice, not {how}"),
    }
    // SAFETY: passes a sched_attr on the stack, of the size it says, to the kernel, which only
    // reads it.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &raw const attr, 0u32) };
    assert_eq!(
        r,
        0,
        "sched_setattr({tid}, {how}): {}",
        std::io::Error::last_os_error()
    );
}

fn monotonic() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the time into the timespec on the stack.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Threads of this process that stop when asked and hand back what they collected.
struct Threads<T> {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<T>>,
}

impl<T: Send + 'static> Threads<T> {
    fn spawn(n: usize, f: impl Fn(&AtomicBool) -> T + Send + Sync + 'static) -> Threads<T> {
        let stop = Arc::new(AtomicBool::new(false));
        let f = Arc::new(f);
        let threads = (0..n)
            .map(|_| {
                let (stop, f) = (stop.clone(), f.clone());
                std::thread::spawn(move || f(&stop))
            })
            .collect();
        Threads { stop, threads }
    }

    fn stop(self) -> Vec<T> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }
}

/// The load: `BUSY` threads spinning until stopped (unpinned, default priority).
fn busy() -> Threads<u64> {
    Threads::spawn(BUSY, |stop| {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n = std::hint::black_box(n.wrapping_add(1));
        }
        n
    })
}

/// The lateness floor: a thread sleeping on an absolute CLOCK_MONOTONIC timerfd at the FRL (tick
/// `k` at `origin + k / FRL`, the next one after each wake-up: a late tick is not caught up), as
/// the instance's tick thread does, without the instance behind it. Hands back each tick's
/// lateness, microseconds.
fn floor() -> Threads<Vec<u64>> {
    Threads::spawn(1, |stop| {
        // SAFETY: creates a descriptor this closure owns and closes.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        assert!(fd >= 0, "timerfd: {}", std::io::Error::last_os_error());
        let period = (1e9 / FRL) as u64;
        let origin = monotonic();
        let mut late = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let k = (monotonic() - origin).as_nanos() as u64 / period + 1;
            let due = origin + Duration::from_nanos(k * period);
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: due.as_secs() as libc::time_t,
                    tv_nsec: due.subsec_nanos() as libc::c_long,
                },
            };
            let mut expirations = 0u64;
            // SAFETY: arms the timerfd owned here with a spec on the stack, then reads its 8-byte
            // expiration count into a u64 on the stack.
            unsafe {
                assert_eq!(
                    libc::timerfd_settime(fd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()),
                    0
                );
                assert_eq!(
                    libc::read(fd, (&raw mut expirations).cast(), 8),
                    8,
                    "timerfd read"
                );
            }
            late.push(monotonic().saturating_sub(due).as_micros() as u64);
        }
        // SAFETY: closes the descriptor created above, once.
        unsafe { libc::close(fd) };
        late
    })
}

/// The `q` quantile of `v` (nearest rank).
fn quantile(v: &[u64], q: f64) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

/// The 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

/// A counter of `frl_runtime`.
fn rt(s: &serde_json::Value, name: &str) -> u64 {
    s["frl_runtime"][name].as_u64().unwrap()
}

/// A frame counter summed over the heads.
fn frames(s: &serde_json::Value, name: &str) -> u64 {
    s["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["frames"][name].as_u64().unwrap_or(0))
        .sum()
}

/// A paced round: `flip CARD` on `served` while the lateness floor runs; prints its figures.
fn paced(guest: &mut Guest, card: u32, served: &Served, what: &str) {
    let pid = served.pid();
    let floor_ticks = floor();
    let thread0 = tick_thread(pid);
    let run = flip(guest, card, PACED_FLIPS, &served.socket, &[pid]);
    let thread1 = tick_thread(pid);
    let floor_late = floor_ticks.stop().pop().unwrap();
    let (before, after) = &run.status;
    let d = |f: fn(&serde_json::Value, &str) -> u64, name: &str| f(after, name) - f(before, name);
    let presented = d(frames, "presented");
    assert!(presented > 0, "card {card} is not this instance: {after}");
    let (wakeups, ticks) = (d(rt, "wakeups"), d(rt, "ticks"));
    let rates: Vec<f64> = run.heads.iter().map(|h| h.rate).collect();
    let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rates.iter().copied().fold(0.0, f64::max);
    println!(
        "{what}: `flip {card} {MODE} {PACED_FLIPS}`, {:.1} s",
        run.wall
    );
    for (i, h) in run.heads.iter().enumerate() {
        println!(
            "  head {i}: {:.2} flips/s ({:.4}x the FRL), interval avg {:.2} ms, max {:.2} ms; \
             status present_rate {:.1}/s",
            h.rate,
            h.rate / FRL,
            h.avg_ms,
            h.max_ms,
            after["heads"][i]["frames"]["present_rate"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
    println!(
        "  per head {lo:.2}-{hi:.2} flips/s: {:.4}x-{:.4}x the FRL ({FRL} fps; goal within 1%)",
        lo / FRL,
        hi / FRL
    );
    println!(
        "  counters over the flips: {presented} presented, {} submitted, {} dropped; {ticks} \
         ticks ({:.1}/s), {} released, {wakeups} runtime wake-ups: {:.3} per presented frame, \
         {:.3} per tick",
        d(frames, "submitted"),
        d(frames, "dropped"),
        ticks as f64 / run.wall,
        d(rt, "released"),
        wakeups as f64 / presented as f64,
        wakeups as f64 / ticks.max(1) as f64,
    );
    println!(
        "  tick lateness (status, the instance's whole life: {} ticks, {} of them before the \
         flips, max {} us then): p50 {} us, p99 {} us, max {} us (goal p99 < 1000 us)",
        rt(after, "ticks"),
        rt(before, "ticks"),
        rt(before, "max_lateness_us"),
        rt(after, "p50_lateness_us"),
        rt(after, "p99_lateness_us"),
        rt(after, "max_lateness_us"),
    );
    println!(
        "  floor, a {FRL} Hz absolute timerfd in this process over the same window ({} ticks): \
         p50 {} us, p99 {} us, max {} us",
        floor_late.len(),
        quantile(&floor_late, 0.5),
        quantile(&floor_late, 0.99),
        floor_late.iter().max().unwrap(),
    );
    let slices = (thread1[2] - thread0[2]).max(1) as f64;
    println!(
        "  tick thread (schedstat): {:.1} us CPU and {:.1} us waiting on a run queue per time \
         slice ({} slices)",
        (thread1[0] - thread0[0]) as f64 / slices / 1e3,
        (thread1[1] - thread0[1]) as f64 / slices / 1e3,
        thread1[2] - thread0[2],
    );
    let (stat, sched) = run.cpu[0];
    println!(
        "  vgpu-emu CPU: {:.2} ms/s (utime+stime) / {:.2} ms/s (schedstat); per presented frame \
         {:.1} / {:.1} us",
        stat / run.wall * 1e3,
        sched / run.wall * 1e3,
        stat / presented as f64 * 1e6,
        sched / presented as f64 * 1e6,
    );
}

fn main() {
    run_script("provision-qemu");
    run_script("build-guest");
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let dir = tempfile::tempdir().unwrap();
    let a = Served::start(dir.path(), "a");
    let b = Served::start(dir.path(), "b");
    let heads = HEADS.to_string();
    // B sits at slot 5, between A (slot 4) and QEMU's card (slot 8): card 1, connectors
    // Virtual-5..8, so QEMU's card has Virtual-9..12, of which 10..12 are forced on here (the
    // launcher forces 6..8, B's, which it reports connected anyway).
    let b_device = format!(
        r#"{{"driver":"vfio-user-pci","addr":"0x5","socket":{{"type":"unix","path":"{}"}}}}"#,
        b.socket.display()
    );
    let force: Vec<String> = (2..=HEADS)
        .map(|k| format!("video=Virtual-{}:e", 2 * HEADS + k))
        .collect();
    let boot = Instant::now();
    let mut guest = Guest::boot(&[
        "--socket",
        a.socket.to_str().unwrap(),
        "--heads",
        &heads,
        "--virtio-gpu",
        &heads,
        "--append",
        &force.join(" "),
        "--",
        "-device",
        &b_device,
    ]);
    let qemu = guest.qemu.0.id();
    println!(
        "guest booted in {:.1} s (accel: {}; load average {}); {TYPE} ({FRL} fps, {HEADS} heads) instances A \
         (card 0) and B (card 1), QEMU's virtio-gpu-pci (card 2); utime+stime at {hz} Hz",
        boot.elapsed().as_secs_f64(),
        accel(qemu),
        loadavg()
    );

    if let Ok(how) = std::env::var("FLIP_TICK_SCHED") {
        for s in [&a, &b] {
            tick_sched(s.pid(), &how);
        }
        println!("EXPERIMENT: both instances' tick threads set to `{how}` (FLIP_TICK_SCHED)");
    }

    // 1 and 2: paced, on fresh instances.
    paced(&mut guest, 0, &a, "1. paced, at rest, instance A");
    let load = busy();
    paced(
        &mut guest,
        1,
        &b,
        &format!("2. paced, under load ({BUSY} busy-looping threads, unpinned), instance B"),
    );
    let spins = load.stop();
    println!(
        "  (the busy threads ran {:.1e} and {:.1e} loop iterations)",
        spins[0] as f64, spins[1] as f64
    );

    // 3: idle, attached.
    std::thread::sleep(SETTLE);
    let served = [("A", &a), ("B", &b)];
    let before: Vec<_> = served.iter().map(|(_, s)| s.status()).collect();
    let cpu0: Vec<_> = served
        .iter()
        .map(|(_, s)| (cpu_seconds(s.pid()), sched_seconds(s.pid())))
        .collect();
    std::thread::sleep(IDLE);
    let cpu1: Vec<_> = served
        .iter()
        .map(|(_, s)| (cpu_seconds(s.pid()), sched_seconds(s.pid())))
        .collect();
    let after: Vec<_> = served.iter().map(|(_, s)| s.status()).collect();
    println!(
        "3. idle: the guest attached, not flipping, {:.0} s from {:.0} s after the last flip \
         (goal 0 wake-ups, 0 CPU):",
        IDLE.as_secs_f64(),
        SETTLE.as_secs_f64()
    );
    for (i, (name, _)) in served.iter().enumerate() {
        println!(
            "  instance {name}: {} runtime wake-ups, {} ticks, {} frames submitted; vgpu-emu CPU \
             {:.0} ticks of 1/{hz} s (utime+stime), {:.0} us (schedstat; the status requests \
             either side fall outside)",
            rt(&after[i], "wakeups") - rt(&before[i], "wakeups"),
            rt(&after[i], "ticks") - rt(&before[i], "ticks"),
            frames(&after[i], "submitted") - frames(&before[i], "submitted"),
            (cpu1[i].0 - cpu0[i].0) * hz as f64,
            (cpu1[i].1 - cpu0[i].1) * 1e6,
        );
    }

    // 4: the limiter off on A, against QEMU's card.
    a.set("frame_rate_limiter=0");
    assert_eq!(a.status()["frame_rate_limiter"], false);
    let pids = [a.pid(), qemu];
    let flips = (HEADS * FLIPS) as f64;
    let us = |s: f64| s / flips * 1e6;
    let sum = |h: &[Head]| h.iter().map(|h| h.rate).sum::<f64>();
    let counter = |v: &serde_json::Value, a: &str, b: &str| v[a][b].as_u64().unwrap();
    println!(
        "4. limiter off on A (`vgpu-emu set frame_rate_limiter=0`): {ROUNDS} rounds of `flip 0` \
         (ours) then `flip 2` (QEMU's): {HEADS} heads at {MODE}, {FLIPS} flips per head. Per \
         round: flips/s summed over the heads, ours/QEMU's, host CPU per flip between the first \
         and the last flip lines (utime+stime / schedstat), vfio-user messages and kicks per \
         flip:"
    );
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let ours = flip(&mut guest, 0, FLIPS, &a.socket, &pids);
        let theirs = flip(&mut guest, 2, FLIPS, &a.socket, &pids);
        let (o, t) = (sum(&ours.heads), sum(&theirs.heads));
        let (before, after) = &ours.status;
        println!(
            "  round {round}: ours {o:.1}, QEMU's {t:.1}: {:.3}x; vgpu-emu CPU {:.1} / {:.1} us; \
             QEMU CPU {:.1} / {:.1} us in ours, {:.1} / {:.1} us in its own; {:.2} messages, \
             {:.2} kicks; {} presented, {} runtime wake-ups",
            o / t,
            us(ours.cpu[0].0),
            us(ours.cpu[0].1),
            us(ours.cpu[1].0),
            us(ours.cpu[1].1),
            us(theirs.cpu[1].0),
            us(theirs.cpu[1].1),
            (counter(after, "server", "messages") - counter(before, "server", "messages")) as f64
                / flips,
            (counter(after, "accesses", "register_writes")
                - counter(before, "accesses", "register_writes")) as f64
                / flips,
            frames(after, "presented") - frames(before, "presented"),
            rt(after, "wakeups") - rt(before, "wakeups"),
        );
        rounds.push((ours, theirs));
    }
    guest.send("poweroff");

    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("  medians over the rounds:");
    println!(
        "  head  ours flips/s  x FRL  QEMU's flips/s  ours/QEMU's  ours avg/max ms  QEMU's avg/max ms"
    );
    for i in 0..HEADS {
        let m = |theirs: bool, f: fn(&Head) -> f64| {
            median(
                rounds
                    .iter()
                    .map(|r| f(&if theirs { &r.1 } else { &r.0 }.heads[i]))
                    .collect(),
            )
        };
        let (o, t) = (m(false, |h| h.rate), m(true, |h| h.rate));
        println!(
            "  {i:>4}  {o:>12.1}  {:>5.1}  {t:>14.1}  {:>10.3}x  {:>7.3}/{:<7.3}  {:>7.3}/{:<7.3}",
            o / FRL,
            o / t,
            m(false, |h| h.avg_ms),
            m(false, |h| h.max_ms),
            m(true, |h| h.avg_ms),
            m(true, |h| h.max_ms),
        );
    }
    let o = median(rounds.iter().map(|r| sum(&r.0.heads)).collect());
    let t = median(rounds.iter().map(|r| sum(&r.1.heads)).collect());
    let ratio = median(
        rounds
            .iter()
            .map(|r| sum(&r.0.heads) / sum(&r.1.heads))
            .collect(),
    );
    println!(
        "   all  {o:>12.1}  {:>5.1}  {t:>14.1}  {ratio:>10.3}x  (median of the rounds' ratios; \
         goal >= 0.5x, then 1.0x; x FRL per head)",
        o / HEADS as f64 / FRL
    );
    println!(
        "  vgpu-emu CPU per flip of our run: {:.1} us (utime+stime) / {:.1} us (schedstat)",
        median(rounds.iter().map(|r| us(r.0.cpu[0].0)).collect()),
        median(rounds.iter().map(|r| us(r.0.cpu[0].1)).collect()),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while guest.qemu.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop((a, b));
}

/// QEMU's `-accel` argument.
fn accel(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.iter()
        .position(|a| a == "-accel")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "?".into())
}
