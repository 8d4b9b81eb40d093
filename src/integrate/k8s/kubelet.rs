//! The plugin's side of kubelet: an endpoint per resource (a UNIX socket in kubelet's
//! device-plugin directory), registration on `kubelet.sock`, registering again whenever kubelet
//! restarts (it then recreates `kubelet.sock` and deletes the plugins' sockets), and the
//! pod-resources list that says which devices containers still hold.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint as ChannelEndpoint, Uri};

use super::plugin::{self, Endpoint, Plugin, DOMAIN};
use super::proto::v1::{
    pod_resources_lister_client::PodResourcesListerClient, ListPodResourcesRequest,
};
use super::proto::v1beta1::{
    device_plugin_server::DevicePluginServer, registration_client::RegistrationClient,
    RegisterRequest, VERSION,
};

/// kubelet's registration socket in its device-plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";
/// Largest message the plugin accepts from kubelet on its endpoints (an Allocate names at most
/// a few hundred IDs).
const MAX_REQUEST: usize = 1 << 20;
/// Largest pod-resources list the plugin reads (every pod of the node).
const MAX_POD_RESOURCES: usize = 16 << 20;
/// How long one call to kubelet may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the plugin looks for a new `kubelet.sock` and its own endpoints.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// The endpoint file of a resource in kubelet's directory: `vgpu-emu-<SUFFIX>.sock`.
pub fn endpoint_name(suffix: &str) -> String {
    format!("vgpu-emu-{suffix}.sock")
}

/// A gRPC channel over a UNIX socket.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI is required but unused: the connector dials the socket.
    ChannelEndpoint::from_static("http://localhost")
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

fn describe(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    message
}

/// The (resource name, device ID) pairs of this plugin's resources that containers hold, per
/// kubelet's pod-resources list.
pub async fn assigned(socket: &Path) -> Result<HashSet<(String, String)>, String> {
    let call = async {
        let channel = connect(socket).await.map_err(|e| describe(&e))?;
        let mut client =
            PodResourcesListerClient::new(channel).max_decoding_message_size(MAX_POD_RESOURCES);
        client
            .list(ListPodResourcesRequest {})
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))
    };
    let list = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| "timed out".to_string())??
        .into_inner();
    let prefix = format!("{DOMAIN}/");
    let mut held = HashSet::new();
    for pod in list.pod_resources {
        for c in pod.containers {
            for d in c.devices {
                if d.resource_name.starts_with(&prefix) {
                    for id in d.device_ids {
                        held.insert((d.resource_name.clone(), id));
                    }
                }
            }
        }
    }
    Ok(held)
}

/// One round of removals: asks kubelet which devices are held and removes the rest (after the
/// grace period). Without an answer from kubelet nothing is removed.
pub async fn reconcile(plugin: &Plugin, pod_resources: &Path) {
    match assigned(pod_resources).await {
        Ok(held) => {
            plugin.reconcile(&held).await;
        }
        Err(e) => warn!(
            "kubelet's pod-resources list at {}: {e}; removing nothing this round",
            pod_resources.display()
        ),
    }
}

/// The identity of a file: a new `kubelet.sock` is a new inode.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The endpoints of one registration: a server per resource.
struct Served {
    tasks: Vec<JoinHandle<()>>,
    sockets: Vec<(PathBuf, Option<(u64, u64)>)>,
}

impl Served {
    /// Stops the servers and deletes the sockets that are still ours.
    fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        for (path, id) in &self.sockets {
            if id.is_some() && identity(path) == *id {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Every endpoint socket is still there (kubelet deletes them when it restarts).
    fn intact(&self) -> bool {
        self.sockets.iter().all(|(p, id)| identity(p) == *id)
    }
}

fn serve(plugin: &Arc<Plugin>, dir: &Path) -> std::io::Result<Served> {
    let mut served = Served {
        tasks: Vec::new(),
        sockets: Vec::new(),
    };
    for r in plugin.resources() {
        let path = dir.join(endpoint_name(&r.suffix));
        // A socket left by an earlier run (or by kubelet's not deleting it yet).
        if std::fs::symlink_metadata(&path).is_ok() {
            std::fs::remove_file(&path)?;
        }
        let listener = match tokio::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                served.stop();
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {}: {e}", path.display()),
                ));
            }
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        served.sockets.push((path.clone(), identity(&path)));
        let service = DevicePluginServer::new(Endpoint::new(plugin.clone(), &r.suffix))
            .max_decoding_message_size(MAX_REQUEST);
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        served.tasks.push(tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .concurrency_limit_per_connection(16)
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                warn!("endpoint {}: {}", path.display(), describe(&e));
            }
        }));
    }
    Ok(served)
}

async fn register(plugin: &Plugin, kubelet_socket: &Path) -> Result<(), String> {
    let channel = connect(kubelet_socket).await.map_err(|e| describe(&e))?;
    let mut client = RegistrationClient::new(channel);
    for r in plugin.resources() {
        let req = RegisterRequest {
            version: VERSION.into(),
            endpoint: endpoint_name(&r.suffix),
            resource_name: r.resource_name(),
            options: Some(plugin::options()),
        };
        tokio::time::timeout(CALL_TIMEOUT, client.register(req))
            .await
            .map_err(|_| format!("registering {}: timed out", r.resource_name()))?
            .map_err(|s| {
                format!(
                    "registering {}: {}: {}",
                    r.resource_name(),
                    s.code(),
                    s.message()
                )
            })?;
    }
    Ok(())
}

/// Serves the endpoints and registers them with kubelet, again whenever kubelet restarts;
/// calls `ready` after each successful registration. Runs until cancelled; the endpoints'
/// sockets are deleted when it stops (through the returned guard's drop).
pub async fn registration_loop(plugin: Arc<Plugin>, dir: PathBuf, mut ready: impl FnMut()) {
    let kubelet = dir.join(KUBELET_SOCKET);
    let mut guard = Guard(None);
    let mut waiting_logged = false;
    loop {
        let Some(kubelet_id) = identity(&kubelet) else {
            if !waiting_logged {
                info!("waiting for kubelet at {}", kubelet.display());
                waiting_logged = true;
            }
            tokio::time::sleep(WATCH_INTERVAL).await;
            continue;
        };
        waiting_logged = false;
        let served = match serve(&plugin, &dir) {
            Ok(s) => s,
            Err(e) => {
                warn!("{e}; retrying");
                tokio::time::sleep(WATCH_INTERVAL * 4).await;
                continue;
            }
        };
        guard.0 = Some(served);
        match register(&plugin, &kubelet).await {
            Ok(()) => {
                info!(
                    "registered {} resource(s) with kubelet at {}",
                    plugin.resources().len(),
                    kubelet.display()
                );
                ready();
                // Until kubelet restarts: a new kubelet.sock, or our sockets deleted.
                loop {
                    tokio::time::sleep(WATCH_INTERVAL).await;
                    let intact = guard.0.as_ref().is_some_and(Served::intact);
                    if identity(&kubelet) != Some(kubelet_id) || !intact {
                        info!("kubelet restarted; registering again");
                        break;
                    }
                }
            }
            Err(e) => {
                warn!(
                    "cannot register with kubelet at {}: {e}; retrying",
                    kubelet.display()
                );
                tokio::time::sleep(WATCH_INTERVAL * 4).await;
            }
        }
        if let Some(s) = guard.0.take() {
            s.stop();
        }
    }
}

/// Stops the endpoints when the registration loop is dropped.
struct Guard(Option<Served>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.stop();
        }
    }
}
