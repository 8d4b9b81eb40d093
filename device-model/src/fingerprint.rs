//! ABI fingerprints: a stable SHA-256 over every guest-visible property of a type version.
//!
//! The digest covers a canonical text encoding of the record's guest-visible fields (never
//! Rust's `Hash`, whose output may change between releases) and, for personalities this build
//! implements, the bytes the guest actually reads at power-on: the config space image, the EDID
//! (with the nil UUID as serial) and the whole register BAR (bochs), or the offered virtio
//! feature bits, every head's EDID, the common configuration and the device configuration
//! (virtio-gpu). So a change to the type record *or*
//! to the code that renders it changes the fingerprint, and the released list
//! (`abi/released.toml`) turns that into a failing test.
//!
//! Not covered: `max_instances`, `family`, `id`, `deprecated` (management, not guest ABI).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::OnceLock;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::catalog::{Personality, VgpuType};
use crate::device::{Device, DeviceError};
use crate::virtio_gpu::transport::{feature, layout};
use crate::vram::NullVram;

/// Version of the canonical encoding. Bumping it changes every fingerprint.
const ENCODING: &str = "vgpu-emu-abi/1";

/// The fingerprints of released type versions, checked in.
pub const RELEASED: &str = include_str!("../abi/released.toml");

/// A SHA-256 ABI fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The canonical encoding that is hashed (exposed so a changed fingerprint can be diffed).
pub fn canonical_encoding(ty: &VgpuType) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| {
        s.push_str(k);
        s.push('=');
        s.push_str(&v);
        s.push('\n');
    };
    line("encoding", ENCODING.to_string());
    line("name", ty.name.clone());
    line("version", ty.version.to_string());
    line("personality", ty.personality.as_str().to_string());
    let p = &ty.pci;
    line(
        "pci",
        format!(
            "{:04x}:{:04x} sub {:04x}:{:04x} class {:06x} rev {:02x}",
            p.vendor, p.device, p.subsystem_vendor, p.subsystem_device, p.class, p.revision
        ),
    );
    for b in &ty.bars {
        line(
            &format!("bar{}", b.index),
            format!(
                "size {:#x} kind {:?} bits {} prefetch {}",
                b.size,
                b.kind,
                if b.is_64bit { 64 } else { 32 },
                b.prefetchable
            ),
        );
    }
    line("framebuffer", ty.framebuffer.to_string());
    line("num_heads", ty.num_heads.to_string());
    line("max_resolution", ty.max_resolution.to_string());
    line("default_resolution", ty.default_resolution.to_string());
    line("frl", ty.frl.to_string());
    if let Ok(mut dev) = new_device(ty) {
        line("config", hex(dev.config().reset_image()));
        match ty.personality {
            Personality::Bochs => {
                line("edid", hex(dev.edid()));
                line("registers", hex(&dev.register_image()));
            }
            Personality::VirtioGpu => {
                line("features", format!("{:#018x}", feature::OFFERED));
                for head in 0..ty.num_heads {
                    line(
                        &format!("edid{head}"),
                        dev.head_edid(head).map_or("none".to_string(), hex),
                    );
                }
                let image = dev.register_image();
                let page = |at: u64, len: u64| {
                    image
                        .get(at as usize..(at + len) as usize)
                        .map_or(String::new(), hex)
                };
                line("common", page(layout::COMMON, layout::COMMON_LEN));
                line("device_config", page(layout::DEVICE, layout::DEVICE_LEN));
            }
        }
    }
    s
}

/// A power-on device of `ty` with the nil UUID (VRAM that holds nothing, where the
/// personality has VRAM): what the fingerprint, `describe` and `diff` inspect.
pub fn new_device(ty: &VgpuType) -> Result<Device, DeviceError> {
    let vram: Option<Box<dyn crate::vram::Vram>> = match ty.personality {
        Personality::Bochs => Some(Box::new(NullVram(ty.framebuffer))),
        Personality::VirtioGpu => None,
    };
    Device::new(ty, &[0; 16], vram)
}

/// The fingerprint of a type version.
pub fn fingerprint(ty: &VgpuType) -> Fingerprint {
    Fingerprint(Sha256::digest(canonical_encoding(ty).as_bytes()).into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleasedFile {
    released: BTreeMap<String, String>,
}

/// The released list: `name@version` -> `sha256:...`, parsed once. An unreadable list is
/// empty (the test of the list itself catches that).
pub fn released() -> &'static BTreeMap<String, String> {
    static LIST: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    LIST.get_or_init(|| {
        toml::from_str::<ReleasedFile>(RELEASED)
            .map(|f| f.released)
            .unwrap_or_default()
    })
}

/// Whether `ty` is a released built-in version (its fingerprint is held fixed).
pub fn is_released(ty: &VgpuType) -> bool {
    ty.source == crate::catalog::BUILTIN_SOURCE && released().contains_key(&ty.key())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, BUILTIN_SOURCE};

    #[test]
    fn released_list_parses() {
        toml::from_str::<ReleasedFile>(RELEASED).expect("abi/released.toml is valid");
        assert!(!released().is_empty());
    }

    /// The guard of the guest ABI: a released type version must never change. If this fails,
    /// do not update the list: restore the old behaviour and add a new type version instead.
    #[test]
    fn released_fingerprints_hold() {
        let c = Catalog::builtin().unwrap();
        for (key, want) in released().iter() {
            let ty = c.resolve(key).unwrap_or_else(|e| {
                panic!("released type {key} is gone ({e}); deprecate, never delete")
            });
            assert_eq!(ty.key(), *key);
            let got = fingerprint(ty).to_string();
            assert_eq!(
                got,
                *want,
                "the guest ABI of released {key} changed; canonical encoding now:\n{}",
                canonical_encoding(ty)
            );
        }
    }

    /// Every built-in type of a served personality must be released (pinned) before it ships.
    #[test]
    fn every_served_builtin_type_is_pinned() {
        let c = Catalog::builtin().unwrap();
        let list = released();
        for ty in c.types().iter().filter(|t| t.source == BUILTIN_SOURCE) {
            if ty.personality.is_implemented() {
                assert!(
                    list.contains_key(&ty.key()),
                    "{} is served but not in abi/released.toml; add: \"{}\" = \"{}\"",
                    ty.key(),
                    ty.key(),
                    fingerprint(ty)
                );
            }
        }
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let c = Catalog::builtin().unwrap();
        let a = c.resolve("EMU-16M").unwrap().clone();
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        let mut b = a.clone();
        b.frl = 30;
        assert_ne!(
            fingerprint(&a),
            fingerprint(&b),
            "FRL is guest-visible (EDID refresh)"
        );
        let mut b = a.clone();
        b.pci.subsystem_device ^= 1;
        assert_ne!(fingerprint(&a), fingerprint(&b));
        let mut b = a.clone();
        b.max_instances = 1;
        b.deprecated = true;
        assert_eq!(
            fingerprint(&a),
            fingerprint(&b),
            "management fields are not ABI"
        );
        let enc = canonical_encoding(&a);
        assert!(
            enc.contains("\nconfig=") && enc.contains("\nedid=") && enc.contains("\nregisters=")
        );
    }
}
