//! `vgpu-emu types` and `vgpu-emu describe`: the type catalog for humans and scripts.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use vgpu_model::catalog::{BarKind, BarSpec};
use vgpu_model::edid::{self, Mode};
use vgpu_model::fingerprint::{self, fingerprint};
use vgpu_model::pci::{walk_capabilities, VendorCapability, CAP_ID_VENDOR, VENDOR_CAP_OFFSET};
use vgpu_model::{Catalog, VgpuType};

use crate::cli::lock::Locked;
use crate::error::CliError;

/// Largest type file read: far above any real table (the built-in one is a few KiB), and small
/// enough that `--types-file /dev/zero` or a never-ending pipe is refused at once.
pub const MAX_TYPES_FILE: u64 = 1 << 20;

/// Reads a type file of at most [`MAX_TYPES_FILE`] bytes, never more than one byte past it.
fn read_types_file(path: &Path) -> Result<String, CliError> {
    let io = |source| CliError::TypesFile {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_TYPES_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_TYPES_FILE {
        return Err(CliError::TypesFileTooLarge {
            path: path.to_path_buf(),
            limit: MAX_TYPES_FILE,
        });
    }
    String::from_utf8(bytes)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Loads the built-in catalog plus `files`, in order, without checking lock files (for
/// `vgpu-emu lock`, which checks them itself).
pub fn load_unlocked(files: &[PathBuf]) -> Result<Catalog, CliError> {
    let mut catalog = Catalog::builtin()?;
    for path in files {
        let text = read_types_file(path)?;
        catalog.add_toml(&path.display().to_string(), &text)?;
    }
    Ok(catalog)
}

/// Loads the built-in catalog plus `files`, in order, and checks the lock files that apply:
/// `lock_file` (`--lock-file`) and each `FILE.lock` beside a type file (see [`crate::cli::lock`]).
pub fn load_catalog(files: &[PathBuf], lock_file: Option<&Path>) -> Result<Catalog, CliError> {
    Ok(load_locked(files, lock_file)?.0)
}

/// [`load_catalog`], and which user type versions the locks hold fixed (for `types` and
/// `describe`).
pub fn load_locked(
    files: &[PathBuf],
    lock_file: Option<&Path>,
) -> Result<(Catalog, Locked), CliError> {
    let catalog = load_unlocked(files)?;
    let locked = crate::cli::lock::verify_all(&catalog, files, lock_file)?;
    Ok((catalog, locked))
}

/// Resolves `NAME`, `NAME@VERSION` or an mdev type directory (`vgpu_emu-emu_64m-v1`, as the
/// daemon's tree and `create` name types).
pub fn resolve<'a>(catalog: &'a Catalog, spec: &str) -> Result<&'a VgpuType, CliError> {
    match catalog.resolve(spec) {
        Ok(t) => Ok(t),
        Err(e) => catalog
            .types()
            .iter()
            .find(|t| crate::manage::manager::type_dir(t) == spec)
            .ok_or(CliError::Lookup(e)),
    }
}

/// The warning logged when a deprecated type version is served, or `None` when `ty` is not
/// deprecated.
pub fn deprecation_warning(catalog: &Catalog, ty: &VgpuType) -> Option<String> {
    if !ty.deprecated {
        return None;
    }
    let instead = match catalog.resolve(&ty.name) {
        Ok(bare) if !bare.deprecated => format!("; a bare {} resolves to {}", ty.name, bare.key()),
        _ => String::new(),
    };
    Some(format!(
        "type {} is deprecated{instead}; it stays served for what pinned it",
        ty.key()
    ))
}

/// Everything `describe --json` prints about a type version.
#[derive(Serialize)]
struct TypeView<'a> {
    key: String,
    #[serde(flatten)]
    ty: &'a VgpuType,
    description: String,
    source: &'a str,
    default: bool,
    newest: bool,
    /// A bare `name` resolves to this version.
    resolves_bare: bool,
    served: bool,
    available_instances: u32,
    fingerprint: String,
    /// The fingerprint is held fixed: a released built-in version, or a user version in a lock
    /// file.
    released: bool,
    /// The lock file that holds this user version fixed.
    locked_in: Option<String>,
    edid_modes: Vec<Mode>,
    /// What the frame-rate limit does to a guest of this personality.
    frl_pacing: String,
    /// The guest's own cap on how slow the limiter can pace it (virtio-gpu: the fence timeout).
    #[serde(skip_serializing_if = "Option::is_none")]
    frl_guest_cap: Option<String>,
}

