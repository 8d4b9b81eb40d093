//! The binary's command line: type resolution through `--types-file`, lock files of user types,
//! exit codes of bad input for every subcommand, and refusals of input that must not be accepted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{spawn_ready, BIN};

/// Runs `vgpu-emu ARGS...` with no stdin.
fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A bochs `LAB-32M` record of `version` with `framebuffer`.
fn lab(version: u32, framebuffer: &str) -> String {
    vgpu_model::catalog::TestType {
        version,
        framebuffer,
        ..Default::default()
    }
    .toml()
}

/// Writes `text` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The issue's file: LAB-32M@1 (64M) and LAB-32M@2 (32M); @2 sorts first by framebuffer.
#[test]
fn a_bare_name_describes_and_serves_the_newest_version() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "lab.toml",
        &(lab(1, "64M") + "\n" + &lab(2, "32M")),
    );
    let out = run(&[
        "--types-file".as_ref(),
        file.as_os_str(),
        "describe".as_ref(),
        "LAB-32M".as_ref(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("LAB-32M@2  (newest version of LAB-32M)"),
        "{text}"
    );

    let socket = dir.path().join("vgpu.sock");
    let (mut child, line) = spawn_ready(
        Command::new(BIN)
            .arg("--types-file")
            .arg(&file)
            .args(["serve", "--type", "LAB-32M", "--socket"])
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit()),
        "vgpu-emu: serving ",
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.starts_with("vgpu-emu: serving LAB-32M@2 (") && line.contains("framebuffer=32M"),
        "{line}"
    );
}

/// Runs `vgpu-emu ARGS...` and asserts its exit code and that stderr contains `needle`.
fn assert_exit<S: AsRef<std::ffi::OsStr>>(args: &[S], code: i32, needle: &str) {
    let out = run(args);
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        out.status.code(),
        Some(code),
        "vgpu-emu {shown:?}: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(needle),
        "vgpu-emu {shown:?}: {needle:?} not in {}",
        stderr(&out)
    );
}

const USAGE: i32 = 2;
const FAILURE: i32 = 1;

/// Bad input exits 2 in every subcommand, as clap's own argument errors do; run-time failures
/// exit 1. (`create`/`remove` refusals by a live daemon are in tests/management.rs.)
#[test]
fn bad_input_exits_2_in_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let missing = format!("{d}/missing.toml");
    let broken = write(dir.path(), "broken.toml", &lab(1, "24M"));
    let broken = broken.to_str().unwrap();
    let sock = format!("{d}/s.sock");
    let cases: &[(&[&str], &str)] = &[
        (
            &["serve", "--type", "NOPE", "--socket", &sock],
            "unknown type `NOPE`",
        ),
        (
            &["serve", "--uuid", "bad", "--socket", &sock],
            "invalid UUID `bad`",
        ),
        (&["serve", "--bogus"], "unexpected argument"),
        (
            &["--types-file", &missing, "types"],
            "cannot read type file",
        ),
        (&["--types-file", broken, "types"], "not a power of two"),
        (&["describe", "NOPE"], "unknown type `NOPE`"),
        (&["describe", "EMU-64M@9"], "has no version 9"),
        (
            &["status", "--socket", &sock, "--bogus"],
            "unexpected argument",
        ),
        (
            &["daemon", "--root", d, "--parent", "x=nope"],
            "unknown family `nope`",
        ),
        (&["daemon", "--root", d, "--parent", "x"], "NAME=FAMILY"),
        (&["list", "--root", d, "--bogus"], "unexpected argument"),
        (
            &[
                "create", "--root", d, "--parent", "emu0", "--type", "EMU-64M", "--uuid", "bad",
            ],
            "invalid UUID `bad`",
        ),
        (&["remove", "--root", d, "bad"], "invalid UUID `bad`"),
        (
            &[
                "screenshot",
                "--socket",
                &sock,
                "--head",
                "x",
                "-o",
                "x.png",
            ],
            "invalid value",
        ),
    ];
    for (args, needle) in cases {
        assert_exit(args, USAGE, needle);
    }
    // Nothing answers: a run-time failure, not bad input.
    let uuid = "11111111-0000-4000-8000-000000000001";
    for args in [
        &["status", "--socket", &sock][..],
        &["screenshot", "--socket", &sock, "-o", "x.png"][..],
        &["list", "--root", d][..],
        &[
            "create", "--root", d, "--parent", "emu0", "--type", "EMU-64M",
        ][..],
        &["remove", "--root", d, uuid][..],
    ] {
        assert_exit(args, FAILURE, "no vgpu-emu instance answers");
    }
}

