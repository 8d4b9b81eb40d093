//! What the hook does with a domain, apart from gRPC: which vfio-user sockets go in (and where
//! that was said), and the domain with them merged as `vgpu-emu libvirt-xml` merges one.
//!
//! The sockets come from the first of these that names any:
//!
//! 1. `--vgpu-socket PATH` (repeatable, or comma-separated), fixed when the hook starts;
//! 2. `VGPU_EMU_SOCKET` (comma-separated) in the hook's environment, fixed when it starts,
//!    with `VGPU_EMU_UUID` and `VGPU_EMU_TYPE` (comma-separated, one per socket, in order)
//!    naming the instances;
//! 3. the annotation `vgpu-emu.io/socket` (comma-separated) on the VMI of each call.
//!
//! A path is the socket as the compute container (its QEMU) sees it: absolute, at most 107
//! bytes (a Unix socket address), no control characters, at most [`MAX_SOCKETS`] of them.
//! Without a UUID, a socket named `UUID.sock` (as the daemon names them) gives its UUID; any
//! other path a name-based (v5) UUID of the path, so that the same path always makes the same
//! device and root port names.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use uuid::Uuid;

use crate::integrate::libvirt::{self, MergeError, VgpuDevice, MAX_DOMAIN_XML};

/// The hook's socket when `--socket` is not given: in the directory KubeVirt shares between a
/// hook sidecar and virt-launcher.
pub const DEFAULT_HOOK_SOCKET: &str = "/var/run/kubevirt-hooks/vgpu-emu.sock";
/// The VMI annotation naming the sockets, when neither the flag nor the environment does.
pub const SOCKET_ANNOTATION: &str = "vgpu-emu.io/socket";
/// The environment variable naming the sockets (what the device plugin sets).
pub const ENV_SOCKET: &str = "VGPU_EMU_SOCKET";
/// The environment variable naming the instances' UUIDs, one per socket.
pub const ENV_UUID: &str = "VGPU_EMU_UUID";
/// The environment variable naming the instances' types, one per socket.
pub const ENV_TYPE: &str = "VGPU_EMU_TYPE";
/// Most vGPUs one domain gets.
pub const MAX_SOCKETS: usize = 16;
/// Longest socket path (`sun_path` holds 108 bytes with its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Largest VMI JSON read (Kubernetes objects are at most about 1.5 MiB).
pub const MAX_VMI_JSON: usize = 2 << 20;
/// The type named in a device's comment when none is known.
const UNKNOWN_TYPE: &str = "unknown";

/// Where the sockets were named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `--vgpu-socket`.
    Flag,
    /// `VGPU_EMU_SOCKET`.
    Env,
    /// The VMI's `vgpu-emu.io/socket` annotation.
    Annotation,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Flag => "--vgpu-socket",
            Source::Env => "$VGPU_EMU_SOCKET",
            Source::Annotation => "the VMI annotation vgpu-emu.io/socket",
        })
    }
}

