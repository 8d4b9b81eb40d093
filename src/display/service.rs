//! Live viewers of every head: raw RFB on one TCP port per head, and one HTTP port that serves
//! a page of the heads, noVNC's files and RFB over WebSocket (`/ws/<uuid>/<head>`).
//!
//! One thread runs a mio loop for every instance it was given ([`Viewers::add`]). Frames are
//! *pulled*: a head is sampled only while one of its viewers has an update request pending and
//! has drained its last update, and at most at the type's frame-rate limit. A sample takes the
//! instance lock only to read where the image lies, the damage the device knows and the cursor;
//! the pixels are copied after the lock is released ([`crate::instance`] does the same for
//! screenshots), so the guest's register path never waits for a viewer. With no viewer, or
//! viewers with nothing requested, the thread sleeps in `poll` with no timeout.
//!
//! Damage: virtio-gpu reports the guest's flush rectangles per head (one generation counter
//! per head here, shared by its viewers); bochs cannot tell, so each sample is hashed in
//! 64-pixel row segments ([`DamageTracker`]). Each viewer accumulates the damage it has not
//! been sent yet, merged into a bounded set of rectangles, so a slow viewer gets fewer, larger
//! updates. A viewer's output is at most one update: a new one is encoded only after the last
//! one left the socket, so a viewer that stops reading costs one frame of memory and nothing
//! else.
//!
//! Viewers are view-only: key, pointer and clipboard messages are read and dropped by the
//! protocol layer. Every peer is untrusted: bounded reads per turn, at most [`MAX_CLIENTS`]
//! connections, handshakes and HTTP requests that must finish within [`HANDSHAKE_TIMEOUT`].

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn, Level};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};
use uuid::Uuid;
use vgpu_model::damage::{self, Damage, DamageTracker};
use vgpu_model::device::HeadImage;
use vgpu_model::{Frame, PixelFormat, VramRead};

use super::config::{ViewerConfig, DEFAULT_DAEMON_PORTS};
use super::rfb::{self, Security, Session, SessionConfig, Update};
use super::web::{self, Method, Route};
use crate::instance::{lock, SharedInstance};
use crate::log_limited;
use crate::ratelimit::RateLimit;

/// Most connections (viewers and HTTP requests) served at once; more are closed on accept.
pub const MAX_CLIENTS: usize = 128;

/// A connection must finish its HTTP request or RFB handshake within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes read from one connection per turn of the loop (the rest waits for the next turn).
const READ_BUDGET: usize = 256 * 1024;

/// Largest WebSocket message a viewer may send: RFB client messages are small; a longer
/// clipboard text closes the connection.
const MAX_WS_MESSAGE: usize = 256 * 1024;

/// Bytes read and dropped after an HTTP response before the connection is closed anyway.
const MAX_DRAIN: usize = 1 << 20;

/// Sampling rate of a head whose type has no frame-rate limit.
const DEFAULT_SAMPLE_HZ: u32 = 60;

/// Size shown for a head that has never displayed (black, until the guest sets a mode).
const BLANK_SIZE: (u32, u32) = (640, 480);

/// A head unchanged this long is sampled [`STILL_SLOWDOWN`] times less often.
const STILL_AFTER: Duration = Duration::from_secs(1);
const STILL_SLOWDOWN: u32 = 4;

const WAKER: Token = Token(0);
const WEB: Token = Token(1);
const FIRST_TOKEN: usize = 2;

/// Where a head can be viewed, as `status` and `list` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadEndpoint {
    /// Head index.
    pub head: u32,
    /// `ADDR:PORT` of its raw RFB listener (empty when none).
    pub vnc: String,
    /// URL of its noVNC page (empty when `--web` is off).
    pub web: String,
}

/// Why viewers could not start or be added.
#[derive(Debug, thiserror::Error)]
pub enum ViewerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The port range has no free port left.
    #[error("no free VNC port left in {first}-{last} for head {head} of {uuid}")]
    NoPort {
        /// Instance.
        uuid: Uuid,
        /// Head.
        head: u32,
        /// Range start.
        first: u16,
        /// Range end.
        last: u16,
    },
    /// The loop thread could not start.
    #[error("cannot start the viewer thread: {0}")]
    Thread(io::Error),
}

enum Cmd {
    Add {
        uuid: Uuid,
        shared: SharedInstance,
        type_key: String,
        frl: u32,
        listeners: Vec<Option<(std::net::TcpListener, u16)>>,
    },
    Remove(Uuid),
    Stop,
}

/// State the handle and the loop share.
struct Shared {
    tx: Mutex<Sender<Cmd>>,
    waker: mio::Waker,
    /// Ports of the `--vnc` range in use.
    ports: Mutex<BTreeSet<u16>>,
    config: ViewerConfig,
    /// The web listener's real address (port 0 resolved).
    web_addr: Option<SocketAddr>,
    /// Why noVNC cannot be served (looked at once, at start), when `--web` is on.
    novnc_missing: Option<String>,
}

impl Shared {
    fn send(&self, cmd: Cmd) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if tx.send(cmd).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// The viewer service: a handle to its thread.
pub struct Viewers {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Viewers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Viewers")
            .field("vnc", &self.shared.config.vnc)
            .field("web", &self.shared.web_addr)
            .finish()
    }
}

