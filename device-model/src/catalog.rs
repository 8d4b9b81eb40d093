//! The vGPU type catalog: named, versioned type records loaded from TOML.
//!
//! A type *version* is one `[[type]]` record. `name@version` pins every guest-visible property; a
//! bare name resolves to the newest non-deprecated version. The built-in table
//! (`types/builtin.toml`) is compiled in; users add their own files with [`Catalog::add_toml`].
//! Every validation error names the file, the line and the field.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// The built-in type table.
pub const BUILTIN_TYPES: &str = include_str!("../types/builtin.toml");
/// The name under which the built-in table reports errors.
pub const BUILTIN_SOURCE: &str = "<built-in types>";

/// Largest width or height an EDID 1.4 detailed timing descriptor can carry (12 bits).
pub const MAX_EDID_DIMENSION: u32 = 4095;
/// Smallest scanout the bochs personality displays (QEMU's bochs-display rule).
pub const MIN_DIMENSION: u32 = 64;
/// Bochs VRAM bounds: BAR0 at least 4 MiB; VIDEO_MEMORY_64K is a 16-bit count of 64 KiB units.
pub const BOCHS_MIN_VRAM: u64 = 4 << 20;
/// See [`BOCHS_MIN_VRAM`]: 0x8000 * 64 KiB is the largest power of two the register can report.
pub const BOCHS_MAX_VRAM: u64 = 2 << 30;
/// Upper bound for a frame-rate limit.
pub const MAX_FRL: u32 = 240;
/// Longest type name (it must fit the vendor capability and an mdev type directory name).
pub const MAX_NAME_LEN: usize = 32;

/// The reference of the type-file format, as `vgpu-emu types --help` prints it. A test keeps its
/// field lists equal to the fields the parser accepts.
pub const TYPE_FILE_REFERENCE: &str = r#"Type files (--types-file FILE, TOML, at most 1 MiB; a bad one is refused with its file, line
and field) hold any of:

default_type = "NAME[@VERSION]"   the type `serve` uses without --type (optional)

[[family]]: a parent family, a simulated physical GPU whose VRAM its instances share
  name                letters, digits, '.', '_', '-' (at most 32); not defined already
  description         one line for humans
  vram                VRAM of one parent: bytes, or a number with K, M, G or T (binary)

[[type]]: one version of a vGPU type; every field is required unless marked optional
  name                letters, digits, '.', '_', '-' (at most 32); a name that differs from
                      another only in case is refused, and the daemon refuses two that differ
                      only in '.', '_' and '-' (they would share an mdev type directory)
  version             1 or more; NAME@VERSION must be new (a released version never changes)
  id                  optional management id, like NVIDIA's nvidia-<id>; not guest-visible
  family              a built-in family (emu: 4G, m60: 8G) or one defined with [[family]]
  personality         "bochs" (one head; served) or "virtio-gpu" (multi-head; listed, not
                      served by this build yet)
  pci                 inline table, every field required:
    vendor            vendor ID; not 0x0000 or 0xffff (a guest sees an empty slot)
    device            device ID (stock drivers bind bochs to 0x1111, virtio-gpu to 0x1050)
    subsystem_vendor  subsystem vendor ID
    subsystem_device  subsystem ID; virtio-gpu needs at least 0x40
    class             24-bit class code (display controller: 0x038000)
    revision          revision ID
  framebuffer         VRAM per instance: a power of two, bytes or a number with K, M, G or T;
                      bochs 4M to 2G with room for two frames at max_resolution and 32 bpp
                      (bochs-drm double-buffers), virtio-gpu one frame per head
  num_heads           display heads: bochs 1, virtio-gpu 1 to 16
  max_resolution      "WIDTHxHEIGHT", 64 to 4095 pixels each: no EDID mode and no scanout above
                      it; its pixel clock at the FRL refresh must fit EDID's 655.35 MHz
  default_resolution  "WIDTHxHEIGHT" within max_resolution: the EDID's preferred mode
  frl                 frame-rate limit in frames per second, 0 (off; the EDID then says 60 Hz)
                      to 240
  max_instances       instances one parent can host, at least 1; times framebuffer within the
                      family's VRAM
  deprecated          optional, default false: a bare name resolves past this version, which
                      stays addressable as NAME@VERSION

Example:

[[type]]
name = "LAB-32M"
version = 1
family = "emu"
personality = "bochs"
pci = { vendor = 0x1234, device = 0x1111, subsystem_vendor = 0x1234, subsystem_device = 0x2001, class = 0x038000, revision = 2 }
framebuffer = "32M"
num_heads = 1
max_resolution = "2560x1440"
default_resolution = "1920x1080"
frl = 30
max_instances = 8
"#;

/// Which register set and driver the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Personality {
    /// QEMU's bochs-display ABI (1234:1111), driven by Linux `bochs` and OVMF; one head.
    Bochs,
    /// virtio-gpu (1af4:1050), multi-head.
    VirtioGpu,
}

impl Personality {
    /// Every personality, in the order used for messages.
    pub const ALL: [Personality; 2] = [Personality::Bochs, Personality::VirtioGpu];

    /// The name used in type files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Personality::Bochs => "bochs",
            Personality::VirtioGpu => "virtio-gpu",
        }
    }

    /// How many heads the personality can drive.
    pub fn max_heads(self) -> u32 {
        match self {
            Personality::Bochs => 1,
            // VIRTIO_GPU_MAX_SCANOUTS.
            Personality::VirtioGpu => 16,
        }
    }

    /// Whether this build has a device model for the personality (and can serve it).
    pub fn is_implemented(self) -> bool {
        matches!(self, Personality::Bochs | Personality::VirtioGpu)
    }
}

impl fmt::Display for Personality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Personality {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Personality::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown personality `{s}` (expected `bochs` or `virtio-gpu`)"))
    }
}

/// A display resolution, written `WIDTHxHEIGHT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resolution {
    /// Pixels per line.
    pub width: u32,
    /// Lines.
    pub height: u32,
}

impl Resolution {
    /// A resolution of `width` x `height`.
    pub const fn new(width: u32, height: u32) -> Self {
        Resolution { width, height }
    }

