//! Generates the gRPC code of the services vgpu-emu speaks, with tonic's manual builder: pure
//! Rust, no `.proto` files, no `protoc`. The messages are declared by hand with prost.
//!
//! - KubeVirt's hook API (`vgpu-emu kubevirt-hook`): messages in
//!   `src/integrate/kubevirt/proto.rs`; routes `/PACKAGE.SERVICE/METHOD` as KubeVirt's `.proto`
//!   files declare them.
//! - kubelet's device-plugin v1beta1 and pod-resources v1 APIs (`vgpu-emu device-plugin`, and
//!   the fake kubelet of its tests): messages in `src/integrate/k8s/proto.rs`; the generated code
//!   refers to them as `super::Message` and is included inside the module of its package.

/// Where the hand-written messages are.
const PROTO: &str = "crate::integrate::kubevirt::proto";

fn hook_method(name: &str, route: &str, input: &str, output: &str) -> Method {
    Method::builder()
        .name(name)
        .route_name(route)
        .input_type(format!("{PROTO}::{input}"))
        .output_type(format!("{PROTO}::{output}"))
        .codec_path("tonic_prost::ProstCodec")
        .build()
}

/// The `Callbacks` service of hook API version `package` (`kubevirt.hooks.v1alpha2`, ...):
/// v1alpha3 adds `Shutdown`.
fn callbacks(package: &str, shutdown: bool) -> Service {
    let mut s = Service::builder()
        .name("Callbacks")
        .package(package)
        .method(hook_method(
            "on_define_domain",
            "OnDefineDomain",
            "OnDefineDomainParams",
            "OnDefineDomainResult",
        ))
        .method(hook_method(
            "pre_cloud_init_iso",
            "PreCloudInitIso",
            "PreCloudInitIsoParams",
            "PreCloudInitIsoResult",
        ));
    if shutdown {
        s = s.method(hook_method(
            "shutdown",
            "Shutdown",
            "ShutdownParams",
            "ShutdownResult",
        ));
    }
    s.build()
}

fn hook_services() -> Vec<Service> {
    let info = Service::builder()
        .name("Info")
        .package("kubevirt.hooks.info")
        .method(hook_method("info", "Info", "InfoParams", "InfoResult"))
        .build();
    vec![
        info,
        callbacks("kubevirt.hooks.v1alpha2", false),
        callbacks("kubevirt.hooks.v1alpha3", true),
    ]
}

use tonic_build::manual::{Builder, Method, Service};

/// A unary (or server-streaming) method whose messages live in the including module.
fn k8s_method(name: &str, route: &str, input: &str, output: &str, streaming: bool) -> Method {
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

fn k8s_services() -> Vec<Service> {
    // kubelet's device-plugin API v1beta1: the registration service kubelet serves and the
    // service each plugin endpoint serves.
    let registration = Service::builder()
        .name("Registration")
        .package("v1beta1")
        .method(k8s_method(
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
        .method(k8s_method(
            "get_device_plugin_options",
            "GetDevicePluginOptions",
            "Empty",
            "DevicePluginOptions",
            false,
        ))
        .method(k8s_method(
            "list_and_watch",
            "ListAndWatch",
            "Empty",
            "ListAndWatchResponse",
            true,
        ))
        .method(k8s_method(
            "get_preferred_allocation",
            "GetPreferredAllocation",
            "PreferredAllocationRequest",
            "PreferredAllocationResponse",
            false,
        ))
        .method(k8s_method(
            "allocate",
            "Allocate",
            "AllocateRequest",
            "AllocateResponse",
            false,
        ))
        .method(k8s_method(
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
        .method(k8s_method(
            "list",
            "List",
            "ListPodResourcesRequest",
            "ListPodResourcesResponse",
            false,
        ))
        .build();
    vec![registration, device_plugin, pod_resources]
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Each service goes to OUT_DIR/PACKAGE.SERVICE.rs, included by the proto.rs of its module.
    let mut services = hook_services();
    services.extend(k8s_services());
    Builder::new().compile(&services);
}
