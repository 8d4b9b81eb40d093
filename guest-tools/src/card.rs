//! DRM cards as the guest tool sees them: /dev/dri/cardN opened read-write, its driver, and its
//! connectors in the kernel's order (for virtio-gpu: connector i drives scanout i, so the order
//! is the head index).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;

use drm::control::{connector, crtc, Device as ControlDevice, Mode, ModeTypeFlags};
use drm::Device;

/// One opened DRM card.
#[derive(Debug)]
pub struct Card {
    file: File,
    /// N of /dev/dri/cardN.
    pub index: u32,
}

impl AsFd for Card {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Device for Card {}
impl ControlDevice for Card {}

/// A connector with what the kernel reports of it.
#[derive(Debug)]
pub struct Connector {
    pub info: connector::Info,
    /// Position in the card's connector list: the head index.
    pub head: u32,
}

impl Connector {
    /// The kernel's name: `Virtual-1` (type and the type's global id).
    pub fn name(&self) -> String {
        format!(
            "{}-{}",
            self.info.interface().as_str(),
            self.info.interface_id()
        )
    }

    pub fn connected(&self) -> bool {
        self.info.state() == connector::State::Connected
    }

    /// The mode the kernel marks preferred (from the EDID or the device's display info).
    pub fn preferred(&self) -> Option<Mode> {
        self.info
            .modes()
            .iter()
            .find(|m| m.mode_type().contains(ModeTypeFlags::PREFERRED))
            .copied()
    }

    /// The mode with the most pixels (the first of equals, in the kernel's order).
    pub fn largest(&self) -> Option<Mode> {
        let area = |m: &Mode| u64::from(m.size().0) * u64::from(m.size().1);
        self.info
            .modes()
            .iter()
            .fold(None, |best: Option<Mode>, m| match best {
                Some(b) if area(&b) >= area(m) => Some(b),
                _ => Some(*m),
            })
    }
}

/// `WxH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub width: u16,
    pub height: u16,
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Size, String> {
        let (w, h) = s
            .split_once('x')
            .ok_or_else(|| format!("{s:?} is not WxH"))?;
        let parse = |v: &str| {
            v.parse::<u16>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{s:?} is not WxH"))
        };
        Ok(Size {
            width: parse(w)?,
            height: parse(h)?,
        })
    }
}

pub fn size_of(mode: &Mode) -> Size {
    let (width, height) = mode.size();
    Size { width, height }
}

/// `dddd:bb:dd.f`.
fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| [4, 7, 10].contains(&i) || c.is_ascii_hexdigit())
}

/// Every /dev/dri/cardN, by N.
pub fn card_paths() -> io::Result<Vec<(u32, PathBuf)>> {
    let mut cards: Vec<(u32, PathBuf)> = std::fs::read_dir("/dev/dri")?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix("card")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    cards.sort();
    Ok(cards)
}

impl Card {
    pub fn open(index: u32) -> io::Result<Card> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/dev/dri/card{index}"))?;
        Ok(Card { file, index })
    }

    /// The kernel driver's name (`virtio_gpu`, `bochs-drm`).
    pub fn driver(&self) -> io::Result<String> {
        Ok(self.get_driver()?.name().to_string_lossy().into_owned())
    }

    /// The PCI address of the card's device (`0000:00:01.0`; for virtio-gpu, of the
    /// virtio-pci device under it), from sysfs; `unknown` when there is none.
    pub fn pci(&self) -> String {
        std::fs::canonicalize(format!("/sys/class/drm/card{}/device", self.index))
            .ok()
            .and_then(|path| {
                path.iter()
                    .rev()
                    .filter_map(|c| c.to_str())
                    .find(|c| is_pci_address(c))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "unknown".into())
    }

    /// The card's connectors, probed, in the kernel's order.
    pub fn connectors(&self) -> io::Result<Vec<Connector>> {
        let resources = self.resource_handles()?;
        resources
            .connectors()
            .iter()
            .enumerate()
            .map(|(i, &handle)| {
                Ok(Connector {
                    info: self.get_connector(handle, true)?,
                    head: i as u32,
                })
            })
            .collect()
    }

    /// A CRTC for each connector, from its encoders' possible CRTCs, none used twice.
    pub fn assign_crtcs(&self, connectors: &[Connector]) -> io::Result<Vec<crtc::Handle>> {
        let resources = self.resource_handles()?;
        let mut used: Vec<crtc::Handle> = Vec::new();
        for c in connectors {
            let mut found = None;
            'encoders: for &e in c.info.encoders() {
                let encoder = self.get_encoder(e)?;
                for crtc in resources.filter_crtcs(encoder.possible_crtcs()) {
                    if !used.contains(&crtc) {
                        found = Some(crtc);
                        break 'encoders;
                    }
                }
            }
            let crtc = found.ok_or_else(|| {
                io::Error::other(format!("no free CRTC for connector {}", c.name()))
            })?;
            used.push(crtc);
        }
        Ok(used)
    }
}

/// A mode of exactly `size` at 60 Hz for a connector that lists none (timings with short
/// blanking: virtual displays ignore them, the kernel only checks that they are ordered).
pub fn synthesized_mode(size: Size) -> Mode {
    let (w, h) = (size.width, size.height);
    let (htotal, vtotal) = (w.saturating_add(160), h.saturating_add(30));
    let mut name = [0 as std::ffi::c_char; 32];
    for (dst, src) in name.iter_mut().zip(size.to_string().bytes()) {
        *dst = src as std::ffi::c_char;
    }
    Mode::from(drm_ffi::drm_mode_modeinfo {
        clock: (u32::from(htotal) * u32::from(vtotal) * 60).div_ceil(1000),
        hdisplay: w,
        hsync_start: w.saturating_add(48),
        hsync_end: w.saturating_add(80),
        htotal,
        hskew: 0,
        vdisplay: h,
        vsync_start: h.saturating_add(3),
        vsync_end: h.saturating_add(9),
        vtotal,
        vscan: 0,
        vrefresh: 60,
        flags: drm_ffi::DRM_MODE_FLAG_PHSYNC | drm_ffi::DRM_MODE_FLAG_NVSYNC,
        type_: drm_ffi::DRM_MODE_TYPE_USERDEF,
        name,
    })
}

/// Which mode to light a connector with: `--mode WxH` when given (the connector's own mode of
/// that size, else one synthesized), else its preferred mode, else its first (the kernel lists
/// them largest first after the preferred one).
pub fn choose_mode(c: &Connector, wanted: Option<Size>) -> Option<Mode> {
    match wanted {
        Some(size) => Some(
            c.info
                .modes()
                .iter()
                .find(|m| size_of(m) == size)
                .copied()
                .unwrap_or_else(|| synthesized_mode(size)),
        ),
        None => c.preferred().or_else(|| c.info.modes().first().copied()),
    }
}