    /// True when both dimensions are within `max`'s.
    pub fn fits_within(self, max: Resolution) -> bool {
        self.width <= max.width && self.height <= max.height
    }

    /// Bytes of one frame at 32 bits per pixel.
    pub fn bytes_at_32bpp(self) -> u64 {
        u64::from(self.width) * u64::from(self.height) * 4
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl FromStr for Resolution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a resolution of the form WIDTHxHEIGHT (e.g. 1920x1080)");
        let (w, h) = s.split_once('x').ok_or_else(bad)?;
        let parse = |v: &str| {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            v.parse::<u32>().map_err(|_| bad())
        };
        let r = Resolution::new(parse(w)?, parse(h)?);
        if r.width < MIN_DIMENSION || r.height < MIN_DIMENSION {
            return Err(format!(
                "{r} is below the {MIN_DIMENSION}x{MIN_DIMENSION} minimum"
            ));
        }
        if r.width > MAX_EDID_DIMENSION || r.height > MAX_EDID_DIMENSION {
            return Err(format!(
                "{r} exceeds {MAX_EDID_DIMENSION} pixels, the most an EDID detailed timing can describe"
            ));
        }
        Ok(r)
    }
}

impl Serialize for Resolution {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// PCI identity of a type: what `lspci -nn` shows in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciIdentity {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem_device: u16,
    /// Class code: base class, sub-class, programming interface (24 bits).
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
}

/// What a BAR holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BarKind {
    /// The framebuffer; mmap-able, never trapped.
    Vram,
    /// Trapped registers (bochs: EDID, VGA ports, DISPI, QEMU extension registers).
    Registers,
    /// MSI-X table and PBA.
    Msix,
    /// virtio-pci modern capabilities (common, notify, ISR, device config).
    Virtio,
}

/// One memory BAR of a type (derived from personality and framebuffer size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BarSpec {
    /// BAR index 0-5 (a 64-bit BAR also takes index + 1).
    pub index: u8,
    /// Size in bytes, a power of two.
    pub size: u64,
    /// What the BAR holds.
    pub kind: BarKind,
    /// 64-bit memory BAR.
    pub is_64bit: bool,
    /// Prefetchable.
    pub prefetchable: bool,
}

/// A parent family: the simulated physical GPU whose VRAM a parent's instances share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Family {
    /// Short name (`m60`).
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// Physical VRAM of one parent, in bytes.
    pub vram: u64,
}

/// One version of a vGPU type, validated and resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VgpuType {
    /// Type name, e.g. `M60-2Q`.
    pub name: String,
    /// Version of the whole record.
    pub version: u32,
    /// Optional management id (NVIDIA's `nvidia-<id>`); not guest-visible.
    pub id: Option<u32>,
    /// Parent family name.
    pub family: String,
    /// Register set and driver.
    pub personality: Personality,
    /// PCI identity.
    pub pci: PciIdentity,
    /// VRAM bytes per instance.
    pub framebuffer: u64,
    /// Display heads.
    pub num_heads: u32,
    /// Largest mode the EDID offers and the scanout accepts.
    pub max_resolution: Resolution,
    /// EDID preferred mode.
    pub default_resolution: Resolution,
    /// Frame-rate limit in fps; 0 = off.
    pub frl: u32,
    /// Instances one parent can host.
    pub max_instances: u32,
    /// Retired: a bare name resolves past it; still addressable as `name@version`.
    pub deprecated: bool,
    /// Memory BARs, derived from personality and framebuffer size.
    pub bars: Vec<BarSpec>,
    /// The file the record came from.
    #[serde(skip)]
    pub source: String,
}

