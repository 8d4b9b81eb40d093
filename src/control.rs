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
//! Requests are served concurrently (a few at a time, see [`ControlServer`]): capturing holds the instance lock only for the copy out of VRAM,
//! and the PNG encode and the send happen without it, so a screenshot never delays the guest's
//! register accesses by more than one frame copy.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, Level};
use mio::{Events, Interest, Poll, Token, Waker};
use serde::{Deserialize, Serialize};

use crate::display::encode_png;
use crate::instance::{lock, SharedInstance, Status};
use crate::log_limited;
use crate::ratelimit::RateLimit;

/// Longest request line.
const MAX_REQUEST: u64 = 4096;
/// How long the CLI waits for an instance's reply.
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

/// Most requests one endpoint serves at once; a client beyond them is told the endpoint is busy.
pub const MAX_CONNECTIONS: usize = 4;
/// How long a control client may take to send its request, and to take each part of the reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);

/// A control endpoint: an accept loop on its own thread that hands each connection to a
/// short-lived thread of its own, at most [`MAX_CONNECTIONS`] at a time. The accept loop never
/// waits on a client, so a silent or slow client delays neither other requests nor
/// [`ControlServer::stop`].
#[derive(Debug)]
pub struct ControlServer {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    active: Arc<Active>,
    thread: Option<JoinHandle<()>>,
}

/// The connections being served, to cut them off at stop.
#[derive(Debug, Default)]
struct Active {
    next: AtomicUsize,
    streams: Mutex<Vec<(usize, UnixStream)>>,
}

impl Active {
    fn streams(&self) -> std::sync::MutexGuard<'_, Vec<(usize, UnixStream)>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Takes a connection out of [`Active`] when its thread ends, however it ends.
struct Served<'a> {
    active: &'a Active,
    id: usize,
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        self.active.streams().retain(|(id, _)| *id != self.id);
    }
}

impl ControlServer {
    /// Serves the control endpoint of `instance` on `listener`.
    pub fn spawn(listener: UnixListener, instance: SharedInstance) -> io::Result<Self> {
        ControlServer::spawn_with(listener, "control", move |stream| {
            serve_one(stream, &instance)
        })
    }

    /// Serves `listener`, calling `handler` for each connection on a thread of its own (named
    /// after `name`). The handler's stream has [`REQUEST_TIMEOUT`] on reads and writes.
    pub fn spawn_with<F>(listener: UnixListener, name: &str, handler: F) -> io::Result<Self>
    where
        F: Fn(UnixStream) -> io::Result<()> + Send + Sync + 'static,
    {
        listener.set_nonblocking(true)?;
        let mut listener = mio::net::UnixListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(Active::default());
        let accept = Accept {
            poll,
            listener,
            stop: stop.clone(),
            active: active.clone(),
            handler: Arc::new(handler),
            name: name.to_string(),
            log: RateLimit::default(),
        };
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || accept.run())?;
        Ok(ControlServer {
            stop,
            waker,
            active,
            thread: Some(thread),
        })
    }

    /// Stops accepting, cuts off the requests in progress, and waits for the accept loop (which
    /// never waits on a client).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for (_, s) in self.active.streams().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = self.waker.wake();
        }
    }
}

/// The accept loop of a [`ControlServer`].
struct Accept<F> {
    poll: Poll,
    listener: mio::net::UnixListener,
    stop: Arc<AtomicBool>,
    active: Arc<Active>,
    handler: Arc<F>,
    name: String,
    log: RateLimit,
}

impl<F> Accept<F>
where
    F: Fn(UnixStream) -> io::Result<()> + Send + Sync + 'static,
{
    fn run(mut self) {
        let mut events = Events::with_capacity(8);
        // After a failed accept (out of descriptors, say), look again a little later: the
        // readiness was consumed, and the refused connection still waits in the backlog.
        let mut retry = None;
        while !self.stop.load(Ordering::SeqCst) {
            if let Err(e) = self.poll.poll(&mut events, retry) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log_limited!(self.log, Level::Warn, "{} poll failed: {e}", self.name);
                    retry = Some(Duration::from_millis(100));
                }
                continue;
            }
            retry = None;
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            loop {
                match self.listener.accept() {
                    Ok((stream, _)) => self.serve(UnixStream::from(stream)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log_limited!(self.log, Level::Warn, "{} accept failed: {e}", self.name);
                        retry = Some(Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
    }

    fn serve(&mut self, stream: UnixStream) {
        let mut streams = self.active.streams();
        if streams.len() >= MAX_CONNECTIONS {
            drop(streams);
            // Still non-blocking: a short line into an empty socket buffer, or nothing.
            let busy = serde_json::json!({
                "ok": false,
                "error": format!("busy: {MAX_CONNECTIONS} requests in progress; try again"),
            });
            let _ = writeln!(&stream, "{busy}");
            log_limited!(
                self.log,
                Level::Warn,
                "{}: {MAX_CONNECTIONS} requests in progress; refused another",
                self.name
            );
            return;
        }
        let id = self.active.next.fetch_add(1, Ordering::Relaxed);
        let prepared = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(REQUEST_TIMEOUT)))
            .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
            .and_then(|()| stream.try_clone());
        let handle = match prepared {
            Ok(h) => h,
            Err(e) => {
                log_limited!(self.log, Level::Warn, "{}: {e}", self.name);
                return;
            }
        };
        streams.push((id, handle));
        drop(streams);
        let (active, handler) = (self.active.clone(), self.handler.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("{}-{id}", self.name))
            .spawn(move || {
                let _served = Served {
                    active: &active,
                    id,
                };
                if let Err(e) = handler(stream) {
                    // The requester went away or stalled; its problem, not ours.
                    debug!("control request failed: {e}");
                }
            });
        if let Err(e) = spawned {
            self.active.streams().retain(|(i, _)| *i != id);
            log_limited!(
                self.log,
                Level::Warn,
                "{}: cannot start a request thread: {e}",
                self.name
            );
        }
    }
}

fn serve_one(stream: UnixStream, instance: &SharedInstance) -> io::Result<()> {
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
            let frame = lock(instance).device.capture(head);
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