/// `screenshot --head` beyond the instance's heads is bad input; a head that exists but shows
/// nothing is a run-time state.
#[test]
fn screenshot_of_a_missing_head_exits_2() {
    let served = common::Served::start("EMU-16M");
    let out = served.cli(&["screenshot", "--head", "1", "-o", "/dev/null"]);
    assert_eq!(out.status.code(), Some(USAGE), "{}", stderr(&out));
    assert!(stderr(&out).contains("head 1 does not exist; the instance has 1 head(s)"));
    let out = served.cli(&["screenshot", "--head", "0", "-o", "/dev/null"]);
    assert_eq!(out.status.code(), Some(FAILURE), "{}", stderr(&out));
    assert!(stderr(&out).contains("not displaying"), "{}", stderr(&out));
}

/// Input that used to be accepted: an invisible vendor ID, parent names that are not single
/// path components, an endless type file, an empty version.
#[test]
fn accepted_bad_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let ffff = write(
        dir.path(),
        "ffff.toml",
        &lab(1, "32M").replace("vendor = 0x1234, device", "vendor = 0xffff, device"),
    );
    let ffff = ffff.to_str().unwrap();
    assert_exit(
        &["--types-file", ffff, "types"],
        USAGE,
        &format!("invalid vGPU type: {ffff}:6: field `vendor`: 0xffff is not a vendor ID"),
    );
    for parent in ["..=emu", ".=emu", "=emu", "a/b=emu", "-x=emu", "gpu 0=emu"] {
        let arg = format!("--parent={parent}");
        assert_exit(&["daemon", "--root", d, &arg], USAGE, "parent name");
    }
    assert!(
        !dir.path().join("etc").exists(),
        "a refused argument touches nothing"
    );
    // /dev/zero never ends: the read stops one byte past the limit.
    assert_exit(
        &["--types-file", "/dev/zero", "types"],
        USAGE,
        "type file /dev/zero is larger than 1024 KiB",
    );
    assert_exit(
        &["describe", "EMU-64M@"],
        USAGE,
        "`EMU-64M@` names no version; write EMU-64M@VERSION (it has 1) or EMU-64M for the newest",
    );
}