/// Why the sockets named are not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A path that cannot be a socket QEMU connects to.
    #[error("{source_}: {path:?} {why}")]
    BadPath {
        /// Where it was named.
        source_: Source,
        /// The path as given.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// More than [`MAX_SOCKETS`].
    #[error("{0} names more than {MAX_SOCKETS} sockets")]
    TooMany(Source),
    /// The same socket twice, or two sockets whose device names collide.
    #[error("{source_}: {what} is named twice")]
    Duplicate {
        /// Where.
        source_: Source,
        /// The path or device name.
        what: String,
    },
    /// `VGPU_EMU_UUID` or `VGPU_EMU_TYPE` does not name one value per socket.
    #[error("${var} has {got} values for {want} sockets in $VGPU_EMU_SOCKET")]
    Count {
        /// The variable.
        var: &'static str,
        /// Values in it.
        got: usize,
        /// Sockets.
        want: usize,
    },
    /// A UUID that does not parse.
    #[error("$VGPU_EMU_UUID: {0:?} is not a UUID")]
    BadUuid(String),
    /// An environment variable that is not UTF-8.
    #[error("${0} is not UTF-8")]
    NotUtf8(&'static str),
}

/// Why a domain was not changed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// A field larger than its limit.
    #[error("the {what} is {len} bytes, more than the {limit} accepted")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The domain XML is not UTF-8.
    #[error("the domain XML is not UTF-8")]
    NotUtf8,
    /// No socket named anywhere.
    #[error(
        "no vfio-user socket is configured: give the hook --vgpu-socket PATH (the socket as the \
         compute container sees it), set ${ENV_SOCKET}, or annotate the VMI with \
         {SOCKET_ANNOTATION}"
    )]
    NoSocket,
    /// The VMI is needed (for its annotation) and is not a VMI's JSON.
    #[error("the VMI is not JSON of an object: {0}")]
    Vmi(String),
    /// The annotation names sockets that cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The domain XML is not a domain.
    #[error(transparent)]
    NotADomain(MergeError),
    /// The domain cannot take a device.
    #[error("cannot add {device} (socket {}): {source}", socket.display())]
    Merge {
        /// The device's QEMU id.
        device: String,
        /// Its socket.
        socket: PathBuf,
        /// Why.
        source: MergeError,
    },
    /// The domain has part of what a device needs, not all of it.
    #[error(
        "the domain has part of {0} (its -device argument or its root port) but not all of \
         what it needs; remove it or add the rest"
    )]
    PartlyMerged(String),
}

impl HookError {
    /// Whether the caller sent something malformed (rather than a domain or setup this hook
    /// cannot serve).
    pub fn is_bad_input(&self) -> bool {
        match self {
            HookError::TooLarge { .. }
            | HookError::NotUtf8
            | HookError::Vmi(_)
            | HookError::Config(_)
            | HookError::NotADomain(_) => true,
            HookError::Merge { .. } | HookError::NoSocket | HookError::PartlyMerged(_) => false,
        }
    }
}

/// The sockets fixed when the hook starts, if any (else each VMI's annotation names them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HookConfig {
    /// The devices and where they were named.
    pub fixed: Option<(Source, Vec<VgpuDevice>)>,
}

