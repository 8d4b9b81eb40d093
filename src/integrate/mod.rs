//! How vgpu-emu instances reach the stacks that run VMs: libvirt domains ([`libvirt`], through a
//! small XML tree, [`xml`]), KubeVirt's hook sidecars ([`kubevirt`]) and kubelet's device
//! plugins ([`k8s`]).

pub mod k8s;
pub mod kubevirt;
pub mod libvirt;
pub mod xml;
