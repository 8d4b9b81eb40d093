//! A vgpu-emu instance in a libvirt domain. No libvirt release knows vfio-user, so the device
//! goes in through libvirt's QEMU passthrough (`<qemu:commandline>`), and the domain gets what
//! that device needs from libvirt: guest RAM shared as a memfd, and (on q35) a PCIe root port
//! for the device to sit on, named with a user alias so the `-device` option can say `bus`.
//!
//! [`fragment`] is what to merge by hand; [`merge`] merges it into a domain's XML and refuses
//! what would conflict (guest RAM that is not a shared memfd, an instance merged twice, a machine
//! without PCI).

use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::xml::{self, Element, Node};

/// The namespace of libvirt's QEMU passthrough elements.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Largest domain XML read.
pub const MAX_DOMAIN_XML: u64 = 1 << 20;

/// The instance to put in a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VgpuDevice {
    /// Instance UUID (names the device and its root port).
    pub uuid: Uuid,
    /// `name@version`, for the comment.
    pub type_key: String,
    /// The instance's vfio-user socket, absolute.
    pub socket: PathBuf,
}

impl VgpuDevice {
    /// A device for the instance on `socket`.
    pub fn new(uuid: Uuid, type_key: &str, socket: &Path) -> VgpuDevice {
        VgpuDevice {
            uuid,
            type_key: type_key.to_string(),
            socket: socket.to_path_buf(),
        }
    }

    fn short(&self) -> String {
        self.uuid.simple().to_string()[..8].to_string()
    }

    /// QEMU's id of the device: `vgpu-emu-` and the UUID's first 8 hex digits.
    pub fn device_id(&self) -> String {
        format!("vgpu-emu-{}", self.short())
    }

    /// The user alias (hence QEMU id) of its PCIe root port.
    pub fn port_alias(&self) -> String {
        format!("ua-vgpu-emu-{}", self.short())
    }

    /// The JSON `-device` argument (QEMU 11 takes vfio-user-pci only in this form).
    pub fn device_json(&self, bus: &str) -> String {
        serde_json::json!({
            "driver": "vfio-user-pci",
            "id": self.device_id(),
            "bus": bus,
            "socket": { "type": "unix", "path": self.socket.display().to_string() },
        })
        .to_string()
    }
}

/// Why an instance cannot be merged into a domain.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The XML does not parse.
    #[error("the domain XML cannot be read: {0}")]
    Xml(#[from] xml::XmlError),
    /// The root is not `<domain>`.
    #[error("the root element is <{0}>, not <domain>")]
    NotADomain(String),
    /// Guest memory that vgpu-emu cannot share.
    #[error(
        "the domain's memory backing conflicts: {0}. vgpu-emu needs guest RAM as a shared memfd \
         (<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>); change \
         or remove that setting, then merge again"
    )]
    MemoryBacking(String),
    /// The instance is in the domain already.
    #[error("the domain already has this instance (device {0}); nothing to merge")]
    AlreadyMerged(String),
    /// A machine type the device cannot be plugged into.
    #[error("machine type {0:?} is not supported: use q35 (or pc/i440fx)")]
    Machine(String),
    /// The `qemu` prefix is bound to another namespace.
    #[error("the prefix qemu is bound to {0}, not to libvirt's QEMU namespace {QEMU_NS}")]
    Prefix(String),
}

/// Where the device plugs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Machine {
    /// PCIe: a root port of our own.
    Q35,
    /// Conventional PCI: the root bus.
    I440fx,
}

fn machine_of(domain: &Element) -> Result<Machine, MergeError> {
    let m = domain
        .child("os")
        .and_then(|os| os.child("type"))
        .and_then(|t| t.attr("machine"))
        .unwrap_or("");
    if m.contains("q35") {
        Ok(Machine::Q35)
    } else if m.is_empty() || m == "pc" || m.starts_with("pc-i440fx") || m.starts_with("pc-") {
        // No machine named: libvirt takes QEMU's default for x86_64, which is pc (i440fx).
        Ok(Machine::I440fx)
    } else {
        Err(MergeError::Machine(m.to_string()))
    }
}

