//! `vgpu-emu`: emulated mediated vGPU devices served to VMs over vfio-user.

use std::error::Error as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use vgpu_emu::cli::serve::{self, ServeConfig};
use vgpu_emu::error::{CliError, EXIT_DIFFERENT};
use vgpu_emu::sys::socket::control_path;
use vgpu_emu::{catalog_cmd, control};

/// Emulated mediated vGPU devices, served to virtual machines over vfio-user.
///
/// With no command, `serve` runs: the default type on the default socket, printing the QEMU
/// options that attach it. Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more.
#[derive(Debug, Parser)]
#[command(name = "vgpu-emu", version, about, long_about)]
struct Cli {
    /// Load extra vGPU types from a TOML file of at most 1 MiB (repeatable; `vgpu-emu types
    /// --help` lists its fields).
    #[arg(long = "types-file", value_name = "FILE", global = true)]
    types_files: Vec<PathBuf>,

    /// Lock file of released user type versions (`vgpu-emu lock` writes it): refuse a locked
    /// version of any --types-file that changed or is gone. A FILE.lock beside a --types-file
    /// FILE is checked whenever it exists. With `lock`: the file to write.
    #[arg(long = "lock-file", value_name = "LOCK", global = true)]
    lock_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one vGPU instance over vfio-user until SIGINT or SIGTERM (the default command).
    Serve(ServeArgs),
    /// List every vGPU type version with its parent family, personality, available/max
    /// instances and NVIDIA-style description. `--help` also prints the type-file reference.
    #[command(after_long_help = vgpu_model::catalog::TYPE_FILE_REFERENCE)]
    Types {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print every guest-visible property of one type version and its ABI fingerprint.
    Describe {
        /// NAME (newest non-deprecated version), NAME@VERSION, or an mdev type directory
        /// (vgpu_emu-emu_64m-v1).
        #[arg(value_name = "NAME[@VERSION]|TYPE-DIR")]
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Write the type's EDID (128 bytes, serial: the nil UUID) to FILE (`-`: stdout) for
        /// edid-decode, instead of the description.
        #[arg(long, value_name = "FILE")]
        edid: Option<PathBuf>,
        /// Write the config space a guest reads at power-on, in `lspci -x` form, to FILE (`-`:
        /// stdout) for `lspci -F FILE -vv`, instead of the description.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Compare two type versions: every guest-visible difference (PCI identity, BARs,
    /// capabilities, features, framebuffer, heads, resolutions, FRL, EDID modes, and the raw
    /// config space, EDID and register bytes a guest reads at power-on). Exits 0 when the
    /// versions are identical to a guest, 1 when they differ (like diff(1)).
    Diff {
        /// First type: NAME (newest non-deprecated version), NAME@VERSION or a type directory.
        #[arg(value_name = "A[@VERSION]")]
        a: String,
        /// Second type.
        #[arg(value_name = "B[@VERSION]")]
        b: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pin the released versions of user types: write the ABI fingerprint of every version the
    /// --types-file files define to a lock file that every command then checks.
    ///
    /// The lock file is --lock-file LOCK, else FILE.lock beside the one --types-file FILE. From
    /// then on a locked version edited in place or deleted is refused (exit 2) wherever the type
    /// file is loaded. `lock` only adds versions not locked yet; when a locked one changed or is
    /// gone it refuses (exit 2) and leaves the file as it was: add a new version instead.
    Lock,
    /// Show a running instance: type, client, display mode, counters.
    Status {
        /// The instance's vfio-user socket [default: the one `serve` uses by default,
        /// $XDG_RUNTIME_DIR/vgpu-emu.sock, else /tmp/vgpu-emu-UID.sock].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve many instances and an mdev-shaped tree at ROOT/sys (FUSE) that mdevctl drives
    /// with MDEVCTL_ENV_ROOT=ROOT, until SIGINT or SIGTERM.
    Daemon {
        /// Root directory [default: $XDG_RUNTIME_DIR/vgpu-emu, else /run/vgpu-emu].
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// A simulated physical GPU, NAME=FAMILY (repeatable; NAME: up to 64 of letters,
        /// digits and `-_.:`, starting with a letter or digit) [default: one parent per type
        /// family: emu0=emu, m60-0=m60].
        #[arg(long = "parent", value_name = "NAME=FAMILY")]
        parents: Vec<vgpu_emu::manage::manager::ParentSpec>,
        /// Start the definitions in ROOT/etc/mdevctl.d marked "start": "auto".
        #[arg(long)]
        autostart: bool,
        /// How long removing an instance that a client uses waits for the client to release
        /// it after asking (the VFIO request interrupt), before failing with EBUSY.
        #[arg(long, value_name = "SECONDS", default_value_t = vgpu_emu::manage::manager::RELEASE_TIMEOUT.as_secs_f64())]
        release_timeout: f64,
        /// Hand every instance's vfio-user socket to USER[:GROUP] (names or numbers; they stay
        /// 0600): the user the VMMs run as, e.g. libvirt-qemu (libvirt on Debian) or 107
        /// (KubeVirt's virt-launcher). Control sockets stay the daemon's.
        #[arg(long, value_name = "USER[:GROUP]")]
        socket_owner: Option<vgpu_emu::socket::Owner>,
        #[command(flatten)]
        viewers: ViewerArgs,
    },
    /// List a daemon's instances.
    List {
        /// The daemon's root [default: as `daemon`].
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create an instance on a daemon's parent (returns once it listens).
    Create {
        /// The daemon's root [default: as `daemon`].
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// Parent name.
        #[arg(long)]
        parent: String,
        /// Type: an mdev type directory (vgpu_emu-emu_64m-v1) or NAME[@VERSION].
        #[arg(long = "type", value_name = "TYPE")]
        ty: String,
        /// Instance UUID [default: a random one].
        #[arg(long)]
        uuid: Option<String>,
    },
    /// Remove an instance from a daemon (its socket goes away, capacity returns).
    Remove {
        /// The daemon's root [default: as `daemon`].
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// Instance UUID.
        uuid: String,
    },
    /// Change a running instance's runtime settings at once (not guest ABI; no reset), through
    /// its control endpoint PATH.ctl. Settings: frame_rate_limiter=0|1 (0 lifts the frame-rate
    /// limit: fences complete as soon as the command is processed).
    Set {
        /// The instance's vfio-user socket [default: the one `serve` uses by default,
        /// $XDG_RUNTIME_DIR/vgpu-emu.sock, else /tmp/vgpu-emu-UID.sock].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// KEY=VALUE (repeatable; all are applied, or none).
        #[arg(value_name = "KEY=VALUE", required = true, value_parser = parse_setting)]
        settings: Vec<(String, String)>,
    },
    /// Print what puts an instance into a libvirt domain, or merge it into a domain's XML.
    ///
    /// No libvirt release knows vfio-user, so the device goes in through libvirt's QEMU
    /// passthrough: the domain gets its guest RAM as a shared memfd (<memoryBacking>), a PCIe
    /// root port with a user alias (q35; pc machines use the root bus) and, in
    /// <qemu:commandline>, QEMU's JSON `-device vfio-user-pci` on that port. Without --domain the
    /// elements are printed to merge by hand; with --domain FILE (e.g. from `virsh dumpxml VM`)
    /// they are merged into it, and a domain whose memory backing conflicts (another source,
    /// private access, a private NUMA cell) or that has the instance already is refused (exit
    /// 2). Then `virsh define FILE`. The host side (socket access for libvirt's QEMU user,
    /// AppArmor): see the README.
    LibvirtXml {
        /// The instance's vfio-user socket [default: the one `serve` uses by default].
        #[arg(long, value_name = "PATH", conflicts_with = "uuid")]
        socket: Option<PathBuf>,
        /// The instance's UUID on a daemon (see --root).
        #[arg(long, value_name = "UUID")]
        uuid: Option<String>,
        /// The daemon's root, with --uuid [default: as `daemon`].
        #[arg(long, value_name = "DIR", requires = "uuid")]
        root: Option<PathBuf>,
        /// Merge into this domain XML and print the whole domain.
        #[arg(long, value_name = "FILE")]
        domain: Option<PathBuf>,
        /// Write the merged domain to FILE instead of stdout (it may be the --domain file
        /// itself; replaced atomically).
        #[arg(short = 'o', long = "output", value_name = "FILE", requires = "domain")]
        output: Option<PathBuf>,
    },
    /// Serve KubeVirt's hook API as a hook sidecar: add vfio-user vGPUs to the domain
    /// virt-launcher defines.
    ///
    /// Listens on --socket (gRPC: Info; Callbacks v1alpha3 and v1alpha2). On OnDefineDomain it
    /// adds what `libvirt-xml` adds (shared memfd guest RAM, a PCIe root port, QEMU's JSON
    /// -device vfio-user-pci) for each vfio-user socket, as the compute container sees it. The
    /// sockets come from --vgpu-socket; else from $VGPU_EMU_SOCKET (comma-separated, with
    /// $VGPU_EMU_UUID and $VGPU_EMU_TYPE naming the instances in the same order); else, per VMI,
    /// from its annotation vgpu-emu.io/socket (comma-separated). A domain that cannot take them
    /// (another memory backing, a partly merged device, no socket configured, malformed XML)
    /// gets a gRPC error saying why, never a half-changed domain. Stops on SIGTERM, SIGINT or
    /// KubeVirt's Shutdown callback (when the VM has ended), removing its socket.
    KubevirtHook {
        /// The hook socket virt-launcher finds (the sidecar's /var/run/kubevirt-hooks is a
        /// directory of the pod's shared hook volume).
        #[arg(long, value_name = "PATH", default_value = vgpu_emu::integrate::kubevirt::hook::DEFAULT_HOOK_SOCKET)]
        socket: PathBuf,
        /// A vfio-user socket to add, as the compute container (its QEMU) sees it
        /// (repeatable, or comma-separated). Wins over $VGPU_EMU_SOCKET and the annotation.
        #[arg(long = "vgpu-socket", value_name = "PATH", value_delimiter = ',')]
        vgpu_sockets: Vec<PathBuf>,
    },
    /// Offer a daemon's vGPU types to Kubernetes: a kubelet device plugin (API v1beta1) for
    /// the node's `vgpu-emu daemon`, until SIGINT or SIGTERM.
    ///
    /// Registers `vgpu-emu.io/NAME` (the newest non-deprecated version of a type name) and
    /// `vgpu-emu.io/NAME.vVERSION` (each version) for every servable type of the daemon's
    /// parents; Allocate creates an instance and mounts its socket in the container at
    /// /var/run/vgpu-emu/<NAME or NAME.vVERSION>/<i>.sock (VGPU_EMU_SOCKET, VGPU_EMU_UUID,
    /// VGPU_EMU_TYPE name them). Instances whose device no container holds any more (per
    /// kubelet's pod-resources API) are removed. See the README.
    DevicePlugin {
        /// The daemon's root [default: as `daemon`].
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// kubelet's device-plugin directory (its kubelet.sock; the plugin's sockets go there).
        #[arg(long, value_name = "DIR", default_value = vgpu_emu::integrate::k8s::KUBELET_DIR)]
        kubelet_dir: PathBuf,
        /// kubelet's pod-resources socket.
        #[arg(long, value_name = "PATH", default_value = vgpu_emu::integrate::k8s::POD_RESOURCES_SOCKET)]
        pod_resources_socket: PathBuf,
        /// Where the plugin records the instances it created (allocations.json).
        #[arg(long, value_name = "DIR", default_value = vgpu_emu::integrate::k8s::STATE_DIR)]
        state_dir: PathBuf,
        /// Register only these: NAME for vgpu-emu.io/NAME, NAME@VERSION for
        /// vgpu-emu.io/NAME.vVERSION (comma-separated or repeated) [default: all].
        #[arg(long, value_name = "NAME[@V],...", value_delimiter = ',')]
        types: Vec<vgpu_emu::integrate::k8s::plugin::TypeSel>,
        /// How often the daemon's capacity and instances are read (device lists are re-sent
        /// when they change).
        #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
        poll_interval: f64,
        /// How often the instances the plugin created are checked against kubelet's
        /// pod-resources list.
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
        reconcile_interval: f64,
        /// How long an instance whose device no container holds is kept (Allocate comes
        /// before the pod shows in the pod-resources list).
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
        grace: f64,
    },
    /// Save a head's current image as PNG.
    Screenshot {
        /// The instance's vfio-user socket [default: the one `serve` uses by default,
        /// $XDG_RUNTIME_DIR/vgpu-emu.sock, else /tmp/vgpu-emu-UID.sock].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Head to capture.
        #[arg(long, default_value_t = 0)]
        head: u32,
        /// Output PNG file (`-`: stdout).
        #[arg(short = 'o', long = "output", value_name = "FILE.png")]
        output: PathBuf,
    },
}

/// `serve` options.
#[derive(Debug, Default, Args)]
struct ServeArgs {
    /// vGPU type, NAME, NAME@VERSION or a type directory (vgpu_emu-emu_64m-v1) [default: the
    /// catalog's default type, see `types`].
    #[arg(long = "type", value_name = "NAME[@VERSION]")]
    type_spec: Option<String>,
    /// vfio-user socket to create [default: $XDG_RUNTIME_DIR/vgpu-emu.sock, else
    /// /tmp/vgpu-emu-UID.sock]. A control socket PATH.ctl is created beside it.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Instance UUID [default: a random one].
    #[arg(long, value_name = "UUID")]
    uuid: Option<String>,
    /// Start with the frame-rate limiter on (1) or off (0); `vgpu-emu set` changes it later.
    #[arg(long = "frame-rate-limiter", value_name = "0|1", default_value = "1", value_parser = parse_bit)]
    frame_rate_limiter: Option<bool>,
    /// Hand the vfio-user socket to USER[:GROUP] (names or numbers; it stays 0600): the user
    /// the VMM runs as, e.g. libvirt-qemu for libvirt's QEMU on Debian. The control socket stays
    /// the server's.
    #[arg(long, value_name = "USER[:GROUP]")]
    socket_owner: Option<vgpu_emu::socket::Owner>,
    #[command(flatten)]
    viewers: ViewerArgs,
}

/// Live viewers of the heads (`serve` and `daemon`).
#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Viewers (VNC, noVNC in a browser)")]
struct ViewerArgs {
    /// Serve each head over VNC (RFB 3.8, view-only). `serve`: head N on PORT+N; `daemon`: each
    /// head takes the lowest free port of PORT-LAST [default LAST: PORT+99]. Port 0: an
    /// ephemeral port per head. `status` and `list` show the ports.
    #[arg(long, value_name = "ADDR:PORT[-LAST]")]
    vnc: Option<vgpu_emu::display::config::VncListen>,
    /// Serve a page listing every head on ADDR:PORT, each opening in noVNC over WebSocket
    /// (/ws/UUID/HEAD). Port 0: an ephemeral port.
    #[arg(long, value_name = "ADDR:PORT", value_parser = vgpu_emu::display::config::parse_web)]
    web: Option<std::net::SocketAddr>,
    /// Where noVNC's files are (Debian package `novnc`) [default: /usr/share/novnc].
    #[arg(long, value_name = "DIR")]
    novnc_dir: Option<PathBuf>,
    /// Ask viewers for the password in FILE's first line (VNC authentication: only 8 bytes
    /// count and it is weak; prefer an SSH tunnel to a loopback address). Required, or
    /// --vnc-insecure, when --vnc or --web binds a non-loopback address.
    #[arg(long, value_name = "FILE")]
    vnc_password_file: Option<PathBuf>,
    /// Serve a non-loopback --vnc or --web address without a password.
    #[arg(long)]
    vnc_insecure: bool,
}

impl TryFrom<ViewerArgs> for vgpu_emu::display::config::ViewerConfig {
    type Error = CliError;
    fn try_from(a: ViewerArgs) -> Result<Self, CliError> {
        Ok(vgpu_emu::display::config::ViewerConfig::new(
            a.vnc,
            a.web,
            a.novnc_dir,
            a.vnc_password_file.as_deref(),
            a.vnc_insecure,
        )?)
    }
}

/// `0` or `1`.
fn parse_bit(s: &str) -> Result<bool, String> {
    match s {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err("expected 0 or 1".into()),
    }
}

/// `KEY=VALUE`.
fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!(
            "expected KEY=VALUE, e.g. frame_rate_limiter=0 (settings: {})",
            vgpu_emu::instance::KNOBS.join(", ")
        )),
    }
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = CliError;
    fn try_from(args: ServeArgs) -> Result<Self, CliError> {
        let uuid = match args.uuid {
            Some(u) => Uuid::parse_str(&u).map_err(|_| CliError::BadUuid(u))?,
            None => Uuid::new_v4(),
        };
        Ok(ServeConfig {
            type_spec: args.type_spec,
            socket: args.socket.unwrap_or_else(serve::default_socket),
            uuid,
            frame_rate_limiter: args.frame_rate_limiter.unwrap_or(true),
            viewers: args.viewers.try_into()?,
            socket_owner: args.socket_owner,
        })
    }
}

fn print(out: &str) {
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = std::io::stdout().write_all(out.as_bytes());
}

/// Writes `bytes` to `path`, or to stdout when `path` is `-`.
fn write_output(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let result = if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes).and_then(|()| out.flush())
    } else {
        std::fs::write(path, bytes)
    };
    result.map_err(|source| CliError::Output {
        path: path.to_path_buf(),
        source,
    })
}