/// How long Linux `virtio_gpu` waits for a fence before it completes a commit anyway.
pub const LINUX_FENCE_TIMEOUT_MS: u32 = 50;

/// What the frame-rate limit of `ty` does, and the guest's cap on it: the `describe` lines.
pub fn frl_pacing(ty: &VgpuType) -> (String, Option<String>) {
    let floor = 1000 / LINUX_FENCE_TIMEOUT_MS;
    match ty.personality {
        vgpu_model::Personality::Bochs => (
            if ty.frl == 0 {
                "off: EDID refresh 60 Hz; viewers and screenshots sample the head at most at 60 \
                 fps (bochs has no fence to hold: the guest is never paced)"
                    .into()
            } else {
                format!(
                    "{0} fps: the EDID refresh rate, and the rate at which viewers and screenshots \
                     sample the head (bochs has no fence to hold: the guest is never paced)",
                    ty.frl
                )
            },
            None,
        ),
        vgpu_model::Personality::VirtioGpu => {
            let pacing = if ty.frl == 0 {
                "off: fences complete as soon as the command is processed".into()
            } else {
                format!(
                    "{0} fps: fenced flushes complete on the instance's tick, so a Linux \
                     virtio_gpu guest on blob scanouts flips at most {0} times a second per head \
                     (frame_rate_limiter=0 lifts it)",
                    ty.frl
                )
            };
            let mut cap = format!(
                "Linux waits at most {LINUX_FENCE_TIMEOUT_MS} ms for a fence, so a limit below \
                 {floor} fps is capped by the guest at {floor} fps"
            );
            if ty.frl != 0 && ty.frl < floor {
                cap.push_str(&format!(
                    ": this type's {} fps is felt as {floor} fps",
                    ty.frl
                ));
            }
            (pacing, Some(cap))
        }
    }
}

fn view<'a>(catalog: &Catalog, locked: &Locked, ty: &'a VgpuType) -> TypeView<'a> {
    let locked_in = locked.lock_of(ty).map(|p| p.display().to_string());
    TypeView {
        key: ty.key(),
        ty,
        description: ty.nvidia_description(),
        source: &ty.source,
        default: catalog.default_type().is_some_and(|d| d.key() == ty.key()),
        newest: catalog.is_newest(ty),
        resolves_bare: catalog.is_bare_resolution(ty),
        served: ty.personality.is_implemented(),
        available_instances: catalog.instances_on_empty_parent(ty),
        fingerprint: fingerprint(ty).to_string(),
        released: fingerprint::is_released(ty) || locked_in.is_some(),
        locked_in,
        edid_modes: edid::decode_modes(&edid::generate(ty, &[0; 16])).unwrap_or_default(),
        frl_pacing: frl_pacing(ty).0,
        frl_guest_cap: frl_pacing(ty).1,
    }
}

fn flags(v: &TypeView<'_>) -> String {
    let mut f = Vec::new();
    if v.default {
        f.push("default");
    }
    if v.ty.deprecated {
        f.push("deprecated");
    }
    if !v.served {
        f.push("not-served-yet");
    }
    if v.ty.source != vgpu_model::catalog::BUILTIN_SOURCE {
        f.push("user");
        if v.locked_in.is_none() {
            f.push("unlocked");
        }
    }
    if f.is_empty() {
        "-".to_string()
    } else {
        f.join(",")
    }
}