impl Viewers {
    /// Binds the web port (if any) and starts the loop thread. noVNC missing from its
    /// directory is logged, not fatal: the page then says how to install it.
    pub fn start(config: ViewerConfig) -> Result<Viewers, ViewerError> {
        let poll = Poll::new().map_err(ViewerError::Thread)?;
        let waker = mio::Waker::new(poll.registry(), WAKER).map_err(ViewerError::Thread)?;
        let (web, web_addr) = match config.web {
            Some(addr) => {
                let l = bind_tcp(addr)?;
                let real = l.local_addr().map_err(|source| ViewerError::Bind {
                    addr: addr.to_string(),
                    source,
                })?;
                let mut l = TcpListener::from_std(l);
                poll.registry()
                    .register(&mut l, WEB, Interest::READABLE)
                    .map_err(ViewerError::Thread)?;
                (Some(l), Some(real))
            }
            None => (None, None),
        };
        let novnc_missing = web.as_ref().and_then(|_| novnc_missing(&config.novnc_dir));
        if let Some(why) = &novnc_missing {
            warn!("{why}");
        }
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            tx: Mutex::new(tx),
            waker,
            ports: Mutex::new(BTreeSet::new()),
            config,
            web_addr,
            novnc_missing,
        });
        let mut lp = Loop {
            poll,
            shared: shared.clone(),
            rx,
            web,
            instances: HashMap::new(),
            listeners: HashMap::new(),
            clients: HashMap::new(),
            next: FIRST_TOKEN,
            again: Vec::new(),
            log: RateLimit::new(20, Duration::from_secs(10)),
        };
        let thread = std::thread::Builder::new()
            .name("viewers".into())
            .spawn(move || lp.run())
            .map_err(ViewerError::Thread)?;
        Ok(Viewers {
            shared,
            thread: Some(thread),
        })
    }

    /// The page listing every head, when `--web` is on.
    pub fn web_url(&self) -> Option<String> {
        self.shared
            .web_addr
            .map(|a| format!("http://{}/", url_host(a)))
    }

    /// What the web page offers, for the readiness line: noVNC, or only the VNC ports when
    /// noVNC's files are missing.
    pub fn web_offer(&self) -> &'static str {
        if self.shared.novnc_missing.is_none() {
            "every head in noVNC"
        } else {
            "noVNC is missing: the page lists the VNC ports"
        }
    }

    /// Serves every head of `instance`: binds a raw RFB port per head when `--vnc` is on (from
    /// the range; `all_ports`: fail unless every head gets one, else a head without a port is
    /// logged and served on the web port only), records the endpoints in the instance (for
    /// `status`) and returns them.
    pub fn add(
        &self,
        instance: &SharedInstance,
        all_ports: bool,
    ) -> Result<Vec<HeadEndpoint>, ViewerError> {
        let (uuid, heads, type_key, frl) = {
            let inst = lock(instance);
            let ty = inst.device.vgpu_type();
            (inst.uuid, ty.num_heads, ty.key(), ty.frl)
        };
        let mut listeners: Vec<Option<(std::net::TcpListener, u16)>> = Vec::new();
        let mut endpoints = Vec::new();
        for head in 0..heads {
            let l = match self.shared.config.vnc {
                Some(vnc) => match self.bind_port(vnc.ip, vnc.range(DEFAULT_DAEMON_PORTS)) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        let e = match e {
                            Some(e) => e,
                            None => {
                                let (first, last) = vnc.range(DEFAULT_DAEMON_PORTS);
                                ViewerError::NoPort {
                                    uuid,
                                    head,
                                    first,
                                    last,
                                }
                            }
                        };
                        if all_ports {
                            self.release(&listeners);
                            return Err(e);
                        }
                        warn!("{uuid} head {head}: {e}; it is viewable on the web port only");
                        None
                    }
                },
                None => None,
            };
            let vnc = match &l {
                Some((l, _)) => l
                    .local_addr()
                    .map(|a| format!("{}:{}", url_host_ip(a.ip()), a.port()))
                    .unwrap_or_default(),
                None => String::new(),
            };
            let web = self
                .shared
                .web_addr
                .map(|a| {
                    format!(
                        "http://{}{}",
                        url_host(a),
                        web::viewer_url(&uuid.to_string(), head)
                    )
                })
                .unwrap_or_default();
            endpoints.push(HeadEndpoint { head, vnc, web });
            listeners.push(l);
        }
        lock(instance).viewers = endpoints.clone();
        for e in &endpoints {
            if !e.vnc.is_empty() {
                info!("{uuid} head {}: VNC on {}", e.head, e.vnc);
            }
        }
        self.shared.send(Cmd::Add {
            uuid,
            shared: instance.clone(),
            type_key,
            frl,
            listeners,
        });
        Ok(endpoints)
    }

    /// Stops serving `uuid`'s heads: its viewers are disconnected, its ports return.
    pub fn remove(&self, uuid: Uuid) {
        self.shared.send(Cmd::Remove(uuid));
    }

    /// Stops the thread, closing every viewer.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.send(Cmd::Stop);
            let _ = t.join();
        }
    }

    /// A listener on the first free port of `range` (`(0, 0)`: an ephemeral port). `Err(None)`:
    /// the range is exhausted.
    fn bind_port(
        &self,
        ip: IpAddr,
        (first, last): (u16, u16),
    ) -> Result<(std::net::TcpListener, u16), Option<ViewerError>> {
        if first == 0 {
            let l = bind_tcp(SocketAddr::new(ip, 0)).map_err(Some)?;
            let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
            return Ok((l, port));
        }
        let mut used = self.shared.ports.lock().unwrap_or_else(|p| p.into_inner());
        for port in first..=last {
            if used.contains(&port) {
                continue;
            }
            match bind_tcp(SocketAddr::new(ip, port)) {
                Ok(l) => {
                    used.insert(port);
                    return Ok((l, port));
                }
                Err(ViewerError::Bind { source, .. })
                    if source.kind() == io::ErrorKind::AddrInUse =>
                {
                    continue
                }
                Err(e) => return Err(Some(e)),
            }
        }
        Err(None)
    }

    fn release(&self, listeners: &[Option<(std::net::TcpListener, u16)>]) {
        let mut used = self.shared.ports.lock().unwrap_or_else(|p| p.into_inner());
        for (_, port) in listeners.iter().flatten() {
            used.remove(port);
        }
    }
}

impl Drop for Viewers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener, ViewerError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| ViewerError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| ViewerError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    Ok(l)
}

/// `ADDR:PORT` as it goes in a URL (IPv6 in brackets).
fn url_host(a: SocketAddr) -> String {
    format!("{}:{}", url_host_ip(a.ip()), a.port())
}

