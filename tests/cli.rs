//! The binary's command line: type resolution through `--types-file`, exit codes of bad input
//! for every subcommand, and refusals of input that must not be accepted.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::BIN;

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
    format!(
        r#"[[type]]
name = "LAB-32M"
version = {version}
family = "emu"
personality = "bochs"
pci = {{ vendor = 0x1234, device = 0x1111, subsystem_vendor = 0x1234, subsystem_device = 0x2001, class = 0x038000, revision = 2 }}
framebuffer = "{framebuffer}"
num_heads = 1
max_resolution = "2560x1440"
default_resolution = "1920x1080"
frl = 30
max_instances = 8
"#
    )
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
    let mut child = Command::new(BIN)
        .arg("--types-file")
        .arg(&file)
        .args(["serve", "--type", "LAB-32M", "--socket"])
        .arg(&socket)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.starts_with("vgpu-emu: serving LAB-32M@2 (") && line.contains("framebuffer=32M"),
        "{line}"
    );
}
