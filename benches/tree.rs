//! mdev tree benchmark: real `mdevctl types` against `vgpu-emu daemon` serving many type
//! versions on one parent. The floor is the same run at a small table (200 types): the figure is
//! the time per type at the large table over the time per type at the small one, so 1.0x means
//! the tree's cost grows linearly with the number of types (it grew with the square before the
//! type index). Also printed: the daemon's start-up time (catalog load and validation, index).
//!
//! A second figure isolates the tree's own work from FUSE and mdevctl: in process, the manager
//! lookups the tree makes for one `mdevctl types` (per type: 31 lookups of its type directory,
//! the FUSE requests per type counted with `strace -c` on the daemon, plus the four files'
//! contents), against the same at the small table.
//!
//! The benchmark, the daemon and mdevctl run pinned to one CPU (see `pin_to_cpu0`).
//!
//! Run: `cargo bench --bench tree` (root, /dev/fuse and mdevctl, as the management tests;
//! `VGPU_BENCH_TYPES=N` sets the large table, default 20 000).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::pin_to_cpu0;

const BIN: &str = env!("CARGO_BIN_EXE_vgpu-emu");
/// Type records per file (about 340 bytes each; a type file is at most 1 MiB).
const PER_FILE: usize = 2000;
const SMALL: usize = 200;

fn mdevctl() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu-scripts/provision-mdevctl");
    let out = Command::new(&script)
        .output()
        .expect("run provision-mdevctl");
    assert!(
        out.status.success(),
        "provision-mdevctl failed (mdevctl is needed): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Writes `n` bochs type versions of family `bench` into files of at most PER_FILE records.
fn write_types(dir: &Path, n: usize) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for (f, chunk) in (0..n).collect::<Vec<_>>().chunks(PER_FILE).enumerate() {
        let mut text = String::new();
        if f == 0 {
            text.push_str(
                "[[family]]\nname = \"bench\"\ndescription = \"benchmark\"\nvram = \"8G\"\n\n",
            );
        }
        for i in chunk {
            text.push_str(&format!(
                "[[type]]\nname = \"B{i:05}\"\nversion = 1\nfamily = \"bench\"\npersonality = \"bochs\"\n\
                 pci = {{ vendor = 0x1234, device = 0x1111, subsystem_vendor = 0x1234, subsystem_device = 0x2001, class = 0x038000, revision = 2 }}\n\
                 framebuffer = \"8M\"\nnum_heads = 1\nmax_resolution = \"1024x768\"\n\
                 default_resolution = \"800x600\"\nfrl = 60\nmax_instances = 1\n\n"
            ));
        }
        let path = dir.join(format!("bench-{f}.toml"));
        std::fs::write(&path, text).unwrap();
        files.push(path);
    }
    files
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

struct Figures {
    startup: Duration,
    types: Duration,
}

/// Starts a daemon with `n` types on parent bench0 and times `mdevctl types` (best of 3).
fn run(mdevctl: &Path, n: usize) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let files = write_types(dir.path(), n);
    let root = dir.path().join("root");
    let mut cmd = Command::new(BIN);
    for f in &files {
        cmd.arg("--types-file").arg(f);
    }
    let started = Instant::now();
    let mut child = cmd
        .args(["daemon", "--parent", "bench0=bench", "--root"])
        .arg(&root)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the daemon");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let startup = started.elapsed();
    let daemon = Daemon(child);
    assert!(
        line.starts_with("vgpu-emu daemon:"),
        "daemon did not come up: {line:?}"
    );
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let out = Command::new(mdevctl)
            .arg("types")
            .env("MDEVCTL_ENV_ROOT", &root)
            .output()
            .unwrap();
        let elapsed = t.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.trim_start().starts_with("Name: B"))
            .count();
        assert_eq!(listed, n, "mdevctl types lists every type");
        best = best.min(elapsed);
    }
    drop(daemon);
    Figures {
        startup,
        types: best,
    }
}

/// Requests the daemon receives per type during `mdevctl types` (strace -c, 2 000 types).
const REQUESTS_PER_TYPE: usize = 31;

/// The manager lookups behind one `mdevctl types` over `n` types, in process.
fn lookups(n: usize) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let mut catalog = vgpu_model::Catalog::builtin().unwrap();
    for file in write_types(dir.path(), n) {
        let text = std::fs::read_to_string(&file).unwrap();
        catalog
            .add_toml(&file.display().to_string(), &text)
            .unwrap();
    }
    let parents = vec!["bench0=bench".parse().unwrap()];
    let m = vgpu_emu::manager::Manager::new(catalog, parents, dir.path()).unwrap();
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let dirs: Vec<String> = m.types_of("bench0").map(|(d, _)| d.to_string()).collect();
        let mut bytes = 0;
        for d in &dirs {
            for _ in 0..REQUESTS_PER_TYPE {
                std::hint::black_box(m.type_by_dir("bench0", d).unwrap());
            }
            let ty = m.type_by_dir("bench0", d).unwrap();
            bytes += ty.key().len()
                + ty.nvidia_description().len()
                + vgpu_emu::manager::DEVICE_API.len()
                + m.available("bench0", ty).to_string().len();
        }
        assert_eq!(dirs.len(), n);
        std::hint::black_box(bytes);
        best = best.min(t.elapsed());
    }
    best
}

fn main() {
    // Every FUSE request is a round trip between mdevctl and the daemon: on two vCPUs of this
    // kind of VM a cross-CPU wake-up costs tens of microseconds and dominates (measured: 2000
    // types in 0.20 s on one core, 3.5 s with the two on different cores), and the
    // scheduler's choice swings from run to run.
    pin_to_cpu0();
    // `cargo bench` passes --bench; nothing else is taken.
    let n: usize = std::env::var("VGPU_BENCH_TYPES")
        .ok()
        .map(|v| v.parse().expect("VGPU_BENCH_TYPES is a number"))
        .unwrap_or(20_000);
    let mdevctl = mdevctl();
    let small = run(&mdevctl, SMALL);
    let large = run(&mdevctl, n);
    let per = |f: &Figures, count: usize| f.types.as_secs_f64() / count as f64;
    println!("mdevctl types, best of 3:");
    println!(
        "  {SMALL:>6} types: {:>8.1} ms ({:.1} us per type); daemon start {:.1} ms",
        small.types.as_secs_f64() * 1e3,
        per(&small, SMALL) * 1e6,
        small.startup.as_secs_f64() * 1e3
    );
    println!(
        "  {n:>6} types: {:>8.1} ms ({:.1} us per type); daemon start {:.1} ms",
        large.types.as_secs_f64() * 1e3,
        per(&large, n) * 1e6,
        large.startup.as_secs_f64() * 1e3
    );
    println!(
        "  time per type at {n} vs at {SMALL} (the floor): {:.2}x",
        per(&large, n) / per(&small, SMALL)
    );
    let (small, large) = (lookups(SMALL), lookups(n));
    println!("the tree's lookups for one mdevctl types, in process, best of 3:");
    println!(
        "  {SMALL:>6} types: {:>8.2} ms; {n:>6} types: {:>8.2} ms",
        small.as_secs_f64() * 1e3,
        large.as_secs_f64() * 1e3
    );
    println!(
        "  time per type at {n} vs at {SMALL} (the floor): {:.2}x",
        (large.as_secs_f64() / n as f64) / (small.as_secs_f64() / SMALL as f64)
    );
}
