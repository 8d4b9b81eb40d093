//! `vgpu-emu serve`: one instance on one socket until SIGINT or SIGTERM.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use log::info;
use uuid::Uuid;
use vgpu_model::{Catalog, VgpuType};

use crate::display::config::ViewerConfig;
use crate::display::service::Viewers;
use crate::error::CliError;
use crate::instance::{start_runtime, Instance};
use crate::manage::control::ControlServer;
use crate::sys::socket::{self, control_path, RemoveOnDrop};
use crate::vfio_user::server::Server;

/// Validated `serve` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// `NAME[@VERSION]`, or `None` for the catalog's default type.
    pub type_spec: Option<String>,
    /// The vfio-user socket path.
    pub socket: PathBuf,
    /// Instance UUID (EDID serial; mdev identity).
    pub uuid: Uuid,
    /// The frame-rate-limiter knob to start with (`vgpu-emu set` changes it later).
    pub frame_rate_limiter: bool,
    /// Live viewers (`--vnc`, `--web`).
    pub viewers: ViewerConfig,
    /// Who the vfio-user socket is handed to (the VMM's user), if not the server's.
    pub socket_owner: Option<socket::Owner>,
}

/// The socket used when none is given: `$XDG_RUNTIME_DIR/vgpu-emu.sock`, else
/// `/tmp/vgpu-emu-<uid>.sock`.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => Path::new(&dir).join("vgpu-emu.sock"),
        // SAFETY: getuid has no preconditions and cannot fail.
        _ => PathBuf::from(format!("/tmp/vgpu-emu-{}.sock", unsafe { libc::getuid() })),
    }
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The QEMU options that attach the instance at `socket` (QEMU 10.1 or newer).
pub fn qemu_options(socket: &Path) -> String {
    let device = serde_json::json!({
        "driver": "vfio-user-pci",
        "socket": { "type": "unix", "path": socket.display().to_string() },
    });
    format!(
        "-object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem \\\n    -device {}",
        shell_quote(&device.to_string())
    )
}

/// Resolves the type to serve and checks this build can serve it.
pub fn resolve_servable<'a>(
    catalog: &'a Catalog,
    spec: Option<&str>,
) -> Result<&'a VgpuType, CliError> {
    let ty = match spec {
        Some(s) => crate::cli::catalog_cmd::resolve(catalog, s)?,
        None => catalog.default_type().ok_or(CliError::NoDefaultType)?,
    };
    if !ty.personality.is_implemented() {
        return Err(not_servable(catalog, ty));
    }
    if let Some(warning) = crate::cli::catalog_cmd::deprecation_warning(catalog, ty) {
        log::warn!("{warning}");
    }
    Ok(ty)
}

/// The error for a type whose personality this build cannot serve (or render), naming those it
/// can.
pub fn not_servable(catalog: &Catalog, ty: &VgpuType) -> CliError {
    let servable: Vec<String> = catalog
        .types()
        .iter()
        .filter(|t| t.personality.is_implemented() && !t.deprecated)
        .map(|t| t.key())
        .collect();
    CliError::NotServable {
        ty: ty.key(),
        personality: ty.personality.to_string(),
        servable: servable.join(", "),
    }
}

/// Runs `serve` until a signal arrives.
pub fn run(catalog: &Catalog, config: &ServeConfig) -> Result<(), CliError> {
    let ty = resolve_servable(catalog, config.type_spec.as_deref())?;
    let listener = socket::bind(&config.socket)?;
    let _socket_guard = RemoveOnDrop(config.socket.clone());
    if let Some(owner) = config.socket_owner {
        socket::give(&config.socket, owner)?;
    }
    let ctl_path = control_path(&config.socket);
    let ctl_listener = socket::bind(&ctl_path)?;
    let _ctl_guard = RemoveOnDrop(ctl_path.clone());

    let (mut instance, vram_file) = Instance::new(ty, config.uuid, config.socket.clone())?;
    // No runtime yet: nothing to wake.
    let _ = instance.set_frame_rate_limiter(config.frame_rate_limiter);
    let shared = Arc::new(Mutex::new(instance));
    // Viewers first: once the control socket answers, `status` names their addresses.
    let viewers = if config.viewers.enabled() {
        let v = Viewers::start(config.viewers.clone())?;
        let endpoints = v.add(&shared, true)?;
        Some((v, endpoints))
    } else {
        None
    };
    let runtime = start_runtime(&shared).map_err(CliError::Runtime)?;
    let control = ControlServer::spawn(ctl_listener, shared.clone()).map_err(CliError::Runtime)?;
    let (mut server, stop) = Server::new(listener, shared, vram_file).map_err(CliError::Runtime)?;

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(CliError::Runtime)?;
    let signal_handle = signals.handle();
    let stopper = stop.clone();
    let signal_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!("signal {sig} received; shutting down");
                stopper.stop();
            }
        })
        .map_err(CliError::Runtime)?;

    // Readiness lines; a closed stdout (`| head -1`) must not stop the server.
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "vgpu-emu: serving {} (uuid {}, {}) on {}",
        ty.key(),
        config.uuid,
        ty.nvidia_description(),
        config.socket.display()
    );
    let _ = writeln!(
        out,
        "Attach it with QEMU 10.1 or newer (guest RAM shared as a memfd{}):",
        if ty.personality == vgpu_model::Personality::VirtioGpu {
            ", which this virtio-gpu type needs"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "  qemu-system-x86_64 {} ...",
        qemu_options(&config.socket)
    );
    let heads = if ty.num_heads > 1 {
        format!(" --head N (N = 0..{})", ty.num_heads - 1)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "Status: vgpu-emu status --socket {0}    Screenshot: vgpu-emu screenshot --socket {0} -o screen.png{heads}",
        shell_quote(&config.socket.display().to_string())
    );
    if let Some((v, endpoints)) = &viewers {
        if let Some(url) = v.web_url() {
            let _ = writeln!(out, "Web: {url} ({})", v.web_offer());
        }
        for e in endpoints.iter().filter(|e| !e.vnc.is_empty()) {
            let _ = writeln!(out, "VNC: head {} on {}", e.head, e.vnc);
        }
    }
    let _ = out.flush();
    info!(
        "listening on {} (control {})",
        config.socket.display(),
        ctl_path.display()
    );

    let result = server.run();
    signal_handle.close();
    let _ = signal_thread.join();
    if let Some((v, _)) = viewers {
        v.stop();
    }
    runtime.stop();
    control.stop();
    info!(
        "stopped; removed {} and {}",
        config.socket.display(),
        ctl_path.display()
    );
    result.map_err(CliError::Runtime)
}