impl HookConfig {
    /// The configuration from `--vgpu-socket` values (`flag`) and the environment (`env`
    /// returns a variable's value): the flag wins over `VGPU_EMU_SOCKET`; with neither, each
    /// call's VMI annotation is read.
    pub fn new(
        flag: &[PathBuf],
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<HookConfig, ConfigError> {
        let var = |name: &'static str| -> Result<Option<String>, ConfigError> {
            match env(name) {
                None => Ok(None),
                Some(v) => match v.into_string() {
                    Ok(s) if s.trim().is_empty() => Ok(None),
                    Ok(s) => Ok(Some(s)),
                    Err(_) => Err(ConfigError::NotUtf8(name)),
                },
            }
        };
        if !flag.is_empty() {
            let list = flag
                .iter()
                .map(|p| p.to_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or(ConfigError::BadPath {
                    source_: Source::Flag,
                    path: flag
                        .iter()
                        .find(|p| p.to_str().is_none())
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    why: "is not UTF-8",
                })?;
            let devices = devices(Source::Flag, &list, None, None)?;
            return Ok(HookConfig {
                fixed: Some((Source::Flag, devices)),
            });
        }
        let Some(sockets) = var(ENV_SOCKET)? else {
            return Ok(HookConfig { fixed: None });
        };
        let sockets = split(&sockets);
        let uuids = var(ENV_UUID)?.map(|v| split(&v));
        let types = var(ENV_TYPE)?.map(|v| split(&v));
        let devices = devices(Source::Env, &sockets, uuids.as_deref(), types.as_deref())?;
        Ok(HookConfig {
            fixed: Some((Source::Env, devices)),
        })
    }
}

/// A comma-separated list, each item trimmed.
fn split(s: &str) -> Vec<String> {
    s.split(',').map(|p| p.trim().to_string()).collect()
}

/// The devices for `sockets`, named by `uuids` and `types` when given (one per socket).
fn devices(
    source: Source,
    sockets: &[String],
    uuids: Option<&[String]>,
    types: Option<&[String]>,
) -> Result<Vec<VgpuDevice>, ConfigError> {
    if sockets.len() > MAX_SOCKETS {
        return Err(ConfigError::TooMany(source));
    }
    for (var, list) in [(ENV_UUID, uuids), (ENV_TYPE, types)] {
        if let Some(list) = list {
            if list.len() != sockets.len() {
                return Err(ConfigError::Count {
                    var,
                    got: list.len(),
                    want: sockets.len(),
                });
            }
        }
    }
    let mut out: Vec<VgpuDevice> = Vec::with_capacity(sockets.len());
    for (i, path) in sockets.iter().enumerate() {
        let socket = check_path(source, path)?;
        let uuid = match uuids {
            Some(u) => Uuid::parse_str(&u[i]).map_err(|_| ConfigError::BadUuid(u[i].clone()))?,
            None => uuid_of(&socket),
        };
        let ty = types.map_or(UNKNOWN_TYPE, |t| t[i].as_str());
        let dev = VgpuDevice::new(uuid, ty, &socket);
        if let Some(other) = out.iter().find(|d| d.socket == dev.socket) {
            return Err(ConfigError::Duplicate {
                source_: source,
                what: other.socket.display().to_string(),
            });
        }
        if out.iter().any(|d| d.device_id() == dev.device_id()) {
            return Err(ConfigError::Duplicate {
                source_: source,
                what: format!("device {}", dev.device_id()),
            });
        }
        out.push(dev);
    }
    Ok(out)
}

/// `path` if QEMU can be pointed at it.
fn check_path(source: Source, path: &str) -> Result<PathBuf, ConfigError> {
    let bad = |why| ConfigError::BadPath {
        source_: source,
        path: path.chars().take(MAX_SOCKET_PATH + 1).collect(),
        why,
    };
    if path.is_empty() {
        return Err(bad("is empty"));
    }
    if !path.starts_with('/') {
        return Err(bad("is not absolute"));
    }
    if path.len() > MAX_SOCKET_PATH {
        return Err(bad("is longer than a Unix socket address (107 bytes)"));
    }
    if path.chars().any(char::is_control) {
        return Err(bad("has a control character"));
    }
    if path.ends_with('/') {
        return Err(bad("names a directory"));
    }
    Ok(PathBuf::from(path))
}

/// The UUID a socket path names: `.../UUID.sock` gives UUID, any other path a v5 UUID of it.
pub fn uuid_of(socket: &Path) -> Uuid {
    socket
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_else(|| {
            Uuid::new_v5(
                &Uuid::NAMESPACE_URL,
                format!("vgpu-emu-socket:{}", socket.display()).as_bytes(),
            )
        })
}

/// The parts of a VMI this hook reads.
#[derive(Debug, Default, Deserialize)]
struct Vmi {
    #[serde(default)]
    metadata: Option<VmiMetadata>,
}

#[derive(Debug, Default, Deserialize)]
struct VmiMetadata {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// A changed (or unchanged) domain and what was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The domain XML to define.
    pub domain_xml: String,
    /// `NAMESPACE/NAME` of the VMI, or `?` when the call did not say.
    pub vmi: String,
    /// Where the sockets were named.
    pub source: Source,
    /// Devices added: QEMU id and socket.
    pub added: Vec<(String, PathBuf)>,
    /// Devices the domain had already, whole (left as they were).
    pub present: Vec<String>,
    /// Sockets named by the annotation that a fixed configuration overrode.
    pub ignored_annotation: Option<String>,
}

/// `OnDefineDomain`: `domain_xml` with the configured devices merged in, or why not. The
/// domain is returned whole or not at all.
pub fn on_define_domain(
    config: &HookConfig,
    domain_xml: &[u8],
    vmi_json: &[u8],
) -> Result<Outcome, HookError> {
    let limit = MAX_DOMAIN_XML as usize;
    if domain_xml.len() > limit {
        return Err(HookError::TooLarge {
            what: "domain XML",
            len: domain_xml.len(),
            limit,
        });
    }
    if vmi_json.len() > MAX_VMI_JSON {
        return Err(HookError::TooLarge {
            what: "VMI JSON",
            len: vmi_json.len(),
            limit: MAX_VMI_JSON,
        });
    }
    let domain = std::str::from_utf8(domain_xml).map_err(|_| HookError::NotUtf8)?;
    let vmi: Result<Vmi, String> = if vmi_json.is_empty() {
        Ok(Vmi::default())
    } else {
        serde_json::from_slice(vmi_json).map_err(|e| e.to_string())
    };
    let meta =
        vmi.as_ref()
            .ok()
            .and_then(|v| v.metadata.as_ref())
            .map_or((None, None, None), |m| {
                (
                    m.namespace.as_deref(),
                    m.name.as_deref(),
                    m.annotations
                        .as_ref()
                        .and_then(|a| a.get(SOCKET_ANNOTATION))
                        .map(String::as_str),
                )
            });
    let vmi_name = match meta {
        (Some(ns), Some(n), _) => format!("{ns}/{n}"),
        (None, Some(n), _) => n.to_string(),
        _ => "?".to_string(),
    };
    let annotation = meta.2.filter(|a| !a.trim().is_empty());

    let (source, devices, ignored_annotation) = match &config.fixed {
        Some((source, devices)) => (*source, devices.clone(), annotation.map(str::to_string)),
        None => {
            if let Err(e) = &vmi {
                return Err(HookError::Vmi(e.clone()));
            }
            let Some(a) = annotation else {
                return Err(HookError::NoSocket);
            };
            let devices = devices(Source::Annotation, &split(a), None, None)?;
            (Source::Annotation, devices, None)
        }
    };
    if devices.is_empty() {
        return Err(HookError::NoSocket);
    }

    let mut xml = domain.to_string();
    let mut added = Vec::new();
    let mut present = Vec::new();
    for dev in &devices {
        match libvirt::merge(&xml, dev) {
            Ok(merged) => {
                xml = merged;
                added.push((dev.device_id(), dev.socket.clone()));
            }
            Err(MergeError::AlreadyMerged(id)) => {
                let whole =
                    libvirt::fully_merged(&xml, dev).map_err(|source| HookError::Merge {
                        device: dev.device_id(),
                        socket: dev.socket.clone(),
                        source,
                    })?;
                if !whole {
                    return Err(HookError::PartlyMerged(id));
                }
                present.push(id);
            }
            Err(e @ (MergeError::Xml(_) | MergeError::NotADomain(_))) => {
                return Err(HookError::NotADomain(e))
            }
            Err(source) => {
                return Err(HookError::Merge {
                    device: dev.device_id(),
                    socket: dev.socket.clone(),
                    source,
                })
            }
        }
    }
    Ok(Outcome {
        domain_xml: xml,
        vmi: vmi_name,
        source,
        added,
        present,
        ignored_annotation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrate::xml;

    const Q35: &str =
        "<domain type=\"kvm\" xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\">
\t<name>default_vm</name>
\t<os>
\t\t<type arch=\"x86_64\" machine=\"q35\">hvm</type>
\t</os>
\t<devices>
\t\t<controller type=\"pci\" index=\"0\" model=\"pcie-root\"></controller>
\t\t<controller type=\"pci\" index=\"1\" model=\"pcie-root-port\"></controller>
\t</devices>
</domain>";

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| {
            vars.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    fn vmi(annotation: Option<&str>) -> Vec<u8> {
        let mut v = serde_json::json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": { "namespace": "default", "name": "vm" },
        });
        if let Some(a) = annotation {
            v["metadata"]["annotations"] = serde_json::json!({ SOCKET_ANNOTATION: a });
        }
        serde_json::to_vec(&v).unwrap()
    }

    /// The `-device` JSON arguments of a domain.
    fn devices_in(out: &str) -> Vec<serde_json::Value> {
        let d = xml::parse(out).unwrap().root;
        d.child("qemu:commandline")
            .unwrap()
            .elements()
            .filter_map(|a| serde_json::from_str(a.attr("value")?).ok())
            .collect()
    }

    #[test]
    fn the_flag_wins_over_the_environment_which_wins_over_the_annotation() {
        let flag = [PathBuf::from("/var/run/vgpu/flag.sock")];
        let both = env(&[(ENV_SOCKET, "/env/a.sock")]);
        let c = HookConfig::new(&flag, &both).unwrap();
        let out = on_define_domain(&c, Q35.as_bytes(), &vmi(Some("/ann.sock"))).unwrap();
        assert_eq!(out.source, Source::Flag);
        assert_eq!(out.ignored_annotation.as_deref(), Some("/ann.sock"));
        assert_eq!(
            devices_in(&out.domain_xml)[0]["socket"]["path"],
            "/var/run/vgpu/flag.sock"
        );
        assert_eq!(out.vmi, "default/vm");

        let c = HookConfig::new(&[], &both).unwrap();
        let out = on_define_domain(&c, Q35.as_bytes(), &vmi(Some("/ann.sock"))).unwrap();
        assert_eq!(out.source, Source::Env);
        assert_eq!(
            devices_in(&out.domain_xml)[0]["socket"]["path"],
            "/env/a.sock"
        );

        let c = HookConfig::new(&[], env(&[(ENV_SOCKET, "  ")])).unwrap();
        assert_eq!(c.fixed, None, "an empty variable is no variable");
        let out = on_define_domain(&c, Q35.as_bytes(), &vmi(Some("/ann.sock"))).unwrap();
        assert_eq!(out.source, Source::Annotation);
        assert_eq!(
            devices_in(&out.domain_xml)[0]["socket"]["path"],
            "/ann.sock"
        );
        assert!(matches!(
            on_define_domain(&c, Q35.as_bytes(), &vmi(None)),
            Err(HookError::NoSocket)
        ));
        assert!(matches!(
            on_define_domain(&c, Q35.as_bytes(), b""),
            Err(HookError::NoSocket)
        ));
        assert!(matches!(
            on_define_domain(&c, Q35.as_bytes(), b"not json"),
            Err(HookError::Vmi(_))
        ));
    }

    #[test]
    fn several_sockets_get_several_devices_on_fresh_root_ports() {
        let uuids = "74351e0c-e65b-4eae-aa34-df30b96c4889,0b9f3ed4-1b4c-4b59-9f7f-8f3a1d0e2c11";
        let c = HookConfig::new(
            &[],
            env(&[
                (ENV_SOCKET, "/run/a.sock, /run/b.sock"),
                (ENV_UUID, uuids),
                (ENV_TYPE, "M60-2Q@1,M60-2Q@1"),
            ]),
        )
        .unwrap();
        let out = on_define_domain(&c, Q35.as_bytes(), &vmi(None)).unwrap();
        let devs = devices_in(&out.domain_xml);
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0]["id"], "vgpu-emu-74351e0c");
        assert_eq!(devs[0]["bus"], "ua-vgpu-emu-74351e0c");
        assert_eq!(devs[1]["id"], "vgpu-emu-0b9f3ed4");
        assert_eq!(devs[1]["socket"]["path"], "/run/b.sock");
        let d = xml::parse(&out.domain_xml).unwrap().root;
        let ports: Vec<(&str, &str)> = d
            .child("devices")
            .unwrap()
            .elements()
            .filter_map(|c| Some((c.attr("index")?, c.child("alias")?.attr("name")?)))
            .collect();
        assert_eq!(
            ports,
            [("2", "ua-vgpu-emu-74351e0c"), ("3", "ua-vgpu-emu-0b9f3ed4")]
        );
        assert_eq!(out.added.len(), 2);

        // Handed the merged domain again, the hook leaves it as it is.
        let again = on_define_domain(&c, out.domain_xml.as_bytes(), &vmi(None)).unwrap();
        assert_eq!(again.domain_xml, out.domain_xml);
        assert!(again.added.is_empty());
        assert_eq!(again.present.len(), 2);
        // With part of a device only, it refuses.
        let partial = out
            .domain_xml
            .replace("<alias name='ua-vgpu-emu-0b9f3ed4'/>", "");
        assert!(matches!(
            on_define_domain(&c, partial.as_bytes(), &vmi(None)),
            Err(HookError::PartlyMerged(_))
        ));
    }