/// The XML to merge into a q35 domain by hand, with a comment saying what each part is for.
pub fn fragment(dev: &VgpuDevice) -> String {
    let json = dev.device_json(&dev.port_alias());
    format!(
        "<!-- vgpu-emu {ty} instance {uuid} on {socket}.
     Merge these elements into the libvirt domain (`vgpu-emu libvirt-xml --domain FILE` does it
     and checks for conflicts). On pc (i440fx) machines leave out the controller and use
     \"bus\":\"pci.0\". -->
<domain type='kvm' xmlns:qemu='{ns}'>
  <!-- Guest RAM shared with vgpu-emu as a sealed memfd (virtio-gpu types read and write it). -->
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <devices>
    <!-- A PCIe root port for the vGPU; its user alias is QEMU's id of the port. Its index
         must be one no other <controller type='pci'> of the domain has (and not 0). -->
    <controller type='pci' index='1' model='pcie-root-port'>
      <alias name='{alias}'/>
    </controller>
  </devices>
  <!-- libvirt has no vfio-user device: QEMU is given it directly. -->
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='{json}'/>
  </qemu:commandline>
</domain>
",
        ty = dev.type_key,
        uuid = dev.uuid,
        socket = dev.socket.display(),
        ns = QEMU_NS,
        alias = dev.port_alias(),
        json = json.replace('\'', "&apos;"),
    )
}

/// `domain_xml` with `dev` merged in: memfd shared memory (added, or kept when it is already
/// so), a PCIe root port (q35), and the `-device` arguments in `<qemu:commandline>` (its
/// namespace declared if it was not). Everything else is kept as it was.
pub fn merge(domain_xml: &str, dev: &VgpuDevice) -> Result<String, MergeError> {
    let mut doc = xml::parse(domain_xml)?;
    let domain = &mut doc.root;
    if domain.name != "domain" {
        return Err(MergeError::NotADomain(domain.name.clone()));
    }
    let machine = machine_of(domain)?;
    let prefix = qemu_prefix(domain)?;
    let commandline = format!("{prefix}:commandline");
    let arg = format!("{prefix}:arg");

    // Merged already? (Our device id in an argument, or our root port.)
    let id = dev.device_id();
    if has_argument(domain, &commandline, dev) || has_port(domain, dev) {
        return Err(MergeError::AlreadyMerged(id));
    }

    check_numa(domain)?;
    memory_backing(domain)?;

    // The root port (q35), then the device on it.
    let bus = match machine {
        Machine::Q35 => {
            // libvirt gives a PCI controller without an index index 0, which q35 reserves for
            // its pcie-root: take the next free one (never 0).
            let index = domain
                .child("devices")
                .and_then(|d| {
                    d.elements()
                        .filter(|c| c.name == "controller" && c.attr("type") == Some("pci"))
                        .filter_map(|c| c.attr("index")?.parse::<u32>().ok())
                        .max()
                })
                .map_or(1, |m| m + 1)
                .to_string();
            let mut port = Element::new(
                "controller",
                &[
                    ("type", "pci"),
                    ("index", &index),
                    ("model", "pcie-root-port"),
                ],
            );
            port.children.push(Node::Element(Element::new(
                "alias",
                &[("name", &dev.port_alias())],
            )));
            devices(domain).append(port, "  ");
            dev.port_alias()
        }
        Machine::I440fx => "pci.0".to_string(),
    };
    if domain.child(&commandline).is_none() {
        domain.append(Element::new(&commandline, &[]), "");
    }
    let cl = domain
        .child_mut(&commandline)
        .expect("present: added above when missing");
    cl.append(Element::new(&arg, &[("value", "-device")]), "  ");
    cl.append(
        Element::new(&arg, &[("value", &dev.device_json(&bus))]),
        "  ",
    );
    Ok(doc.write())
}

/// Whether `domain` has `dev`'s `-device` argument in its `<PREFIX:commandline>`.
fn has_argument(domain: &Element, commandline: &str, dev: &VgpuDevice) -> bool {
    let id = dev.device_id();
    domain.child(commandline).is_some_and(|c| {
        c.elements()
            .any(|a| a.attr("value").is_some_and(|v| v.contains(&id)))
    })
}