/// `diff` exits 0 for identical versions, 1 when they differ, 2 for a type that does not exist.
#[test]
fn diff_exit_codes() {
    let out = run(&["diff", "EMU-64M", "EMU-64M@1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "EMU-64M@1 and EMU-64M@1: no guest-visible difference\n"
    );
    let out = run(&["diff", "EMU-16M", "EMU-64M"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PCI subsystem       EMU-16M@1: 1234:1001"),
        "{text}"
    );
    assert!(stderr(&out).is_empty(), "a difference is no error");
    assert_exit(&["diff", "EMU-16M", "NOPE"], USAGE, "unknown type `NOPE`");
}

/// The type directory `create` and the tree use names a type wherever a name does.
#[test]
fn a_type_directory_names_a_type() {
    let out = run(&["describe", "vgpu_emu-emu_64m-v1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("EMU-64M@1  ("));
    assert_exit(
        &["describe", "vgpu_emu-emu_64m-v7"],
        USAGE,
        "unknown type `vgpu_emu-emu_64m-v7`",
    );
}

#[test]
fn types_help_prints_the_field_reference() {
    let out = run(&["types", "--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(vgpu_model::catalog::TYPE_FILE_REFERENCE.trim_end()),
        "{text}"
    );
}

/// `describe --edid/--config` write the raw bytes for edid-decode and `lspci -F`.
#[test]
fn describe_dumps_edid_and_config_space() {
    let out = run(&["describe", "EMU-64M", "--edid", "-"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout.len(), 128);
    assert_eq!(out.stdout[..8], [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    assert_eq!(
        out.stdout.iter().fold(0u8, |s, b| s.wrapping_add(*b)),
        0,
        "EDID checksum"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.lspci");
    let out = run(&[
        "describe".as_ref(),
        "vgpu_emu-emu_16m-v1".as_ref(),
        "--config".as_ref(),
        file.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "no description with a dump");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("00:00.0 vgpu-emu EMU-16M@1 "), "{text}");
    assert!(
        text.contains("\n00: 34 12 11 11 00 00 10 00 02 00 80 03 "),
        "{text}"
    );
    assert_eq!(text.lines().count(), 17);
    let out = run(&["describe", "M60-2Q", "--config", "-"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("\n00: f4 1a 50 10 00 00 10 00 01 00 80 03 "),
        "virtio-gpu identity: {text}"
    );
    assert_exit(
        &["describe", "EMU-64M", "--config", "-", "--edid", "-"],
        USAGE,
        "cannot both write to stdout",
    );
}

/// Serving a deprecated version works (it is pinned somewhere) and logs a warning.
#[test]
fn serving_a_deprecated_version_warns() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "lab.toml",
        &(lab(1, "64M") + "deprecated = true\n\n" + &lab(2, "32M")),
    );
    let socket = dir.path().join("vgpu.sock");
    let (mut child, _) = spawn_ready(
        Command::new(BIN)
            .arg("--types-file")
            .arg(&file)
            .args(["serve", "--type", "LAB-32M@1", "--socket"])
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped()),
        "vgpu-emu: serving LAB-32M@1 (",
    );
    // The warning is logged before the readiness line; stderr ends when the process does.
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("type LAB-32M@1 is deprecated; a bare LAB-32M resolves to LAB-32M@2"),
        "{err}"
    );
}

/// `status` and `screenshot` find the instance `serve` started on its default socket, and
/// `screenshot -o -` writes the PNG to stdout.
#[test]
fn status_and_screenshot_default_to_serves_socket() {
    let runtime = tempfile::tempdir().unwrap();
    let socket = runtime.path().join("vgpu-emu.sock");
    let with_env = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("XDG_RUNTIME_DIR", runtime.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let (mut child, line) = spawn_ready(
        Command::new(BIN)
            .args(["serve", "--type", "EMU-16M"])
            .env("XDG_RUNTIME_DIR", runtime.path())
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit()),
        "vgpu-emu: serving ",
    );
    assert!(
        line.contains(&format!(" on {}", socket.display())),
        "{line}"
    );
    let out = with_env(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["type"], "EMU-16M@1");

    // A 64x64 mode at 32 bpp, the way Linux bochs-drm sets one, and one red pixel.
    let mut c = vfio_user::Client::new(&socket).unwrap();
    let bar2 = 2;
    let mut b = [0u8; 1];
    c.region_read(bar2, 0x400 + 0x1a, &mut b).unwrap();
    c.region_write(bar2, 0x400, &[0x20]).unwrap();
    for (index, value) in [
        (4u64, 0u16),
        (3, 32),
        (1, 64),
        (2, 64),
        (6, 64),
        (7, 64),
        (4, 0x41),
    ] {
        c.region_write(bar2, 0x500 + 2 * index, &value.to_le_bytes())
            .unwrap();
    }
    c.region_write(0, 0, &[0x00, 0x00, 0xff, 0x00]).unwrap();
    let out = with_env(&["screenshot", "-o", "-"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("to stdout"), "{}", stderr(&out));
    let (w, h, rgb) = vgpu_emu::display::decode_png_rgb(&out.stdout).unwrap();
    assert_eq!((w, h, &rgb[..3]), (64, 64, &[0xff, 0x00, 0x00][..]));
    drop(c);
    let _ = child.kill();
    let _ = child.wait();
}

/// The ABI fingerprint of `key` as the type file `text` defines it.
fn fingerprint_in(text: &str, key: &str) -> String {
    let mut c = vgpu_model::Catalog::builtin().unwrap();
    c.add_toml("lab.toml", text).unwrap();
    vgpu_model::fingerprint::fingerprint(c.resolve(key).unwrap()).to_string()
}

/// `vgpu-emu --types-file FILE [EXTRA...] ARGS...`.
fn with_types(file: &Path, extra: &[&str], args: &[&str]) -> Vec<String> {
    let mut v = vec!["--types-file".to_string(), file.display().to_string()];
    v.extend(extra.iter().chain(args).map(|s| s.to_string()));
    v
}

/// Spawns `vgpu-emu ARGS...` (a command that runs until stopped when it starts at all) and
/// returns its exit code and stderr once it exits; it must exit within 20 s.
fn run_to_exit(args: &[String]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut exited = false;
    // Stops at the deadline rather than panicking inside, so a child that runs is killed.
    common::wait_until(
        std::time::Duration::from_secs(21),
        "vgpu-emu to exit",
        || {
            exited = child.try_wait().unwrap().is_some();
            exited || std::time::Instant::now() >= deadline
        },
    );
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!("vgpu-emu {args:?} kept running");
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), stderr(&out))
}

/// `lock` records the fingerprint `describe` prints, in FILE.lock, and the locked version is
/// described and served as before.
#[test]
fn lock_then_describe_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let text = lab(1, "64M");
    let file = write(dir.path(), "lab.toml", &text);
    let fp = fingerprint_in(&text, "LAB-32M@1");
    let out = run(&with_types(&file, &[], &["lock"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let lock_path = dir.path().join("lab.toml.lock");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.starts_with(&format!(
            "locked LAB-32M@1 {fp}\nwrote {}",
            lock_path.display()
        )),
        "{printed}"
    );
    let lock = std::fs::read_to_string(&lock_path).unwrap();
    assert!(lock.starts_with("# vgpu-emu lock file"), "{lock}");
    assert!(
        lock.ends_with(&format!("\n[locked]\n\"LAB-32M@1\" = \"{fp}\"\n")),
        "{lock}"
    );

    let out = run(&with_types(
        &file,
        &[],
        &["describe", "LAB-32M@1", "--json"],
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["fingerprint"], fp.as_str());
    assert_eq!(json["released"], true);
    assert_eq!(json["locked_in"], lock_path.display().to_string());

    let socket = dir.path().join("vgpu.sock");
    let (mut child, _) = spawn_ready(
        Command::new(BIN)
            .arg("--types-file")
            .arg(&file)
            .args(["serve", "--type", "LAB-32M@1", "--socket"])
            .arg(&socket)
            .env("RUST_LOG", "warn"),
        "vgpu-emu: serving LAB-32M@1 (",
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A locked version edited in place (its framebuffer) is refused by every command that loads
/// it, with the FILE.lock found beside the type file and no option.
#[test]
fn a_locked_version_edited_in_place_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let old = lab(1, "64M");
    let file = write(dir.path(), "lab.toml", &old);
    let out = run(&with_types(&file, &[], &["lock"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let new = lab(1, "32M");
    write(dir.path(), "lab.toml", &new);
    let want = format!(
        "vgpu-emu: error: {}: LAB-32M@1 changed after it was locked in {}.lock (fingerprint {} \
         now {}): a released version never changes; add LAB-32M@2 instead\n",
        file.display(),
        file.display(),
        fingerprint_in(&old, "LAB-32M@1"),
        fingerprint_in(&new, "LAB-32M@1"),
    );
    let d = dir.path().join("root");
    let sock = dir.path().join("vgpu.sock");
    for args in [
        &["describe", "LAB-32M@1"][..],
        &["types"],
        &["diff", "LAB-32M@1", "EMU-64M"],
        // Refused although the edited version is not the one named.
        &["describe", "EMU-64M"],
    ] {
        let out = run(&with_types(&file, &[], args));
        assert_eq!(out.status.code(), Some(USAGE), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with(&want),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    for args in [
        &[
            "serve",
            "--type",
            "LAB-32M@1",
            "--socket",
            sock.to_str().unwrap(),
        ][..],
        &["daemon", "--root", d.to_str().unwrap()],
    ] {
        let (code, err) = run_to_exit(&with_types(&file, &[], args));
        assert_eq!(code, Some(USAGE), "{args:?}: {err}");
        assert!(err.starts_with(&want), "{args:?}: {err}");
    }
    assert!(
        !sock.exists() && !d.exists(),
        "a refused type file touches nothing"
    );
}

/// Re-locking after adding @2 adds @2 only: the @1 line stays as it was.
#[test]
fn relocking_adds_only_the_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "lab.toml", &lab(1, "64M"));
    let lock_path = dir.path().join("lab.toml.lock");
    let out = run(&with_types(&file, &[], &["lock"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let before = std::fs::read_to_string(&lock_path).unwrap();

    let text = lab(1, "64M") + "\n" + &lab(2, "32M");
    write(dir.path(), "lab.toml", &text);
    let out = run(&with_types(&file, &[], &["lock"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    let fp2 = fingerprint_in(&text, "LAB-32M@2");
    assert!(
        printed.starts_with(&format!("locked LAB-32M@2 {fp2}\nwrote ")),
        "{printed}"
    );
    assert!(!printed.contains("LAB-32M@1"), "{printed}");
    let after = std::fs::read_to_string(&lock_path).unwrap();
    assert_eq!(after, before + &format!("\"LAB-32M@2\" = \"{fp2}\"\n"));

    let out = run(&with_types(&file, &[], &["lock"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("nothing to add: "),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(std::fs::read_to_string(&lock_path).unwrap(), after);
}

/// `lock` never changes an entry: a changed locked version makes it refuse, naming both
/// fingerprints and what to do, and the lock file stays as it was.
#[test]
fn lock_refuses_a_changed_entry() {
    let dir = tempfile::tempdir().unwrap();
    let old = lab(1, "64M") + "\n" + &lab(2, "32M");
    let file = write(dir.path(), "lab.toml", &old);
    let lock_path = dir.path().join("lab.toml.lock");
    let out = run(&with_types(&file, &[], &["lock"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let before = std::fs::read_to_string(&lock_path).unwrap();

    let new = lab(1, "64M") + "\n" + &lab(2, "32M").replace("frl = 30", "frl = 60");
    write(dir.path(), "lab.toml", &new);
    let out = run(&with_types(&file, &[], &["lock"]));
    assert_eq!(out.status.code(), Some(USAGE), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "LAB-32M@2 changed after it was locked in {} (fingerprint {} now {}): a released \
             version never changes; add LAB-32M@3 instead\n",
            lock_path.display(),
            fingerprint_in(&old, "LAB-32M@2"),
            fingerprint_in(&new, "LAB-32M@2"),
        )),
        "{err}"
    );
    assert!(
        err.contains("restore LAB-32M@2 as it was when locked"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&lock_path).unwrap(), before);
}

/// A locked version deleted from its type file is refused (deprecation is a flag, not a
/// deletion); a version not locked yet may still go.
#[test]
fn a_removed_locked_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "lab.toml",
        &(lab(1, "64M") + "\n" + &lab(2, "32M")),
    );
    let out = run(&with_types(&file, &[], &["lock"]));
    assert!(out.status.success(), "{}", stderr(&out));
    write(dir.path(), "lab.toml", &lab(2, "32M"));
    let out = run(&with_types(&file, &[], &["describe", "LAB-32M@2"]));
    assert_eq!(out.status.code(), Some(USAGE), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "LAB-32M@1 is locked in {}.lock but no longer defined in {}: a released version is \
             never deleted; keep it, with `deprecated = true` to retire it",
            file.display(),
            file.display()
        )),
        "{}",
        stderr(&out)
    );
    // Deprecating instead is accepted; an unlocked @3 can come and go.
    let text = lab(1, "64M") + "deprecated = true\n\n" + &lab(2, "32M") + "\n" + &lab(3, "128M");
    write(dir.path(), "lab.toml", &text);
    let out = run(&with_types(&file, &[], &["describe", "LAB-32M@3"]));
    assert!(out.status.success(), "{}", stderr(&out));
    write(
        dir.path(),
        "lab.toml",
        &(lab(1, "64M") + "deprecated = true\n\n" + &lab(2, "32M")),
    );
    let out = run(&with_types(&file, &[], &["describe", "LAB-32M@1"]));
    assert!(out.status.success(), "{}", stderr(&out));
}

/// With several type files, one `--lock-file` covers them all: `lock` needs it, and it is
/// checked only where it is named (a FILE.lock beside a file is found without it).
#[test]
fn one_lock_file_for_several_type_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.toml", &lab(1, "64M"));
    let b = write(
        dir.path(),
        "b.toml",
        &lab(1, "32M").replace("LAB-32M", "LAB-B"),
    );
    let all = dir.path().join("all.lock");
    let files = |args: &[&str]| {
        let mut v = with_types(&a, &[], &[]);
        v.extend(with_types(&b, &[], args));
        v
    };
    assert_exit(
        &files(&["lock"]),
        USAGE,
        "2 type files are given: name the one lock file for all of them with --lock-file LOCK",
    );
    assert!(!dir.path().join("a.toml.lock").exists());
    let out = run(&files(&["lock", "--lock-file", all.to_str().unwrap()]));
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("locked LAB-32M@1 ") && printed.contains("locked LAB-B@1 "),
        "{printed}"
    );
    let lock = std::fs::read_to_string(&all).unwrap();
    assert!(lock.contains("types\n# in a.toml, b.toml,"), "{lock}");

    write(
        dir.path(),
        "b.toml",
        &lab(1, "64M").replace("LAB-32M", "LAB-B"),
    );
    assert_exit(
        &files(&["--lock-file", all.to_str().unwrap(), "types"]),
        USAGE,
        &format!(
            "{}: LAB-B@1 changed after it was locked in {}",
            b.display(),
            all.display()
        ),
    );
    let out = run(&files(&["types"]));
    assert!(
        out.status.success(),
        "not named, not found: {}",
        stderr(&out)
    );
    // A named lock file must exist, and locks the types of some type file.
    let missing = dir.path().join("missing.lock");
    assert_exit(
        &files(&["--lock-file", missing.to_str().unwrap(), "types"]),
        USAGE,
        &format!("cannot read lock file {}", missing.display()),
    );
    assert_exit(
        &["--lock-file", all.to_str().unwrap(), "types"],
        USAGE,
        "no --types-file is given",
    );
    assert_exit(&["lock"], USAGE, "no --types-file is given");
}

/// A malformed, unreadable or endless lock file is bad input, refused with its file and line.
#[test]
fn a_bad_lock_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "lab.toml", &lab(1, "64M"));
    let lock = write(
        dir.path(),
        "lab.toml.lock",
        "# hand-written\n[locked]\n\"LAB-32M@1\" = \"sha256:3fa2\"\n",
    );
    let want = format!(
        "vgpu-emu: error: invalid lock file: {}:3: `LAB-32M@1` = \"sha256:3fa2\" is not an ABI \
         fingerprint",
        lock.display()
    );
    assert_exit(&with_types(&file, &[], &["types"]), USAGE, &want);
    assert_exit(&with_types(&file, &[], &["lock"]), USAGE, &want);
    write(dir.path(), "lab.toml.lock", "# c\n[locked]\n[other]\n");
    assert_exit(
        &with_types(&file, &[], &["types"]),
        USAGE,
        &format!(
            "invalid lock file: {}:3: unknown field `other`",
            lock.display()
        ),
    );
    assert_exit(
        &with_types(&file, &["--lock-file", "/dev/zero"], &["types"]),
        USAGE,
        "lock file /dev/zero is larger than 1024 KiB",
    );
}

/// `vgpu-emu set` changes the frame-rate-limiter knob of a served instance at once; bad input
/// (an unknown key, a bad value, no `=`) exits 2 and changes nothing; no instance answering
/// exits 1. The control endpoint itself refuses bad settings as bad input, all or nothing.
#[test]
fn set_changes_the_knob_and_refuses_bad_input() {
    let served = common::Served::start("M60-0B");
    let cli = |args: &[&str]| served.cli(args);
    assert_eq!(served.status()["frame_rate_limiter"], true);

    let out = cli(&["set", "frame_rate_limiter=0"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "frame_rate_limiter=0\n"
    );
    let status = served.status();
    assert_eq!(status["frame_rate_limiter"], false);
    let text = cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("45 fps, frame_rate_limiter off"), "{text}");

    for (args, needle) in [
        (
            &["set", "fps=1"][..],
            "unknown setting `fps` (settings: frame_rate_limiter)",
        ),
        (
            &["set", "frame_rate_limiter=2"][..],
            "invalid value `2` for frame_rate_limiter: 0 or 1",
        ),
        (
            &["set", "frame_rate_limiter=1", "frame_rate_limiter2=1"][..],
            "unknown setting `frame_rate_limiter2`",
        ),
        (&["set", "frame_rate_limiter"][..], "expected KEY=VALUE"),
        (&["set"][..], "required"),
    ] {
        let out = cli(args);
        assert_eq!(out.status.code(), Some(USAGE), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert_eq!(
            served.status()["frame_rate_limiter"],
            false,
            "{args:?} changed nothing"
        );
    }

    // The endpoint's own checks (a client that skips the CLI's): bad input, all or nothing.
    let ctl = common::ctl_path(&served.socket);
    let ask = |request: &str| -> serde_json::Value {
        use std::io::{BufRead, Write};
        let s = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
        writeln!(&s, "{request}").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };
    let reply = ask(r#"{"op":"set","settings":{"frame_rate_limiter":"1","x":"1"}}"#);
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["bad_input"], true, "{reply}");
    assert_eq!(served.status()["frame_rate_limiter"], false);
    let reply = ask(r#"{"op":"set","settings":{}}"#);
    assert_eq!(reply["bad_input"], true, "{reply}");
    let reply = ask(r#"{"op":"set","settings":{"frame_rate_limiter":"1"}}"#);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["applied"][0], "frame_rate_limiter=1");
    assert_eq!(served.status()["frame_rate_limiter"], true);

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let missing = missing.to_str().unwrap();
    assert_exit(
        &["set", "--socket", missing, "frame_rate_limiter=0"],
        FAILURE,
        "no vgpu-emu instance answers",
    );
    // Bad input is bad input even with nobody there.
    assert_exit(
        &["set", "--socket", missing, "frame_rate_limiter=x"],
        USAGE,
        "invalid value `x`",
    );
}

/// `serve --frame-rate-limiter 0` starts with the limiter off; anything but 0 or 1 is refused.
#[test]
fn serve_can_start_with_the_limiter_off() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("v.sock");
    let (mut child, _) = spawn_ready(
        Command::new(BIN)
            .args([
                "serve",
                "--type",
                "M60-0B",
                "--frame-rate-limiter",
                "0",
                "--socket",
            ])
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit()),
        "vgpu-emu: serving ",
    );
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["frame_rate_limiter"], false);
    let _ = child.kill();
    let _ = child.wait();
    let s = socket.to_str().unwrap();
    assert_exit(
        &["serve", "--frame-rate-limiter", "2", "--socket", s],
        USAGE,
        "expected 0 or 1",
    );
}

/// Context switches of every thread of `pid` (voluntary and not): a thread that never wakes
/// adds none.
fn context_switches(pid: u32) -> (u64, Vec<String>) {
    let mut total = 0;
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap();
            }
        }
        threads.push(comm.trim().to_string());
    }
    (total, threads)
}

/// CPU time of `pid` in clock ticks (utime + stime).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: state is field 3; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A served virtio-gpu instance with no guest costs nothing: over a second no thread of the
/// process wakes up (no context switch at all, so no CPU time either), and the frame-rate
/// limiter's runtime reports no wake-up.
#[test]
fn an_idle_instance_costs_no_cpu_and_no_wakeups() {
    let served = common::Served::start("M60-2Q");
    let pid = served.pid();
    // Let the start-up settle (the readiness probe's connection is answered).
    std::thread::sleep(Duration::from_millis(300));
    let (switches, threads) = context_switches(pid);
    assert!(
        threads.iter().any(|t| t.starts_with("frl-")),
        "a runtime thread: {threads:?}"
    );
    let cpu = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let (switches_after, _) = context_switches(pid);
    assert_eq!(cpu_ticks(pid), cpu, "CPU time while idle");
    assert_eq!(switches_after, switches, "thread wake-ups while idle");
    let status = served.status();
    assert_eq!(status["frl_runtime"]["wakeups"], 0, "{status}");
    assert_eq!(status["frl_runtime"]["ticks"], 0, "{status}");
}

#[test]
fn libvirt_xml_prints_the_elements_and_merges_them_into_a_domain_file() {
    let served = common::Served::start("M60-2Q");
    let socket = served.socket.to_str().unwrap().to_string();
    let uuid = served.status()["uuid"].as_str().unwrap().to_string();
    let short = &uuid.replace('-', "")[..8];

    // The elements to merge by hand: well-formed, naming this instance's socket.
    let out = run(&["libvirt-xml", "--socket", &socket]);
    assert!(out.status.success(), "{}", stderr(&out));
    let fragment = String::from_utf8(out.stdout.clone()).unwrap();
    for needle in [
        "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'",
        "<source type='memfd'/>",
        "<access mode='shared'/>",
        "model='pcie-root-port'",
        &format!("ua-vgpu-emu-{short}"),
        &format!("\"path\":\"{socket}\""),
        "M60-2Q@1",
    ] {
        assert!(
            fragment.contains(needle),
            "{needle} missing from:\n{fragment}"
        );
    }
    assert!(
        stderr(&out).contains("libvirt-qemu"),
        "the socket access hint"
    );

    // Merged into a domain file, in place.
    let dir = tempfile::tempdir().unwrap();
    let domain = write(
        dir.path(),
        "vm.xml",
        "<domain type='qemu'>\n  <name>vm</name>\n  <memory unit='MiB'>512</memory>\n  <os>\n    \
         <type arch='x86_64' machine='q35'>hvm</type>\n  </os>\n</domain>\n",
    );
    let d = domain.to_str().unwrap();
    let out = run(&["libvirt-xml", "--socket", &socket, "--domain", d, "-o", d]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "written to the file, not stdout");
    let merged = std::fs::read_to_string(&domain).unwrap();
    assert!(
        merged.contains("<name>vm</name>") && merged.contains("vfio-user-pci"),
        "{merged}"
    );
    // A second merge is refused (exit 2) and leaves the file alone.
    assert_exit(
        &["libvirt-xml", "--socket", &socket, "--domain", d, "-o", d],
        2,
        "already has this instance",
    );
    assert_eq!(std::fs::read_to_string(&domain).unwrap(), merged);

    // Conflicting memory, a non-domain, a missing file, a missing instance.
    let file_backed = write(
        dir.path(),
        "file.xml",
        "<domain><memoryBacking><source type='file'/></memoryBacking></domain>",
    );
    assert_exit(
        &[
            "libvirt-xml",
            "--socket",
            &socket,
            "--domain",
            file_backed.to_str().unwrap(),
        ],
        2,
        "memory backing conflicts",
    );
    let net = write(dir.path(), "net.xml", "<network/>");
    assert_exit(
        &[
            "libvirt-xml",
            "--socket",
            &socket,
            "--domain",
            net.to_str().unwrap(),
        ],
        2,
        "not <domain>",
    );
    assert_exit(
        &[
            "libvirt-xml",
            "--socket",
            &socket,
            "--domain",
            "/nonexistent/vm.xml",
        ],
        2,
        "cannot read the domain XML",
    );
    let out = run(&["libvirt-xml", "--socket", "/nonexistent/vgpu.sock"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/vgpu.sock"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn socket_owner_hands_the_vfio_user_socket_to_the_vmms_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vgpu.sock");
    let (mut child, _) = spawn_ready(
        Command::new(BIN)
            .args(["serve", "--socket-owner", "65534:65533", "--socket"])
            .arg(&socket),
        "vgpu-emu: serving",
    );
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65533));
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "still private to its owner"
    );
    let ctl = std::fs::metadata(dir.path().join("vgpu.sock.ctl")).unwrap();
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    assert_eq!(ctl.uid(), me, "the control socket stays the server's");
    let _ = child.kill();
    let _ = child.wait();
    assert_exit(
        &[
            "serve",
            "--socket-owner",
            "no-such-user-here",
            "--socket",
            "/tmp/x.sock",
        ],
        2,
        "no user no-such-user-here",
    );
}
