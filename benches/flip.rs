//! Page flips of a stock Linux guest on our virtio-gpu personality, as a ratio against QEMU's own
//! in-process `virtio-gpu-pci` flipping in the same VM, measured in the same run.
//! Run: `cargo bench --bench flip` (boots a guest: QEMU and the guest image are provisioned by
//! qemu-scripts, as for the guest tests).
//!
//! One guest boots with an M60-2Q (four heads, card 0) served by `vgpu-emu serve` and QEMU's
//! `virtio-gpu-pci,max_outputs=4` (card 1). The guest's `flip` command (`vgpu-guest flip`)
//! flips every head of one card between two dumb buffers as fast as each head's flip events
//! come back, 300 flips per head at 1024x768, and reports each head's rate from the events'
//! timestamps. On our device Linux `virtio_gpu` uses guest-memory blobs and waits for a fence
//! per flip (a round trip over the vfio-user socket); on QEMU's, without blob support, it flips
//! 2D buffers (a TRANSFER_TO_HOST_2D of the whole buffer per flip) without waiting.
//!
//! The two cards flip in alternating rounds (ours, then QEMU's, three times), so the load of a
//! shared machine moves both sides of a round. Printed per round: the rates summed over the
//! heads, ours / QEMU's, the host CPU time per flip of the vgpu-emu process (utime + stime of
//! /proc/PID/stat, all its threads; and the scheduler's nanosecond figure) and of QEMU, and the
//! vfio-user messages and register writes (virtqueue kicks) per flip. Then per head and overall
//! the medians over the rounds: our rate, QEMU's (the floor), and ours / QEMU's.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vgpu-emu");
const TYPE: &str = "M60-2Q";
const HEADS: usize = 4;
const MODE: &str = "1024x768";
const FLIPS: usize = 300;
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

/// What one `flip` run measured: the heads in head order, and per watched process the CPU
/// seconds (stat, schedstat) spent between the tool's `flipping` and `flipped` lines.
struct Run {
    heads: Vec<Head>,
    cpu: Vec<(f64, f64)>,
}

/// Runs `flip CARD MODE FLIPS`, reading the CPU time of `pids` as the flips start and end.
fn flip(guest: &mut Guest, card: u32, pids: &[u32]) -> Run {
    let cpu = || -> Vec<(f64, f64)> {
        pids.iter()
            .map(|&p| (cpu_seconds(p), sched_seconds(p)))
            .collect()
    };
    guest.send(&format!("flip {card} {MODE} {FLIPS}"));
    guest.until(&format!("VGPU: flipping card={card}"));
    let start = cpu();
    let lines = guest.until(&format!("VGPU: flipped card={card}"));
    let end = cpu();
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
            assert_eq!(head.count, FLIPS, "{l}");
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
    }
}

fn main() {
    run_script("provision-qemu");
    run_script("build-guest");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vgpu.sock");
    let served = Killed(
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
    let heads = HEADS.to_string();
    let boot = Instant::now();
    let mut guest = Guest::boot(&[
        "--socket",
        socket.to_str().unwrap(),
        "--heads",
        &heads,
        "--virtio-gpu",
        &heads,
    ]);
    println!(
        "guest booted in {:.1} s (accel: {})",
        boot.elapsed().as_secs_f64(),
        accel(guest.qemu.0.id())
    );

    let pids = [served.0.id(), guest.qemu.0.id()];
    let flips = (HEADS * FLIPS) as f64;
    let us = |s: f64| s / flips * 1e6;
    let sum = |h: &[Head]| h.iter().map(|h| h.rate).sum::<f64>();
    let counter = |v: &serde_json::Value, a: &str, b: &str| v[a][b].as_u64().unwrap();
    println!(
        "{ROUNDS} rounds of `flip 0` (ours) then `flip 1` (QEMU's): {HEADS} heads at {MODE}, \
         {FLIPS} flips per head. Per round: flips/s summed over the heads, ours/QEMU's, host \
         CPU per flip from the first flip asked for to the last event (utime+stime at {} Hz / \
         schedstat), vfio-user messages and kicks per flip of our whole command:",
        // SAFETY: sysconf only reads a configuration value.
        unsafe { libc::sysconf(libc::_SC_CLK_TCK) }
    );
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let before = status(&socket);
        let ours = flip(&mut guest, 0, &pids);
        let after = status(&socket);
        let theirs = flip(&mut guest, 1, &pids);
        let (o, t) = (sum(&ours.heads), sum(&theirs.heads));
        println!(
            "  round {round}: ours {o:.1}, QEMU's {t:.1}: {:.3}x; vgpu-emu CPU {:.1} / {:.1} us; \
             QEMU CPU {:.1} / {:.1} us in ours, {:.1} / {:.1} us in its own; {:.2} messages, \
             {:.2} kicks",
            o / t,
            us(ours.cpu[0].0),
            us(ours.cpu[0].1),
            us(ours.cpu[1].0),
            us(ours.cpu[1].1),
            us(theirs.cpu[1].0),
            us(theirs.cpu[1].1),
            (counter(&after, "server", "messages") - counter(&before, "server", "messages")) as f64
                / flips,
            (counter(&after, "accesses", "register_writes")
                - counter(&before, "accesses", "register_writes")) as f64
                / flips,
        );
        rounds.push((ours, theirs));
    }
    guest.send("poweroff");

    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("medians over the rounds:");
    println!("head  ours flips/s  QEMU's flips/s  ours/QEMU's  ours avg/max ms  QEMU's avg/max ms");
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
            "{i:>4}  {o:>12.1}  {t:>14.1}  {:>10.3}x  {:>7.3}/{:<7.3}  {:>7.3}/{:<7.3}",
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
        " all  {o:>12.1}  {t:>14.1}  {ratio:>10.3}x  (median of the rounds' ratios; goal >= 0.5x, \
         then 1.0x)"
    );
    println!(
        "vgpu-emu CPU per flip of our run: {:.1} us (utime+stime) / {:.1} us (schedstat)",
        median(rounds.iter().map(|r| us(r.0.cpu[0].0)).collect()),
        median(rounds.iter().map(|r| us(r.0.cpu[0].1)).collect()),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while guest.qemu.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(served);
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