/// `vgpu-emu types`; `locked` marks the user versions a lock file holds fixed.
pub fn types(catalog: &Catalog, locked: &Locked, json: bool) -> Result<String, CliError> {
    let views: Vec<TypeView<'_>> = catalog
        .types()
        .iter()
        .map(|t| view(catalog, locked, t))
        .collect();
    if json {
        return Ok(serde_json::to_string_pretty(&views)? + "\n");
    }
    let header = [
        "TYPE",
        "PARENT",
        "PERSONALITY",
        "AVAIL/MAX",
        "FLAGS",
        "DESCRIPTION",
    ];
    let rows: Vec<[String; 6]> = views
        .iter()
        .map(|v| {
            [
                v.key.clone(),
                v.ty.family.clone(),
                v.ty.personality.to_string(),
                format!("{}/{}", v.available_instances, v.ty.max_instances),
                flags(v),
                v.description.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for r in &rows {
        line(&r.each_ref().map(String::as_str));
    }
    let _ = writeln!(
        out,
        "\nAVAIL is what one empty parent of the family hosts. Parents: {}",
        catalog
            .families()
            .iter()
            .map(|f| format!("{} ({}M VRAM)", f.name, f.vram >> 20))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(out)
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => format!("{b}"),
    }
}

fn bar_line(b: &BarSpec) -> String {
    let what = match b.kind {
        BarKind::Vram => "VRAM, mmap-able (never trapped)",
        BarKind::Registers => {
            "registers, trapped: EDID 0x000, VGA ports 0x400, DISPI 0x500, QEMU ext 0x600"
        }
        BarKind::Msix => "MSI-X table and PBA",
        BarKind::Virtio => "virtio-pci common/notify/ISR/device-config",
    };
    format!(
        "{} memory, {}-bit, {}: {what}",
        human_size(b.size),
        if b.is_64bit { 64 } else { 32 },
        if b.prefetchable {
            "prefetchable"
        } else {
            "non-prefetchable"
        },
    )
}

/// `vgpu-emu describe NAME[@VERSION]`; `locked` says which user versions a lock file holds
/// fixed.
pub fn describe(
    catalog: &Catalog,
    locked: &Locked,
    spec: &str,
    json: bool,
) -> Result<String, CliError> {
    let ty = resolve(catalog, spec)?;
    let v = view(catalog, locked, ty);
    if json {
        return Ok(serde_json::to_string_pretty(&v)? + "\n");
    }
    let mut out = String::new();
    let mut kv = |k: &str, val: String| {
        let _ = writeln!(out, "  {k:<19} {val}");
    };
    let family = catalog.family(&ty.family);
    let p = &ty.pci;
    let mut status = Vec::new();
    match (v.newest, v.resolves_bare) {
        (true, true) => status.push(format!("newest version of {}", ty.name)),
        (false, true) => status.push(format!(
            "what a bare {} resolves to (newer versions are deprecated)",
            ty.name
        )),
        (newest, false) => {
            let bare = catalog.resolve(&ty.name)?;
            status.push(format!(
                "{}; a bare {} resolves to {}",
                if newest {
                    "newest version"
                } else {
                    "an older version"
                },
                ty.name,
                bare.key()
            ));
        }
    }
    if ty.deprecated {
        status.push("DEPRECATED".into());
    }
    if v.default {
        status.push("the default type".into());
    }
    let header = format!("{}  ({})\n", v.key, status.join("; "));
    kv("description", v.description.clone());
    kv(
        "parent family",
        family.map_or(ty.family.clone(), |f| {
            format!("{} ({})", f.name, f.description)
        }),
    );
    kv(
        "personality",
        format!(
            "{}{}",
            ty.personality,
            if v.served {
                ""
            } else {
                " (listed and described; not served by this build yet)"
            }
        ),
    );
    kv("PCI ID", format!("{:04x}:{:04x}", p.vendor, p.device));
    kv(
        "PCI subsystem",
        format!("{:04x}:{:04x}", p.subsystem_vendor, p.subsystem_device),
    );
    kv("PCI class", format!("{:06x}", p.class));
    kv("PCI revision", format!("{:02x}", p.revision));
    for b in &ty.bars {
        kv(&format!("BAR{}", b.index), bar_line(b));
    }
    if v.served {
        kv(
            "vendor capability",
            format!(
                "at {VENDOR_CAP_OFFSET:#04x}: ID 0x09, {} bytes, name \"{}\" version {}",
                VendorCapability::LEN,
                ty.name,
                ty.version
            ),
        );
        kv(
            "interrupts",
            match ty.personality {
                vgpu_model::Personality::Bochs => "none (interrupt pin 0, no MSI/MSI-X)".into(),
                vgpu_model::Personality::VirtioGpu => {
                    "MSI-X, 3 vectors: configuration, control queue, cursor queue (interrupt pin 0)"
                        .to_string()
                }
            },
        );
    }
    kv("framebuffer", human_size(ty.framebuffer));
    kv("heads", ty.num_heads.to_string());
    kv("max resolution", ty.max_resolution.to_string());
    kv("default resolution", ty.default_resolution.to_string());
    kv("frame-rate limit", v.frl_pacing.clone());
    if let Some(cap) = &v.frl_guest_cap {
        kv("fence timeout", cap.clone());
    }
    kv(
        "EDID modes",
        modes_text(&v.edid_modes, " (preferred)", ", "),
    );
    kv(
        "max instances",
        format!(
            "{} per parent ({} on an empty one)",
            ty.max_instances, v.available_instances
        ),
    );
    let pinned = match &v.locked_in {
        Some(lock) => format!("locked in {lock}: held fixed"),
        None if v.released => "released: held fixed".into(),
        None if ty.source == vgpu_model::catalog::BUILTIN_SOURCE => "not released yet".into(),
        None => "user type, not locked: not released yet (`vgpu-emu lock` pins it)".into(),
    };
    kv("ABI fingerprint", format!("{} ({pinned})", v.fingerprint));
    kv("defined in", ty.source.clone());
    Ok(header + &out)
}

/// The EDID base block of a type version, with the nil UUID as serial (an instance puts its own
/// UUID there): 128 bytes for `edid-decode`.
pub fn edid_bytes(ty: &VgpuType) -> Vec<u8> {
    edid::generate(ty, &[0; 16]).to_vec()
}

/// The config space a guest reads at power-on, in the hex form of `lspci -x`, which
/// `lspci -F FILE` reads back (`lspci -F FILE -vv` decodes it). Only personalities this build
/// renders have one.
pub fn config_dump(catalog: &Catalog, ty: &VgpuType) -> Result<String, CliError> {
    let Some(images) = power_on_images(ty) else {
        return Err(crate::cli::serve::not_servable(catalog, ty));
    };
    let config = &images[0].1;
    let mut out = format!("00:00.0 vgpu-emu {} config space at power-on\n", ty.key());
    for (row, bytes) in config.chunks(16).enumerate() {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let _ = writeln!(out, "{:02x}: {}", row * 16, hex.join(" "));
    }
    Ok(out)
}

/// One guest-visible property that differs between two type versions.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Difference {
    /// What differs (`PCI subsystem`, `BAR0`, `EDID modes`, `config space bytes`, ...).
    pub property: String,
    /// Its value in the first version.
    pub a: String,
    /// Its value in the second version.
    pub b: String,
}

/// What the guest reads at power-on, for personalities this build renders: config space,
/// EDID, register BAR.
fn power_on_images(ty: &VgpuType) -> Option<[(&'static str, Vec<u8>); 3]> {
    let mut dev = vgpu_model::fingerprint::new_device(ty).ok()?;
    Some([
        ("config space bytes", dev.config().reset_image().to_vec()),
        ("EDID bytes", dev.edid().to_vec()),
        ("register BAR bytes", dev.register_image()),
    ])
}

fn capability_list(config: &[u8]) -> String {
    let caps: Vec<String> = walk_capabilities(config)
        .into_iter()
        .map(|(id, at)| {
            let what = if id == CAP_ID_VENDOR {
                VendorCapability::find(config).map_or("vendor-specific".to_string(), |(n, v)| {
                    format!("vendor-specific: type {n} version {v}")
                })
            } else {
                format!("ID {id:#04x}")
            };
            format!("{at:#04x} {what}")
        })
        .collect();
    if caps.is_empty() {
        "none".into()
    } else {
        caps.join(", ")
    }
}

/// The guest-visible properties of a type version, in a fixed order, as `diff` compares them.
fn guest_properties(ty: &VgpuType) -> Vec<(String, String)> {
    let p = &ty.pci;
    let mut props = vec![
        ("personality".to_string(), ty.personality.to_string()),
        (
            "PCI ID".into(),
            format!("{:04x}:{:04x}", p.vendor, p.device),
        ),
        (
            "PCI subsystem".into(),
            format!("{:04x}:{:04x}", p.subsystem_vendor, p.subsystem_device),
        ),
        ("PCI class".into(), format!("{:06x}", p.class)),
        ("PCI revision".into(), format!("{:02x}", p.revision)),
    ];
    for index in 0..6u8 {
        let bar = ty.bars.iter().find(|b| b.index == index);
        props.push((format!("BAR{index}"), bar.map_or("none".into(), bar_line)));
    }
    let images = power_on_images(ty);
    props.push((
        "capabilities".into(),
        images
            .as_ref()
            .map_or("not rendered by this build".into(), |i| {
                capability_list(&i[0].1)
            }),
    ));
    props.push((
        "virtio features".into(),
        match ty.personality {
            vgpu_model::Personality::Bochs => "none (no virtio transport)".into(),
            vgpu_model::Personality::VirtioGpu => "not rendered by this build".into(),
        },
    ));
    props.push(("framebuffer".into(), human_size(ty.framebuffer)));
    props.push(("heads".into(), ty.num_heads.to_string()));
    props.push(("max resolution".into(), ty.max_resolution.to_string()));
    props.push((
        "default resolution".into(),
        ty.default_resolution.to_string(),
    ));
    props.push((
        "frame-rate limit".into(),
        if ty.frl == 0 {
            "off".into()
        } else {
            format!("{} fps", ty.frl)
        },
    ));
    let modes = edid::decode_modes(&edid::generate(ty, &[0; 16])).unwrap_or_default();
    props.push(("EDID modes".into(), modes_text(&modes, "*", " ")));
    props
}

/// EDID modes as `WxH@Hz`, the preferred one followed by `preferred`, joined by `sep`.
fn modes_text(modes: &[edid::Mode], preferred: &str, sep: &str) -> String {
    let modes: Vec<String> = modes
        .iter()
        .map(|m| {
            let mark = if m.preferred { preferred } else { "" };
            format!("{}x{}@{}{mark}", m.width, m.height, m.refresh)
        })
        .collect();
    modes.join(sep)
}

/// Offsets where two byte images differ, as ranges: `0x10-0x13, 0x2e`.
fn differing_ranges(a: &[u8], b: &[u8]) -> Option<String> {
    let len = a.len().max(b.len());
    let differs = |i: usize| a.get(i) != b.get(i);
    let mut ranges: Vec<String> = Vec::new();
    let mut i = 0;
    while i < len {
        if differs(i) {
            let start = i;
            while i + 1 < len && differs(i + 1) {
                i += 1;
            }
            ranges.push(if start == i {
                format!("{start:#05x}")
            } else {
                format!("{start:#05x}-{i:#05x}")
            });
        }
        i += 1;
    }
    (!ranges.is_empty()).then(|| ranges.join(", "))
}

/// Every guest-visible difference between type versions `a` and `b`.
pub fn differences(a: &VgpuType, b: &VgpuType) -> Vec<Difference> {
    let mut out: Vec<Difference> = guest_properties(a)
        .into_iter()
        .zip(guest_properties(b))
        .filter(|((_, va), (_, vb))| va != vb)
        .map(|((property, a), (_, b))| Difference { property, a, b })
        .collect();
    // Raw images catch whatever the properties above do not spell out.
    if let (Some(ia), Some(ib)) = (power_on_images(a), power_on_images(b)) {
        for ((what, ba), (_, bb)) in ia.into_iter().zip(ib) {
            if let Some(at) = differing_ranges(&ba, &bb) {
                out.push(Difference {
                    property: what.to_string(),
                    a: format!("differ at {at}"),
                    b: String::new(),
                });
            }
        }
    }
    out
}

/// `vgpu-emu diff A B`: the report, and whether the two versions are identical to a guest.
pub fn diff(catalog: &Catalog, a: &str, b: &str, json: bool) -> Result<(String, bool), CliError> {
    let (ta, tb) = (resolve(catalog, a)?, resolve(catalog, b)?);
    let diffs = differences(ta, tb);
    let identical = diffs.is_empty();
    if json {
        let v = serde_json::json!({
            "a": ta.key(),
            "b": tb.key(),
            "identical": identical,
            "fingerprints": [fingerprint(ta).to_string(), fingerprint(tb).to_string()],
            "differences": diffs,
        });
        return Ok((serde_json::to_string_pretty(&v)? + "\n", identical));
    }
    let (ka, kb) = (ta.key(), tb.key());
    if identical {
        return Ok((
            format!("{ka} and {kb}: no guest-visible difference\n"),
            true,
        ));
    }
    let mut out = format!(
        "{ka} and {kb}: {} guest-visible difference(s)\n",
        diffs.len()
    );
    let width = diffs.iter().map(|d| d.property.len()).max().unwrap_or(0);
    for d in &diffs {
        if d.b.is_empty() {
            let _ = writeln!(out, "  {:<width$}  {}", d.property, d.a);
        } else {
            let _ = writeln!(out, "  {:<width$}  {ka}: {}", d.property, d.a);
            let _ = writeln!(out, "  {:<width$}  {kb}: {}", "", d.b);
        }
    }
    Ok((out, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_lists_every_version_with_nvidia_descriptions() {
        let c = Catalog::builtin().unwrap();
        let out = types(&c, &Locked::default(), false).unwrap();
        for t in c.types() {
            let row = out
                .lines()
                .find(|l| l.starts_with(&format!("{} ", t.key())))
                .unwrap_or_else(|| panic!("{} missing:\n{out}", t.key()));
            assert!(row.ends_with(&t.nvidia_description()), "{row}");
        }
        assert!(out.contains("num_heads=4, frl_config=60, framebuffer=2048M, max_resolution=2560x1600, max_instance=4"));
        let json: serde_json::Value =
            serde_json::from_str(&types(&c, &Locked::default(), true).unwrap()).unwrap();
        assert_eq!(json.as_array().unwrap().len(), c.types().len());
    }

    /// A bochs type record for `--types-file` tests.
    fn lab(version: u32, framebuffer: &str, extra: &str) -> String {
        vgpu_model::catalog::TestType {
            version,
            framebuffer,
            extra,
            ..Default::default()
        }
        .toml()
    }

    #[test]
    fn describe_a_bare_name_shows_the_newest_version() {
        let mut c = Catalog::builtin().unwrap();
        // @2 has the smaller framebuffer, so it sorts before @1 in the table.
        c.add_toml("lab.toml", &(lab(1, "64M", "") + &lab(2, "32M", "")))
            .unwrap();
        let out = describe(&c, &Locked::default(), "LAB-32M", false).unwrap();
        assert!(
            out.starts_with("LAB-32M@2  (newest version of LAB-32M)"),
            "{out}"
        );
        assert!(out.contains("framebuffer         32M"), "{out}");
        let out = describe(&c, &Locked::default(), "LAB-32M@1", false).unwrap();
        assert!(
            out.starts_with("LAB-32M@1  (an older version; a bare LAB-32M resolves to LAB-32M@2)"),
            "{out}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&describe(&c, &Locked::default(), "LAB-32M", true).unwrap())
                .unwrap();
        assert_eq!(
            (json["version"].as_u64(), json["resolves_bare"].as_bool()),
            (Some(2), Some(true))
        );

        let mut c = Catalog::builtin().unwrap();
        c.add_toml(
            "lab.toml",
            &(lab(1, "64M", "") + &lab(2, "32M", "") + &lab(3, "64M", "deprecated = true")),
        )
        .unwrap();
        let out = describe(&c, &Locked::default(), "LAB-32M", false).unwrap();
        assert!(
            out.starts_with(
                "LAB-32M@2  (what a bare LAB-32M resolves to (newer versions are deprecated))"
            ),
            "{out}"
        );
        let out = describe(&c, &Locked::default(), "LAB-32M@3", false).unwrap();
        assert!(
            out.starts_with(
                "LAB-32M@3  (newest version; a bare LAB-32M resolves to LAB-32M@2; DEPRECATED)"
            ),
            "{out}"
        );
    }

    #[test]
    fn diff_lists_every_guest_visible_difference_and_nothing_else() {
        let mut c = Catalog::builtin().unwrap();
        // @2 differs from @1 only in its FRL (and so its EDID refresh) and in max_instances,
        // which is management, not guest ABI.
        c.add_toml(
            "lab.toml",
            &(lab(1, "32M", "")
                + &lab(2, "32M", "")
                    .replace("frl = 30", "frl = 60")
                    .replace("max_instances = 8", "max_instances = 4")),
        )
        .unwrap();
        let (a, b) = (
            c.resolve("LAB-32M@1").unwrap(),
            c.resolve("LAB-32M@2").unwrap(),
        );
        let props: Vec<String> = differences(a, b).into_iter().map(|d| d.property).collect();
        assert_eq!(
            props,
            [
                "capabilities",
                "frame-rate limit",
                "EDID modes",
                "config space bytes",
                "EDID bytes",
                "register BAR bytes"
            ],
        );
        let d = &differences(a, b)[1];
        assert_eq!((d.a.as_str(), d.b.as_str()), ("30 fps", "60 fps"));
        let (out, identical) = diff(&c, "LAB-32M@1", "LAB-32M", false).unwrap();
        assert!(!identical);
        assert!(
            out.starts_with("LAB-32M@1 and LAB-32M@2: 6 guest-visible difference(s)\n"),
            "{out}"
        );
        assert!(out.contains("1920x1080@30*"), "{out}");
        // The capability carries the version, at 0x44 (after ID, next, length, layout).
        assert!(
            out.contains("config space bytes  differ at 0x044\n"),
            "{out}"
        );
        let (out, identical) = diff(&c, "EMU-64M", "emu-64m@1", false).unwrap();
        assert!(identical);
        assert_eq!(
            out,
            "EMU-64M@1 and EMU-64M@1: no guest-visible difference\n"
        );
        let (json, _) = diff(&c, "EMU-16M", "EMU-64M", true).unwrap();
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json["identical"], false);
        assert!(json["differences"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["property"] == "PCI subsystem"
                && d["a"] == "1234:1001"
                && d["b"] == "1234:1002"));
        assert!(matches!(
            diff(&c, "EMU-64M", "NOPE", false),
            Err(CliError::Lookup(_))
        ));
    }

    #[test]
    fn describe_and_diff_accept_a_type_directory() {
        let c = Catalog::builtin().unwrap();
        let out = describe(&c, &Locked::default(), "vgpu_emu-emu_64m-v1", false).unwrap();
        assert!(out.starts_with("EMU-64M@1  ("), "{out}");
        let (_, identical) = diff(&c, "vgpu_emu-m60_2q-v1", "M60-2Q@1", false).unwrap();
        assert!(identical);
        assert!(matches!(
            describe(&c, &Locked::default(), "vgpu_emu-emu_64m-v9", false),
            Err(CliError::Lookup(_))
        ));
    }

    /// The dump follows what lspci's dump reader (lib/dump.c) takes: a `BB:DD.F ` line, then
    /// `XX: ` and 16 bytes per line; read back, it is the power-on config space.
    #[test]
    fn config_dump_is_in_lspci_x_form() {
        let c = Catalog::builtin().unwrap();
        let ty = c.resolve("EMU-64M").unwrap();
        let dump = config_dump(&c, ty).unwrap();
        let mut lines = dump.lines();
        let head = lines.next().unwrap();
        assert_eq!((&head[2..3], &head[5..6], &head[7..8]), (":", ".", " "));
        let mut bytes = Vec::new();
        for (row, line) in lines.enumerate() {
            assert_eq!(line.len(), 51, "{line}");
            assert_eq!(&line[..4], format!("{:02x}: ", row * 16));
            bytes.extend(
                line[4..]
                    .split(' ')
                    .map(|h| u8::from_str_radix(h, 16).unwrap()),
            );
        }
        let dev = vgpu_model::fingerprint::new_device(ty).unwrap();
        assert_eq!(bytes, dev.config().reset_image().to_vec());
        let m60 = config_dump(&c, c.resolve("M60-2Q").unwrap()).unwrap();
        assert!(m60.contains("\n00: f4 1a 50 10 "), "{m60}");
        let edid = edid_bytes(ty);
        assert_eq!(edid, dev.edid()[..128].to_vec(), "what the guest reads");
        assert_eq!(edid[..8], [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    }

    /// A user version a lock file holds fixed is `released` and names its lock; one that is not
    /// locked is flagged `unlocked`.
    #[test]
    fn types_and_describe_say_which_user_versions_are_locked() {
        use crate::cli::lock::{Lock, LockFile};
        let mut c = Catalog::builtin().unwrap();
        c.add_toml("lab.toml", &(lab(1, "64M", "") + &lab(2, "32M", "")))
            .unwrap();
        let lock = Lock {
            path: "lab.toml.lock".into(),
            covers: vec!["lab.toml".into()],
        };
        let fp = fingerprint(c.resolve("LAB-32M@1").unwrap()).to_string();
        let file = LockFile::parse(
            "lab.toml.lock",
            &format!("[locked]\n\"LAB-32M@1\" = \"{fp}\"\n"),
        )
        .unwrap();
        let mut held = Locked::default();
        crate::cli::lock::verify(&c, &lock, &file, &mut held).unwrap();

        let out = types(&c, &held, false).unwrap();
        let row = |key: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("{key} ")))
                .unwrap()
                .to_string()
        };
        assert!(row("LAB-32M@1").contains(" user "), "{out}");
        assert!(row("LAB-32M@2").contains(" user,unlocked "), "{out}");
        assert!(row("EMU-64M@1").contains(" default "), "{out}");
        let out = describe(&c, &held, "LAB-32M@1", false).unwrap();
        assert!(
            out.contains(&format!(
                "ABI fingerprint     {fp} (locked in lab.toml.lock: held fixed)\n"
            )),
            "{out}"
        );
        let out = describe(&c, &held, "LAB-32M@2", false).unwrap();
        assert!(
            out.contains(" (user type, not locked: not released yet"),
            "{out}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&describe(&c, &held, "LAB-32M@1", true).unwrap()).unwrap();
        assert_eq!(
            (&json["released"], &json["locked_in"]),
            (
                &serde_json::json!(true),
                &serde_json::json!("lab.toml.lock")
            )
        );
        let json: serde_json::Value =
            serde_json::from_str(&describe(&c, &held, "LAB-32M@2", true).unwrap()).unwrap();
        assert_eq!(
            (&json["released"], &json["locked_in"]),
            (&serde_json::json!(false), &serde_json::Value::Null)
        );
    }

    #[test]
    fn deprecation_shows_in_types_describe_and_the_warning() {
        let mut c = Catalog::builtin().unwrap();
        c.add_toml(
            "lab.toml",
            &(lab(1, "64M", "deprecated = true") + &lab(2, "32M", "")),
        )
        .unwrap();
        let old = c.resolve("LAB-32M@1").unwrap();
        let out = types(&c, &Locked::default(), false).unwrap();
        let row = out.lines().find(|l| l.starts_with("LAB-32M@1 ")).unwrap();
        assert!(row.contains(" deprecated,user,unlocked "), "{row}");
        let row = out.lines().find(|l| l.starts_with("LAB-32M@2 ")).unwrap();
        assert!(!row.contains("deprecated"), "{row}");
        let json: serde_json::Value =
            serde_json::from_str(&types(&c, &Locked::default(), true).unwrap()).unwrap();
        assert!(json
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["key"] == "LAB-32M@1" && t["deprecated"] == true));
        let out = describe(&c, &Locked::default(), "LAB-32M@1", false).unwrap();
        assert!(
            out.starts_with(
                "LAB-32M@1  (an older version; a bare LAB-32M resolves to LAB-32M@2; DEPRECATED)"
            ),
            "{out}"
        );
        assert_eq!(
            deprecation_warning(&c, old).as_deref(),
            Some(
                "type LAB-32M@1 is deprecated; a bare LAB-32M resolves to LAB-32M@2; it stays \
                 served for what pinned it"
            )
        );
        assert_eq!(
            deprecation_warning(&c, c.resolve("LAB-32M@2").unwrap()),
            None
        );
    }

    #[test]
    fn describe_shows_the_pinned_abi() {
        let c = Catalog::builtin().unwrap();
        let out = describe(&c, &Locked::default(), "EMU-1G", false).unwrap();
        assert!(out.starts_with("EMU-1G@1  ("), "{out}");
        for needle in [
            "PCI ID              1234:1111",
            "PCI class           038000",
            "PCI revision        02",
            "BAR0                1G memory, 64-bit, prefetchable",
            "BAR2                4K memory, 32-bit, non-prefetchable",
            "1920x1080@60 (preferred)",
            "ABI fingerprint     sha256:",
        ] {
            assert!(out.contains(needle), "missing {needle:?} in\n{out}");
        }
        let json: serde_json::Value =
            serde_json::from_str(&describe(&c, &Locked::default(), "M60-2Q@1", true).unwrap())
                .unwrap();
        assert_eq!(json["num_heads"], 4);
        assert_eq!(json["pci"]["device"], 0x1050);
        assert_eq!(json["served"], true);
    }
}