fn status_text(s: &vgpu_emu::instance::Status) -> String {
    let yes_no = |b: bool, yes: &str, no: &str| if b { yes } else { no }.to_string();
    let mut rows = vec![
        ("type".to_string(), s.type_key.clone()),
        ("uuid".into(), s.uuid.clone()),
        ("socket".into(), s.socket.clone()),
        (
            "client".into(),
            yes_no(s.client_connected, "connected", "not connected"),
        ),
    ];
    rows.extend(s.heads.iter().map(|h| {
        let frames = h.frames.map_or(String::new(), |f| {
            format!(
                "; frames {} submitted, {} presented, {} dropped, {:.1}/s",
                f.submitted, f.presented, f.dropped, f.present_rate
            )
        });
        let view = [("vnc", &h.vnc), ("web", &h.web)]
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("; {k} {v}"))
            .collect::<String>();
        (
            format!("head {}", h.head),
            format!("{}{frames}{view}", h.mode),
        )
    }));
    rows.push(("blanked".into(), yes_no(s.blanked, "yes", "no")));
    let frl = if s.frl == 0 {
        "off".to_string()
    } else {
        format!("{} fps", s.frl)
    };
    let rt = &s.frl_runtime;
    rows.push((
        "frl".into(),
        format!(
            "{frl}, frame_rate_limiter {}; {} ticks released {} completions ({} wake-ups; tick \
             lateness p50 {} us, p99 {} us, max {} us; tick thread {})",
            yes_no(s.frame_rate_limiter, "on", "off"),
            rt.ticks,
            rt.released,
            rt.wakeups,
            rt.p50_lateness_us,
            rt.p99_lateness_us,
            rt.max_lateness_us,
            yes_no(
                rt.realtime,
                "real-time (SCHED_FIFO 1)",
                "in the default policy"
            )
        ),
    ));
    let (sv, a) = (&s.server, &s.accesses);
    rows.push((
        "protocol".into(),
        format!(
            "{} messages, {} errors, {} connections ({} refused)",
            sv.messages, sv.errors, sv.connections, sv.refused_connections
        ),
    ));
    rows.push((
        "accesses".into(),
        format!(
            "config {}r/{}w, registers {}r/{}w ({} ignored), trapped VRAM {}, refused {}, resets {}",
            a.config_reads,
            a.config_writes,
            a.register_reads,
            a.register_writes,
            a.ignored_writes,
            a.vram_accesses,
            a.refused,
            a.resets
        ),
    ));
    rows.iter().map(|(k, v)| format!("{k:<10} {v}\n")).collect()
}

