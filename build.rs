//! Generates the gRPC services of KubeVirt's hook API (`vgpu-emu kubevirt-hook`) with tonic's
//! manual builder: pure Rust, no `protoc`. The messages are written by hand in
//! `src/integrate/kubevirt/proto.rs`; this only names the services, their methods and routes
//! (`/PACKAGE.SERVICE/METHOD`, as KubeVirt's `.proto` files declare them).

use tonic_build::manual::{Builder, Method, Service};

/// Where the hand-written messages are.
const PROTO: &str = "crate::integrate::kubevirt::proto";

fn method(name: &str, route: &str, input: &str, output: &str) -> Method {
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
        .method(method(
            "on_define_domain",
            "OnDefineDomain",
            "OnDefineDomainParams",
            "OnDefineDomainResult",
        ))
        .method(method(
            "pre_cloud_init_iso",
            "PreCloudInitIso",
            "PreCloudInitIsoParams",
            "PreCloudInitIsoResult",
        ));
    if shutdown {
        s = s.method(method(
            "shutdown",
            "Shutdown",
            "ShutdownParams",
            "ShutdownResult",
        ));
    }
    s.build()
}

fn main() {
    let info = Service::builder()
        .name("Info")
        .package("kubevirt.hooks.info")
        .method(method("info", "Info", "InfoParams", "InfoResult"))
        .build();
    // Each service goes to OUT_DIR/PACKAGE.SERVICE.rs, included by proto.rs.
    Builder::new().compile(&[
        info,
        callbacks("kubevirt.hooks.v1alpha2", false),
        callbacks("kubevirt.hooks.v1alpha3", true),
    ]);
    println!("cargo:rerun-if-changed=build.rs");
}
