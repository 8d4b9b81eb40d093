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
//!  -> {"op":"set","settings":{"frame_rate_limiter":"0"}}
//!                                     <- {"ok":true,"applied":["frame_rate_limiter=0"]}
//!                                     <- {"ok":false,"bad_input":true,"error":"unknown setting ..."}
//! ```
//!
//! `set` changes runtime settings (not guest ABI; [`crate::instance::Knob`]) at once: all of
//! them or, when one is unknown or has a bad value, none.
//!
//! One thread per endpoint serves a few clients at a time without ever waiting on one (see
//! [`ControlServer`]). Capturing holds the instance lock only for the copy out of VRAM, and the
//! PNG encode and the send happen without it, so a screenshot never delays the guest's register
//! accesses by more than one frame copy.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, Level};
use mio::{Events, Interest, Poll, Token, Waker};
use serde::{Deserialize, Serialize};

use crate::display::encode_png;
use crate::instance::{lock, Knob, SharedInstance, Status};
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
    /// Change runtime settings, `KEY` to `VALUE` (all or none).
    Set {
        /// The settings.
        settings: std::collections::BTreeMap<String, String>,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The refusal is the request's fault (an unknown setting, a bad value).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    bad_input: bool,
    /// What `set` applied, `KEY=VALUE` each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    applied: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    png_bytes: Option<u64>,
}

/// Most connections one endpoint holds at once; a client beyond them is told it is busy.
pub const MAX_CONNECTIONS: usize = 4;
/// How long a control client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a control client may take to read its reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// Connection `i` is `Token(FIRST_CONN + i)`.
const FIRST_CONN: usize = 2;

/// Answers one request line (never empty) by appending the reply's bytes to the buffer, or
/// later, through [`Later::defer`].
type Handler = dyn Fn(&str, &mut Vec<u8>, &Later) -> io::Result<()> + Send + Sync;

/// Lets a handler answer a request later, from another thread, when the answer waits on
/// something (a removal waiting for a client to let go): the endpoint goes on serving its other
/// clients meanwhile.
#[derive(Debug)]
pub struct Later {
    waker: Arc<Waker>,
    deferred: std::cell::RefCell<Option<mpsc::Receiver<Vec<u8>>>>,
}

impl Later {
    /// Defers the answer to this request: whatever was appended to the reply buffer is dropped,
    /// and the bytes given to [`Replier::reply`] are sent instead. A replier dropped without
    /// replying closes the connection.
    pub fn defer(&self) -> Replier {
        let (tx, rx) = mpsc::sync_channel(1);
        *self.deferred.borrow_mut() = Some(rx);
        Replier {
            tx,
            waker: self.waker.clone(),
        }
    }
}

/// The answer to a deferred request (see [`Later::defer`]).
#[derive(Debug)]
pub struct Replier {
    tx: mpsc::SyncSender<Vec<u8>>,
    waker: Arc<Waker>,
}

impl Replier {
    /// Sends the answer and wakes the endpoint.
    pub fn reply(self, bytes: Vec<u8>) {
        let _ = self.tx.send(bytes);
        let _ = self.waker.wake();
    }
}

impl Drop for Replier {
    fn drop(&mut self) {
        // A replier that never replied: the endpoint sees the channel closed.
        let _ = self.waker.wake();
    }
}

/// How long a deferred answer may take (the endpoint keeps the client that long at most).
const DEFERRED_TIMEOUT: Duration = Duration::from_secs(3600);

/// A control endpoint: one thread with a poll loop that reads requests and writes replies
/// without blocking, for at most [`MAX_CONNECTIONS`] clients at a time, each with a deadline.
/// It never waits on a client: a silent or slow one delays neither other requests nor
/// [`ControlServer::stop`], and no client can make it start a thread.
#[derive(Debug)]
pub struct ControlServer {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Serves the control endpoint of `instance` on `listener`.
    pub fn spawn(listener: UnixListener, instance: SharedInstance) -> io::Result<Self> {
        ControlServer::spawn_with(listener, "control", move |line, out, _| {
            serve_one(line, out, &instance)
        })
    }

