//! How vgpu-emu instances reach the stacks that run VMs: libvirt domains ([`libvirt`]), through
//! a small XML tree ([`xml`]).

pub mod k8s;
pub mod libvirt;
pub mod xml;