fn url_host_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// Why noVNC cannot be served from `dir`, if it cannot.
fn novnc_missing(dir: &std::path::Path) -> Option<String> {
    if dir.join("vnc.html").is_file() && dir.join("core/rfb.js").is_file() {
        None
    } else {
        Some(format!(
            "noVNC is not in {} (no vnc.html and core/rfb.js there): install Debian's `novnc` \
             package or give --novnc-dir DIR; until then the web page lists the raw VNC ports \
             only",
            dir.display()
        ))
    }
}

/// One head as the loop serves it.
struct HeadState {
    listener: Option<(TcpListener, Token, u16)>,
    period: Duration,
    last_sample: Option<Instant>,
    /// The last sample, shared by every viewer of the head.
    frame: Option<Arc<Frame>>,
    /// The last sample was the black stand-in of a head that displays nothing.
    blank: bool,
    /// bochs: hashes of the last sample's row segments.
    tracker: DamageTracker,
    /// virtio-gpu: the flush log generation seen.
    gen: u64,
    cursor: Option<rfb::Cursor>,
    cursor_gen: u64,
    clients: Vec<Token>,
    /// Samples in a row that found nothing changed.
    still: u32,
}

impl HeadState {
    /// A head sampled at most every `period`, not sampled yet.
    fn new(listener: Option<(TcpListener, Token, u16)>, period: Duration) -> HeadState {
        HeadState {
            listener,
            period,
            last_sample: None,
            frame: None,
            blank: false,
            tracker: DamageTracker::new(),
            gen: 0,
            cursor: None,
            cursor_gen: 0,
            clients: Vec::new(),
            still: 0,
        }
    }

    /// The time between samples: the type's frame period, four of them once the head has
    /// not changed for a second.
    fn interval(&self) -> Duration {
        let still_for = STILL_AFTER.as_secs_f64() / self.period.as_secs_f64().max(1e-6);
        if f64::from(self.still) >= still_for.round() {
            self.period * STILL_SLOWDOWN
        } else {
            self.period
        }
    }
}

struct Inst {
    shared: SharedInstance,
    type_key: String,
    heads: Vec<HeadState>,
}

/// A viewer's RFB session on a head.
struct View {
    uuid: Uuid,
    head: u32,
    session: Session,
    /// Damage not sent yet, in head coordinates.
    dirty: Damage,
    cursor_gen: u64,
}

enum Conn {
    /// An HTTP request being read, or its response being written (then closed, or turned into
    /// a WebSocket when `upgrade` is set).
    Http {
        stream: TcpStream,
        buf: Vec<u8>,
        out: Vec<u8>,
        sent: usize,
        upgrade: Option<(Uuid, u32)>,
        /// Bytes read and dropped after the response (a lingering close: closing with unread
        /// input would reset the connection before the peer read the response).
        drained: Option<usize>,
    },
    /// Raw RFB over TCP.
    Tcp(TcpStream),
    /// RFB over WebSocket; `clean`: nothing is waiting in the WebSocket's write buffer.
    Ws {
        ws: Box<WebSocket<TcpStream>>,
        clean: bool,
    },
}

struct Client {
    conn: Conn,
    peer: String,
    since: Instant,
    view: Option<View>,
}

impl Client {
    fn stream(&mut self) -> &mut TcpStream {
        match &mut self.conn {
            Conn::Http { stream, .. } | Conn::Tcp(stream) => stream,
            Conn::Ws { ws, .. } => ws.get_mut(),
        }
    }

    /// Whether everything produced so far has left for the socket.
    fn drained(&self) -> bool {
        let session_empty = self
            .view
            .as_ref()
            .is_none_or(|v| v.session.output().is_empty());
        match &self.conn {
            Conn::Ws { clean, .. } => *clean && session_empty,
            Conn::Tcp(_) => session_empty,
            Conn::Http { out, sent, .. } => *sent >= out.len(),
        }
    }

    /// The viewer waits for an update we could send now.
    fn wants_update(&self) -> bool {
        self.view
            .as_ref()
            .is_some_and(|v| v.session.is_ready() && v.session.pending_update().is_some())
            && self.drained()
    }
}

/// What a turn on a connection decided.
enum Fate {
    Keep,
    Close(String),
}

struct Loop {
    poll: Poll,
    shared: Arc<Shared>,
    rx: Receiver<Cmd>,
    web: Option<TcpListener>,
    instances: HashMap<Uuid, Inst>,
    listeners: HashMap<Token, (Uuid, u32)>,
    clients: HashMap<Token, Client>,
    next: usize,
    /// Connections with unread input left over from their read budget.
    again: Vec<Token>,
    log: RateLimit,
}