impl VgpuType {
    /// `name@version`.
    pub fn key(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// The refresh rate the EDID advertises: the FRL, or 60 Hz when the FRL is off.
    pub fn refresh_hz(&self) -> u32 {
        if self.frl == 0 {
            60
        } else {
            self.frl
        }
    }

    /// NVIDIA's sysfs `description` line.
    pub fn nvidia_description(&self) -> String {
        format!(
            "num_heads={}, frl_config={}, framebuffer={}M, max_resolution={}, max_instance={}",
            self.num_heads,
            self.frl,
            self.framebuffer >> 20,
            self.max_resolution,
            self.max_instances
        )
    }

    /// The BAR holding VRAM, if the personality has one.
    pub fn vram_bar(&self) -> Option<&BarSpec> {
        self.bars.iter().find(|b| b.kind == BarKind::Vram)
    }
}

/// Derives the BAR layout the personality defines (DESIGN.md section 3).
fn bars_for(personality: Personality, framebuffer: u64) -> Vec<BarSpec> {
    match personality {
        Personality::Bochs => vec![
            BarSpec {
                index: 0,
                size: framebuffer,
                kind: BarKind::Vram,
                // A 32-bit BAR over 256 MiB hung the guest's boot in a trial; QEMU places a
                // 64-bit one above 4 GiB.
                is_64bit: framebuffer > (256 << 20),
                prefetchable: true,
            },
            BarSpec {
                index: 2,
                size: 4096,
                kind: BarKind::Registers,
                is_64bit: false,
                prefetchable: false,
            },
        ],
        Personality::VirtioGpu => vec![
            BarSpec {
                index: 1,
                size: 4096,
                kind: BarKind::Msix,
                is_64bit: false,
                prefetchable: false,
            },
            BarSpec {
                index: 4,
                size: 16 * 1024,
                kind: BarKind::Virtio,
                is_64bit: true,
                prefetchable: true,
            },
        ],
    }
}

/// An error in a type file. `Display` gives `file:line: field `f`: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: field `{field}`: {message}")]
pub struct CatalogError {
    /// The file (or [`BUILTIN_SOURCE`]).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// The field at fault (`type` or `family` for whole records).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Why a type name did not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No type has that name.
    #[error("unknown type `{name}`")]
    UnknownName {
        /// What was asked for.
        name: String,
        /// Close names, best first.
        suggestions: Vec<String>,
    },
    /// `NAME@` with nothing after the `@`.
    #[error("`{name}@` names no version; write {name}@VERSION (it has {available}) or {name} for the newest")]
    EmptyVersion {
        /// Type name.
        name: String,
        /// The versions that exist, e.g. `1, 2`.
        available: String,
    },
    /// The type exists but not in that version.
    #[error("type `{name}` has no version {version} (it has {available})")]
    UnknownVersion {
        /// Type name.
        name: String,
        /// Version asked for.
        version: String,
        /// The versions that exist, e.g. `1, 2`.
        available: String,
    },
}

/// Byte size in a type file: an integer, or a string with a binary K/M/G/T suffix.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

fn parse_size(raw: &RawSize) -> Result<u64, String> {
    let text = match raw {
        RawSize::Bytes(b) => return Ok(*b),
        RawSize::Text(t) => t.trim(),
    };
    let bad = || format!("`{text}` is not a size (bytes, or a number with K, M, G or T)");
    let body = text
        .strip_suffix("iB")
        .or_else(|| text.strip_suffix('B'))
        .unwrap_or(text);
    let (digits, shift) = match body.as_bytes().last() {
        Some(b'K') => (&body[..body.len() - 1], 10),
        Some(b'M') => (&body[..body.len() - 1], 20),
        Some(b'G') => (&body[..body.len() - 1], 30),
        Some(b'T') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    default_type: Option<Spanned<String>>,
    #[serde(default)]
    family: Vec<Spanned<RawFamily>>,
    #[serde(default, rename = "type")]
    types: Vec<Spanned<RawType>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFamily {
    name: Spanned<String>,
    description: String,
    vram: Spanned<RawSize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawType {
    name: Spanned<String>,
    version: Spanned<u32>,
    id: Option<u32>,
    family: Spanned<String>,
    personality: Spanned<String>,
    pci: Spanned<PciIdentity>,
    framebuffer: Spanned<RawSize>,
    num_heads: Spanned<u32>,
    max_resolution: Spanned<String>,
    default_resolution: Spanned<String>,
    frl: Spanned<u32>,
    max_instances: Spanned<u32>,
    #[serde(default)]
    deprecated: bool,
}

/// The set of known type versions and parent families.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    families: Vec<Family>,
    types: Vec<VgpuType>,
    default_type: Option<String>,
}

/// Locates errors in one source text.
struct Source<'a> {
    name: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn error(&self, span: Range<usize>, field: &str, message: impl Into<String>) -> CatalogError {
        CatalogError {
            file: self.name.to_string(),
            line: self.line_of(span.start),
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// Turns a TOML/serde error into one that names line and field.
    fn toml_error(&self, err: &toml::de::Error) -> CatalogError {
        let message = err.message().trim().to_string();
        let span = err.span().unwrap_or(0..0);
        let field = backticked_field(&message)
            .or_else(|| self.key_near(span.clone()))
            .unwrap_or_else(|| "-".to_string());
        self.error(span, &field, message)
    }

    /// The key a span belongs to: the span itself when it is a key, else the key before the
    /// nearest `=` to its left on the same line.
    fn key_near(&self, span: Range<usize>) -> Option<String> {
        let start = span.start.min(self.text.len());
        let end = span.end.clamp(start, self.text.len());
        let is_key = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        let own = self.text.get(start..end)?.trim();
        let after = self.text.get(end..)?.trim_start();
        if !own.is_empty() && own.chars().all(is_key) && after.starts_with('=') {
            return Some(own.to_string());
        }
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let before = &self.text[line_start..start];
        let eq = before.rfind('=')?;
        let key: String = before[..eq]
            .trim_end()
            .chars()
            .rev()
            .take_while(|&c| is_key(c))
            .collect();
        (!key.is_empty()).then(|| key.chars().rev().collect())
    }
}

/// Extracts `x` from serde messages such as "unknown field `x`, expected ..." or
/// "missing field `x`".
fn backticked_field(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))?;
    rest.split('`').next().map(str::to_string)
}

fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("must be 1 to {MAX_NAME_LEN} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "`{name}` contains `{c}`; use letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

impl Catalog {
    /// An empty catalog (no families, no types).
    pub fn empty() -> Self {
        Catalog::default()
    }

    /// The built-in catalog.
    pub fn builtin() -> Result<Self, CatalogError> {
        let mut c = Catalog::empty();
        c.add_toml(BUILTIN_SOURCE, BUILTIN_TYPES)?;
        Ok(c)
    }

    /// Adds the families and types of one TOML document. `source` names it in errors. On error
    /// the catalog is unchanged.
    pub fn add_toml(&mut self, source: &str, text: &str) -> Result<(), CatalogError> {
        let src = Source { name: source, text };
        let raw: RawFile = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
        let mut next = self.clone();
        for fam in &raw.family {
            next.add_family(&src, fam)?;
        }
        // Versions by lower-case name, so checking a record against the table stays O(1) and
        // loading tens of thousands of types stays linear.
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, t) in next.types.iter().enumerate() {
            by_name
                .entry(t.name.to_ascii_lowercase())
                .or_default()
                .push(i);
        }
        for ty in &raw.types {
            let ty = next.validate_type(&src, ty, &by_name)?;
            by_name
                .entry(ty.name.to_ascii_lowercase())
                .or_default()
                .push(next.types.len());
            next.types.push(ty);
        }
        if let Some(default) = &raw.default_type {
            next.resolve(default.get_ref())
                .map_err(|e| src.error(default.span(), "default_type", e.to_string()))?;
            next.default_type = Some(default.get_ref().clone());
        }
        next.types.sort_by(|a, b| {
            let key = |t: &VgpuType| (t.family.clone(), t.framebuffer, t.name.clone(), t.version);
            key(a).cmp(&key(b))
        });
        *self = next;
        Ok(())
    }

    fn add_family(
        &mut self,
        src: &Source<'_>,
        fam: &Spanned<RawFamily>,
    ) -> Result<(), CatalogError> {
        let raw = fam.get_ref();
        let name = raw.name.get_ref();
        valid_name(name).map_err(|m| src.error(raw.name.span(), "name", m))?;
        if self.family(name).is_some() {
            return Err(src.error(
                raw.name.span(),
                "name",
                format!("family `{name}` is already defined"),
            ));
        }
        let vram =
            parse_size(raw.vram.get_ref()).map_err(|m| src.error(raw.vram.span(), "vram", m))?;
        if vram == 0 {
            return Err(src.error(raw.vram.span(), "vram", "must not be zero"));
        }
        self.families.push(Family {
            name: name.clone(),
            description: raw.description.clone(),
            vram,
        });
        Ok(())
    }

    /// Validates one record; `by_name` indexes `self.types` by lower-case name.
    fn validate_type(
        &self,
        src: &Source<'_>,
        ty: &Spanned<RawType>,
        by_name: &HashMap<String, Vec<usize>>,
    ) -> Result<VgpuType, CatalogError> {
        let raw = ty.get_ref();
        let err = |span: Range<usize>, field: &str, msg: String| src.error(span, field, msg);

        let name = raw.name.get_ref().clone();
        valid_name(&name).map_err(|m| err(raw.name.span(), "name", m))?;
        let version = *raw.version.get_ref();
        if version == 0 {
            return Err(err(
                raw.version.span(),
                "version",
                "versions start at 1".into(),
            ));
        }
        let same_name: Vec<&VgpuType> = by_name
            .get(&name.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .map(|&i| &self.types[i])
            .collect();
        if let Some(other) = same_name.iter().find(|t| t.version == version) {
            return Err(err(
                raw.name.span(),
                "name",
                format!(
                    "duplicate type `{name}@{version}` (already defined in {})",
                    other.source
                ),
            ));
        }
        if let Some(other) = same_name.iter().find(|t| t.name != name) {
            return Err(err(
                raw.name.span(),
                "name",
                format!(
                    "`{name}` differs from existing type `{}` only in case",
                    other.name
                ),
            ));
        }
        let family = raw.family.get_ref();
        let fam = self.family(family).ok_or_else(|| {
            let known: Vec<&str> = self.families.iter().map(|f| f.name.as_str()).collect();
            err(
                raw.family.span(),
                "family",
                format!("unknown family `{family}` (known: {})", known.join(", ")),
            )
        })?;
        let personality: Personality = raw
            .personality
            .get_ref()
            .parse()
            .map_err(|m| err(raw.personality.span(), "personality", m))?;

        let pci = *raw.pci.get_ref();
        // PCI Local Bus 3.0, 6.2.1: a read of Vendor ID 0xFFFF means "no device here", so no
        // guest enumerates such a function; 0x0000 is no vendor either.
        if matches!(pci.vendor, 0x0000 | 0xffff) {
            return Err(err(
                raw.pci.span(),
                "vendor",
                format!(
                    "{:#06x} is not a vendor ID: a guest reads it as an empty slot",
                    pci.vendor
                ),
            ));
        }
        if pci.class > 0xff_ffff {
            return Err(err(
                raw.pci.span(),
                "class",
                format!("{:#x} does not fit 24 bits", pci.class),
            ));
        }
        if personality == Personality::VirtioGpu && pci.subsystem_device < 0x40 {
            return Err(err(
                raw.pci.span(),
                "subsystem_device",
                "virtio-pci modern devices need a subsystem ID of at least 0x40".into(),
            ));
        }

        let fb_span = raw.framebuffer.span();
        let framebuffer = parse_size(raw.framebuffer.get_ref())
            .map_err(|m| err(fb_span.clone(), "framebuffer", m))?;
        if !framebuffer.is_power_of_two() {
            return Err(err(
                fb_span,
                "framebuffer",
                format!("{framebuffer} bytes is not a power of two"),
            ));
        }
        if personality == Personality::Bochs
            && !(BOCHS_MIN_VRAM..=BOCHS_MAX_VRAM).contains(&framebuffer)
        {
            return Err(err(
                fb_span,
                "framebuffer",
                format!(
                    "bochs VRAM must be {}M to {}M (BAR0 minimum; VIDEO_MEMORY_64K is 16 bits)",
                    BOCHS_MIN_VRAM >> 20,
                    BOCHS_MAX_VRAM >> 20
                ),
            ));
        }

        let num_heads = *raw.num_heads.get_ref();
        if num_heads == 0 || num_heads > personality.max_heads() {
            return Err(err(
                raw.num_heads.span(),
                "num_heads",
                format!(
                    "{num_heads} heads; personality `{personality}` supports 1 to {}",
                    personality.max_heads()
                ),
            ));
        }

        let max_resolution: Resolution = raw
            .max_resolution
            .get_ref()
            .parse()
            .map_err(|m| err(raw.max_resolution.span(), "max_resolution", m))?;
        let default_resolution: Resolution = raw
            .default_resolution
            .get_ref()
            .parse()
            .map_err(|m| err(raw.default_resolution.span(), "default_resolution", m))?;
        if !default_resolution.fits_within(max_resolution) {
            return Err(err(
                raw.default_resolution.span(),
                "default_resolution",
                format!("{default_resolution} is above max_resolution {max_resolution}"),
            ));
        }
        // Linux bochs-drm (drm_vram_helper) accepts a mode only when two frames of it fit in
        // VRAM (double buffering); a bochs type must leave room for that at max resolution.
        let frames = if personality == Personality::Bochs {
            2
        } else {
            1
        };
        let needed = max_resolution.bytes_at_32bpp() * u64::from(num_heads) * frames;
        if framebuffer < needed {
            let why = if frames == 2 {
                format!(
                    "two frames at {max_resolution} and 32 bpp (bochs-drm double-buffers in VRAM)"
                )
            } else {
                format!("{num_heads} head(s) at {max_resolution} and 32 bpp")
            };
            return Err(err(
                fb_span,
                "framebuffer",
                format!(
                    "{}M is too small for {why}: {needed} bytes",
                    framebuffer >> 20
                ),
            ));
        }

        let frl = *raw.frl.get_ref();
        if frl > MAX_FRL {
            return Err(err(
                raw.frl.span(),
                "frl",
                format!("{frl} fps is above the {MAX_FRL} limit"),
            ));
        }
        let refresh = if frl == 0 { 60 } else { frl };
        let clock = crate::edid::cvt_rb_timing(max_resolution, refresh).pixel_clock_khz;
        if clock > crate::edid::MAX_PIXEL_CLOCK_KHZ {
            return Err(err(
                raw.max_resolution.span(),
                "max_resolution",
                format!(
                    "{max_resolution} at {refresh} Hz needs a {} MHz pixel clock; EDID's limit is 655.35 MHz",
                    clock / 1000
                ),
            ));
        }

        let max_instances = *raw.max_instances.get_ref();
        if max_instances == 0 {
            return Err(err(
                raw.max_instances.span(),
                "max_instances",
                "must be at least 1".into(),
            ));
        }
        if u64::from(max_instances).saturating_mul(framebuffer) > fam.vram {
            return Err(err(
                raw.max_instances.span(),
                "max_instances",
                format!(
                    "{max_instances} x {}M exceeds family `{}`'s {}M of VRAM",
                    framebuffer >> 20,
                    fam.name,
                    fam.vram >> 20
                ),
            ));
        }

        Ok(VgpuType {
            name,
            version,
            id: raw.id,
            family: fam.name.clone(),
            personality,
            pci,
            framebuffer,
            num_heads,
            max_resolution,
            default_resolution,
            frl,
            max_instances,
            deprecated: raw.deprecated,
            bars: bars_for(personality, framebuffer),
            source: src.name.to_string(),
        })
    }

    /// All type versions, sorted by family, framebuffer size, name and version.
    pub fn types(&self) -> &[VgpuType] {
        &self.types
    }

    /// All parent families.
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// A family by name.
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The type served when none is named.
    pub fn default_type(&self) -> Option<&VgpuType> {
        self.default_type
            .as_deref()
            .and_then(|d| self.resolve(d).ok())
    }

    /// Resolves `NAME` (newest non-deprecated version; the newest at all when every version is
    /// deprecated) or `NAME@VERSION` (`@2` or `@v2`). Names match case-insensitively.
    pub fn resolve(&self, spec: &str) -> Result<&VgpuType, LookupError> {
        let (name, version) = match spec.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (spec, None),
        };
        let versions: Vec<&VgpuType> = self
            .types
            .iter()
            .filter(|t| t.name.eq_ignore_ascii_case(name))
            .collect();
        // The newest non-deprecated version, else the newest: by version number alone, because
        // `types` is sorted by family and framebuffer first and its order says nothing about
        // which version is newer.
        let Some(bare) = versions
            .iter()
            .copied()
            .max_by_key(|t| (!t.deprecated, t.version))
        else {
            return Err(LookupError::UnknownName {
                name: spec.to_string(),
                suggestions: self.suggestions(name),
            });
        };
        let available = || {
            let mut numbers: Vec<u32> = versions.iter().map(|t| t.version).collect();
            numbers.sort_unstable();
            numbers
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match version {
            None => Ok(bare),
            Some("") => Err(LookupError::EmptyVersion {
                name: bare.name.clone(),
                available: available(),
            }),
            Some(v) => {
                let wanted = v.strip_prefix(['v', 'V']).unwrap_or(v).parse::<u32>().ok();
                versions
                    .iter()
                    .find(|t| Some(t.version) == wanted)
                    .copied()
                    .ok_or_else(|| LookupError::UnknownVersion {
                        name: bare.name.clone(),
                        version: v.to_string(),
                        available: available(),
                    })
            }
        }
    }

    /// Whether a bare `ty.name` resolves to `ty` (see [`Catalog::resolve`]).
    pub fn is_bare_resolution(&self, ty: &VgpuType) -> bool {
        self.resolve(&ty.name)
            .is_ok_and(|t| t.version == ty.version)
    }

    /// Whether `ty` is the newest version of its name.
    pub fn is_newest(&self, ty: &VgpuType) -> bool {
        !self
            .types
            .iter()
            .any(|t| t.name == ty.name && t.version > ty.version)
    }

    /// Type names close to `name`, best first (at most five).
    pub fn suggestions(&self, name: &str) -> Vec<String> {
        let wanted = name.to_ascii_lowercase();
        let mut scored: Vec<(f64, &str)> = Vec::new();
        for t in &self.types {
            if scored.iter().any(|(_, n)| *n == t.name) {
                continue;
            }
            let candidate = t.name.to_ascii_lowercase();
            let mut score = strsim::jaro_winkler(&wanted, &candidate);
            if !wanted.is_empty() && (candidate.contains(&wanted) || wanted.contains(&candidate)) {
                score += 0.5;
            }
            if score >= 0.75 {
                scored.push((score, &t.name));
            }
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        scored
            .into_iter()
            .take(5)
            .map(|(_, n)| n.to_string())
            .collect()
    }

    /// Instances of `ty` an empty parent of its family can host: `max_instances`, capped by the
    /// family's VRAM.
    pub fn instances_on_empty_parent(&self, ty: &VgpuType) -> u32 {
        let fits = self
            .family(&ty.family)
            .map_or(0, |f| f.vram / ty.framebuffer.max(1));
        ty.max_instances
            .min(u32::try_from(fits).unwrap_or(u32::MAX))
    }
}

/// A single-head bochs type record in TOML, for tests of type files in this crate and in
/// others (the CLI's and the daemon's tests load user type files). Not part of the catalog.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct TestType<'a> {
    /// `name`.
    pub name: &'a str,
    /// `version`.
    pub version: u32,
    /// `framebuffer`, e.g. "32M".
    pub framebuffer: &'a str,
    /// `max_resolution`.
    pub max_resolution: &'a str,
    /// `default_resolution`.
    pub default_resolution: &'a str,
    /// `frl`.
    pub frl: u32,
    /// `max_instances`.
    pub max_instances: u32,
    /// Lines appended to the record (e.g. `deprecated = true`).
    pub extra: &'a str,
}

impl Default for TestType<'_> {
    /// `LAB-32M@1`: 32M, 2560x1440 at most, 1920x1080 preferred, FRL 30, 8 per parent.
    fn default() -> Self {
        TestType {
            name: "LAB-32M",
            version: 1,
            framebuffer: "32M",
            max_resolution: "2560x1440",
            default_resolution: "1920x1080",
            frl: 30,
            max_instances: 8,
            extra: "",
        }
    }
}

impl TestType<'_> {
    /// The record.
    pub fn toml(&self) -> String {
        let TestType {
            name,
            version,
            framebuffer,
            max_resolution,
            default_resolution,
            frl,
            max_instances,
            extra,
        } = self;
        format!(
            r#"[[type]]
name = "{name}"
version = {version}
family = "emu"
personality = "bochs"
pci = {{ vendor = 0x1234, device = 0x1111, subsystem_vendor = 0x1234, subsystem_device = 0x2001, class = 0x038000, revision = 2 }}
framebuffer = "{framebuffer}"
num_heads = 1
max_resolution = "{max_resolution}"
default_resolution = "{default_resolution}"
frl = {frl}
max_instances = {max_instances}
{extra}
"#
        )
    }
}

/// Type records in TOML for tests.
#[cfg(test)]
pub(crate) mod test_support {
    /// A bochs type with the fields tests vary; `extra` lines are appended.
    pub(crate) fn bochs_toml(
        name: &str,
        version: u32,
        framebuffer: &str,
        max_resolution: &str,
        default_resolution: &str,
        frl: u32,
        extra: &str,
    ) -> String {
        super::TestType {
            name,
            version,
            framebuffer,
            max_resolution,
            default_resolution,
            frl,
            max_instances: 4,
            extra,
        }
        .toml()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::bochs_toml;
    use super::*;

    fn builtin() -> Catalog {
        Catalog::builtin().expect("built-in table is valid")
    }

    /// The M60 seed table, exactly as the issue gives it.
    const SEED: [(u32, &str, u32, u32, u32, u64, &str); 8] = [
        (11, "M60-0B", 16, 2, 45, 512, "2560x1600"),
        (12, "M60-0Q", 16, 2, 60, 512, "2560x1600"),
        (13, "M60-1B", 8, 2, 45, 1024, "2560x1600"),
        (14, "M60-1Q", 8, 2, 60, 1024, "2560x1600"),
        (15, "M60-2B", 4, 2, 45, 2048, "2560x1600"),
        (16, "M60-2Q", 4, 4, 60, 2048, "2560x1600"),
        (17, "M60-4Q", 2, 4, 60, 4096, "3840x2160"),
        (18, "M60-8Q", 1, 4, 60, 8192, "3840x2160"),
    ];

    #[test]
    fn seed_table_round_trips() {
        let c = builtin();
        let m60: Vec<&VgpuType> = c.types().iter().filter(|t| t.family == "m60").collect();
        assert_eq!(m60.len(), SEED.len());
        for (id, name, max_inst, heads, frl, fb_mib, max_res) in SEED {
            let t = c.resolve(name).unwrap();
            assert_eq!(t.id, Some(id), "{name}");
            assert_eq!(t.max_instances, max_inst, "{name}");
            assert_eq!(t.num_heads, heads, "{name}");
            assert_eq!(t.frl, frl, "{name}");
            assert_eq!(t.framebuffer, fb_mib << 20, "{name}");
            assert_eq!(t.max_resolution.to_string(), max_res, "{name}");
            assert_eq!(t.personality, Personality::VirtioGpu);
            assert_eq!(
                t.nvidia_description(),
                format!(
                    "num_heads={heads}, frl_config={frl}, framebuffer={fb_mib}M, max_resolution={max_res}, max_instance={max_inst}"
                )
            );
            assert_eq!(c.instances_on_empty_parent(t), max_inst);
        }
    }

    #[test]
    fn builtin_has_bochs_types_and_a_bochs_default() {
        let c = builtin();
        let bochs: Vec<&VgpuType> = c
            .types()
            .iter()
            .filter(|t| t.personality == Personality::Bochs)
            .collect();
        assert!(bochs.len() >= 3);
        assert!(bochs.iter().any(|t| t.frl == 45) && bochs.iter().any(|t| t.frl == 60));
        assert!(
            bochs.iter().any(|t| t.framebuffer > 256 << 20),
            "a 64-bit BAR0 type"
        );
        let d = c.default_type().expect("a default type");
        assert_eq!(d.personality, Personality::Bochs);
        assert!(d.personality.is_implemented());
    }

    #[test]
    fn bare_names_resolve_to_newest_non_deprecated() {
        let mut c = builtin();
        let extra = bochs_toml("EMU-16M", 2, "16M", "1920x1080", "800x600", 60, "")
            + "\n"
            + &bochs_toml(
                "EMU-16M",
                3,
                "16M",
                "1920x1080",
                "640x480",
                60,
                "deprecated = true",
            );
        c.add_toml("extra.toml", &extra).unwrap();
        assert_eq!(c.resolve("EMU-16M").unwrap().version, 2);
        assert_eq!(c.resolve("emu-16m").unwrap().version, 2, "case-insensitive");
        assert_eq!(c.resolve("EMU-16M@1").unwrap().version, 1);
        assert_eq!(
            c.resolve("EMU-16M@v3").unwrap().version,
            3,
            "deprecated stays addressable"
        );
        assert!(matches!(
            c.resolve("EMU-16M@9"),
            Err(LookupError::UnknownVersion { ref available, .. }) if available == "1, 2, 3"
        ));
        assert!(!c.is_newest(c.resolve("EMU-16M@2").unwrap()));
        assert!(c.is_newest(c.resolve("EMU-16M@3").unwrap()));
    }

    /// Versions whose other fields sort the other way: `types` is ordered by family and
    /// framebuffer, so a newer version may come first, and files may list it first.
    #[test]
    fn bare_names_resolve_by_version_number_not_table_order() {
        let v1 = bochs_toml("LAB-32M", 1, "64M", "2560x1440", "1920x1080", 30, "");
        let v2 = bochs_toml("LAB-32M", 2, "32M", "2560x1440", "1920x1080", 30, "");
        let deprecated_v3 = bochs_toml(
            "LAB-32M",
            3,
            "16M",
            "1280x1024",
            "1024x768",
            30,
            "deprecated = true",
        );

        // One file, newest first; the newer version has the smaller framebuffer.
        let mut c = builtin();
        c.add_toml("lab.toml", &format!("{v2}\n{v1}")).unwrap();
        assert_eq!(c.resolve("LAB-32M").unwrap().version, 2);
        assert_eq!(c.resolve("lab-32m").unwrap().version, 2);
        assert!(c.is_bare_resolution(c.resolve("LAB-32M@2").unwrap()));
        assert!(!c.is_bare_resolution(c.resolve("LAB-32M@1").unwrap()));

        // Two files, the newer version loaded first.
        let mut c = builtin();
        c.add_toml("new.toml", &v2).unwrap();
        c.add_toml("old.toml", &v1).unwrap();
        assert_eq!(c.resolve("LAB-32M").unwrap().version, 2);

        // The newer version in a family that sorts first.
        let mut c = builtin();
        let family = "[[family]]\nname = \"aaa\"\ndescription = \"sorts first\"\nvram = \"4G\"\n";
        c.add_toml(
            "fam.toml",
            &format!(
                "{family}{v1}\n{}",
                v2.replace("family = \"emu\"", "family = \"aaa\"")
            ),
        )
        .unwrap();
        let first = c.types().iter().find(|t| t.name == "LAB-32M").unwrap();
        assert_eq!(
            first.key(),
            "LAB-32M@2",
            "the newer version sorts first here"
        );
        assert_eq!(c.resolve("LAB-32M").unwrap().version, 2);

        // A newer deprecated version (smallest framebuffer, so it sorts first) is passed over;
        // when every version is deprecated, the newest is taken.
        let mut c = builtin();
        c.add_toml("dep.toml", &format!("{v1}\n{v2}\n{deprecated_v3}"))
            .unwrap();
        assert_eq!(c.resolve("LAB-32M").unwrap().version, 2);
        let deprecated = |t: &str| t.to_string() + "deprecated = true\n";
        let mut c = builtin();
        c.add_toml(
            "alldep.toml",
            &format!("{}\n{}\n{deprecated_v3}", deprecated(&v1), deprecated(&v2)),
        )
        .unwrap();
        assert!(c
            .types()
            .iter()
            .filter(|t| t.name == "LAB-32M")
            .all(|t| t.deprecated));
        assert_eq!(c.resolve("LAB-32M").unwrap().version, 3);

        // Versions are listed in numeric order whatever the table order.
        let mut c = builtin();
        c.add_toml("lab.toml", &format!("{v2}\n{v1}")).unwrap();
        assert_eq!(
            c.resolve("LAB-32M@7").unwrap_err().to_string(),
            "type `LAB-32M` has no version 7 (it has 1, 2)"
        );
        assert_eq!(
            c.resolve("lab-32m@").unwrap_err().to_string(),
            "`LAB-32M@` names no version; write LAB-32M@VERSION (it has 1, 2) or LAB-32M for the newest"
        );
    }

    #[test]
    fn unknown_names_get_suggestions() {
        let c = builtin();
        match c.resolve("M60-2") {
            Err(LookupError::UnknownName { suggestions, .. }) => {
                assert!(suggestions.iter().any(|s| s == "M60-2Q"), "{suggestions:?}");
            }
            other => panic!("unexpected {other:?}"),
        }
        match c.resolve("zzzz") {
            Err(LookupError::UnknownName { suggestions, .. }) => assert!(suggestions.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn good() -> String {
        bochs_toml("T1", 1, "16M", "1920x1080", "1280x720", 30, "")
    }

    /// Replaces the line starting with `key =` in good() by `line`, and returns the error.
    fn error_with(key: &str, line: &str) -> CatalogError {
        let text: String = good()
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{key} =")) {
                    line
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut c = builtin();
        let before = c.types().len();
        let e = c
            .add_toml("user.toml", &text)
            .expect_err("must be rejected");
        assert_eq!(
            c.types().len(),
            before,
            "a rejected file leaves the catalog unchanged"
        );
        assert_eq!(e.file, "user.toml");
        e
    }

    fn line_of(key: &str) -> usize {
        good()
            .lines()
            .position(|l| l.starts_with(&format!("{key} =")))
            .unwrap()
            + 1
    }

    #[test]
    fn good_user_file_loads() {
        let mut c = builtin();
        c.add_toml("user.toml", &good()).unwrap();
        let t = c.resolve("T1").unwrap();
        assert_eq!(t.source, "user.toml");
        assert_eq!(t.frl, 30);
    }

    #[test]
    fn validation_errors_name_line_and_field() {
        let cases = [
            (
                "framebuffer",
                "framebuffer = \"24M\"",
                "framebuffer",
                "power of two",
            ),
            (
                "framebuffer",
                "framebuffer = \"4M\"",
                "framebuffer",
                "too small",
            ),
            (
                "framebuffer",
                "framebuffer = \"8M\"",
                "framebuffer",
                "two frames",
            ),
            (
                "framebuffer",
                "framebuffer = \"4G\"",
                "framebuffer",
                "bochs VRAM",
            ),
            (
                "framebuffer",
                "framebuffer = \"lots\"",
                "framebuffer",
                "not a size",
            ),
            (
                "max_resolution",
                "max_resolution = \"1920*1080\"",
                "max_resolution",
                "WIDTHxHEIGHT",
            ),
            (
                "max_resolution",
                "max_resolution = \"8192x4320\"",
                "max_resolution",
                "4095",
            ),
            (
                "default_resolution",
                "default_resolution = \"2560x1440\"",
                "default_resolution",
                "above max_resolution",
            ),
            ("num_heads", "num_heads = 2", "num_heads", "supports 1 to 1"),
            (
                "personality",
                "personality = \"cirrus\"",
                "personality",
                "unknown personality",
            ),
            ("family", "family = \"nope\"", "family", "unknown family"),
            ("frl", "frl = 1000", "frl", "240"),
            (
                "max_instances",
                "max_instances = 1000",
                "max_instances",
                "exceeds family",
            ),
            ("version", "version = 0", "version", "start at 1"),
            ("name", "name = \"bad name\"", "name", "contains"),
            ("frl", "frl = \"sixty\"", "frl", "expected u32"),
            ("frl", "colour = 3", "colour", "unknown field"),
            (
                "pci",
                "pci = { vendor = 0xffff, device = 0x1111, subsystem_vendor = 0x1234, subsystem_device = 0x2001, class = 0x038000, revision = 2 }",
                "vendor",
                "0xffff is not a vendor ID",
            ),
            (
                "pci",
                "pci = { vendor = 0x0000, device = 0x1111, subsystem_vendor = 0x1234, subsystem_device = 0x2001, class = 0x038000, revision = 2 }",
                "vendor",
                "0x0000 is not a vendor ID",
            ),
        ];
        for (key, line, field, needle) in cases {
            let e = error_with(key, line);
            assert_eq!(e.field, field, "{line}: {e}");
            assert_eq!(e.line, line_of(key), "{line}: {e}");
            assert!(e.message.contains(needle), "{line}: {e}");
            assert!(e
                .to_string()
                .starts_with(&format!("user.toml:{}: field `{field}`", line_of(key))));
        }
    }

    /// The fields of one section of [`TYPE_FILE_REFERENCE`]: lines indented by `indent` spaces
    /// that start with a field name, from the line starting with `header` to the next blank line.
    fn reference_fields(header: &str, indent: usize) -> Vec<String> {
        let mut lines = TYPE_FILE_REFERENCE
            .lines()
            .skip_while(|l| !l.starts_with(header))
            .skip(1);
        let mut fields = Vec::new();
        for l in lines.by_ref().take_while(|l| !l.is_empty()) {
            let body = &l[indent.min(l.len())..];
            if l.len() > indent
                && l[..indent].trim().is_empty()
                && body.starts_with(|c: char| c.is_ascii_lowercase())
            {
                fields.push(body.split_whitespace().next().unwrap().to_string());
            }
        }
        fields.sort();
        fields
    }

    /// The fields the parser accepts, from serde's unknown-field error.
    fn accepted_fields(text: &str) -> Vec<String> {
        let e = Catalog::builtin()
            .unwrap()
            .add_toml("x.toml", text)
            .unwrap_err();
        let list = e
            .message
            .split("expected one of")
            .nth(1)
            .unwrap_or_else(|| panic!("{e}"));
        let mut fields: Vec<String> = list
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        fields.sort();
        fields
    }

    #[test]
    fn the_field_reference_lists_every_accepted_field() {
        let ty = accepted_fields(&(good() + "bogus = 1\n"));
        assert_eq!(reference_fields("[[type]]", 2), ty);
        let pci = accepted_fields(&good().replace("revision = 2 }", "revision = 2, bogus = 1 }"));
        assert_eq!(reference_fields("  pci ", 4), pci);
        let family = accepted_fields(
            "[[family]]\nname = \"f\"\ndescription = \"d\"\nvram = \"1G\"\nbogus = 1\n",
        );
        assert_eq!(reference_fields("[[family]]", 2), family);
        let top = accepted_fields("bogus = 1\n");
        assert_eq!(top, ["default_type", "family", "type"]);
        assert!(TYPE_FILE_REFERENCE.contains("\ndefault_type = "));
        // The example loads.
        let example = TYPE_FILE_REFERENCE.split("Example:\n").nth(1).unwrap();
        let mut c = builtin();
        c.add_toml("example.toml", example).unwrap();
        assert_eq!(c.resolve("LAB-32M").unwrap().framebuffer, 32 << 20);
    }

    #[test]
    fn unknown_field_in_inline_table_is_named() {
        let e = error_with(
            "pci",
            "pci = { vendor = 0x1234, device = 0x1111, subsystem_vendor = 0x1234, subsystem_device = 0x2001, class = 0x038000, revision = 2, colour = 1 }",
        );
        assert_eq!((e.field.as_str(), e.line), ("colour", line_of("pci")));
        let e = error_with(
            "pci",
            "pci = { vendor = 0x12345, device = 0x1111, subsystem_vendor = 0x1234, subsystem_device = 0x2001, class = 0x038000, revision = 2 }",
        );
        assert_eq!((e.field.as_str(), e.line), ("vendor", line_of("pci")));
    }

    #[test]
    fn duplicates_and_syntax_errors_are_located() {
        let mut c = builtin();
        let dup = good().replace("name = \"T1\"", "name = \"EMU-64M\"");
        let e = c.add_toml("dup.toml", &dup).unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("name", 2));
        assert!(e.message.contains("duplicate type `EMU-64M@1`"), "{e}");
        assert!(e.message.contains(BUILTIN_SOURCE), "{e}");

        let e = c.add_toml("broken.toml", "[[type]\nname = 1").unwrap_err();
        assert_eq!(e.line, 1, "{e}");

        let missing = good().replace("frl = 30\n", "");
        let e = c.add_toml("missing.toml", &missing).unwrap_err();
        assert_eq!(e.field, "frl", "{e}");
        assert!(e.message.contains("missing field"), "{e}");
    }

    #[test]
    fn sizes_parse() {
        let s = |t: &str| parse_size(&RawSize::Text(t.into()));
        assert_eq!(s("512M"), Ok(512 << 20));
        assert_eq!(s("8G"), Ok(8 << 30));
        assert_eq!(s("4KiB"), Ok(4096));
        assert_eq!(s("100"), Ok(100));
        assert!(s("M").is_err() && s("-1M").is_err() && s("99999999999T").is_err());
        assert_eq!(parse_size(&RawSize::Bytes(7)), Ok(7));
    }

    #[test]
    fn bochs_bar0_is_64bit_only_above_256m() {
        let c = builtin();
        for t in c
            .types()
            .iter()
            .filter(|t| t.personality == Personality::Bochs)
        {
            let bar0 = t.vram_bar().unwrap();
            assert_eq!(
                (bar0.index, bar0.size, bar0.prefetchable),
                (0, t.framebuffer, true)
            );
            assert_eq!(bar0.is_64bit, t.framebuffer > 256 << 20, "{}", t.key());
        }
    }
}
