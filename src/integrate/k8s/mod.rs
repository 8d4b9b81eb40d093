//! `vgpu-emu device-plugin`: a node's vGPU types as Kubernetes extended resources, through
//! kubelet's device-plugin API (v1beta1), beside the node's `vgpu-emu daemon`.
//!
//! - [`proto`]: kubelet's messages and services (device plugin v1beta1, pod resources v1)
//! - [`backend`]: what the plugin uses of the daemon (its tree and control socket)
//! - [`plugin`]: resources, devices, Allocate, the state file, removals
//! - [`kubelet`]: endpoints, registration and re-registration, the pod-resources list
//!
//! The tokio runtime lives in [`run`] alone: the rest of vgpu-emu is synchronous.
//!
//! The instances the plugin created are listed in `STATE_DIR/allocations.json`; only those are
//! ever removed by it, when kubelet's pod-resources list no longer shows their device held by a
//! container (after a grace period, since Allocate comes before the pod is listed), every
//! `--reconcile-interval` and at start.

pub mod backend;
pub mod kubelet;
pub mod plugin;
pub mod proto;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};

use crate::error::CliError;
use backend::{Backend, DaemonBackend};
use plugin::{Plugin, PluginSettings, TypeSel};

/// kubelet's device-plugin directory.
pub const KUBELET_DIR: &str = "/var/lib/kubelet/device-plugins";
/// kubelet's pod-resources socket.
pub const POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
/// Where the plugin keeps its state file.
pub const STATE_DIR: &str = "/var/lib/vgpu-emu/device-plugin";

/// Validated `device-plugin` settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The daemon's root.
    pub root: PathBuf,
    /// kubelet's device-plugin directory (its `kubelet.sock` and the plugin's endpoints).
    pub kubelet_dir: PathBuf,
    /// kubelet's pod-resources socket.
    pub pod_resources_socket: PathBuf,
    /// Where the state file lives.
    pub state_dir: PathBuf,
    /// Only these resources (all when empty).
    pub types: Vec<TypeSel>,
    /// How often the daemon's capacity and instances are read.
    pub poll_interval: Duration,
    /// How often held devices are checked against kubelet's pod-resources list.
    pub reconcile_interval: Duration,
    /// How long an allocation no container holds is kept.
    pub grace: Duration,
}

/// Runs the plugin until SIGINT or SIGTERM. Prints one line to stdout once every resource is
/// registered for the first time.
pub fn run(config: &Config) -> Result<(), CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    rt.block_on(run_async(config))
}

/// The offers of the daemon, once it has parents: waits for the daemon to come up.
async fn wait_for_daemon(backend: Arc<DaemonBackend>, poll: Duration) -> Vec<backend::Offer> {
    let mut logged = false;
    loop {
        let b = backend.clone();
        match tokio::task::spawn_blocking(move || b.offers()).await {
            Ok(Ok(offers)) if !offers.is_empty() => return offers,
            Ok(Ok(_)) => {}
            Ok(Err(e)) if !logged => {
                info!("waiting for the vgpu-emu daemon: {e}");
                logged = true;
            }
            _ => {}
        }
        tokio::time::sleep(poll).await;
    }
}

async fn run_async(config: &Config) -> Result<(), CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(CliError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(CliError::Runtime)?;

    let socket_len = config
        .kubelet_dir
        .join(kubelet::KUBELET_SOCKET)
        .as_os_str()
        .len();
    if socket_len + 64 > crate::sys::socket::MAX_SOCKET_PATH {
        return Err(CliError::Config(format!(
            "--kubelet-dir {} is too long for the sockets in it",
            config.kubelet_dir.display()
        )));
    }
    let state_file = plugin::state_file(&config.state_dir);
    let allocations = plugin::load_state(&state_file).map_err(CliError::Config)?;

    let backend = Arc::new(DaemonBackend::new(&config.root));
    let offers = tokio::select! {
        o = wait_for_daemon(backend.clone(), config.poll_interval) => o,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    let (resources, warnings) =
        plugin::resources(&offers, &config.types).map_err(CliError::Config)?;
    for w in warnings {
        warn!("{w}");
    }
    if resources.is_empty() {
        return Err(CliError::Config(
            "the daemon's parents offer no servable type: nothing to register".into(),
        ));
    }
    for r in &resources {
        info!("resource {}: type {}", r.resource_name(), r.type_key());
    }
    let names: Vec<String> = resources.iter().map(|r| r.resource_name()).collect();
    let plugin = Plugin::new(
        backend as Arc<dyn Backend>,
        PluginSettings {
            resources,
            state_file,
            grace: config.grace,
        },
        allocations,
    );
    plugin.refresh().await;
    // Instances of an earlier run that no container holds go now.
    kubelet::reconcile(&plugin, &config.pod_resources_socket).await;

    let poller = {
        let plugin = plugin.clone();
        let every = config.poll_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                plugin.refresh().await;
            }
        })
    };
    let reconciler = {
        let plugin = plugin.clone();
        let every = config.reconcile_interval;
        let socket = config.pod_resources_socket.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                kubelet::reconcile(&plugin, &socket).await;
            }
        })
    };
    let mut first = true;
    let dir = config.kubelet_dir.clone();
    let registration = kubelet::registration_loop(plugin.clone(), dir.clone(), move || {
        if std::mem::take(&mut first) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "vgpu-emu device-plugin: registered {} with kubelet in {}",
                names.join(" "),
                dir.display()
            );
            let _ = out.flush();
        }
    });
    tokio::select! {
        () = registration => {}
        _ = term.recv() => info!("SIGTERM: stopping (instances stay with their pods)"),
        _ = int.recv() => info!("SIGINT: stopping (instances stay with their pods)"),
    }
    poller.abort();
    reconciler.abort();
    Ok(())
}