impl Loop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self.timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("viewers: poll failed: {e}; viewers stop");
                return;
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {
                        if !self.commands() {
                            return;
                        }
                    }
                    WEB => self.accept_web(),
                    t if self.listeners.contains_key(&t) => self.accept_vnc(t),
                    t => self.pump(t),
                }
            }
            for t in std::mem::take(&mut self.again) {
                self.pump(t);
            }
            self.sample_due();
            self.expire();
        }
    }

    /// How long poll may sleep: until the next head is due, 0 with input left over, a second
    /// while handshakes run (to time them out), forever otherwise.
    fn timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut t: Option<Duration> = None;
        let mut min = |d: Duration| t = Some(t.map_or(d, |t| t.min(d)));
        for (_, _, due) in self.waiting_heads(now) {
            min(due.saturating_duration_since(now));
        }
        if self
            .clients
            .values()
            .any(|c| c.view.as_ref().is_none_or(|v| !v.session.is_ready()))
        {
            min(Duration::from_secs(1));
        }
        t
    }

    /// Runs the handle's commands; false on Stop.
    fn commands(&mut self) -> bool {
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Stop => return false,
                Cmd::Remove(uuid) => self.remove(uuid),
                Cmd::Add {
                    uuid,
                    shared,
                    type_key,
                    frl,
                    listeners,
                } => {
                    let hz = if frl > 0 { frl } else { DEFAULT_SAMPLE_HZ };
                    let mut heads = Vec::new();
                    for (head, l) in listeners.into_iter().enumerate() {
                        let listener = l.and_then(|(l, port)| {
                            let token = self.token();
                            let mut l = TcpListener::from_std(l);
                            match self
                                .poll
                                .registry()
                                .register(&mut l, token, Interest::READABLE)
                            {
                                Ok(()) => {
                                    self.listeners.insert(token, (uuid, head as u32));
                                    Some((l, token, port))
                                }
                                Err(e) => {
                                    warn!("{uuid} head {head}: cannot watch its VNC port: {e}");
                                    None
                                }
                            }
                        });
                        heads.push(HeadState::new(listener, Duration::from_secs(1) / hz));
                    }
                    self.instances.insert(
                        uuid,
                        Inst {
                            shared,
                            type_key,
                            heads,
                        },
                    );
                }
            }
        }
        true
    }

    fn token(&mut self) -> Token {
        let t = Token(self.next);
        self.next += 1;
        t
    }

    fn remove(&mut self, uuid: Uuid) {
        let Some(inst) = self.instances.remove(&uuid) else {
            return;
        };
        let mut used = self.shared.ports.lock().unwrap_or_else(|p| p.into_inner());
        for mut h in inst.heads {
            if let Some((mut l, token, port)) = h.listener.take() {
                let _ = self.poll.registry().deregister(&mut l);
                self.listeners.remove(&token);
                used.remove(&port);
            }
            for c in h.clients {
                if let Some(mut client) = self.clients.remove(&c) {
                    let _ = self.poll.registry().deregister(client.stream());
                    info!(
                        "viewer {} of {uuid} head: disconnected (instance removed)",
                        client.peer
                    );
                }
            }
        }
    }

    fn has_room(&mut self) -> bool {
        if self.clients.len() < MAX_CLIENTS {
            return true;
        }
        log_limited!(
            self.log,
            Level::Warn,
            "viewers: {MAX_CLIENTS} connections open; refusing another"
        );
        false
    }

    /// Watches a new connection: an HTTP request (`http`) or raw RFB.
    fn register(&mut self, mut stream: TcpStream, http: bool) -> Option<Token> {
        let token = self.token();
        match self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            Ok(()) => {
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "?".into());
                let _ = stream.set_nodelay(true);
                let conn = if http {
                    Conn::Http {
                        stream,
                        buf: Vec::new(),
                        out: Vec::new(),
                        sent: 0,
                        upgrade: None,
                        drained: None,
                    }
                } else {
                    Conn::Tcp(stream)
                };
                self.clients.insert(
                    token,
                    Client {
                        conn,
                        peer,
                        since: Instant::now(),
                        view: None,
                    },
                );
                Some(token)
            }
            Err(e) => {
                log_limited!(
                    self.log,
                    Level::Warn,
                    "viewers: cannot watch a connection: {e}"
                );
                None
            }
        }
    }

    fn accept_vnc(&mut self, token: Token) {
        let Some(&(uuid, head)) = self.listeners.get(&token) else {
            return;
        };
        loop {
            let accepted = {
                let Some(h) = self
                    .instances
                    .get_mut(&uuid)
                    .and_then(|i| i.heads.get_mut(head as usize))
                else {
                    return;
                };
                let Some((l, _, _)) = &h.listener else { return };
                l.accept()
            };
            match accepted {
                Ok((stream, _)) => {
                    if !self.has_room() {
                        continue;
                    }
                    if let Some(t) = self.register(stream, false) {
                        self.attach_view(t, uuid, head);
                        self.pump(t);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log_limited!(self.log, Level::Warn, "viewers: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn accept_web(&mut self) {
        loop {
            let Some(l) = &self.web else { return };
            match l.accept() {
                Ok((stream, _)) => {
                    if !self.has_room() {
                        continue;
                    }
                    if let Some(t) = self.register(stream, true) {
                        self.pump(t);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log_limited!(self.log, Level::Warn, "viewers: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Starts an RFB session for connection `t` on `uuid`'s head `head`.
    fn attach_view(&mut self, t: Token, uuid: Uuid, head: u32) {
        let Some(inst) = self.instances.get_mut(&uuid) else {
            return;
        };
        let (w, h) = match inst.heads.get(head as usize).and_then(|h| h.frame.as_ref()) {
            Some(f) => (f.width, f.height),
            None => {
                let g = lock(&inst.shared);
                g.device
                    .head_source(head)
                    .map(|s| s.size())
                    .unwrap_or(BLANK_SIZE)
            }
        };
        let security = match &self.shared.config.password {
            Some(pw) => Security::vnc_auth(pw, random_challenge()),
            None => Security::None,
        };
        let session = Session::new(SessionConfig {
            width: w.min(u32::from(u16::MAX)) as u16,
            height: h.min(u32::from(u16::MAX)) as u16,
            name: format!("vgpu-emu {} {uuid} head {head}", inst.type_key),
            security,
            screen_id: head,
        });
        if let Some(hs) = inst.heads.get_mut(head as usize) {
            hs.clients.push(t);
        }
        if let Some(c) = self.clients.get_mut(&t) {
            info!("viewer {} connected to {uuid} head {head}", c.peer);
            c.view = Some(View {
                uuid,
                head,
                session,
                dirty: Damage::none(),
                cursor_gen: 0,
            });
        }
    }

    /// One turn on connection `t`: read what came (within the budget), write what is due,
    /// answer a pending update from the head's last sample.
    fn pump(&mut self, t: Token) {
        let fate = self.io(t);
        if let Fate::Close(why) = fate {
            self.close(t, &why);
            return;
        }
        self.serve(t);
    }

    fn io(&mut self, t: Token) -> Fate {
        let upgrade = {
            let Some(c) = self.clients.get_mut(&t) else {
                return Fate::Keep;
            };
            match &mut c.conn {
                Conn::Http { .. } => match self.http(t) {
                    Ok(Some(up)) => Some(up),
                    Ok(None) => return Fate::Keep,
                    Err(why) => return Fate::Close(why),
                },
                _ => None,
            }
        };
        if let Some((uuid, head, rest)) = upgrade {
            let Some(mut c) = self.clients.remove(&t) else {
                return Fate::Keep;
            };
            let Conn::Http { stream, .. } = c.conn else {
                return Fate::Keep;
            };
            let config = WebSocketConfig::default()
                .max_message_size(Some(MAX_WS_MESSAGE))
                .max_frame_size(Some(MAX_WS_MESSAGE));
            let ws = WebSocket::from_partially_read(stream, rest, Role::Server, Some(config));
            c.conn = Conn::Ws {
                ws: Box::new(ws),
                clean: true,
            };
            self.clients.insert(t, c);
            self.attach_view(t, uuid, head);
        }
        let Some(c) = self.clients.get_mut(&t) else {
            return Fate::Keep;
        };
        let (fate, more) = rfb_io(c);
        if more {
            self.again.push(t);
        }
        fate
    }

    /// The HTTP phase of connection `t`: reads the request, writes the response. `Ok(Some)`:
    /// the response (a 101) is out and the connection becomes a WebSocket on that head, with
    /// the bytes read past the request. `Err`: close.
    #[allow(clippy::type_complexity)]
    fn http(&mut self, t: Token) -> Result<Option<(Uuid, u32, Vec<u8>)>, String> {
        let request = {
            let Some(Client {
                conn: Conn::Http {
                    stream, buf, out, ..
                },
                ..
            }) = self.clients.get_mut(&t)
            else {
                return Ok(None);
            };
            if out.is_empty() {
                let mut chunk = [0u8; 4096];
                loop {
                    match stream.read(&mut chunk) {
                        Ok(0) => return Err("closed before its request was complete".into()),
                        Ok(n) => {
                            buf.extend_from_slice(&chunk[..n]);
                            if buf.len() > web::MAX_REQUEST_HEAD {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(format!("read failed: {e}")),
                    }
                }
                Some(web::parse_request(buf))
            } else {
                None
            }
        };
        if let Some(parsed) = request {
            let (response, upgrade, consumed) = match parsed {
                Ok(None) => return Ok(None),
                Err(e) => (web::error_response(&e), None, 0),
                Ok(Some((req, consumed))) => {
                    let (resp, up) = self.respond(&req);
                    (resp, up, consumed)
                }
            };
            if let Some(Client {
                conn:
                    Conn::Http {
                        buf,
                        out,
                        upgrade: u,
                        ..
                    },
                ..
            }) = self.clients.get_mut(&t)
            {
                *out = response;
                *u = upgrade;
                buf.drain(..consumed.min(buf.len()));
            }
        }
        let Some(Client {
            conn:
                Conn::Http {
                    stream,
                    buf,
                    out,
                    sent,
                    upgrade,
                    drained,
                },
            ..
        }) = self.clients.get_mut(&t)
        else {
            return Ok(None);
        };
        while *sent < out.len() {
            match stream.write(&out[*sent..]) {
                Ok(0) => return Err("closed".into()),
                Ok(n) => *sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("write failed: {e}")),
            }
        }
        if let Some((uuid, head)) = upgrade.take() {
            return Ok(Some((uuid, head, std::mem::take(buf))));
        }
        // The response is out: say so, then read and drop what the peer still sends until it
        // closes (bounded, and by the handshake timeout).
        let n = drained.get_or_insert_with(|| {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            0
        });
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return Err(String::new()),
                Ok(k) => {
                    *n += k;
                    if *n > MAX_DRAIN {
                        return Err(String::new());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(String::new()),
            }
        }
    }

    /// The response to `req`, and the head it upgrades to.
    fn respond(&mut self, req: &web::Request) -> (Vec<u8>, Option<(Uuid, u32)>) {
        let head_only = matches!(req.method, Method::Head);
        match web::route(&req.target) {
            Route::Index => {
                let page = web::index_page(&self.links(), self.shared.novnc_missing.as_deref());
                (
                    web::response(200, "text/html; charset=utf-8", page.as_bytes(), head_only),
                    None,
                )
            }
            Route::HeadsJson => (
                web::response(
                    200,
                    "application/json",
                    web::heads_json(&self.links()).as_bytes(),
                    head_only,
                ),
                None,
            ),
            Route::Novnc(rel) => {
                if let Some(why) = &self.shared.novnc_missing {
                    return (
                        web::response(404, "text/plain; charset=utf-8", why.as_bytes(), head_only),
                        None,
                    );
                }
                match web::static_file(&self.shared.config.novnc_dir, &rel) {
                    Ok((body, ty)) => (web::response(200, ty, &body, head_only), None),
                    Err(_) => (web::not_found(), None),
                }
            }
            Route::Ws { uuid, head } => {
                let exists = self
                    .instances
                    .get(&uuid)
                    .is_some_and(|i| (head as usize) < i.heads.len());
                match (&req.websocket, exists) {
                    (_, false) => (web::not_found(), None),
                    (None, true) => (web::error_response(&web::HttpError::UpgradeRequired), None),
                    (Some(up), true) => (
                        web::upgrade_response(&up.key, web::choose_protocol(&up.protocols)),
                        Some((uuid, head)),
                    ),
                }
            }
            Route::NotFound => (web::not_found(), None),
        }
    }

    /// Every head, for the index page.
    fn links(&self) -> Vec<web::HeadLink> {
        let mut v: Vec<web::HeadLink> = Vec::new();
        let mut ids: Vec<&Uuid> = self.instances.keys().collect();
        ids.sort();
        for uuid in ids {
            let inst = &self.instances[uuid];
            let (status, endpoints) = {
                let g = lock(&inst.shared);
                (g.status(), g.viewers.clone())
            };
            for (i, _) in inst.heads.iter().enumerate() {
                let head = i as u32;
                v.push(web::HeadLink {
                    uuid: uuid.to_string(),
                    type_key: inst.type_key.clone(),
                    head,
                    mode: status
                        .heads
                        .iter()
                        .find(|h| h.head == head)
                        .map(|h| h.mode.clone())
                        .unwrap_or_default(),
                    vnc: endpoints
                        .iter()
                        .find(|e| e.head == head)
                        .map(|e| e.vnc.clone())
                        .unwrap_or_default(),
                });
            }
        }
        v
    }

    /// Answers `t`'s pending update from its head's last sample, when there is something to
    /// send and its last update has left.
    fn serve(&mut self, t: Token) {
        let Some(c) = self.clients.get_mut(&t) else {
            return;
        };
        if !c.wants_update() {
            return;
        }
        let Some(v) = &c.view else { return };
        let Some(h) = self
            .instances
            .get(&v.uuid)
            .and_then(|i| i.heads.get(v.head as usize))
        else {
            return;
        };
        let (Some(frame), cursor, cursor_gen) = (h.frame.clone(), h.cursor.clone(), h.cursor_gen)
        else {
            return;
        };
        if send_to(c, &frame, cursor.as_ref(), cursor_gen) {
            let (fate, _) = rfb_io(c);
            if let Fate::Close(why) = fate {
                self.close(t, &why);
            }
        }
    }

    /// Samples every head that a viewer waits on and whose period has passed.
    fn sample_due(&mut self) {
        let now = Instant::now();
        let due: Vec<(Uuid, usize)> = self
            .waiting_heads(now)
            .filter(|&(_, _, due)| due <= now)
            .map(|(uuid, i, _)| (uuid, i))
            .collect();
        for (uuid, i) in due {
            self.sample(uuid, i, now);
        }
    }

    /// Every head one of whose viewers waits for an update it could take now, with when the
    /// head may next be sampled (`now` if it never was).
    fn waiting_heads(&self, now: Instant) -> impl Iterator<Item = (Uuid, usize, Instant)> + '_ {
        self.instances.iter().flat_map(move |(uuid, inst)| {
            inst.heads
                .iter()
                .enumerate()
                .filter(|(_, h)| {
                    h.clients
                        .iter()
                        .any(|c| self.clients.get(c).is_some_and(Client::wants_update))
                })
                .map(move |(i, h)| (*uuid, i, h.last_sample.map_or(now, |s| s + h.interval())))
        })
    }

    /// Takes a sample of `uuid`'s head `i`, merges its damage into every viewer of the head and
    /// answers those that wait.
    fn sample(&mut self, uuid: Uuid, i: usize, now: Instant) {
        let Some(inst) = self.instances.get_mut(&uuid) else {
            return;
        };
        let shared = inst.shared.clone();
        let Some(h) = inst.heads.get_mut(i) else {
            return;
        };
        let head = i as u32;
        h.last_sample = Some(now);
        let (image, flushed, cursor, view) = {
            let g = lock(&shared);
            let image = g.device.head_source(head);
            let flushed = g.device.head_damage(head, h.gen);
            let cursor = g
                .device
                .virtio_gpu()
                .and_then(|t| t.gpu().cursor_state(head))
                .map(rfb_cursor);
            (image, flushed, cursor, g.vram_view.clone())
        };
        let old_size = h.frame.as_ref().map(|f| (f.width, f.height));
        let damage = match image {
            Err(_) => {
                if h.blank && h.frame.is_some() {
                    Damage::none()
                } else {
                    let (w, hh) = old_size.unwrap_or(BLANK_SIZE);
                    h.frame = Some(Arc::new(Frame {
                        width: w,
                        height: hh,
                        format: PixelFormat::Xrgb8888,
                        data: vec![0; w as usize * hh as usize * 4],
                    }));
                    h.blank = true;
                    h.tracker.invalidate();
                    Damage::Full
                }
            }
            Ok(image) => {
                let resized = old_size != Some(image.size()) || h.blank;
                match flushed {
                    // virtio-gpu: the guest said what changed; copy only when something did.
                    Some((d, gen)) => {
                        h.gen = gen;
                        if d.is_empty() && !resized {
                            Damage::none()
                        } else {
                            match capture(&image, view.as_ref(), &shared, head) {
                                Some(f) => {
                                    h.frame = Some(Arc::new(f));
                                    h.blank = false;
                                    if resized {
                                        Damage::Full
                                    } else {
                                        d
                                    }
                                }
                                None => Damage::none(),
                            }
                        }
                    }
                    // bochs: hash the scanout where it lies, a row at a time, and copy the
                    // frame only when something changed (a static screen costs one read pass).
                    None => match (&image, view.as_ref(), h.frame.is_some() && !resized) {
                        (HeadImage::Vram(sc), Some(v), true) => {
                            let row = u64::from(sc.stride);
                            let d =
                                h.tracker
                                    .update_rows(sc.width, sc.height, sc.format, |y, dst| {
                                        v.read(sc.offset + y as u64 * row, dst)
                                    });
                            if d.is_empty() {
                                d
                            } else {
                                match capture(&image, view.as_ref(), &shared, head) {
                                    Some(f) => {
                                        h.frame = Some(Arc::new(f));
                                        d
                                    }
                                    None => Damage::none(),
                                }
                            }
                        }
                        _ => match capture(&image, view.as_ref(), &shared, head) {
                            Some(f) => {
                                if resized {
                                    h.tracker.invalidate();
                                }
                                let d = h.tracker.update(&f);
                                let d = if resized { Damage::Full } else { d };
                                h.frame = Some(Arc::new(f));
                                h.blank = false;
                                d
                            }
                            None => Damage::none(),
                        },
                    },
                }
            }
        };
        // A head that stopped changing is looked at less often (a quarter of the rate after a
        // second); the first change brings the full rate back.
        if damage.is_empty() {
            h.still += 1;
        } else {
            h.still = 0;
        }
        if let Some(cur) = cursor {
            if h.cursor.as_ref() != Some(&cur) {
                h.cursor = Some(cur);
                h.cursor_gen += 1;
            }
        }
        let Some(frame) = h.frame.clone() else {
            return;
        };
        let (cursor, cursor_gen) = (h.cursor.clone(), h.cursor_gen);
        let clients = h.clients.clone();
        let mut closed = Vec::new();
        for t in clients {
            let Some(c) = self.clients.get_mut(&t) else {
                continue;
            };
            if let Some(v) = &mut c.view {
                v.dirty = merge(&v.dirty, &damage, frame.width, frame.height);
            }
            if c.wants_update() && send_to(c, &frame, cursor.as_ref(), cursor_gen) {
                if let (Fate::Close(why), _) = rfb_io(c) {
                    closed.push((t, why));
                }
            }
        }
        for (t, why) in closed {
            self.close(t, &why);
        }
    }

    /// Closes connections whose request or handshake did not finish in time.
    fn expire(&mut self) {
        let stale: Vec<Token> = self
            .clients
            .iter()
            .filter(|(_, c)| {
                c.view.as_ref().is_none_or(|v| !v.session.is_ready())
                    && c.since.elapsed() > HANDSHAKE_TIMEOUT
            })
            .map(|(t, _)| *t)
            .collect();
        for t in stale {
            self.close(t, "did not finish its handshake in time");
        }
    }

    fn close(&mut self, t: Token, why: &str) {
        let Some(mut c) = self.clients.remove(&t) else {
            return;
        };
        let _ = self.poll.registry().deregister(c.stream());
        if let Conn::Ws { ws, .. } = &mut c.conn {
            let _ = ws.close(None);
            let _ = ws.flush();
        }
        if let Some(v) = &c.view {
            if let Some(h) = self
                .instances
                .get_mut(&v.uuid)
                .and_then(|i| i.heads.get_mut(v.head as usize))
            {
                h.clients.retain(|x| *x != t);
                if h.clients.is_empty() {
                    // Nobody watches: let the sample go.
                    h.frame = None;
                    h.blank = false;
                    h.tracker.invalidate();
                    h.cursor = None;
                    h.cursor_gen = 0;
                    h.still = 0;
                }
            }
            if why.is_empty() {
                info!("viewer {} of {} head {} left", c.peer, v.uuid, v.head);
            } else {
                log_limited!(
                    self.log,
                    Level::Info,
                    "viewer {} of {} head {} closed: {why}",
                    c.peer,
                    v.uuid,
                    v.head
                );
            }
        } else if !why.is_empty() {
            log_limited!(self.log, Level::Info, "web client {} closed: {why}", c.peer);
        }
    }
}

/// Sends the viewer of `c` an update from `frame` (its accumulated damage, the cursor when it
/// changed). True when something was encoded.
fn send_to(c: &mut Client, frame: &Frame, cursor: Option<&rfb::Cursor>, cursor_gen: u64) -> bool {
    let Some(v) = &mut c.view else { return false };
    let dirty: Vec<rfb::Rect> = v
        .dirty
        .rects(frame.width, frame.height)
        .into_iter()
        .map(to_rfb_rect)
        .collect();
    let cursor = cursor.filter(|_| v.cursor_gen != cursor_gen);
    let sent = v.session.send_update(&Update {
        frame,
        dirty: &dirty,
        cursor,
    });
    if sent {
        v.dirty = Damage::none();
        v.cursor_gen = cursor_gen;
    }
    sent
}

/// Reads from and writes to an RFB connection. Returns its fate and whether input was left
/// unread (the read budget ran out).
fn rfb_io(c: &mut Client) -> (Fate, bool) {
    let Some(v) = &mut c.view else {
        return (Fate::Keep, false);
    };
    let mut more = false;
    match &mut c.conn {
        Conn::Http { .. } => return (Fate::Keep, false),
        Conn::Tcp(stream) => {
            let mut buf = [0u8; 16384];
            let mut budget = READ_BUDGET;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return (Fate::Close(String::new()), false),
                    Ok(n) => {
                        if let Err(e) = v.session.feed(&buf[..n]) {
                            // The reason (RFB 3.8 sends one) goes out best-effort.
                            let _ = stream.write(v.session.output());
                            return (Fate::Close(e.to_string()), false);
                        }
                        budget = budget.saturating_sub(n);
                        if budget == 0 {
                            more = true;
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return (Fate::Close(format!("read failed: {e}")), false),
                }
            }
            while !v.session.output().is_empty() {
                match stream.write(v.session.output()) {
                    Ok(0) => return (Fate::Close("closed".into()), false),
                    Ok(n) => v.session.consume_output(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return (Fate::Close(format!("write failed: {e}")), false),
                }
            }
        }
        Conn::Ws { ws, clean } => {
            let mut budget = READ_BUDGET;
            loop {
                match ws.read() {
                    Ok(Message::Binary(data)) => {
                        if let Err(e) = v.session.feed(&data) {
                            let out = v.session.take_output();
                            let _ = ws.send(Message::binary(out));
                            return (Fate::Close(e.to_string()), false);
                        }
                        budget = budget.saturating_sub(data.len().max(1));
                        if budget == 0 {
                            more = true;
                            break;
                        }
                    }
                    Ok(Message::Close(_)) => return (Fate::Close(String::new()), false),
                    Ok(Message::Text(_)) => {
                        return (
                            Fate::Close("sent a text message (RFB needs binary)".into()),
                            false,
                        )
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        break
                    }
                    Err(tungstenite::Error::ConnectionClosed)
                    | Err(tungstenite::Error::AlreadyClosed) => {
                        return (Fate::Close(String::new()), false)
                    }
                    Err(e) => return (Fate::Close(format!("WebSocket: {e}")), false),
                }
            }
            if !v.session.output().is_empty() {
                let out = v.session.take_output();
                if let Err(e) = ws.write(Message::binary(out)) {
                    return (Fate::Close(format!("WebSocket: {e}")), false);
                }
            }
            match ws.flush() {
                Ok(()) => *clean = true,
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    *clean = false
                }
                Err(e) => return (Fate::Close(format!("WebSocket: {e}")), false),
            }
        }
    }
    (Fate::Keep, more)
}

/// Copies `image` outside the instance lock (through the VRAM view; VRAM without a view, in
/// tests, is copied under the lock).
fn capture(
    image: &HeadImage,
    view: Option<&crate::instance::VramView>,
    shared: &SharedInstance,
    head: u32,
) -> Option<Frame> {
    match (image, view) {
        (HeadImage::Vram(_), None) => crate::instance::capture(shared, head).ok(),
        (_, view) => image.capture(view.map(|v| v as &dyn VramRead)),
    }
}

/// `a` and `b` together on a `w` x `h` head.
fn merge(a: &Damage, b: &Damage, w: u32, h: u32) -> Damage {
    match (a, b) {
        (Damage::Full, _) | (_, Damage::Full) => Damage::Full,
        (Damage::Rects(x), Damage::Rects(y)) if y.is_empty() => Damage::Rects(x.clone()),
        (Damage::Rects(x), Damage::Rects(y)) => {
            Damage::from_rects(x.iter().chain(y.iter()).copied(), w, h)
        }
    }
}

fn to_rfb_rect(r: damage::Rect) -> rfb::Rect {
    let c = |v: u32| v.min(u32::from(u16::MAX)) as u16;
    rfb::Rect::new(c(r.x), c(r.y), c(r.width), c(r.height))
}

/// The guest's cursor as RFB shows it: its image in ARGB, or an empty cursor when hidden.
fn rfb_cursor(c: &vgpu_model::virtio_gpu::commands::Cursor) -> rfb::Cursor {
    let Some(img) = c.image.as_ref().filter(|_| c.resource_id != 0) else {
        return rfb::Cursor {
            width: 0,
            height: 0,
            hot_x: 0,
            hot_y: 0,
            argb: Vec::new(),
        };
    };
    let rgb = img.to_rgb8();
    let bpp = img.format.bytes_per_pixel() as usize;
    // Where a pixel's alpha byte is, for the formats that have one.
    let alpha_at = match img.format {
        PixelFormat::Argb8888 | PixelFormat::Abgr8888 => Some(3),
        PixelFormat::Bgra8888 | PixelFormat::Rgba8888 => Some(0),
        _ => None,
    };
    let argb = rgb
        .chunks_exact(3)
        .enumerate()
        .map(|(i, p)| {
            let a = alpha_at
                .and_then(|k| img.data.get(i * bpp + k).copied())
                .unwrap_or(0xff);
            u32::from(a) << 24 | u32::from(p[0]) << 16 | u32::from(p[1]) << 8 | u32::from(p[2])
        })
        .collect();
    let clamp = |v: u32| v.min(u32::from(u16::MAX)) as u16;
    rfb::Cursor {
        width: clamp(img.width),
        height: clamp(img.height),
        hot_x: clamp(c.hot_x.min(img.width.saturating_sub(1))),
        hot_y: clamp(c.hot_y.min(img.height.saturating_sub(1))),
        argb,
    }
}

/// 16 bytes from the kernel's CSPRNG, for a VncAuth challenge.
fn random_challenge() -> [u8; 16] {
    let mut c = [0u8; 16];
    let mut got = 0;
    while got < c.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `c`, which outlives
        // the call; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(c[got..].as_mut_ptr().cast(), c.len() - got, 0) };
        if n <= 0 {
            // Only EINTR is possible with these flags and a valid buffer; try again.
            continue;
        }
        got += n as usize;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_model::virtio_gpu::commands::Cursor as GpuCursor;

    #[test]
    fn the_guests_cursor_becomes_an_argb_cursor_or_an_empty_one_when_hidden() {
        // 2x1 ARGB8888 (bytes B, G, R, A): an opaque red pixel and a transparent blue one.
        let img = Frame {
            width: 2,
            height: 1,
            format: PixelFormat::Argb8888,
            data: vec![0, 0, 0xff, 0xff, 0xff, 0, 0, 0x10],
        };
        let c = GpuCursor {
            resource_id: 5,
            hot_x: 9,
            hot_y: 0,
            x: 100,
            y: 100,
            image: Some(img.clone()),
        };
        let r = rfb_cursor(&c);
        assert_eq!((r.width, r.height), (2, 1));
        assert_eq!((r.hot_x, r.hot_y), (1, 0), "hot spot kept inside the image");
        assert_eq!(r.argb, [0xffff_0000, 0x1000_00ff]);
        // Formats without alpha are opaque.
        let x = GpuCursor {
            image: Some(Frame {
                format: PixelFormat::Xrgb8888,
                ..img
            }),
            ..c.clone()
        };
        assert_eq!(rfb_cursor(&x).argb, [0xffff_0000, 0xff00_00ff]);
        // Hidden: resource 0, or no image.
        for hidden in [
            GpuCursor {
                resource_id: 0,
                ..c.clone()
            },
            GpuCursor {
                image: None,
                ..c.clone()
            },
        ] {
            let r = rfb_cursor(&hidden);
            assert_eq!((r.width, r.height, r.argb.len()), (0, 0, 0));
        }
    }

    #[test]
    fn damage_not_sent_yet_accumulates_and_stays_bounded() {
        let r = |x, y| damage::Rect::new(x, y, 10, 10);
        let a = Damage::Rects(vec![r(0, 0)]);
        let b = Damage::Rects(vec![r(100, 100)]);
        assert_eq!(
            merge(&a, &b, 640, 480),
            Damage::Rects(vec![r(0, 0), r(100, 100)])
        );
        assert_eq!(merge(&a, &Damage::none(), 640, 480), a);
        assert_eq!(merge(&a, &Damage::Full, 640, 480), Damage::Full);
        // Many separate changes end as a bounded set.
        let mut d = Damage::none();
        for i in 0..1000u32 {
            d = merge(
                &d,
                &Damage::Rects(vec![r((i * 37) % 600, (i * 53) % 440)]),
                640,
                480,
            );
        }
        match d {
            Damage::Rects(v) => assert!(v.len() <= damage::MAX_RECTS, "{} rectangles", v.len()),
            Damage::Full => {}
        }
    }

    #[test]
    fn a_still_head_is_sampled_at_a_quarter_rate() {
        let mut h = HeadState::new(None, Duration::from_secs(1) / 60);
        assert_eq!(h.interval(), h.period);
        h.still = 59;
        assert_eq!(h.interval(), h.period);
        h.still = 60;
        assert_eq!(h.interval(), h.period * 4);
    }
}