/// Whether `domain` has a device with `dev`'s root port alias.
fn has_port(domain: &Element, dev: &VgpuDevice) -> bool {
    domain.child("devices").is_some_and(|d| {
        d.elements()
            .filter_map(|c| c.child("alias"))
            .any(|a| a.attr("name") == Some(dev.port_alias().as_str()))
    })
}

/// Whether `domain_xml` has everything [`merge`] adds for `dev`: its `-device` argument, its
/// root port (q35) and guest RAM as a shared memfd. [`merge`] refuses such a domain
/// ([`MergeError::AlreadyMerged`]) and also one that has only some of it; this tells the two
/// apart, for a caller that may be handed the same domain twice.
pub fn fully_merged(domain_xml: &str, dev: &VgpuDevice) -> Result<bool, MergeError> {
    let doc = xml::parse(domain_xml)?;
    let domain = &doc.root;
    if domain.name != "domain" {
        return Err(MergeError::NotADomain(domain.name.clone()));
    }
    let machine = machine_of(domain)?;
    let Some((prefix, _)) = domain
        .attrs
        .iter()
        .find(|(k, v)| k.starts_with("xmlns:") && v == QEMU_NS)
    else {
        return Ok(false);
    };
    let commandline = format!("{}:commandline", &prefix["xmlns:".len()..]);
    let memfd = domain.child("memoryBacking").is_some_and(|mb| {
        mb.child("source").and_then(|s| s.attr("type")) == Some("memfd")
            && mb.child("access").and_then(|a| a.attr("mode")) == Some("shared")
    });
    Ok(memfd
        && has_argument(domain, &commandline, dev)
        && (machine == Machine::I440fx || has_port(domain, dev)))
}

/// The prefix bound to libvirt's QEMU namespace on `domain`, binding `qemu` when none is.
fn qemu_prefix(domain: &mut Element) -> Result<String, MergeError> {
    // A prefix that is a valid name without a colon (an NCName) can be used as it is.
    if let Some((k, _)) = domain.attrs.iter().find(|(k, v)| {
        v == QEMU_NS
            && k.strip_prefix("xmlns:")
                .is_some_and(|p| xml::is_name(p) && !p.contains(':'))
    }) {
        return Ok(k["xmlns:".len()..].to_string());
    }
    if let Some(other) = domain.attr("xmlns:qemu") {
        return Err(MergeError::Prefix(other.to_string()));
    }
    domain.set_attr("xmlns:qemu", QEMU_NS);
    Ok("qemu".to_string())
}

