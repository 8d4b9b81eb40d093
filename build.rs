//! Generates the gRPC client and server code of the three kubelet services `vgpu-emu
//! device-plugin` speaks (and its tests fake), from the method lists below: tonic's manual
//! builder, so no `.proto` file and no `protoc`. The messages are declared by hand with prost in
//! `src/integrate/k8s/proto.rs`; the generated code refers to them as `super::Message` and is
//! included there, inside the module of its package.

use tonic_build::manual::{Builder, Method, Service};

/// A unary (or server-streaming) method whose messages live in the including module.
fn method(name: &str, route: &str, input: &str, output: &str, streaming: bool) -> Method {
    let b = Method::builder()
        .name(name)
        .route_name(route)
        .input_type(format!("super::{input}"))
        .output_type(format!("super::{output}"))
        .codec_path("tonic_prost::ProstCodec");
    match streaming {
        true => b.server_streaming().build(),
        false => b.build(),
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // kubelet's device-plugin API v1beta1: the registration service kubelet serves and the
    // service each plugin endpoint serves.
    let registration = Service::builder()
        .name("Registration")
        .package("v1beta1")
        .method(method(
            "register",
            "Register",
            "RegisterRequest",
            "Empty",
            false,
        ))
        .build();
    let device_plugin = Service::builder()
        .name("DevicePlugin")
        .package("v1beta1")
        .method(method(
            "get_device_plugin_options",
            "GetDevicePluginOptions",
            "Empty",
            "DevicePluginOptions",
            false,
        ))
        .method(method(
            "list_and_watch",
            "ListAndWatch",
            "Empty",
            "ListAndWatchResponse",
            true,
        ))
        .method(method(
            "get_preferred_allocation",
            "GetPreferredAllocation",
            "PreferredAllocationRequest",
            "PreferredAllocationResponse",
            false,
        ))
        .method(method(
            "allocate",
            "Allocate",
            "AllocateRequest",
            "AllocateResponse",
            false,
        ))
        .method(method(
            "pre_start_container",
            "PreStartContainer",
            "PreStartContainerRequest",
            "PreStartContainerResponse",
            false,
        ))
        .build();
    // kubelet's pod-resources API v1: only List, the one call the plugin makes.
    let pod_resources = Service::builder()
        .name("PodResourcesLister")
        .package("v1")
        .method(method(
            "list",
            "List",
            "ListPodResourcesRequest",
            "ListPodResourcesResponse",
            false,
        ))
        .build();
    Builder::new().compile(&[registration, device_plugin, pod_resources]);
}
