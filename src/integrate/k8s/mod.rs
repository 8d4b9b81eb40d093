//! `vgpu-emu device-plugin`: a node's vGPU types as Kubernetes extended resources, through
//! kubelet's device-plugin API (v1beta1), beside the node's `vgpu-emu daemon`.

pub mod backend;
pub mod plugin;
pub mod proto;
