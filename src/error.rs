//! Top-level errors of the `vgpu-emu` binary and their exit codes.

use std::path::PathBuf;

use vgpu_model::{CatalogError, LookupError};

/// Exit code for bad input from the user: unknown type, bad type file, bad arguments (as clap).
pub const EXIT_USAGE: i32 = 2;
/// Exit code for failures at run time.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code of `diff` when the two type versions differ (as diff(1)).
pub const EXIT_DIFFERENT: u8 = 1;

/// What can end a `vgpu-emu` command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A type file could not be read.
    #[error("cannot read type file {}", path.display())]
    TypesFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A type file is larger than any type table could be.
    #[error("type file {} is larger than {} KiB; it cannot be a type table", path.display(), limit >> 10)]
    TypesFileTooLarge {
        /// The file.
        path: PathBuf,
        /// The most bytes read.
        limit: u64,
    },
    /// A type file (or the built-in table) is invalid.
    #[error("invalid vGPU type")]
    Catalog(#[from] CatalogError),
    /// A lock file is bad, or a locked type version changed or is gone.
    #[error(transparent)]
    Lock(#[from] crate::cli::lock::LockError),
    /// A type name did not resolve.
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// Output could not be encoded.
    #[error("cannot encode JSON")]
    Json(#[from] serde_json::Error),
    /// The catalog names no default type.
    #[error("no default type is defined; name one with --type")]
    NoDefaultType,
    /// The type's personality has no device model in this build.
    #[error(
        "type {ty} has personality `{personality}`, which this build lists but cannot serve yet"
    )]
    NotServable {
        /// Type key.
        ty: String,
        /// Its personality.
        personality: String,
        /// Types that can be served.
        servable: String,
    },
    /// A bad `--uuid`.
    #[error("invalid UUID `{0}`")]
    BadUuid(String),
    /// The socket path cannot be used.
    #[error(transparent)]
    Socket(#[from] crate::sys::socket::SocketError),
    /// The instance could not be created.
    #[error("cannot create the instance")]
    Instance(#[from] crate::instance::InstanceError),
    /// A control request failed.
    #[error(transparent)]
    Control(#[from] crate::manage::control::ControlError),
    /// The daemon refused a request.
    #[error("{message}")]
    Refused {
        /// The daemon's reason.
        message: String,
        /// The request named something wrong (a bad UUID, an unknown parent, type or instance),
        /// as opposed to a run-time refusal (no capacity, a taken UUID, a start failure).
        bad_input: bool,
    },
    /// `screenshot --head` names a head the instance does not have.
    #[error("head {head} does not exist; the instance has {heads} head(s), numbered from 0")]
    NoSuchHead {
        /// The head asked for.
        head: u32,
        /// Heads of the instance.
        heads: usize,
    },
    /// Writing an output file failed.
    #[error("cannot write {}", path.display())]
    Output {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bad daemon configuration.
    #[error("{0}")]
    Config(String),
    /// The daemon's root cannot be used.
    #[error(transparent)]
    Root(#[from] crate::manage::daemon::RootError),
    /// The FUSE tree could not be mounted.
    #[error("cannot mount the mdev tree at {}", path.display())]
    Mount {
        /// Mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bad `KEY=VALUE` runtime setting.
    #[error(transparent)]
    Setting(#[from] crate::instance::KnobError),
    /// Bad viewer options (`--vnc`, `--web`, the password).
    #[error(transparent)]
    ViewerConfig(#[from] crate::display::config::ViewerConfigError),
    /// The viewers could not listen.
    #[error(transparent)]
    Viewer(#[from] crate::display::service::ViewerError),
    /// A domain XML file could not be read.
    #[error("cannot read the domain XML {}: {source}", path.display())]
    DomainFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An instance cannot be merged into a domain.
    #[error("{}: {source}", path.display())]
    Libvirt {
        /// The domain file.
        path: PathBuf,
        /// Why.
        source: crate::integrate::libvirt::MergeError,
    },
    /// Another run-time failure.
    #[error("server failed")]
    Runtime(#[source] std::io::Error),
}

impl CliError {
    /// The process exit code for this error: the one mapping every subcommand uses. Bad input
    /// (what the user named or wrote is wrong) is [`EXIT_USAGE`], as clap's own errors are; a
    /// failure at run time is [`EXIT_FAILURE`]. Exhaustive, so a new variant must choose.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::TypesFile { .. }
            | CliError::TypesFileTooLarge { .. }
            | CliError::Catalog(_)
            | CliError::Lock(_)
            | CliError::Lookup(_)
            | CliError::NoDefaultType
            | CliError::NotServable { .. }
            | CliError::BadUuid(_)
            | CliError::NoSuchHead { .. }
            | CliError::Refused {
                bad_input: true, ..
            }
            | CliError::Config(_)
            | CliError::ViewerConfig(_)
            | CliError::DomainFile { .. }
            | CliError::Libvirt { .. }
            | CliError::Setting(_)
            | CliError::Control(crate::manage::control::ControlError::BadInput(_))
            | CliError::Root(_) => EXIT_USAGE,
            CliError::Json(_)
            | CliError::Socket(_)
            | CliError::Instance(_)
            | CliError::Control(_)
            | CliError::Refused {
                bad_input: false, ..
            }
            | CliError::Output { .. }
            | CliError::Mount { .. }
            | CliError::Viewer(_)
            | CliError::Runtime(_) => EXIT_FAILURE,
        }
    }

    /// Lines to print after the error itself (hints).
    pub fn hints(&self) -> Vec<String> {
        match self {
            CliError::Lookup(LookupError::UnknownName { suggestions, .. })
                if !suggestions.is_empty() =>
            {
                vec![
                    format!("close names: {}", suggestions.join(", ")),
                    "`vgpu-emu types` lists every type".into(),
                ]
            }
            CliError::Lookup(_) => vec!["`vgpu-emu types` lists every type".into()],
            CliError::NotServable { servable, .. } => {
                vec![format!("types this build serves: {servable}")]
            }
            CliError::Lock(e) => e.hints(),
            _ => Vec::new(),
        }
    }
}

/// An error and its causes on one line, `error: cause: cause's cause`, as the CLI prints them.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}
