//! KubeVirt's hook API on the wire: the protobuf messages, written here by hand with the field
//! numbers and types of KubeVirt's `.proto` files (`pkg/hooks/info`, `pkg/hooks/v1alpha2`,
//! `pkg/hooks/v1alpha3`), and the gRPC services `build.rs` generates around them.
//!
//! ```text
//! service kubevirt.hooks.info.Info       { Info(InfoParams) -> InfoResult }
//! service kubevirt.hooks.v1alpha2.Callbacks {
//!     OnDefineDomain(OnDefineDomainParams) -> OnDefineDomainResult
//!     PreCloudInitIso(PreCloudInitIsoParams) -> PreCloudInitIsoResult }
//! service kubevirt.hooks.v1alpha3.Callbacks { the same, and Shutdown(ShutdownParams) -> ShutdownResult }
//! ```
//!
//! v1alpha2 and v1alpha3 declare the same messages field for field, so one Rust type serves
//! both (a package name is part of a route, not of a message's encoding).

/// `InfoParams {}`: the request of `Info`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct InfoParams {}

/// `InfoResult`: who the hook is and what it subscribes to.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct InfoResult {
    /// `string name = 1`: the hook's name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// `repeated HookPoint hookPoints = 3`: the hook points subscribed to.
    #[prost(message, repeated, tag = "3")]
    pub hook_points: Vec<HookPoint>,
    /// `repeated string versions = 4`: the `Callbacks` versions served (virt-launcher takes the
    /// newest it knows).
    #[prost(string, repeated, tag = "4")]
    pub versions: Vec<String>,
}

/// `HookPoint`: a subscription.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct HookPoint {
    /// `string name = 1`: `OnDefineDomain`, `PreCloudInitIso` or `Shutdown`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// `int32 priority = 2`: higher runs first (then by name).
    #[prost(int32, tag = "2")]
    pub priority: i32,
}

/// `OnDefineDomainParams`: the domain virt-launcher is about to define.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct OnDefineDomainParams {
    /// `bytes domainXML = 1`: the libvirt domain XML.
    #[prost(bytes = "vec", tag = "1")]
    pub domain_xml: Vec<u8>,
    /// `bytes vmi = 2`: the VirtualMachineInstance, as JSON.
    #[prost(bytes = "vec", tag = "2")]
    pub vmi: Vec<u8>,
}

/// `OnDefineDomainResult`: the domain to define instead.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct OnDefineDomainResult {
    /// `bytes domainXML = 1`.
    #[prost(bytes = "vec", tag = "1")]
    pub domain_xml: Vec<u8>,
}

/// `PreCloudInitIsoParams`: cloud-init data before its ISO is written.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PreCloudInitIsoParams {
    /// `bytes cloudInitNoCloudSource = 1` (JSON; legacy).
    #[prost(bytes = "vec", tag = "1")]
    pub cloud_init_no_cloud_source: Vec<u8>,
    /// `bytes vmi = 2` (JSON).
    #[prost(bytes = "vec", tag = "2")]
    pub vmi: Vec<u8>,
    /// `bytes cloudInitData = 3` (JSON).
    #[prost(bytes = "vec", tag = "3")]
    pub cloud_init_data: Vec<u8>,
}

/// `PreCloudInitIsoResult`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PreCloudInitIsoResult {
    /// `bytes cloudInitNoCloudSource = 1` (JSON; legacy).
    #[prost(bytes = "vec", tag = "1")]
    pub cloud_init_no_cloud_source: Vec<u8>,
    /// `bytes cloudInitData = 3` (JSON).
    #[prost(bytes = "vec", tag = "3")]
    pub cloud_init_data: Vec<u8>,
}

/// `ShutdownParams {}` (v1alpha3): the VM has ended; the sidecar may exit.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct ShutdownParams {}

/// `ShutdownResult {}` (v1alpha3).
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct ShutdownResult {}

/// The `Info` service (`kubevirt.hooks.info`): `info_server`, `info_client`.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod info {
    include!(concat!(env!("OUT_DIR"), "/kubevirt.hooks.info.Info.rs"));
}

/// The v1alpha2 `Callbacks` service (`kubevirt.hooks.v1alpha2`): `callbacks_server`,
/// `callbacks_client`.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod v1alpha2 {
    include!(concat!(
        env!("OUT_DIR"),
        "/kubevirt.hooks.v1alpha2.Callbacks.rs"
    ));
}

/// The v1alpha3 `Callbacks` service (`kubevirt.hooks.v1alpha3`): `callbacks_server`,
/// `callbacks_client`.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod v1alpha3 {
    include!(concat!(
        env!("OUT_DIR"),
        "/kubevirt.hooks.v1alpha3.Callbacks.rs"
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    /// The bytes a protobuf encoder of KubeVirt's `.proto` produces, field by field (tag =
    /// number << 3 | wire type; 2 is length-delimited, 0 a varint).
    #[test]
    fn messages_encode_with_kubevirts_field_numbers() {
        let info = InfoResult {
            name: "h".into(),
            hook_points: vec![HookPoint {
                name: "x".into(),
                priority: 1,
            }],
            versions: vec!["v".into()],
        };
        assert_eq!(
            info.encode_to_vec(),
            [
                0x0a, 1, b'h', // name = 1
                0x1a, 5, 0x0a, 1, b'x', 0x10, 1, // hookPoints = 3 {name = 1, priority = 2}
                0x22, 1, b'v', // versions = 4
            ]
        );
        let p = OnDefineDomainParams {
            domain_xml: b"<d/>".to_vec(),
            vmi: b"{}".to_vec(),
        };
        let bytes = p.encode_to_vec();
        assert_eq!(
            bytes,
            [0x0a, 4, b'<', b'd', b'/', b'>', 0x12, 2, b'{', b'}']
        );
        assert_eq!(OnDefineDomainParams::decode(&bytes[..]).unwrap(), p);
        let r = PreCloudInitIsoResult {
            cloud_init_no_cloud_source: b"a".to_vec(),
            cloud_init_data: b"b".to_vec(),
        };
        assert_eq!(r.encode_to_vec(), [0x0a, 1, b'a', 0x1a, 1, b'b']);
        assert!(ShutdownResult {}.encode_to_vec().is_empty());
        // Fields this side does not know are skipped, as protobuf requires.
        let with_unknown = [0x0a, 1, b'x', 0x4a, 1, b'z'];
        assert_eq!(
            OnDefineDomainResult::decode(&with_unknown[..])
                .unwrap()
                .domain_xml,
            b"x"
        );
    }
}