    #[test]
    fn names_come_from_the_socket_path_without_a_uuid() {
        let daemon = Path::new("/run/vgpu-emu/run/74351e0c-e65b-4eae-aa34-df30b96c4889.sock");
        assert_eq!(
            uuid_of(daemon).to_string(),
            "74351e0c-e65b-4eae-aa34-df30b96c4889"
        );
        let a = uuid_of(Path::new("/var/run/vgpu-emu/vgpu0.sock"));
        assert_eq!(a, uuid_of(Path::new("/var/run/vgpu-emu/vgpu0.sock")));
        assert_ne!(a, uuid_of(Path::new("/var/run/vgpu-emu/vgpu1.sock")));
        assert_eq!(a.get_version_num(), 5);
    }

    #[test]
    fn bad_socket_lists_are_refused_with_the_reason() {
        for (sockets, what) in [
            ("relative.sock", "not absolute"),
            ("/a.sock,,/b.sock", "empty"),
            ("/dir/", "directory"),
            ("/a\u{7}.sock", "control character"),
            (&format!("/{}", "x".repeat(MAX_SOCKET_PATH)), "longer"),
            ("/a.sock,/a.sock", "named twice"),
        ] {
            let e = HookConfig::new(&[], env(&[(ENV_SOCKET, sockets)])).unwrap_err();
            assert!(e.to_string().contains(what), "{sockets:?}: {e}");
            assert!(e.to_string().contains("VGPU_EMU_SOCKET"), "{e}");
        }
        let many = (0..=MAX_SOCKETS)
            .map(|i| format!("/s{i}.sock"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            HookConfig::new(&[], env(&[(ENV_SOCKET, &many)])).unwrap_err(),
            ConfigError::TooMany(Source::Env)
        );
        assert!(matches!(
            HookConfig::new(&[], env(&[(ENV_SOCKET, "/a.sock"), (ENV_UUID, "nope")])),
            Err(ConfigError::BadUuid(_))
        ));
        assert!(matches!(
            HookConfig::new(
                &[],
                env(&[(ENV_SOCKET, "/a.sock,/b.sock"), (ENV_TYPE, "EMU-64M@1")])
            ),
            Err(ConfigError::Count {
                got: 1,
                want: 2,
                ..
            })
        ));
        // Through the annotation: the call fails, as bad input.
        let c = HookConfig::default();
        let e = on_define_domain(&c, Q35.as_bytes(), &vmi(Some("rel.sock"))).unwrap_err();
        assert!(e.is_bad_input());
        assert!(e.to_string().contains("annotation"), "{e}");
    }

    #[test]
    fn domains_that_cannot_take_the_device_are_refused_and_sizes_are_bounded() {
        let c = HookConfig::new(&[PathBuf::from("/s.sock")], env(&[])).unwrap();
        let e = on_define_domain(&c, b"not xml", b"").unwrap_err();
        assert!(
            e.is_bad_input() && e.to_string().contains("cannot be read"),
            "{e}"
        );
        let file = Q35.replace(
            "\t<os>",
            "\t<memoryBacking><source type=\"file\"></source></memoryBacking>\n\t<os>",
        );
        let e = on_define_domain(&c, file.as_bytes(), b"").unwrap_err();
        assert!(!e.is_bad_input());
        assert!(e.to_string().contains("memory backing"), "{e}");
        let e = on_define_domain(&c, &[0xff, 0xfe], b"").unwrap_err();
        assert!(matches!(e, HookError::NotUtf8));
        let big = vec![b' '; MAX_DOMAIN_XML as usize + 1];
        assert!(matches!(
            on_define_domain(&c, &big, b""),
            Err(HookError::TooLarge { .. })
        ));
        let big = vec![b' '; MAX_VMI_JSON + 1];
        assert!(matches!(
            on_define_domain(&c, Q35.as_bytes(), &big),
            Err(HookError::TooLarge { .. })
        ));
        // A VMI that is not JSON does not matter when the flag names the socket.
        assert!(on_define_domain(&c, Q35.as_bytes(), b"{").is_ok());
    }
}