/// Refuses NUMA cells whose memory is private.
fn check_numa(domain: &Element) -> Result<(), MergeError> {
    let cells = domain
        .child("cpu")
        .and_then(|c| c.child("numa"))
        .map(|n| {
            n.elements()
                .filter(|e| e.name == "cell")
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for c in cells {
        if c.attr("memAccess") == Some("private") {
            return Err(MergeError::MemoryBacking(format!(
                "NUMA cell {} has memAccess='private'",
                c.attr("id").unwrap_or("?")
            )));
        }
    }
    Ok(())
}

/// Makes `<memoryBacking>` a shared memfd, refusing another source or private access.
fn memory_backing(domain: &mut Element) -> Result<(), MergeError> {
    if let Some(mb) = domain.child("memoryBacking") {
        if let Some(t) = mb.child("source").and_then(|s| s.attr("type")) {
            if t != "memfd" {
                return Err(MergeError::MemoryBacking(format!(
                    "<source type='{t}'/> (not memfd)"
                )));
            }
        }
        if let Some(m) = mb.child("access").and_then(|a| a.attr("mode")) {
            if m != "shared" {
                return Err(MergeError::MemoryBacking(format!(
                    "<access mode='{m}'/> (not shared)"
                )));
            }
        }
    } else {
        domain.append(Element::new("memoryBacking", &[]), "");
    }
    let mb = domain
        .child_mut("memoryBacking")
        .expect("present: added above when missing");
    if mb.child("source").is_none() {
        mb.append(Element::new("source", &[("type", "memfd")]), "  ");
    }
    if mb.child("access").is_none() {
        mb.append(Element::new("access", &[("mode", "shared")]), "  ");
    }
    Ok(())
}

/// The domain's `<devices>`, added when missing.
fn devices(domain: &mut Element) -> &mut Element {
    if domain.child("devices").is_none() {
        domain.append(Element::new("devices", &[]), "");
    }
    domain
        .child_mut("devices")
        .expect("present: added above when missing")
}

/// Fuzz entry point (the `domain_xml` target and its corpus replay): `data` as a domain (lossy
/// UTF-8, as the hook and `libvirt-xml` would refuse other bytes first) merged with an instance;
/// a merged domain must parse again, hold the device once, and refuse a second merge.
pub fn fuzz_merge(data: &[u8]) {
    let xml = String::from_utf8_lossy(data);
    let dev = VgpuDevice::new(
        Uuid::from_u128(0x1234),
        "EMU-64M@1",
        Path::new("/run/x.sock"),
    );
    let Ok(out) = merge(&xml, &dev) else {
        return;
    };
    let doc = xml::parse(&out).expect("a merged domain parses again");
    let id = format!("\"id\":\"{}\"", dev.device_id());
    assert_eq!(
        out.matches(id.as_str()).count(),
        1,
        "the device is added once"
    );
    assert!(doc.root.name == "domain");
    assert!(
        matches!(merge(&out, &dev), Err(MergeError::AlreadyMerged(_))),
        "a second merge is refused"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of `<NAME:arg>` under `<NAME:commandline>` of `d`.
    fn args<'a>(d: &'a Element, commandline: &str) -> Vec<&'a str> {
        d.child(commandline)
            .unwrap()
            .elements()
            .map(|a| a.attr("value").unwrap())
            .collect()
    }

    fn dev() -> VgpuDevice {
        VgpuDevice::new(
            Uuid::parse_str("74351e0c-e65b-4eae-aa34-df30b96c4889").unwrap(),
            "M60-2Q@1",
            Path::new("/run/vgpu-emu/run/74351e0c-e65b-4eae-aa34-df30b96c4889.sock"),
        )
    }

    const Q35: &str = "<domain type='kvm'>
  <name>vm</name>
  <memory unit='MiB'>512</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-9.2'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
  </devices>
</domain>
";

    #[test]
    fn a_q35_domain_gets_shared_memfd_memory_a_root_port_and_the_device_on_it() {
        let out = merge(Q35, &dev()).unwrap();
        let d = xml::parse(&out).unwrap().root;
        assert_eq!(d.attr("xmlns:qemu"), Some(QEMU_NS));
        let mb = d.child("memoryBacking").unwrap();
        assert_eq!(mb.child("source").unwrap().attr("type"), Some("memfd"));
        assert_eq!(mb.child("access").unwrap().attr("mode"), Some("shared"));
        let port = d
            .child("devices")
            .unwrap()
            .elements()
            .find(|e| e.name == "controller")
            .unwrap();
        assert_eq!(port.attr("model"), Some("pcie-root-port"));
        assert_eq!(
            port.attr("index"),
            Some("1"),
            "never 0: q35's pcie-root has it"
        );
        assert_eq!(
            port.child("alias").unwrap().attr("name"),
            Some("ua-vgpu-emu-74351e0c")
        );
        let args = args(&d, "qemu:commandline");
        assert_eq!(args[0], "-device");
        let json: serde_json::Value = serde_json::from_str(args[1]).unwrap();
        assert_eq!(json["driver"], "vfio-user-pci");
        assert_eq!(json["bus"], "ua-vgpu-emu-74351e0c");
        assert_eq!(json["id"], "vgpu-emu-74351e0c");
        assert_eq!(
            json["socket"]["path"],
            "/run/vgpu-emu/run/74351e0c-e65b-4eae-aa34-df30b96c4889.sock"
        );
        // What was there is kept as it was.
        assert!(out.contains("  <name>vm</name>\n  <memory unit='MiB'>512</memory>\n"));
        assert!(out.contains("<emulator>/usr/bin/qemu-system-x86_64</emulator>"));
        // Merging twice is refused, and the merged domain is told apart from one with only
        // some of it.
        assert!(matches!(
            merge(&out, &dev()),
            Err(MergeError::AlreadyMerged(_))
        ));
        assert!(fully_merged(&out, &dev()).unwrap());
        assert!(!fully_merged(Q35, &dev()).unwrap());
        let no_port = out.replace("<alias name='ua-vgpu-emu-74351e0c'/>", "");
        assert_ne!(no_port, out);
        assert!(!fully_merged(&no_port, &dev()).unwrap());
        assert!(matches!(
            merge(&no_port, &dev()),
            Err(MergeError::AlreadyMerged(_))
        ));
        let private = out.replace("mode='shared'", "mode='private'");
        assert!(!fully_merged(&private, &dev()).unwrap());
    }

    #[test]
    fn the_root_port_takes_the_next_free_pci_controller_index() {
        let xml = Q35.replace(
            "<emulator>",
            "<controller type='pci' index='0' model='pcie-root'/>\n    \
             <controller type='pci' index='3' model='pcie-root-port'/>\n    \
             <controller type='usb' index='7'/>\n    <emulator>",
        );
        let out = merge(&xml, &dev()).unwrap();
        let d = xml::parse(&out).unwrap().root;
        let ours = d
            .child("devices")
            .unwrap()
            .elements()
            .find(|e| e.child("alias").is_some())
            .unwrap();
        assert_eq!(ours.attr("index"), Some("4"));
    }

    #[test]
    fn existing_memfd_backing_and_commandline_are_reused() {
        let xml = "<domain type='kvm' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'>
  <memoryBacking><hugepages/><source type='memfd'/></memoryBacking>
  <os><type machine='q35'>hvm</type></os>
  <q:commandline><q:arg value='-trace'/><q:arg value='vfio*'/></q:commandline>
</domain>";
        let out = merge(xml, &dev()).unwrap();
        let d = xml::parse(&out).unwrap().root;
        assert_eq!(d.attr("xmlns:qemu"), None, "the existing prefix is used");
        let mb = d.child("memoryBacking").unwrap();
        assert!(mb.child("hugepages").is_some());
        assert_eq!(mb.elements().filter(|e| e.name == "source").count(), 1);
        assert_eq!(mb.child("access").unwrap().attr("mode"), Some("shared"));
        let args = args(&d, "q:commandline");
        assert_eq!(args[..3], ["-trace", "vfio*", "-device"]);
        assert_eq!(
            d.elements().filter(|e| e.name == "q:commandline").count(),
            1
        );
    }

    #[test]
    fn conflicting_memory_is_refused_with_the_reason() {
        for (xml, what) in [
            (
                "<domain><memoryBacking><source type='file'/></memoryBacking></domain>",
                "source type='file'",
            ),
            (
                "<domain><memoryBacking><access mode='private'/></memoryBacking></domain>",
                "access mode='private'",
            ),
            (
                "<domain><cpu><numa><cell id='0' memory='1' memAccess='private'/></numa></cpu></domain>",
                "NUMA cell 0",
            ),
        ] {
            let e = merge(xml, &dev()).unwrap_err();
            assert!(matches!(e, MergeError::MemoryBacking(_)), "{xml}");
            let msg = e.to_string();
            assert!(msg.contains(what) && msg.contains("memfd"), "{msg}");
        }
    }

    #[test]
    fn i440fx_puts_the_device_on_the_root_bus_and_other_machines_are_refused() {
        let out = merge(
            "<domain><os><type machine='pc-i440fx-9.2'>hvm</type></os></domain>",
            &dev(),
        )
        .unwrap();
        assert!(
            out.contains("&quot;bus&quot;:&quot;pci.0&quot;") || out.contains("\"bus\":\"pci.0\"")
        );
        assert!(!out.contains("pcie-root-port"));
        assert!(matches!(
            merge(
                "<domain><os><type machine='virt'>hvm</type></os></domain>",
                &dev()
            ),
            Err(MergeError::Machine(_))
        ));
        assert!(matches!(
            merge("<network/>", &dev()),
            Err(MergeError::NotADomain(_))
        ));
        assert!(matches!(
            merge("<domain xmlns:qemu='urn:other'/>", &dev()),
            Err(MergeError::Prefix(_))
        ));
        assert!(matches!(merge("<domain>", &dev()), Err(MergeError::Xml(_))));
    }

    #[test]
    fn the_fragment_is_well_formed_and_names_the_same_device() {
        let f = fragment(&dev());
        let d = xml::parse(&f).unwrap().root;
        let args = args(&d, "qemu:commandline");
        assert_eq!(args[1], dev().device_json(&dev().port_alias()));
    }
}
