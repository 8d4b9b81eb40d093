//! What `--vnc`, `--web`, `--novnc-dir` and the password options ask for, validated before
//! anything listens.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where Debian's `novnc` package puts noVNC.
pub const DEFAULT_NOVNC_DIR: &str = "/usr/share/novnc";

/// How many ports `--vnc ADDR:PORT` gives the daemon when no `-LAST` is named.
pub const DEFAULT_DAEMON_PORTS: u16 = 100;

/// `--vnc ADDR:PORT[-LAST]`: the address raw RFB listeners bind and the ports they may take.
/// Port 0 means one ephemeral port per head (what `status` then reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VncListen {
    /// Address to bind.
    pub ip: IpAddr,
    /// First port of the range (0: ephemeral ports).
    pub first: u16,
    /// Last port of the range, when named.
    pub last: Option<u16>,
}

impl VncListen {
    /// The ports to hand out, given how many a user of this listener needs when no range was
    /// named (`serve`: one per head; the daemon: [`DEFAULT_DAEMON_PORTS`]).
    pub fn range(&self, default_count: u16) -> (u16, u16) {
        match (self.first, self.last) {
            (0, _) => (0, 0),
            (first, Some(last)) => (first, last),
            (first, None) => (
                first,
                first.saturating_add(default_count.max(1).saturating_sub(1)),
            ),
        }
    }
}

impl FromStr for VncListen {
    type Err = String;

    fn from_str(s: &str) -> Result<VncListen, String> {
        let (host, ports) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not ADDR:PORT[-LAST] (e.g. 127.0.0.1:5900)"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let ip: IpAddr = host
            .parse()
            .map_err(|_| format!("`{host}` is not an IP address (use 127.0.0.1 or ::1)"))?;
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("`{p}` is not a port number (0-65535)"))
        };
        let (first, last) = match ports.split_once('-') {
            Some((a, b)) => (port(a)?, Some(port(b)?)),
            None => (port(ports)?, None),
        };
        if let Some(last) = last {
            if first == 0 || last < first {
                return Err(format!(
                    "port range {first}-{last} is empty (FIRST-LAST with 0 < FIRST <= LAST)"
                ));
            }
        }
        Ok(VncListen { ip, first, last })
    }
}

/// Parses `--web ADDR:PORT`.
pub fn parse_web(s: &str) -> Result<SocketAddr, String> {
    let l: VncListen = s.parse()?;
    if l.last.is_some() {
        return Err(format!("`{s}`: --web takes one port, not a range"));
    }
    Ok(SocketAddr::new(l.ip, l.first))
}

/// The viewer options of `serve` and `daemon`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViewerConfig {
    /// Raw RFB listeners, one per head.
    pub vnc: Option<VncListen>,
    /// The HTTP/WebSocket port (noVNC).
    pub web: Option<SocketAddr>,
    /// Where noVNC's files are.
    pub novnc_dir: PathBuf,
    /// The VncAuth password (`--vnc-password-file`); `None`: no authentication.
    pub password: Option<Vec<u8>>,
    /// `--vnc-insecure`: serve a non-loopback address without a password.
    pub insecure: bool,
}

/// Why the viewer options cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ViewerConfigError {
    /// A non-loopback address without a password.
    #[error(
        "{0} is not a loopback address: anyone who reaches it would see the guest's screen. Give \
         --vnc-password-file FILE (VNC authentication; weak, so prefer an SSH tunnel to a \
         loopback address), or --vnc-insecure to serve it without a password"
    )]
    NeedsPassword(IpAddr),
    /// The password file could not be read.
    #[error("cannot read the VNC password file {path}: {source}")]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The password file holds no password.
    #[error("the VNC password file {0} is empty")]
    EmptyPassword(PathBuf),
    /// Options that only make sense with a listener.
    #[error("{0} needs --vnc or --web")]
    Orphan(&'static str),
}

impl ViewerConfig {
    /// Whether any viewer listens.
    pub fn enabled(&self) -> bool {
        self.vnc.is_some() || self.web.is_some()
    }

