//! `vgpu-emu kubevirt-hook`: a KubeVirt hook sidecar that puts vfio-user vGPUs into the domain
//! virt-launcher defines.
//!
//! KubeVirt runs each image named in a VMI's `hooks.kubevirt.io/hookSidecars` annotation as a
//! container of the VMI's pod, beside the compute container. The sidecar serves gRPC on a Unix
//! socket in `/var/run/kubevirt-hooks/` (a per-sidecar subdirectory of a volume the compute
//! container sees whole); virt-launcher asks each socket's `Info` which hook points and API
//! versions it serves, then calls `OnDefineDomain` with the domain XML it generated and the VMI
//! as JSON, and defines what comes back. Here that adds what `vgpu-emu libvirt-xml` adds
//! ([`crate::integrate::libvirt::merge`]): guest RAM as a shared memfd, a PCIe root port, and
//! QEMU's `-device vfio-user-pci` in `<qemu:commandline>`, for each configured socket.
//!
//! - [`proto`]: the messages and services (`Info`; `Callbacks` v1alpha2 and v1alpha3)
//! - [`hook`]: which sockets, and the merge, without gRPC
//! - [`server`]: the gRPC server on the hook socket

pub mod hook;
pub mod proto;
pub mod server;