/// Runs the command; `Ok` carries the exit code of a command that succeeded (`diff`: 1 when the
/// versions differ).
fn run(cli: Cli) -> Result<u8, CliError> {
    let command = cli.command.unwrap_or(Command::Serve(ServeArgs::default()));
    match command {
        Command::Diff { a, b, json } => {
            let catalog = catalog_cmd::load_catalog(&cli.types_files, cli.lock_file.as_deref())?;
            let (out, identical) = catalog_cmd::diff(&catalog, &a, &b, json)?;
            print(&out);
            return Ok(if identical { 0 } else { EXIT_DIFFERENT });
        }
        Command::Lock => {
            let catalog = catalog_cmd::load_unlocked(&cli.types_files)?;
            print(&vgpu_emu::cli::lock::lock(
                &catalog,
                &cli.types_files,
                cli.lock_file.as_deref(),
            )?);
            Ok(())
        }
        Command::Serve(args) => {
            let catalog = catalog_cmd::load_catalog(&cli.types_files, cli.lock_file.as_deref())?;
            serve::run(&catalog, &ServeConfig::try_from(args)?)
        }
        Command::Types { json } => {
            let (catalog, locked) =
                catalog_cmd::load_locked(&cli.types_files, cli.lock_file.as_deref())?;
            print(&catalog_cmd::types(&catalog, &locked, json)?);
            Ok(())
        }
        Command::Describe {
            name,
            json,
            edid,
            config,
        } => {
            let (catalog, locked) =
                catalog_cmd::load_locked(&cli.types_files, cli.lock_file.as_deref())?;
            if edid.is_none() && config.is_none() {
                print(&catalog_cmd::describe(&catalog, &locked, &name, json)?);
                return Ok(0);
            }
            let stdout = Path::new("-");
            if edid.as_deref() == Some(stdout) && config.as_deref() == Some(stdout) {
                return Err(CliError::Config(
                    "--edid and --config cannot both write to stdout".into(),
                ));
            }
            let ty = catalog_cmd::resolve(&catalog, &name)?;
            let config_text = match &config {
                Some(_) => Some(catalog_cmd::config_dump(&catalog, ty)?),
                None => None,
            };
            if let Some(path) = &edid {
                write_output(path, &catalog_cmd::edid_bytes(ty))?;
            }
            if let (Some(path), Some(text)) = (&config, config_text) {
                write_output(path, text.as_bytes())?;
            }
            Ok(())
        }
        Command::Daemon {
            root,
            parents,
            autostart,
            release_timeout,
            socket_owner,
            viewers,
        } => {
            let catalog = catalog_cmd::load_catalog(&cli.types_files, cli.lock_file.as_deref())?;
            let parents = if parents.is_empty() {
                catalog
                    .families()
                    .iter()
                    .map(|f| {
                        let sep = if f.name.ends_with(|c: char| c.is_ascii_digit()) {
                            "-"
                        } else {
                            ""
                        };
                        vgpu_emu::manage::manager::ParentSpec {
                            name: format!("{}{sep}0", f.name),
                            family: f.name.clone(),
                        }
                    })
                    .collect()
            } else {
                parents
            };
            let config = vgpu_emu::manage::daemon::DaemonConfig {
                root: root.unwrap_or_else(vgpu_emu::manage::daemon::default_root),
                parents,
                autostart,
                release_timeout: std::time::Duration::try_from_secs_f64(release_timeout)
                    .map_err(|e| CliError::Config(format!("--release-timeout: {e}")))?,
                viewers: viewers.try_into()?,
                socket_owner,
            };
            vgpu_emu::manage::daemon::run(catalog, &config)
        }
        Command::DevicePlugin {
            root,
            kubelet_dir,
            pod_resources_socket,
            state_dir,
            types,
            poll_interval,
            reconcile_interval,
            grace,
        } => {
            let secs = |what: &str, v: f64, min: f64| {
                if !(min..=86400.0).contains(&v) {
                    return Err(CliError::Config(format!(
                        "--{what} {v}: give {min} to 86400 seconds"
                    )));
                }
                Ok(std::time::Duration::from_secs_f64(v))
            };
            let config = vgpu_emu::integrate::k8s::Config {
                root: root.unwrap_or_else(vgpu_emu::manage::daemon::default_root),
                kubelet_dir,
                pod_resources_socket,
                state_dir,
                types,
                poll_interval: secs("poll-interval", poll_interval, 0.1)?,
                reconcile_interval: secs("reconcile-interval", reconcile_interval, 0.1)?,
                grace: secs("grace", grace, 0.0)?,
            };
            vgpu_emu::integrate::k8s::run(&config)
        }
        Command::List { root, json } => {
            let root = root.unwrap_or_else(vgpu_emu::manage::daemon::default_root);
            let reply = vgpu_emu::manage::daemon::request(&root, &vgpu_emu::manage::daemon::Request::List)?;
            let list = reply.instances.unwrap_or_default();
            if json {
                print(&(serde_json::to_string_pretty(&list)? + "\n"));
            } else {
                let mut out = String::from("UUID                                  PARENT  TYPE                    CLIENT  FRL  SOCKET\n");
                for i in &list {
                    out.push_str(&format!(
                        "{:<36}  {:<6}  {:<22}  {:<6}  {:<3}  {}\n",
                        i.uuid,
                        i.parent,
                        i.type_key,
                        if i.client_connected { "yes" } else { "no" },
                        if i.frame_rate_limiter { "on" } else { "off" },
                        i.socket
                    ));
                    for v in &i.viewers {
                        let mut line = format!("  head {}:", v.head);
                        if !v.vnc.is_empty() {
                            line.push_str(&format!(" vnc {}", v.vnc));
                        }
                        if !v.web.is_empty() {
                            line.push_str(&format!(" web {}", v.web));
                        }
                        out.push_str(&line);
                        out.push('\n');
                    }
                }
                print(&out);
            }
            Ok(())
        }
        Command::Create {
            root,
            parent,
            ty,
            uuid,
        } => {
            if let Some(u) = &uuid {
                Uuid::parse_str(u).map_err(|_| CliError::BadUuid(u.clone()))?;
            }
            let root = root.unwrap_or_else(vgpu_emu::manage::daemon::default_root);
            let reply = vgpu_emu::manage::daemon::request(
                &root,
                &vgpu_emu::manage::daemon::Request::Create { parent, ty, uuid },
            )?;
            print(&format!("{}\n", reply.uuid.unwrap_or_default()));
            Ok(())
        }
        Command::LibvirtXml {
            socket,
            uuid,
            root,
            domain,
            output,
        } => {
            let (xml, hints) = vgpu_emu::cli::libvirt_cmd::run(&vgpu_emu::cli::libvirt_cmd::LibvirtXmlArgs {
                socket,
                uuid,
                root,
                domain,
                output,
            })?;
            for h in hints {
                eprintln!("{h}");
            }
            print(&xml);
            Ok(())
        }
        Command::KubevirtHook {
            socket,
            vgpu_sockets,
        } => {
            use vgpu_emu::integrate::kubevirt::{hook::HookConfig, server};
            let config = HookConfig::new(&vgpu_sockets, |k| std::env::var_os(k))
                .map_err(|e| CliError::Config(e.to_string()))?;
            server::run(&socket, config).map_err(CliError::Runtime)
        }
        Command::Remove { root, uuid } => {
            Uuid::parse_str(&uuid).map_err(|_| CliError::BadUuid(uuid.clone()))?;
            let root = root.unwrap_or_else(vgpu_emu::manage::daemon::default_root);
            vgpu_emu::manage::daemon::request(&root, &vgpu_emu::manage::daemon::Request::Remove { uuid })?;
            Ok(())
        }
        Command::Status { socket, json } => {
            let socket = socket.unwrap_or_else(serve::default_socket);
            // The socket may be named through a link (the mdev tree's vfio-user.sock).
            let socket = std::fs::canonicalize(&socket).unwrap_or(socket);
            let s = control::status(&control_path(&socket))?;
            print(&if json {
                serde_json::to_string_pretty(&s)? + "\n"
            } else {
                status_text(&s)
            });
            Ok(())
        }
        Command::Set { socket, settings } => {
            // Checked here too, so bad input is told apart from an instance that is not there.
            for (k, v) in &settings {
                vgpu_emu::instance::Knob::parse(k, v)?;
            }
            let socket = socket.unwrap_or_else(serve::default_socket);
            let socket = std::fs::canonicalize(&socket).unwrap_or(socket);
            let applied = control::set(&control_path(&socket), settings.into_iter().collect())?;
            print(&applied.iter().map(|a| format!("{a}\n")).collect::<String>());
            Ok(())
        }
        Command::Screenshot {
            socket,
            head,
            output,
        } => {
            let socket = socket.unwrap_or_else(serve::default_socket);
            let socket = std::fs::canonicalize(&socket).unwrap_or(socket);
            let ctl = control_path(&socket);
            let heads = control::status(&ctl)?.heads.len();
            if head as usize >= heads {
                return Err(CliError::NoSuchHead { head, heads });
            }
            let png = control::screenshot(&ctl, head)?;
            write_output(&output, &png)?;
            let to = if output == Path::new("-") {
                "stdout".to_string()
            } else {
                output.display().to_string()
            };
            eprintln!("vgpu-emu: wrote head {head} of {} to {to}", socket.display());
            Ok(())
        }
    }
    .map(|()| 0)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let mut msg = format!("vgpu-emu: error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            for hint in e.hints() {
                eprintln!("  {hint}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// CLI defaults and config defaults agree: `serve` with no options and no subcommand at all
    /// serve the default type on the default socket.
    #[test]
    fn serve_defaults_match_config_defaults() {
        for argv in [&["vgpu-emu"][..], &["vgpu-emu", "serve"][..]] {
            let cli = Cli::try_parse_from(argv).unwrap();
            let args = match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
                Command::Serve(a) => a,
                other => panic!("{other:?}"),
            };
            let config = ServeConfig::try_from(args).unwrap();
            assert_eq!(config.type_spec, None);
            assert_eq!(config.socket, serve::default_socket());
        }
        let cli = Cli::try_parse_from(["vgpu-emu", "serve", "--uuid", "not-a-uuid"]).unwrap();
        let Some(Command::Serve(args)) = cli.command else {
            panic!()
        };
        assert!(matches!(
            ServeConfig::try_from(args),
            Err(CliError::BadUuid(_))
        ));
    }
}
