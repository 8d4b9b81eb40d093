//! The hook's gRPC server: `Info`, and `Callbacks` v1alpha3 and v1alpha2 (virt-launcher takes
//! the newest version it knows), on a Unix socket, until SIGTERM, SIGINT or v1alpha3's
//! `Shutdown` (sent when the VM has ended, so that the pod can finish).
//!
//! A domain that cannot be merged is answered with a gRPC error that says why
//! (`INVALID_ARGUMENT` for malformed input, `FAILED_PRECONDITION` for a domain or setup the hook
//! cannot serve); virt-launcher then fails the VMI instead of defining a domain without its
//! vGPU. Requests are bounded: [`MAX_MESSAGE`] bytes, a few at a time per connection, each
//! within [`REQUEST_TIMEOUT`].

use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::hook::{self, HookConfig, HookError, Outcome, MAX_VMI_JSON};
use super::proto::{
    info, v1alpha2, v1alpha3, HookPoint, InfoParams, InfoResult, OnDefineDomainParams,
    OnDefineDomainResult, PreCloudInitIsoParams, PreCloudInitIsoResult, ShutdownParams,
    ShutdownResult,
};
use crate::integrate::libvirt::MAX_DOMAIN_XML;

/// The hook's name in `Info`.
pub const HOOK_NAME: &str = "vgpu-emu";
/// The `Callbacks` versions served, newest first.
pub const VERSIONS: [&str; 2] = ["v1alpha3", "v1alpha2"];
/// The hook point that changes the domain.
pub const ON_DEFINE_DOMAIN: &str = "OnDefineDomain";
/// The hook point (v1alpha3) that tells the sidecar the VM has ended.
pub const SHUTDOWN: &str = "Shutdown";
/// Largest request message: the domain XML and the VMI at their limits, and framing.
pub const MAX_MESSAGE: usize = MAX_DOMAIN_XML as usize + MAX_VMI_JSON + 4096;
/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests served at once on one connection.
pub const CONCURRENCY_PER_CONNECTION: usize = 4;
/// How long connections may take to finish once the hook is asked to stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The services' shared state.
#[derive(Debug)]
struct Hook {
    config: HookConfig,
    stop: watch::Sender<bool>,
}

impl Hook {
    fn on_define_domain(&self, p: &OnDefineDomainParams, version: &str) -> Result<Outcome, Status> {
        hook::on_define_domain(&self.config, &p.domain_xml, &p.vmi).map_err(|e| {
            log::error!("OnDefineDomain ({version}): refused, the domain is not changed: {e}");
            status(&e)
        })
    }

    fn log(&self, o: &Outcome, version: &str) {
        let added = o
            .added
            .iter()
            .map(|(id, socket)| format!("{id} on {}", socket.display()))
            .collect::<Vec<_>>();
        log::info!(
            "OnDefineDomain ({version}) for VMI {}: sockets from {}; added {}{}",
            o.vmi,
            o.source,
            if added.is_empty() {
                "nothing".to_string()
            } else {
                added.join(", ")
            },
            if o.present.is_empty() {
                String::new()
            } else {
                format!(
                    "; the domain had {} already, left as it was",
                    o.present.join(", ")
                )
            }
        );
        if let Some(a) = &o.ignored_annotation {
            log::warn!(
                "the VMI's {} annotation ({a}) is ignored: {} wins over it",
                hook::SOCKET_ANNOTATION,
                o.source
            );
        }
    }

    fn answer(
        &self,
        p: OnDefineDomainParams,
        version: &str,
    ) -> Result<Response<OnDefineDomainResult>, Status> {
        let o = self.on_define_domain(&p, version)?;
        self.log(&o, version);
        Ok(Response::new(OnDefineDomainResult {
            domain_xml: o.domain_xml.into_bytes(),
        }))
    }
}

/// The gRPC status of a refusal.
fn status(e: &HookError) -> Status {
    let msg = format!("vgpu-emu kubevirt-hook: {e}");
    if e.is_bad_input() {
        Status::invalid_argument(msg)
    } else {
        Status::failed_precondition(msg)
    }
}

/// `PreCloudInitIso` is not subscribed to; should it be called, the data goes back as it came.
fn pre_cloud_init_iso(p: PreCloudInitIsoParams) -> Response<PreCloudInitIsoResult> {
    Response::new(PreCloudInitIsoResult {
        cloud_init_no_cloud_source: p.cloud_init_no_cloud_source,
        cloud_init_data: p.cloud_init_data,
    })
}

/// The `Info` service.
#[derive(Debug, Clone, Copy)]
struct InfoService;