    /// Builds and checks the options: a non-loopback address needs a password or `insecure`.
    pub fn new(
        vnc: Option<VncListen>,
        web: Option<SocketAddr>,
        novnc_dir: Option<PathBuf>,
        password_file: Option<&Path>,
        insecure: bool,
    ) -> Result<ViewerConfig, ViewerConfigError> {
        if vnc.is_none() && web.is_none() {
            if password_file.is_some() {
                return Err(ViewerConfigError::Orphan("--vnc-password-file"));
            }
            if insecure {
                return Err(ViewerConfigError::Orphan("--vnc-insecure"));
            }
            if novnc_dir.is_some() {
                return Err(ViewerConfigError::Orphan("--novnc-dir"));
            }
        }
        let password = match password_file {
            Some(path) => Some(read_password(path)?),
            None => None,
        };
        let exposed = vnc
            .map(|v| v.ip)
            .into_iter()
            .chain(web.map(|w| w.ip()))
            .find(|ip| !ip.is_loopback());
        if let Some(ip) = exposed {
            if password.is_none() && !insecure {
                return Err(ViewerConfigError::NeedsPassword(ip));
            }
        }
        Ok(ViewerConfig {
            vnc,
            web,
            novnc_dir: novnc_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_NOVNC_DIR)),
            password,
            insecure,
        })
    }
}

/// The first line of `path`, without its line end. Only 8 bytes count in VNC authentication;
/// a longer password is accepted with a warning (every VNC server truncates it).
fn read_password(path: &Path) -> Result<Vec<u8>, ViewerConfigError> {
    use std::io::Read as _;
    let err = |source| ViewerConfigError::PasswordFile {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(err)?
        .take(4096)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err(ViewerConfigError::EmptyPassword(path.to_path_buf()));
    }
    if line.len() > 8 {
        log::warn!(
            "VNC authentication uses only the first 8 bytes of the password in {}",
            path.display()
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                log::warn!(
                    "{} is readable by other users (chmod 600 it)",
                    path.display()
                );
            }
        }
    }
    Ok(line.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_with_ranges_and_ipv6() {
        let v: VncListen = "127.0.0.1:5900".parse().unwrap();
        assert_eq!(v.range(4), (5900, 5903));
        let v: VncListen = "[::1]:5900-5999".parse().unwrap();
        assert_eq!(v.ip, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(v.range(4), (5900, 5999));
        let v: VncListen = "127.0.0.1:0".parse().unwrap();
        assert_eq!(v.range(4), (0, 0));
        assert_eq!(
            "127.0.0.1:65535".parse::<VncListen>().unwrap().range(100),
            (65535, 65535)
        );
        for bad in [
            "5900",
            "localhost:5900",
            "127.0.0.1:x",
            "127.0.0.1:5910-5900",
            "127.0.0.1:0-10",
            "127.0.0.1:70000",
        ] {
            assert!(bad.parse::<VncListen>().is_err(), "{bad}");
        }
        assert!(parse_web("127.0.0.1:6080-6090").is_err());
        assert_eq!(
            parse_web("127.0.0.1:6080").unwrap(),
            "127.0.0.1:6080".parse().unwrap()
        );
    }

    #[test]
    fn exposed_addresses_need_a_password_or_insecure() {
        let any: VncListen = "0.0.0.0:5900".parse().unwrap();
        let lo: VncListen = "127.0.0.1:5900".parse().unwrap();
        let e = ViewerConfig::new(Some(any), None, None, None, false).unwrap_err();
        assert!(e.to_string().contains("--vnc-password-file"), "{e}");
        let e = ViewerConfig::new(
            Some(lo),
            Some(parse_web("0.0.0.0:6080").unwrap()),
            None,
            None,
            false,
        )
        .unwrap_err();
        assert!(matches!(e, ViewerConfigError::NeedsPassword(_)));
        assert!(ViewerConfig::new(Some(any), None, None, None, true).is_ok());
        assert!(ViewerConfig::new(Some(lo), None, None, None, false).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let c = ViewerConfig::new(Some(any), None, None, Some(&pw), false).unwrap();
        assert_eq!(c.password.as_deref(), Some(&b"s3cret"[..]));
        std::fs::write(&pw, "\n").unwrap();
        assert!(matches!(
            ViewerConfig::new(Some(lo), None, None, Some(&pw), false),
            Err(ViewerConfigError::EmptyPassword(_))
        ));
        assert!(matches!(
            ViewerConfig::new(None, None, None, Some(&pw), false),
            Err(ViewerConfigError::Orphan(_))
        ));
    }
}