    /// Serves `listener` on a thread named `name`, answering each request line with `handler`.
    pub fn spawn_with<F>(listener: UnixListener, name: &str, handler: F) -> io::Result<Self>
    where
        F: Fn(&str, &mut Vec<u8>, &Later) -> io::Result<()> + Send + Sync + 'static,
    {
        listener.set_nonblocking(true)?;
        let mut listener = mio::net::UnixListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let endpoint = Endpoint {
            poll,
            listener,
            stop: stop.clone(),
            conns: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            handler: Box::new(handler),
            waker: waker.clone(),
            name: name.to_string(),
            log: RateLimit::default(),
        };
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || endpoint.run())?;
        Ok(ControlServer {
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// Stops the endpoint, dropping the connections in progress, and waits for its thread
    /// (which never waits on a client).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// One client of an endpoint.
struct Conn {
    stream: mio::net::UnixStream,
    /// The request read so far.
    input: Vec<u8>,
    /// The reply, once there is one, and how much of it was sent.
    output: Option<(Vec<u8>, usize)>,
    /// A deferred reply still to come.
    pending: Option<mpsc::Receiver<Vec<u8>>>,
    deadline: Instant,
}

/// What to do with a connection after serving an event.
enum Next {
    Keep,
    Close(&'static str),
}

/// The loop of a [`ControlServer`].
struct Endpoint {
    poll: Poll,
    listener: mio::net::UnixListener,
    stop: Arc<AtomicBool>,
    conns: Vec<Option<Conn>>,
    handler: Box<Handler>,
    /// Wakes this loop (stop, deferred replies).
    waker: Arc<Waker>,
    name: String,
    log: RateLimit,
}

impl Endpoint {
    /// Sends the deferred answers that have arrived; closes connections whose replier went
    /// away without answering.
    fn deliver(&mut self) {
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else {
                continue;
            };
            let Some(rx) = &conn.pending else {
                continue;
            };
            match rx.try_recv() {
                Ok(reply) => {
                    conn.pending = None;
                    let next = answer(conn, reply, self.poll.registry(), slot);
                    if let Next::Close(why) = next {
                        debug!("{}: connection closed: {why}", self.name);
                        self.conns[slot] = None;
                    }
                }
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => {
                    debug!("{}: a deferred request was never answered", self.name);
                    self.conns[slot] = None;
                }
            }
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(16);
        // After a failed accept (out of descriptors, say), look again a little later: the
        // readiness was consumed, and the refused connection still waits in the backlog.
        let mut retry: Option<Instant> = None;
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let wake_at = self
                .conns
                .iter()
                .flatten()
                .map(|c| c.deadline)
                .chain(retry)
                .min();
            let timeout = wake_at.map(|t| t.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log_limited!(self.log, Level::Warn, "{} poll failed: {e}", self.name);
                    retry = Some(Instant::now() + Duration::from_millis(100));
                }
                continue;
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let mut accept = retry.is_some_and(|t| t <= Instant::now());
            for event in events.iter() {
                match event.token() {
                    LISTENER => accept = true,
                    WAKER => self.deliver(),
                    Token(t) => self.drive(t - FIRST_CONN),
                }
            }
            if accept {
                retry = self.accept();
            }
            let now = Instant::now();
            for slot in &mut self.conns {
                if slot.as_ref().is_some_and(|c| c.deadline <= now) {
                    debug!("{}: a client took too long; dropped", self.name);
                    *slot = None;
                }
            }
        }
    }

    /// Accepts every waiting client; returns when to try again after a failure.
    fn accept(&mut self) -> Option<Instant> {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log_limited!(self.log, Level::Warn, "{} accept failed: {e}", self.name);
                    return Some(Instant::now() + Duration::from_millis(100));
                }
            };
            let Some(slot) = self.conns.iter().position(Option::is_none) else {
                // Non-blocking: a short line into an empty socket buffer, or nothing.
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
                continue;
            };
            let token = Token(FIRST_CONN + slot);
            if let Err(e) = self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE)
            {
                log_limited!(self.log, Level::Warn, "{}: {e}", self.name);
                continue;
            }
            self.conns[slot] = Some(Conn {
                stream,
                input: Vec::new(),
                output: None,
                pending: None,
                deadline: Instant::now() + REQUEST_TIMEOUT,
            });
            // Data may have arrived before the registration.
            self.drive(slot);
        }
    }

    /// Reads, answers and writes as far as the socket allows without blocking.
    fn drive(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let next = match (&conn.output, &conn.pending) {
            (None, None) => {
                let later = Later {
                    waker: self.waker.clone(),
                    deferred: std::cell::RefCell::new(None),
                };
                read_request(conn, &self.handler, &later, self.poll.registry(), slot)
            }
            // Waiting for a deferred answer: nothing to read or write yet.
            (None, Some(_)) => Next::Keep,
            (Some(_), _) => write_reply(conn),
        };
        if let Next::Close(why) = next {
            debug!("{}: connection closed: {why}", self.name);
            self.conns[slot] = None;
        }
    }
}