#[tonic::async_trait]
impl info::info_server::Info for InfoService {
    async fn info(&self, _: Request<InfoParams>) -> Result<Response<InfoResult>, Status> {
        log::info!(
            "Info: hook points {ON_DEFINE_DOMAIN} and {SHUTDOWN}, versions {}",
            VERSIONS.join(", ")
        );
        Ok(Response::new(InfoResult {
            name: HOOK_NAME.to_string(),
            hook_points: [ON_DEFINE_DOMAIN, SHUTDOWN]
                .iter()
                .map(|n| HookPoint {
                    name: n.to_string(),
                    priority: 0,
                })
                .collect(),
            versions: VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }
}

/// `Callbacks` v1alpha2.
#[derive(Debug, Clone)]
struct V1alpha2(Arc<Hook>);

#[tonic::async_trait]
impl v1alpha2::callbacks_server::Callbacks for V1alpha2 {
    async fn on_define_domain(
        &self,
        r: Request<OnDefineDomainParams>,
    ) -> Result<Response<OnDefineDomainResult>, Status> {
        self.0.answer(r.into_inner(), "v1alpha2")
    }

    async fn pre_cloud_init_iso(
        &self,
        r: Request<PreCloudInitIsoParams>,
    ) -> Result<Response<PreCloudInitIsoResult>, Status> {
        Ok(pre_cloud_init_iso(r.into_inner()))
    }
}

/// `Callbacks` v1alpha3.
#[derive(Debug, Clone)]
struct V1alpha3(Arc<Hook>);

#[tonic::async_trait]
impl v1alpha3::callbacks_server::Callbacks for V1alpha3 {
    async fn on_define_domain(
        &self,
        r: Request<OnDefineDomainParams>,
    ) -> Result<Response<OnDefineDomainResult>, Status> {
        self.0.answer(r.into_inner(), "v1alpha3")
    }

    async fn pre_cloud_init_iso(
        &self,
        r: Request<PreCloudInitIsoParams>,
    ) -> Result<Response<PreCloudInitIsoResult>, Status> {
        Ok(pre_cloud_init_iso(r.into_inner()))
    }

    async fn shutdown(
        &self,
        _: Request<ShutdownParams>,
    ) -> Result<Response<ShutdownResult>, Status> {
        log::info!("Shutdown: the VM has ended; stopping");
        self.0.stop.send_replace(true);
        Ok(Response::new(ShutdownResult {}))
    }
}

/// A listening socket at `path` that is removed on drop, if it is still the one bound.
#[derive(Debug)]
struct Bound {
    path: PathBuf,
    ino: u64,
}

impl Drop for Bound {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path`: its directory is created when missing, a stale socket (nobody answers on it)
/// is replaced, a live one or another file is not.
fn bind(path: &Path) -> std::io::Result<(std::os::unix::net::UnixListener, Bound)> {
    use std::io::{Error, ErrorKind};
    let ctx =
        |e: Error, what: &str| Error::new(e.kind(), format!("{what} {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| ctx(e, "cannot create the directory of"))?;
    }
    let listener = match std::os::unix::net::UnixListener::bind(path) {
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            let meta = std::fs::symlink_metadata(path).map_err(|e| ctx(e, "cannot look at"))?;
            if !meta.file_type().is_socket() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::new(
                    ErrorKind::AddrInUse,
                    format!("another process serves on {}", path.display()),
                ));
            }
            log::info!("replacing the stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|e| ctx(e, "cannot remove the stale socket"))?;
            std::os::unix::net::UnixListener::bind(path)
        }
        other => other,
    }
    .map_err(|e| ctx(e, "cannot listen on"))?;
    listener.set_nonblocking(true)?;
    let ino = std::fs::symlink_metadata(path)
        .map_err(|e| ctx(e, "cannot look at"))?
        .ino();
    Ok((
        listener,
        Bound {
            path: path.to_path_buf(),
            ino,
        },
    ))
}

/// Serves the hook on `socket` until SIGTERM, SIGINT or `Shutdown`; the socket is removed at
/// the end.
pub fn run(socket: &Path, config: HookConfig) -> std::io::Result<()> {
    match &config.fixed {
        Some((source, devices)) => {
            for d in devices {
                log::info!(
                    "vGPU {} (instance {}, type {}) on {}, from {source}",
                    d.device_id(),
                    d.uuid,
                    d.type_key,
                    d.socket.display()
                );
            }
        }
        None => log::info!(
            "no --vgpu-socket or ${}: each VMI's {} annotation names its sockets",
            hook::ENV_SOCKET,
            hook::SOCKET_ANNOTATION
        ),
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (listener, bound) = bind(socket)?;
    rt.block_on(serve(listener, config))?;
    drop(bound);
    log::info!("stopped; {} removed", socket.display());
    Ok(())
}

async fn serve(
    listener: std::os::unix::net::UnixListener,
    config: HookConfig,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .unwrap_or_default();
    let (stop, _) = watch::channel(false);
    let hook = Arc::new(Hook { config, stop });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let on_signal = hook.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        log::info!("{name}: stopping");
        on_signal.stop.send_replace(true);
    });

    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let router = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .timeout(REQUEST_TIMEOUT)
        .add_service(
            info::info_server::InfoServer::new(InfoService).max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            v1alpha3::callbacks_server::CallbacksServer::new(V1alpha3(hook.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            v1alpha2::callbacks_server::CallbacksServer::new(V1alpha2(hook.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        );
    log::info!(
        "serving KubeVirt's hook API ({}) on {}",
        VERSIONS.join(", "),
        path.display()
    );
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let served = router.serve_with_incoming_shutdown(incoming, stopped(hook.stop.subscribe()));
    let grace = stopped(hook.stop.subscribe());
    tokio::select! {
        r = served => r.map_err(std::io::Error::other),
        () = async { grace.await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            log::warn!("connections still open {SHUTDOWN_GRACE:?} after the stop; closing them");
            Ok(())
        }
    }
}
