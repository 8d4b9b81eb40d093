//! The control endpoint of an instance (`<socket>.ctl`), used by `vgpu-emu status` and
//! `vgpu-emu screenshot`.
//!
//! One request per connection: the client sends one JSON line, the server answers with one JSON
//! line and, for a screenshot, that many PNG bytes after it:
//!
//! ```text
//!  -> {"op":"status"}                 <- {"ok":true,"status":{...}}
//!  -> {"op":"screenshot","head":0}    <- {"ok":true,"png_bytes":N}\n<N bytes of PNG>
//!                                     <- {"ok":false,"error":"head 0 is not displaying: ..."}
//! ```
//!
//! It runs on its own thread: capturing holds the instance lock only for the copy out of VRAM,
//! and the PNG encode and the send happen without it, so a screenshot never delays the guest's
//! register accesses by more than one frame copy.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, warn};
use serde::{Deserialize, Serialize};

use crate::display::encode_png;
use crate::instance::{lock, SharedInstance, Status};

/// Longest request line.
const MAX_REQUEST: u64 = 4096;
/// How long a control client may take to send its request.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A control request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Instance status.
    Status,
    /// PNG of one head.
    Screenshot {
        /// Head index.
        head: u32,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    png_bytes: Option<u64>,
}

/// The running control thread.
#[derive(Debug)]
pub struct ControlServer {
    stop: Arc<AtomicBool>,
    path: std::path::PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Serves `listener` for `instance` on a new thread.
    pub fn spawn(
        listener: UnixListener,
        path: &Path,
        instance: SharedInstance,
    ) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(stream) => {
                            if let Err(e) = serve_one(stream, &instance) {
                                // The requester went away or stalled; its problem, not ours.
                                debug!("control request failed: {e}");
                            }
                        }
                        Err(e) => warn!("control accept failed: {e}"),
                    }
                }
            })?;
        Ok(ControlServer {
            stop,
            path: path.to_path_buf(),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(stream: UnixStream, instance: &SharedInstance) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    if line.trim().is_empty() {
        // A probe that connected and left (a readiness check): nothing to answer.
        return Ok(());
    }
    let mut out = &stream;
    let fail = |out: &mut &UnixStream, error: String| -> io::Result<()> {
        let reply = Reply {
            ok: false,
            error: Some(error),
            status: None,
            png_bytes: None,
        };
        writeln!(out, "{}", serde_json::to_string(&reply)?)
    };
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return fail(&mut out, format!("bad request: {e}")),
    };
    match request {
        Request::Status => {
            let status = lock(instance).status();
            let reply = Reply {
                ok: true,
                error: None,
                status: Some(status),
                png_bytes: None,
            };
            writeln!(out, "{}", serde_json::to_string(&reply)?)
        }
        Request::Screenshot { head } => {
            let frame = crate::instance::capture(instance, head);
            match frame {
                Err(e) => fail(&mut out, format!("head {head} is not displaying: {e}")),
                Ok(frame) => match encode_png(&frame) {
                    Err(e) => fail(&mut out, format!("PNG encoding failed: {e}")),
                    Ok(png) => {
                        let reply = Reply {
                            ok: true,
                            error: None,
                            status: None,
                            png_bytes: Some(png.len() as u64),
                        };
                        writeln!(out, "{}", serde_json::to_string(&reply)?)?;
                        out.write_all(&png)
                    }
                },
            }
        }
    }
}

/// Why a control request failed, as the CLI reports it.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens at the control path.
    #[error("no vgpu-emu instance answers at {}", .path.display())]
    Connect {
        /// The control socket.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The exchange broke off.
    #[error("control connection failed")]
    Io(#[from] io::Error),
    /// The instance answered with something unreadable.
    #[error("bad reply from the instance: {0}")]
    BadReply(String),
    /// The instance refused.
    #[error("{0}")]
    Refused(String),
}

fn exchange(
    control: &Path,
    request: &Request,
) -> Result<(Reply, BufReader<UnixStream>), ControlError> {
    let stream = UnixStream::connect(control).map_err(|source| ControlError::Connect {
        path: control.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut w = &stream;
    let line = serde_json::to_string(request).map_err(|e| ControlError::BadReply(e.to_string()))?;
    writeln!(w, "{line}")?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.by_ref().take(1 << 20).read_line(&mut header)?;
    let reply: Reply =
        serde_json::from_str(header.trim()).map_err(|e| ControlError::BadReply(e.to_string()))?;
    if !reply.ok {
        return Err(ControlError::Refused(
            reply.error.unwrap_or_else(|| "request refused".into()),
        ));
    }
    Ok((reply, reader))
}

/// Asks the instance at control socket `control` for its status (JSON).
pub fn status(control: &Path) -> Result<Status, ControlError> {
    let (reply, _) = exchange(control, &Request::Status)?;
    reply
        .status
        .ok_or_else(|| ControlError::BadReply("no status in reply".into()))
}

/// Most PNG bytes a client accepts (a 4K frame compresses far below this).
const MAX_PNG: u64 = 256 << 20;

/// Asks the instance for a PNG of `head`.
pub fn screenshot(control: &Path, head: u32) -> Result<Vec<u8>, ControlError> {
    let (reply, mut reader) = exchange(control, &Request::Screenshot { head })?;
    let n = reply
        .png_bytes
        .ok_or_else(|| ControlError::BadReply("no PNG size in reply".into()))?;
    if n > MAX_PNG {
        return Err(ControlError::BadReply(format!(
            "PNG of {n} bytes is implausibly large"
        )));
    }
    let mut png = Vec::with_capacity(n as usize);
    reader.by_ref().take(n).read_to_end(&mut png)?;
    if png.len() as u64 != n {
        return Err(ControlError::BadReply(format!(
            "PNG cut short at {} of {n} bytes",
            png.len()
        )));
    }
    Ok(png)
}