fn read_request(
    conn: &mut Conn,
    handler: &Handler,
    later: &Later,
    registry: &mio::Registry,
    slot: usize,
) -> Next {
    let mut buf = [0u8; 1024];
    let mut eof = false;
    loop {
        match conn.stream.read(&mut buf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                conn.input.extend_from_slice(&buf[..n]);
                if conn.input.len() as u64 > MAX_REQUEST || conn.input.contains(&b'\n') {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Next::Close("read failed"),
        }
    }
    let end = conn.input.iter().position(|&b| b == b'\n');
    if end.is_none() && !eof {
        if conn.input.len() as u64 > MAX_REQUEST {
            return Next::Close("request too long");
        }
        return Next::Keep;
    }
    let line = &conn.input[..end.unwrap_or(conn.input.len())];
    let Ok(line) = std::str::from_utf8(line) else {
        return Next::Close("request is not UTF-8");
    };
    if line.trim().is_empty() {
        // A probe that connected and left (a readiness check): nothing to answer.
        return Next::Close("empty request");
    }
    let mut reply = Vec::new();
    if handler(line.trim(), &mut reply, later).is_err() {
        return Next::Close("cannot encode the reply");
    }
    if let Some(rx) = later.deferred.take() {
        conn.pending = Some(rx);
        conn.deadline = Instant::now() + DEFERRED_TIMEOUT;
        return Next::Keep;
    }
    answer(conn, reply, registry, slot)
}

/// Starts sending `reply` to the client of `slot`.
fn answer(conn: &mut Conn, reply: Vec<u8>, registry: &mio::Registry, slot: usize) -> Next {
    conn.output = Some((reply, 0));
    conn.deadline = Instant::now() + REPLY_TIMEOUT;
    if registry
        .reregister(
            &mut conn.stream,
            Token(FIRST_CONN + slot),
            Interest::WRITABLE,
        )
        .is_err()
    {
        return Next::Close("cannot wait for the client");
    }
    write_reply(conn)
}

fn write_reply(conn: &mut Conn) -> Next {
    let Some((reply, sent)) = conn.output.as_mut() else {
        return Next::Keep;
    };
    while *sent < reply.len() {
        match conn.stream.write(&reply[*sent..]) {
            Ok(0) => return Next::Close("client gone"),
            Ok(n) => *sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Next::Close("write failed"),
        }
    }
    Next::Close("answered")
}

fn serve_one(line: &str, out: &mut Vec<u8>, instance: &SharedInstance) -> io::Result<()> {
    let mut out = out;
    let fail = |out: &mut &mut Vec<u8>, error: String| -> io::Result<()> {
        let reply = Reply {
            error: Some(error),
            ..Reply::default()
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
                status: Some(status),
                ..Reply::default()
            };
            writeln!(out, "{}", serde_json::to_string(&reply)?)
        }
        Request::Set { settings } => {
            let knobs: Result<Vec<Knob>, _> =
                settings.iter().map(|(k, v)| Knob::parse(k, v)).collect();
            let reply = match knobs {
                Ok(knobs) if !knobs.is_empty() => {
                    for k in &knobs {
                        k.apply(instance);
                        log::info!("{k}");
                    }
                    Reply {
                        ok: true,
                        applied: Some(knobs.iter().map(Knob::to_string).collect()),
                        ..Reply::default()
                    }
                }
                Ok(_) => Reply {
                    error: Some("nothing to set".into()),
                    bad_input: true,
                    ..Reply::default()
                },
                Err(e) => Reply {
                    error: Some(e.to_string()),
                    bad_input: true,
                    ..Reply::default()
                },
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
                            png_bytes: Some(png.len() as u64),
                            ..Reply::default()
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
    /// The instance refused the request as bad input (an unknown setting, a bad value).
    #[error("{0}")]
    BadInput(String),
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
    let line = serde_json::to_string(request).map_err(|e| ControlError::BadReply(e.to_string()))?;
    let sent = writeln!(&stream, "{line}");
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    // A busy endpoint answers and closes without reading: its answer is still there to read
    // when the send failed.
    let read = reader.by_ref().take(1 << 20).read_line(&mut header);
    if header.trim().is_empty() {
        sent?;
        read?;
    }
    let reply: Reply =
        serde_json::from_str(header.trim()).map_err(|e| ControlError::BadReply(e.to_string()))?;
    if !reply.ok {
        let why = reply.error.unwrap_or_else(|| "request refused".into());
        return Err(if reply.bad_input {
            ControlError::BadInput(why)
        } else {
            ControlError::Refused(why)
        });
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

/// Changes runtime settings of the instance at control socket `control` (all or none); returns
/// what was applied, `KEY=VALUE` each.
pub fn set(
    control: &Path,
    settings: std::collections::BTreeMap<String, String>,
) -> Result<Vec<String>, ControlError> {
    let (reply, _) = exchange(control, &Request::Set { settings })?;
    reply
        .applied
        .ok_or_else(|| ControlError::BadReply("no settings in reply".into()))
}
