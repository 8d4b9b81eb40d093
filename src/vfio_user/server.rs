//! The vfio-user server: one listening socket, one client at a time.
//!
//! A mio loop owns the listening socket and the instance's lifecycle (accepting, holding
//! reconnecting clients until the attached one has gone, refusing, stopping). The attached client
//! is served by its own thread with blocking `recvmsg`/`sendmsg`: one read and one write per
//! register access, the same system calls as a bare socket ping-pong. (With the client on the mio
//! loop too, every access cost an extra `epoll_wait`: 1.22x the floor instead of the 1.10x goal;
//! see BENCHMARKS.md.)
//!
//! Framing: bytes are read into a fixed per-connection buffer (sized by *our* limit, never by a
//! peer's claim) and a message is acted on only once all of it is in. A message whose size is
//! below the header is answered with EINVAL and the connection closed (the stream cannot be
//! resynchronised); one above our limit is answered with E2BIG and its bytes drained, so the
//! next message is read in sync. Every error reply carries a non-zero errno; a message flagged
//! no-reply gets no reply, even on error.
//!
//! Descriptors: the kernel ends a `recvmsg` right after the segment that carried descriptors,
//! and a client sends each message (with its descriptors) in one `sendmsg`. So descriptors that
//! arrive with a read belong to the *last* message that starts within that read's bytes. After
//! every read, descriptors that cannot belong to the message still being received (their read
//! did not contain its start, or it is being drained) are closed at once, so a connection holds
//! at most one message's worth ([`MAX_FDS`]) of descriptors it has not acted on; a read carrying
//! more than that is refused whole.
//!
//! Locks: the instance lock is taken only around device-model calls. DMA maps (mmap/munmap),
//! descriptor checks, interrupt signalling, sends and every other system call happen without it,
//! so the guest's register path never waits on a client's descriptors or a viewer.
//!
//! Several clients: a client that connects while another is attached waits (a VMM reconnecting
//! can race its own EOF) for up to [`RECONNECT_GRACE`]; clients that close while waiting are
//! forgotten. One that is refused (the grace ran out, or too many wait) gets its first message
//! answered with EBUSY before the socket closes, so a VMM reports an error instead of a broken
//! stream.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, trace, warn, Level};
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use vfio_bindings::bindings::vfio as vb;
use vgpu_model::device::{NUM_IRQS, NUM_REGIONS};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use crate::instance::{lock, Instance, ServerStats, SharedInstance};
use crate::log_limited;
use crate::ratelimit::RateLimit;
use crate::vfio_user::dma::{DmaMaps, Mapped};
use crate::vfio_user::irq::{EventFd, Interrupts, MsixSink, Signalled};
use crate::vfio_user::protocol::{self as p, cmd, flags, Header, HEADER_SIZE};
use crate::vfio_user::scm::{self, MAX_FDS};

/// Largest REGION_READ/WRITE data we accept and advertise (`max_data_xfer_size`).
pub const MAX_DATA_XFER: u32 = 1 << 20;
/// Largest message we accept: header, access head and data.
pub const MAX_MESSAGE: usize = HEADER_SIZE + 16 + MAX_DATA_XFER as usize;
/// Receive buffer: one largest message plus one read's worth.
const BUF_SIZE: usize = MAX_MESSAGE + 64 * 1024;
/// Page size we advertise (`pgsizes`).
const PAGE_SIZE: u64 = 4096;

/// How long a new client waits for the attached one to go away before it is refused. A client
/// that closes and reconnects can race its own EOF (for instance while a forked child still
/// holds the old socket until it execs), so a reconnect is held briefly rather than refused.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(1);
/// Most clients waiting for the attached one to leave; more are refused at once.
const MAX_WAITING: usize = 4;
/// Most refused clients waiting for their EBUSY answer; more are closed without one.
const MAX_REFUSING: usize = 8;
/// How long a refused client has to send its first message (to be answered EBUSY).
const REFUSE_WAIT: Duration = Duration::from_secs(2);
/// How long stopping waits for a connection thread before leaving it behind.
const STOP_WAIT: Duration = Duration::from_secs(2);

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);

/// Stops a running [`Server`] from another thread, or asks its client to let go.
#[derive(Clone, Debug)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    irqs: Arc<Interrupts>,
}

impl StopHandle {
    /// Asks the server loop to return (after disconnecting its client).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    /// Raises the REQ interrupt: asks the attached client to release the device (QEMU then
    /// unplugs it from the guest). Never blocks.
    pub fn request_release(&self) -> Signalled {
        self.irqs.signal(vb::VFIO_PCI_REQ_IRQ_INDEX, 0)
    }
}

/// The client being served, on its own thread.
#[derive(Debug)]
struct Active {
    id: u64,
    /// A second handle on the socket, to shut it down when stopping.
    stream: StdStream,
    done: Arc<AtomicBool>,
    thread: JoinHandle<Ended>,
}

/// What a connection thread reports when it ends.
#[derive(Debug)]
struct Ended {
    why: String,
    messages: u64,
    dma_maps: usize,
    irq_fds: usize,
    log: RateLimit,
}

/// A client kept on the loop: waiting for the attached one to leave, or refused and waiting for
/// its first message to be answered EBUSY.
#[derive(Debug)]
struct Held {
    stream: UnixStream,
    token: Token,
    /// When it is refused (waiting) or closed (refusing).
    deadline: Instant,
}

/// The server of one instance.
#[derive(Debug)]
pub struct Server {
    poll: Poll,
    listener: UnixListener,
    waker: Arc<Waker>,
    instance: SharedInstance,
    stats: Arc<ServerStats>,
    irqs: Arc<Interrupts>,
    vram_file: Option<Arc<File>>,
    stop: Arc<AtomicBool>,
    active: Option<Active>,
    /// Clients that connected while another was attached, oldest first.
    waiting: VecDeque<Held>,
    /// Refused clients, until their first message is answered EBUSY.
    refusing: Vec<Held>,
    next_token: usize,
    refuse_log: RateLimit,
    /// Limits protocol-error logs across connections: a client reconnecting in a loop does not
    /// reset it. Lent to the connection thread while one runs.
    error_log: Option<RateLimit>,
    next_conn: u64,
}

/// Negotiated limits of a connection.
#[derive(Clone, Copy, Debug)]
struct Caps {
    max_xfer: u32,
}

/// Descriptors that arrived with one read, and the stream range of that read.
#[derive(Debug)]
struct FdChunk {
    start: u64,
    end: u64,
    fds: Vec<OwnedFd>,
    /// The read carried more descriptors than a message may (closed at once): whatever message
    /// they were for is refused.
    refused: bool,
}

/// One client connection: framing state and protocol session.
#[derive(Debug)]
struct Conn {
    stream: StdStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream position of `buf[0]`.
    base: u64,
    fd_chunks: VecDeque<FdChunk>,
    /// Bytes still to drain from a rejected oversize message.
    discard: u64,
    /// Scratch for building a reply.
    reply: Vec<u8>,
    session: Session,
    closing: bool,
    log: RateLimit,
}

/// What a connection works on: the instance, its VRAM file, its counters and interrupts.
#[derive(Debug)]
struct Ctx<'a> {
    instance: &'a SharedInstance,
    vram: Option<&'a File>,
    stats: &'a ServerStats,
    irqs: &'a Interrupts,
}

/// Per-client protocol state: negotiation, DMA maps.
#[derive(Debug, Default)]
struct Session {
    caps: Option<Caps>,
    dma: DmaMaps,
    /// The DMA table changed since the device was last given guest RAM.
    ram_stale: bool,
    messages: u64,
    /// Limits logs of things a guest or client can repeat at will (resets, unsealed maps).
    noisy: RateLimit,
}

impl Server {
    /// A server for `instance` on an already bound `listener`. `vram_file` (a personality with
    /// mmap-able VRAM) is handed to clients as the VRAM region's fd.
    pub fn new(
        listener: std::os::unix::net::UnixListener,
        instance: SharedInstance,
        vram_file: Option<File>,
    ) -> io::Result<(Server, StopHandle)> {
        listener.set_nonblocking(true)?;
        let mut listener = UnixListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (stats, msix) = {
            let inst = lock(&instance);
            (inst.stats.clone(), inst.device.msix_vectors())
        };
        let irqs = Arc::new(Session::interrupts(msix));
        {
            let sink = Arc::new(MsixSink::new(irqs.clone()));
            let mut inst = lock(&instance);
            inst.device.attach_interrupts(sink.clone());
            inst.msix = Some(sink);
        }
        Ok((
            Server {
                poll,
                listener,
                waker: waker.clone(),
                instance,
                stats,
                irqs: irqs.clone(),
                vram_file: vram_file.map(Arc::new),
                stop: stop.clone(),
                active: None,
                waiting: VecDeque::new(),
                refusing: Vec::new(),
                next_token: 2,
                refuse_log: RateLimit::default(),
                error_log: Some(RateLimit::default()),
                next_conn: 1,
            },
            StopHandle { stop, waker, irqs },
        ))
    }

    /// Serves until stopped.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(16);
        while !self.stop.load(Ordering::SeqCst) {
            let timeout = self
                .waiting
                .iter()
                .chain(&self.refusing)
                .map(|h| h.deadline)
                .min()
                .map(|d| d.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER | WAKER => {}
                    token => self.held_ready(token),
                }
            }
            if events.iter().any(|e| e.token() == LISTENER) {
                self.accept();
            }
            self.reap();
            self.settle();
        }
        self.waiting.clear();
        self.refusing.clear();
        if let Some(active) = &self.active {
            let _ = active.stream.shutdown(std::net::Shutdown::Both);
        }
        self.reap_bounded();
        Ok(())
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    self.reap();
                    if self.active.is_none() && self.waiting.is_empty() {
                        self.adopt(stream);
                        continue;
                    }
                    // Clients that gave up while waiting make room.
                    self.waiting.retain(|h| !peer_closed(&h.stream));
                    if self.waiting.len() < MAX_WAITING {
                        self.hold(stream, RECONNECT_GRACE, true);
                    } else {
                        self.refuse(stream, "too many clients are waiting");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log_limited!(self.refuse_log, Level::Warn, "accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Registers `stream` on the loop (readable: to see it close, or its first message).
    fn hold(&mut self, mut stream: UnixStream, wait: Duration, waiting: bool) {
        let token = Token(self.next_token);
        self.next_token = self.next_token.wrapping_add(1).max(2);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, token, Interest::READABLE)
        {
            log_limited!(self.refuse_log, Level::Warn, "cannot hold a client: {e}");
            return;
        }
        let held = Held {
            stream,
            token,
            deadline: Instant::now() + wait,
        };
        if waiting {
            self.waiting.push_back(held);
        } else {
            self.refusing.push(held);
        }
    }

    /// A held client's socket is readable: a waiting one may have closed; a refused one may
    /// have sent its first message.
    fn held_ready(&mut self, token: Token) {
        if let Some(i) = self.waiting.iter().position(|h| h.token == token) {
            if peer_closed(&self.waiting[i].stream) {
                self.waiting.remove(i);
            }
        } else if let Some(i) = self.refusing.iter().position(|h| h.token == token) {
            if answer_busy(&self.refusing[i].stream) {
                self.refusing.swap_remove(i);
            }
        }
    }

    /// Adopts the oldest waiting client once the attached one is gone; refuses those whose
    /// grace ran out; closes refused clients that never spoke.
    fn settle(&mut self) {
        let now = Instant::now();
        self.refusing.retain(|h| h.deadline > now);
        if self.active.is_none() {
            while let Some(h) = self.waiting.pop_front() {
                let mut stream = h.stream;
                let _ = self.poll.registry().deregister(&mut stream);
                if peer_closed(&stream) {
                    continue;
                }
                self.adopt(stream);
                break;
            }
        }
        while self.waiting.front().is_some_and(|h| h.deadline <= now) {
            if let Some(h) = self.waiting.pop_front() {
                let mut stream = h.stream;
                let _ = self.poll.registry().deregister(&mut stream);
                self.refuse(stream, "another client is attached");
            }
        }
    }

    /// Refuses a client: its first message is answered EBUSY, then it is closed.
    fn refuse(&mut self, stream: UnixStream, why: &str) {
        ServerStats::add(&self.stats.refused_connections, 1);
        log_limited!(
            self.refuse_log,
            Level::Warn,
            "refused a vfio-user client: {why} (one client is served at a time; its first message is answered EBUSY)"
        );
        if answer_busy(&stream) {
            return;
        }
        if self.refusing.len() < MAX_REFUSING {
            self.hold(stream, REFUSE_WAIT, false);
        }
    }

    fn adopt(&mut self, stream: UnixStream) {
        let id = self.next_conn;
        self.next_conn += 1;
        // mio hands out non-blocking sockets; the connection thread blocks.
        // SAFETY: `into_raw_fd` gives up ownership of a valid socket descriptor, which the new
        // std stream then owns alone.
        let stream = unsafe {
            use std::os::fd::{FromRawFd, IntoRawFd};
            StdStream::from_raw_fd(stream.into_raw_fd())
        };
        let spawned = stream
            .set_nonblocking(false)
            .and_then(|()| stream.try_clone())
            .and_then(|handle| {
                let done = Arc::new(AtomicBool::new(false));
                let (flag, waker) = (done.clone(), self.waker.clone());
                let instance = self.instance.clone();
                let vram = self.vram_file.clone();
                let stats = self.stats.clone();
                let irqs = self.irqs.clone();
                let log = self.error_log.take().unwrap_or_default();
                let thread = std::thread::Builder::new()
                    .name(format!("vfio-user-{id}"))
                    .spawn(move || {
                        let ctx = Ctx {
                            instance: &instance,
                            vram: vram.as_deref(),
                            stats: &stats,
                            irqs: &irqs,
                        };
                        let mut conn = Conn::new(stream, log);
                        let why = match conn.run(&ctx) {
                            Ok(()) => "closed".to_string(),
                            Err(e) => format!("error: {e}"),
                        };
                        let ended = Ended {
                            why,
                            messages: conn.session.messages,
                            dma_maps: conn.session.dma.len(),
                            irq_fds: irqs.clear(),
                            log: std::mem::take(&mut conn.log),
                        };
                        // The device lets go of guest RAM; closing the socket and dropping the
                        // table then unmaps it, before reporting.
                        lock(&instance).device.attach_memory(None);
                        drop(conn);
                        flag.store(true, Ordering::SeqCst);
                        let _ = waker.wake();
                        ended
                    })?;
                Ok(Active {
                    id,
                    stream: handle,
                    done,
                    thread,
                })
            });
        match spawned {
            Ok(active) => {
                ServerStats::add(&self.stats.connections, 1);
                lock(&self.instance).client_since = Some(SystemTime::now());
                info!("client connected (connection {id})");
                self.active = Some(active);
            }
            Err(e) => warn!("cannot serve new client: {e}"),
        }
    }

    /// Collects a connection thread that has ended.
    fn reap(&mut self) {
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.done.load(Ordering::SeqCst))
        {
            self.collect();
        }
    }

    /// When stopping: waits a bounded time for the connection thread (its socket is shut
    /// down), then leaves it behind rather than hang the stop.
    fn reap_bounded(&mut self) {
        let Some(active) = &self.active else {
            return;
        };
        let deadline = Instant::now() + STOP_WAIT;
        while !active.done.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::park_timeout(Duration::from_millis(5));
        }
        if active.done.load(Ordering::SeqCst) {
            self.collect();
        } else {
            warn!(
                "connection {} did not end within {STOP_WAIT:?} of being shut down; left behind",
                active.id
            );
            self.active = None;
            lock(&self.instance).client_since = None;
        }
    }

    fn collect(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        lock(&self.instance).client_since = None;
        match active.thread.join() {
            Ok(ended) => {
                info!(
                    "client disconnected (connection {}, {}) after {} messages; dropped {} DMA maps and {} IRQ eventfds; device state kept",
                    active.id, ended.why, ended.messages, ended.dma_maps, ended.irq_fds
                );
                self.error_log = Some(ended.log);
            }
            Err(_) => warn!(
                "connection {} ended abnormally; device state kept",
                active.id
            ),
        }
    }
}

/// What a receive on a held socket found, without waiting.
enum Received {
    /// This many bytes.
    Data(usize),
    /// End of stream, or the socket broke.
    Closed,
    /// Nothing yet.
    Nothing,
}

/// Receives (or with `MSG_PEEK`, peeks) into `buf` without blocking.
fn receive_now(stream: &UnixStream, buf: &mut [u8], flags: i32) -> Received {
    // SAFETY: receives at most `buf.len()` bytes into a live buffer, without blocking.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Received::Closed,
        n if n > 0 => Received::Data(n as usize),
        _ => match io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR) => Received::Nothing,
            _ => Received::Closed,
        },
    }
}

/// Whether the peer of a held socket has closed: readable with nothing to read.
fn peer_closed(stream: &UnixStream) -> bool {
    matches!(
        receive_now(stream, &mut [0u8; 1], libc::MSG_PEEK),
        Received::Closed
    )
}

/// Answers a refused client's first message with EBUSY once its header is in (without
/// blocking). Returns true when done with it: answered, closed, or broken.
fn answer_busy(stream: &UnixStream) -> bool {
    let mut h = [0u8; HEADER_SIZE];
    match receive_now(stream, &mut h, libc::MSG_PEEK) {
        Received::Closed => return true,
        Received::Nothing => return false,
        Received::Data(n) if n < HEADER_SIZE => return false,
        Received::Data(_) => {}
    }
    if let Some(hdr) = p::read::<Header>(&h) {
        if !no_reply(&hdr) {
            let reply = Header::error_reply(&hdr, libc::EBUSY);
            let bytes = reply.as_bytes();
            // SAFETY: sends from a live local buffer, without blocking. Best effort: a full
            // socket or a gone peer changes nothing.
            let _ = unsafe {
                libc::send(
                    stream.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
    }
    // Consume what it sent (a bounded amount), so that closing reads as a clean end of stream
    // rather than a reset.
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        if !matches!(receive_now(stream, &mut sink, 0), Received::Data(_)) {
            break;
        }
    }
    true
}

impl Conn {
    fn new(stream: StdStream, log: RateLimit) -> Conn {
        Conn {
            stream,
            buf: vec![0; BUF_SIZE],
            start: 0,
            end: 0,
            base: 0,
            fd_chunks: VecDeque::new(),
            discard: 0,
            reply: Vec::with_capacity(256),
            session: Session::default(),
            closing: false,
            log,
        }
    }

    /// Serves the client until it closes, the stream breaks, or it must be dropped.
    fn run(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        loop {
            self.handle_buffered(ctx)?;
            if self.closing {
                return Ok(());
            }
            self.close_stray_fds(ctx.stats);
            debug_assert!(self.pending_fds() <= MAX_FDS, "descriptors hoarded");
            if self.start == self.end {
                self.base += self.end as u64;
                self.start = 0;
                self.end = 0;
            } else if self.end == self.buf.len() {
                self.base += self.start as u64;
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let got = match scm::recv_with_fds(self.stream.as_raw_fd(), &mut self.buf[self.end..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if got.len == 0 {
                return Ok(());
            }
            self.received(got);
        }
    }

    /// Appends one read's bytes (already in the buffer) and descriptors.
    fn received(&mut self, got: scm::Received) {
        let at = self.base + self.end as u64;
        if !got.fds.is_empty() || got.truncated {
            let refused = got.truncated || got.fds.len() > MAX_FDS;
            self.fd_chunks.push_back(FdChunk {
                start: at,
                end: at + got.len as u64,
                // More than one message may carry: closed now, the message refused.
                fds: if refused { Vec::new() } else { got.fds },
                refused,
            });
        }
        self.end += got.len;
    }

    /// Closes descriptors that cannot belong to the message still being received: only a read
    /// that contained that message's first byte can carry its descriptors (and it is the last
    /// message starting in that read). Leaves at most one chunk of at most [`MAX_FDS`].
    fn close_stray_fds(&mut self, stats: &ServerStats) {
        let next = self.base + self.start as u64 + self.discard;
        let mut closed = 0;
        self.fd_chunks.retain_mut(|c| {
            let keep = c.start <= next && next < c.end;
            if !keep {
                closed += c.fds.len();
            }
            keep
        });
        if closed > 0 {
            ServerStats::add(&stats.stray_fds_closed, closed as u64);
            log_limited!(
                self.log,
                Level::Warn,
                "closed {closed} descriptors that belong to no message"
            );
        }
    }

    /// Takes the descriptors that belong to the message at stream position `pos` of `size`
    /// bytes (and whether they were refused); closes any that arrived for no message.
    fn take_fds(&mut self, pos: u64, size: u64, stats: &ServerStats) -> (Vec<OwnedFd>, bool) {
        while let Some(c) = self.fd_chunks.front() {
            if c.end <= pos {
                let stale = self.fd_chunks.pop_front().map_or(0, |c| c.fds.len());
                ServerStats::add(&stats.stray_fds_closed, stale as u64);
                log_limited!(
                    self.log,
                    Level::Warn,
                    "closed {stale} descriptors sent with no message"
                );
                continue;
            }
            break;
        }
        match self.fd_chunks.front() {
            Some(c) if c.start <= pos && pos + size >= c.end => {
                let c = self.fd_chunks.pop_front().expect("front exists");
                (c.fds, c.refused)
            }
            _ => (Vec::new(), false),
        }
    }

    /// Handles every whole message in the buffer. The instance is locked only inside device
    /// calls and never across a send: a client that stops reading its replies blocks only its
    /// own thread, not the instance's status, screenshots or (in a daemon) the mdev tree.
    fn handle_buffered(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        while !self.closing {
            let avail = self.end - self.start;
            if self.discard > 0 {
                let n = (self.discard.min(avail as u64)) as usize;
                self.start += n;
                self.discard -= n as u64;
                if self.discard > 0 {
                    break;
                }
                continue;
            }
            let pos = self.base + self.start as u64;
            let (hdr, size) = match frame(&self.buf[self.start..self.end]) {
                Framed::Incomplete => break,
                Framed::TooSmall(hdr) => {
                    log_limited!(
                        self.log,
                        Level::Warn,
                        "message size {} is below the header size; closing the connection",
                        hdr.size.get()
                    );
                    self.send_error(&hdr, libc::EINVAL, no_reply(&hdr))?;
                    self.closing = true;
                    break;
                }
                Framed::TooLarge(hdr) => {
                    let size = hdr.size.get();
                    log_limited!(
                        self.log,
                        Level::Warn,
                        "{} message of {size} bytes exceeds the {MAX_MESSAGE}-byte limit; draining it",
                        cmd::name(hdr.command.get())
                    );
                    let _ = self.take_fds(pos, u64::from(size), ctx.stats);
                    self.discard = u64::from(size);
                    self.send_error(&hdr, libc::E2BIG, no_reply(&hdr))?;
                    continue;
                }
                Framed::Message(hdr, size) => (hdr, size),
            };
            let no_reply = no_reply(&hdr);
            let (fds, refused) = self.take_fds(pos, size as u64, ctx.stats);
            self.reply.clear();
            self.reply.extend_from_slice(&[0u8; HEADER_SIZE]);
            let mut reply_fds: Vec<RawFd> = Vec::new();
            let payload = &self.buf[self.start + HEADER_SIZE..self.start + size];
            let result = if refused {
                Err(libc::EINVAL)
            } else {
                self.session
                    .handle(&hdr, payload, fds, ctx, &mut self.reply, &mut reply_fds)
            };
            ServerStats::add(&ctx.stats.messages, 1);
            if result.is_err() {
                ServerStats::add(&ctx.stats.errors, 1);
            }
            self.start += size;
            self.session.messages += 1;
            match result {
                Ok(()) => {
                    if !no_reply {
                        let h = Header::reply_to(&hdr, self.reply.len() - HEADER_SIZE);
                        self.reply[..HEADER_SIZE].copy_from_slice(h.as_bytes());
                        let reply = std::mem::take(&mut self.reply);
                        let r = self.send(&reply, &reply_fds);
                        self.reply = reply;
                        r?;
                    }
                }
                Err(errno) => {
                    log_limited!(
                        self.log,
                        Level::Warn,
                        "{} (id {}) failed: {}",
                        cmd::name(hdr.command.get()),
                        hdr.id.get(),
                        io::Error::from_raw_os_error(errno)
                    );
                    self.send_error(&hdr, errno, no_reply)?;
                }
            }
        }
        Ok(())
    }

    fn send_error(&mut self, req: &Header, errno: i32, no_reply: bool) -> io::Result<()> {
        if no_reply {
            return Ok(());
        }
        let h = Header::error_reply(req, errno);
        self.send(h.as_bytes(), &[])
    }

    /// Sends one reply (blocking; a client that stops reading stalls only its own thread, and
    /// stopping the server shuts the socket down under it).
    fn send(&mut self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut sent = 0;
        let mut fds = fds;
        while sent < bytes.len() {
            match scm::send_with_fds(self.stream.as_raw_fd(), &bytes[sent..], fds) {
                Ok(n) => {
                    sent += n;
                    fds = &[];
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Descriptors held for messages not yet acted on.
    fn pending_fds(&self) -> usize {
        self.fd_chunks.iter().map(|c| c.fds.len()).sum()
    }
}

/// What the bytes at the head of a receive buffer hold.
#[derive(Debug)]
enum Framed {
    /// Not a whole header or message yet.
    Incomplete,
    /// A header whose size is below the header's own: the stream cannot be resynchronised.
    TooSmall(Header),
    /// A message above [`MAX_MESSAGE`]: refuse it and drain its bytes.
    TooLarge(Header),
    /// A whole message of this many bytes.
    Message(Header, usize),
}

/// Frames the next message of `buf`.
fn frame(buf: &[u8]) -> Framed {
    let Some(hdr) = p::read::<Header>(buf) else {
        return Framed::Incomplete;
    };
    let size = hdr.size.get() as usize;
    if size < HEADER_SIZE {
        Framed::TooSmall(hdr)
    } else if size > MAX_MESSAGE {
        Framed::TooLarge(hdr)
    } else if buf.len() < size {
        Framed::Incomplete
    } else {
        Framed::Message(hdr, size)
    }
}

fn no_reply(hdr: &Header) -> bool {
    hdr.flags.get() & flags::NO_REPLY != 0
}

/// A fresh instance of the smallest built-in type, for the fuzz entry points.
fn fuzz_instance() -> Option<(SharedInstance, &'static File)> {
    use std::sync::OnceLock;
    static SETUP: OnceLock<Option<(vgpu_model::VgpuType, File)>> = OnceLock::new();
    let (ty, vram_file) = SETUP
        .get_or_init(|| {
            let ty = vgpu_model::Catalog::builtin()
                .ok()?
                .resolve("EMU-16M")
                .ok()?
                .clone();
            let file = crate::sys::memfd::memfd("fuzz-vram", ty.framebuffer).ok()?;
            Some((ty, file))
        })
        .as_ref()?;
    let vram = vgpu_model::vram::NullVram(ty.framebuffer);
    let device = vgpu_model::Device::new(ty, &[0; 16], Some(Box::new(vram))).ok()?;
    let inst = Instance::from_device(device, uuid::Uuid::nil(), "fuzz".into());
    Some((Arc::new(std::sync::Mutex::new(inst)), vram_file))
}

/// Fuzz entry point: frames `data` as a stream of messages from one client and dispatches each
/// whole one to a fresh instance, as a connection does (without descriptors). The first byte
/// chooses whether VERSION is negotiated up front, to reach the other commands sooner. Panics
/// only when a reply breaks the protocol's rules or the device breaks its invariants.
#[doc(hidden)]
pub fn fuzz_dispatch(data: &[u8]) {
    let Some((instance, vram_file)) = fuzz_instance() else {
        return;
    };
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let stats = ServerStats::default();
    let irqs = Session::interrupts(lock(&instance).device.msix_vectors());
    let ctx = Ctx {
        instance: &instance,
        vram: Some(vram_file),
        stats: &stats,
        irqs: &irqs,
    };
    let mut session = Session::default();
    if first & 1 == 1 {
        session.caps = Some(Caps {
            max_xfer: MAX_DATA_XFER,
        });
    }
    let mut reply = Vec::new();
    let mut reply_fds = Vec::new();
    while let Framed::Message(hdr, size) = frame(rest) {
        reply.clear();
        reply.extend_from_slice(&[0u8; HEADER_SIZE]);
        reply_fds.clear();
        let payload = &rest[HEADER_SIZE..size];
        let result = session.handle(&hdr, payload, Vec::new(), &ctx, &mut reply, &mut reply_fds);
        match result {
            Ok(()) => assert!(reply.len() <= MAX_MESSAGE, "reply of {} bytes", reply.len()),
            Err(errno) => assert_ne!(errno, 0, "error replies carry an errno"),
        }
        if hdr.command.get() == cmd::REGION_READ && result.is_ok() {
            let count = p::read::<p::RegionAccess>(payload).map_or(0, |a| a.count.get());
            assert_eq!(
                reply.len(),
                HEADER_SIZE + 16 + count as usize,
                "a read reply carries count bytes"
            );
        }
        rest = &rest[size..];
    }
    vgpu_model::fuzz::check_invariants(&lock(&instance).device);
}

/// Fuzz entry point for the whole connection state machine: a real [`Conn`] serves one end of
/// a socket pair while the input is sent to the other in pieces, each piece with descriptors
/// attached, so framing across reads, descriptor attribution, refusal and draining all run as
/// with a real client.
///
/// Input: records of `[fds, len_lo, len_hi, bytes...]`; `fds & 31` descriptors (more than a
/// message may carry, sometimes) go with the piece, drawn from a sealed memfd, an unsealed memfd,
/// an eventfd and a socket. Panics when a reply is malformed, an error reply carries errno 0, the
/// connection holds more than one message's descriptors, or any descriptor of the pool
/// outlives the connection.
#[doc(hidden)]
pub fn fuzz_connection(data: &[u8]) {
    use std::io::Read;
    use std::os::fd::{AsFd, AsRawFd};
    use std::sync::OnceLock;

    static POOL: OnceLock<Option<Vec<OwnedFd>>> = OnceLock::new();
    let Some(pool) = POOL
        .get_or_init(|| {
            let sealed = crate::sys::memfd::memfd("fuzz-conn-sealed", 1 << 16).ok()?;
            let open = crate::sys::memfd::memfd_unsealed("fuzz-conn-open", 1 << 16).ok()?;
            let efd = crate::vfio_user::irq::new_eventfd(libc::EFD_CLOEXEC).ok()?;
            let (sock, _) = StdStream::pair().ok()?;
            Some(vec![sealed.into(), open.into(), efd, sock.into()])
        })
        .as_ref()
    else {
        return;
    };
    // The pool's files, by identity (eventfds share one inode, so they are not counted).
    let ids: Vec<(u64, u64)> = pool
        .iter()
        .filter_map(|fd| {
            let m = File::from(fd.try_clone().ok()?).metadata().ok()?;
            use std::os::unix::fs::MetadataExt;
            Some((m.dev(), m.ino()))
        })
        .collect();
    let pool_copies = || -> usize {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
                    .filter(|m| m.file_type().is_file() || m.file_type().is_socket())
                    .filter(|m| ids.contains(&(m.dev(), m.ino())))
                    .count()
            })
            .unwrap_or(0)
    };
    let before = pool_copies();

    let mut pieces: Vec<(Vec<RawFd>, &[u8])> = Vec::new();
    let mut rest = data;
    while let [fds, lo, hi, tail @ ..] = rest {
        let len = (usize::from(*hi) << 8 | usize::from(*lo)).min(tail.len());
        let (bytes, next) = tail.split_at(len);
        let n = usize::from(fds & 31);
        let fds = (0..n)
            .map(|i| pool[(usize::from(*fds >> 5) + i) % pool.len()].as_raw_fd())
            .collect();
        if !bytes.is_empty() {
            pieces.push((fds, bytes));
        }
        rest = next;
    }

    let Some((instance, vram_file)) = fuzz_instance() else {
        return;
    };
    let Ok((ours, theirs)) = StdStream::pair() else {
        return;
    };
    let (Ok(writer), Ok(mut reader)) = (theirs.try_clone(), theirs.try_clone()) else {
        return;
    };
    drop(theirs);
    let stats = ServerStats::default();
    let irqs = Session::interrupts(lock(&instance).device.msix_vectors());
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for (fds, bytes) in &pieces {
                let mut sent = 0;
                let mut fds = &fds[..];
                while sent < bytes.len() {
                    match scm::send_fds_unlimited(writer.as_fd().as_raw_fd(), &bytes[sent..], fds) {
                        Ok(n) => {
                            sent += n;
                            fds = &[];
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return,
                    }
                }
            }
            let _ = writer.shutdown(std::net::Shutdown::Write);
        });
        scope.spawn(move || {
            // Every reply: a header of a sane size; an error reply carries an errno.
            let mut stream = Vec::new();
            let _ = reader.read_to_end(&mut stream);
            let mut at = &stream[..];
            while let Some(hdr) = p::read::<Header>(at) {
                let size = hdr.size.get() as usize;
                assert!(
                    (HEADER_SIZE..=MAX_MESSAGE).contains(&size),
                    "reply size {size}"
                );
                assert_eq!(hdr.flags.get() & flags::TYPE_MASK, flags::TYPE_REPLY);
                if hdr.flags.get() & flags::ERROR != 0 {
                    assert_ne!(hdr.error.get(), 0, "an error reply without errno");
                }
                at = at.get(size..).unwrap_or_default();
            }
        });
        let ctx = Ctx {
            instance: &instance,
            vram: Some(vram_file),
            stats: &stats,
            irqs: &irqs,
        };
        let mut conn = Conn::new(ours, RateLimit::new(0, Duration::from_secs(3600)));
        let _ = conn.run(&ctx);
        irqs.clear();
        drop(conn);
    });
    assert_eq!(
        pool_copies(),
        before,
        "a descriptor outlived its connection"
    );
    vgpu_model::fuzz::check_invariants(&lock(&instance).device);
}

/// Appends a zerocopy struct to a reply.
fn put<T: IntoBytes + zerocopy::Immutable>(reply: &mut Vec<u8>, v: &T) {
    reply.extend_from_slice(v.as_bytes());
}

impl Session {
    /// Vectors per IRQ index. INTx and MSI have none (interrupt pin 0, no MSI capability);
    /// MSI-X has the device's vectors (none on bochs). ERR and REQ have one each, as on a PCIe
    /// vfio-pci device: QEMU's vfio-user-pci always queries ERR (warning "Could not enable error
    /// recovery" at count 0) and assigns it an eventfd; REQ lets a server ask a client to
    /// release the device.
    fn irq_count(index: u32, msix: u32) -> u32 {
        match index {
            vb::VFIO_PCI_MSIX_IRQ_INDEX => msix,
            vb::VFIO_PCI_ERR_IRQ_INDEX | vb::VFIO_PCI_REQ_IRQ_INDEX => 1,
            _ => 0,
        }
    }

    /// An interrupt table with [`Session::irq_count`] vectors per index, none assigned.
    fn interrupts(msix: u32) -> Interrupts {
        let counts: Vec<u32> = (0..NUM_IRQS).map(|i| Session::irq_count(i, msix)).collect();
        Interrupts::new(&counts)
    }

    /// Logs what the device model reported (a ring outside guest RAM, a broken chain), rate
    /// limited: a guest can repeat them at will.
    fn log_notices(&mut self, notices: Vec<String>) {
        for n in notices {
            log_limited!(self.noisy, Level::Warn, "device: {n}");
        }
    }

    /// Gives the device the current guest RAM if the DMA table changed since it last got it.
    /// The collection is built outside the instance lock (no system call either way).
    fn refresh_ram(&mut self, ctx: &Ctx<'_>) {
        if std::mem::take(&mut self.ram_stale) {
            let ram = self.dma.guest_ram();
            lock(ctx.instance).device.attach_memory(Some(ram));
        }
    }

    /// Acts on one message. The instance lock is taken only around device-model calls.
    fn handle(
        &mut self,
        hdr: &Header,
        payload: &[u8],
        fds: Vec<OwnedFd>,
        ctx: &Ctx<'_>,
        reply: &mut Vec<u8>,
        reply_fds: &mut Vec<RawFd>,
    ) -> Result<(), i32> {
        let command = hdr.command.get();
        trace!(
            "{} id {} ({} bytes)",
            cmd::name(command),
            hdr.id.get(),
            payload.len()
        );
        if hdr.flags.get() & flags::TYPE_MASK != flags::TYPE_COMMAND
            || hdr.flags.get() & flags::ERROR != 0
        {
            return Err(libc::EINVAL);
        }
        if !fds.is_empty() && !matches!(command, cmd::DMA_MAP | cmd::DEVICE_SET_IRQS) {
            return Err(libc::EINVAL);
        }
        if command == cmd::VERSION {
            return self.version(payload, reply);
        }
        let Some(caps) = self.caps else {
            // Everything but VERSION needs a negotiated connection.
            return Err(libc::EINVAL);
        };
        if matches!(
            command,
            cmd::REGION_READ | cmd::REGION_WRITE | cmd::REGION_WRITE_MULTI | cmd::DEVICE_RESET
        ) {
            self.refresh_ram(ctx);
        }
        match command {
            cmd::DMA_MAP => {
                let m: p::DmaMap = p::read(payload).ok_or(libc::EINVAL)?;
                if (m.argsz.get() as usize) < size_of::<p::DmaMap>() || fds.len() > 1 {
                    return Err(libc::EINVAL);
                }
                let prot_bits = vb::VFIO_DMA_MAP_FLAG_READ | vb::VFIO_DMA_MAP_FLAG_WRITE;
                if m.flags.get() & !prot_bits != 0 {
                    return Err(libc::EINVAL);
                }
                let mapped = self.dma.map(
                    m.addr.get(),
                    m.size.get(),
                    m.offset.get(),
                    m.flags.get(),
                    fds.into_iter().next(),
                )?;
                self.ram_stale = true;
                if mapped == Mapped::NotSealed {
                    log_limited!(
                        self.noisy,
                        Level::Info,
                        "DMA region {:#x}+{:#x} comes with a file that can shrink (no F_SEAL_SHRINK): not mapped; reachable only through DMA messages",
                        m.addr.get(),
                        m.size.get()
                    );
                }
                debug!(
                    "DMA map {:#x}+{:#x} ({} regions)",
                    m.addr.get(),
                    m.size.get(),
                    self.dma.len()
                );
                Ok(())
            }
            cmd::DMA_UNMAP => {
                let u: p::DmaUnmap = p::read(payload).ok_or(libc::EINVAL)?;
                if (u.argsz.get() as usize) < size_of::<p::DmaUnmap>() {
                    return Err(libc::EINVAL);
                }
                let f = u.flags.get();
                if f & vb::VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
                    return Err(libc::ENOTSUP);
                }
                if f & !vb::VFIO_DMA_UNMAP_FLAG_ALL != 0 {
                    return Err(libc::EINVAL);
                }
                if f & vb::VFIO_DMA_UNMAP_FLAG_ALL != 0 {
                    if u.addr.get() != 0 || u.size.get() != 0 {
                        return Err(libc::EINVAL);
                    }
                    self.dma.clear();
                } else {
                    self.dma.unmap(u.addr.get(), u.size.get())?;
                }
                self.ram_stale = true;
                put(
                    reply,
                    &p::DmaUnmap {
                        argsz: U32::new(size_of::<p::DmaUnmap>() as u32),
                        ..u
                    },
                );
                Ok(())
            }
            cmd::DEVICE_GET_INFO => {
                let i: p::DeviceInfo = p::read(payload).ok_or(libc::EINVAL)?;
                if (i.argsz.get() as usize) < size_of::<p::DeviceInfo>() {
                    return Err(libc::EINVAL);
                }
                put(
                    reply,
                    &p::DeviceInfo {
                        argsz: U32::new(size_of::<p::DeviceInfo>() as u32),
                        flags: U32::new(vb::VFIO_DEVICE_FLAGS_PCI | vb::VFIO_DEVICE_FLAGS_RESET),
                        num_regions: U32::new(NUM_REGIONS),
                        num_irqs: U32::new(NUM_IRQS),
                    },
                );
                Ok(())
            }
            cmd::DEVICE_GET_REGION_INFO => {
                let req: p::RegionInfo = p::read(payload).ok_or(libc::EINVAL)?;
                let info = lock(ctx.instance)
                    .device
                    .region_info(req.index.get())
                    .ok_or(libc::EINVAL)?;
                region_info(&req, &info, ctx.vram, reply, reply_fds)
            }
            cmd::DEVICE_GET_IRQ_INFO => {
                let i: p::IrqInfo = p::read(payload).ok_or(libc::EINVAL)?;
                let index = i.index.get();
                if (i.argsz.get() as usize) < size_of::<p::IrqInfo>() || index >= NUM_IRQS {
                    return Err(libc::EINVAL);
                }
                let mut fl = vb::VFIO_IRQ_INFO_EVENTFD;
                fl |= match index {
                    vb::VFIO_PCI_INTX_IRQ_INDEX => {
                        vb::VFIO_IRQ_INFO_MASKABLE | vb::VFIO_IRQ_INFO_AUTOMASKED
                    }
                    // QEMU then assigns MSI-X vectors one SET_IRQS at a time, as the guest
                    // unmasks them.
                    vb::VFIO_PCI_MSIX_IRQ_INDEX => 0,
                    _ => vb::VFIO_IRQ_INFO_NORESIZE,
                };
                put(
                    reply,
                    &p::IrqInfo {
                        argsz: U32::new(size_of::<p::IrqInfo>() as u32),
                        flags: U32::new(fl),
                        index: U32::new(index),
                        count: U32::new(ctx.irqs.count(index) as u32),
                    },
                );
                Ok(())
            }
            cmd::DEVICE_SET_IRQS => self.set_irqs(payload, fds, ctx.irqs),
            cmd::REGION_READ => {
                let a: p::RegionAccess = p::read(payload).ok_or(libc::EINVAL)?;
                if payload.len() != size_of::<p::RegionAccess>() || a.count.get() > caps.max_xfer {
                    return Err(libc::EINVAL);
                }
                put(reply, &a);
                let at = reply.len();
                reply.resize(at + a.count.get() as usize, 0);
                let read = lock(ctx.instance).device.read(
                    a.region.get(),
                    a.offset.get(),
                    &mut reply[at..],
                );
                if let Err(e) = read {
                    trace!("{e}");
                    return Err(libc::EINVAL);
                }
                Ok(())
            }
            cmd::REGION_WRITE => {
                let a: p::RegionAccess = p::read(payload).ok_or(libc::EINVAL)?;
                let data = &payload[size_of::<p::RegionAccess>()..];
                if data.len() != a.count.get() as usize || a.count.get() > caps.max_xfer {
                    return Err(libc::EINVAL);
                }
                let (written, notices, wake) = {
                    let mut inst = lock(ctx.instance);
                    let before = inst.frl_deadline();
                    let written = inst.device.write(a.region.get(), a.offset.get(), data);
                    let wake = inst.waker_if_sooner(before);
                    (written, inst.device.take_notices(), wake)
                };
                // The limiter now holds something due sooner than the runtime sleeps for: wake
                // it (one eventfd write, never blocking) after the lock is released. The reply
                // never waits for pacing.
                if let Some(w) = wake {
                    w.wake();
                }
                self.log_notices(notices);
                if let Err(e) = written {
                    trace!("{e}");
                    return Err(libc::EINVAL);
                }
                put(reply, &a);
                Ok(())
            }
            cmd::REGION_WRITE_MULTI => {
                let (count, rest) = payload.split_at_checked(8).ok_or(libc::EINVAL)?;
                let count = u64::from_le_bytes(count.try_into().map_err(|_| libc::EINVAL)?);
                let entry = size_of::<p::WriteOne>();
                if count == 0 || count > p::MULTI_MAX as u64 || rest.len() < count as usize * entry
                {
                    return Err(libc::EINVAL);
                }
                let entries: Vec<p::WriteOne> = rest
                    .chunks_exact(entry)
                    .take(count as usize)
                    .filter_map(p::read)
                    .collect();
                if entries
                    .iter()
                    .any(|w| !(1..=p::MULTI_DATA as u32).contains(&w.count.get()))
                {
                    return Err(libc::EINVAL);
                }
                // All or nothing: every entry is checked before any is applied.
                let mut inst = lock(ctx.instance);
                for w in &entries {
                    inst.device
                        .validate(w.region.get(), w.offset.get(), w.count.get() as usize)
                        .map_err(|_| libc::EINVAL)?;
                }
                let before = inst.frl_deadline();
                let mut written = Ok(());
                for w in &entries {
                    let data = &w.data[..w.count.get() as usize];
                    written = inst
                        .device
                        .write(w.region.get(), w.offset.get(), data)
                        .map(drop)
                        .map_err(|_| libc::EINVAL);
                    if written.is_err() {
                        break;
                    }
                }
                let wake = inst.waker_if_sooner(before);
                let notices = inst.device.take_notices();
                drop(inst);
                if let Some(w) = wake {
                    w.wake();
                }
                self.log_notices(notices);
                written
            }
            cmd::DEVICE_RESET => {
                lock(ctx.instance).device.reset();
                log_limited!(self.noisy, Level::Info, "device reset by the client");
                Ok(())
            }
            _ => Err(libc::ENOSYS),
        }
    }

    fn version(&mut self, payload: &[u8], reply: &mut Vec<u8>) -> Result<(), i32> {
        if self.caps.is_some() {
            return Err(libc::EINVAL);
        }
        let v: p::Version = p::read(payload).ok_or(libc::EINVAL)?;
        if v.major.get() != 0 {
            return Err(libc::ENOTSUP);
        }
        let json = &payload[size_of::<p::Version>()..];
        // A NUL-terminated string with no NUL inside.
        let Some((&0, text)) = json.split_last() else {
            return Err(libc::EINVAL);
        };
        if text.contains(&0) {
            return Err(libc::EINVAL);
        }
        let value: serde_json::Value = if text.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_slice(text).map_err(|_| libc::EINVAL)?
        };
        let caps = match value.get("capabilities") {
            None => None,
            Some(c) if c.is_object() => Some(c),
            Some(_) => return Err(libc::EINVAL),
        };
        if !value.is_object() {
            return Err(libc::EINVAL);
        }
        let field = |k: &str| -> Result<Option<u64>, i32> {
            match caps.and_then(|c| c.get(k)) {
                None => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or(libc::EINVAL),
            }
        };
        let client_xfer = field("max_data_xfer_size")?.unwrap_or(u64::from(MAX_DATA_XFER));
        if client_xfer == 0 {
            return Err(libc::EINVAL);
        }
        let _ = field("max_msg_fds")?;
        self.caps = Some(Caps {
            max_xfer: client_xfer.min(u64::from(MAX_DATA_XFER)) as u32,
        });
        // QEMU reads the reply into a buffer the size of its request: never answer longer.
        let full = format!(
            "{{\"capabilities\":{{\"max_msg_fds\":{MAX_FDS},\"max_data_xfer_size\":{MAX_DATA_XFER},\"pgsizes\":{PAGE_SIZE}}}}}"
        );
        let short = format!("{{\"capabilities\":{{\"pgsizes\":{PAGE_SIZE}}}}}");
        let answer = if full.len() <= text.len() {
            full
        } else {
            short
        };
        put(
            reply,
            &p::Version {
                major: U16::new(0),
                minor: U16::new(0),
            },
        );
        reply.extend_from_slice(answer.as_bytes());
        reply.push(0);
        info!(
            "negotiated vfio-user 0.0 (client {}.{}; max_data_xfer_size {})",
            v.major.get(),
            v.minor.get(),
            client_xfer.min(u64::from(MAX_DATA_XFER))
        );
        Ok(())
    }

    fn set_irqs(
        &mut self,
        payload: &[u8],
        fds: Vec<OwnedFd>,
        irqs: &Interrupts,
    ) -> Result<(), i32> {
        let s: p::IrqSet = p::read(payload).ok_or(libc::EINVAL)?;
        let (fl, index, start, count) =
            (s.flags.get(), s.index.get(), s.start.get(), s.count.get());
        if (s.argsz.get() as usize) < size_of::<p::IrqSet>() || index >= NUM_IRQS {
            return Err(libc::EINVAL);
        }
        let data = fl & vb::VFIO_IRQ_SET_DATA_TYPE_MASK;
        let action = fl & vb::VFIO_IRQ_SET_ACTION_TYPE_MASK;
        let known = vb::VFIO_IRQ_SET_DATA_TYPE_MASK | vb::VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if fl & !known != 0 || !data.is_power_of_two() || !action.is_power_of_two() {
            return Err(libc::EINVAL);
        }
        if data != vb::VFIO_IRQ_SET_DATA_EVENTFD && !fds.is_empty() {
            return Err(libc::EINVAL);
        }
        if data == vb::VFIO_IRQ_SET_DATA_NONE
            && action == vb::VFIO_IRQ_SET_ACTION_TRIGGER
            && count == 0
        {
            // Disable the whole index.
            irqs.disable(index);
            return Ok(());
        }
        let end = start.checked_add(count).ok_or(libc::EINVAL)?;
        if count == 0 || end as usize > irqs.count(index) {
            return Err(libc::EINVAL);
        }
        // No index here is maskable.
        if action != vb::VFIO_IRQ_SET_ACTION_TRIGGER {
            return Err(libc::EINVAL);
        }
        let range = start as usize..end as usize;
        match data {
            vb::VFIO_IRQ_SET_DATA_EVENTFD => {
                if fds.is_empty() {
                    // A chunk without descriptors de-assigns.
                    irqs.assign(index, range.start, range.map(|_| None).collect());
                } else if fds.len() == count as usize {
                    let adopted = fds
                        .into_iter()
                        .map(|fd| EventFd::adopt(fd).map(Some))
                        .collect::<Result<Vec<_>, i32>>()?;
                    irqs.assign(index, range.start, adopted);
                } else {
                    return Err(libc::EINVAL);
                }
                Ok(())
            }
            vb::VFIO_IRQ_SET_DATA_NONE => {
                for v in range {
                    irqs.signal(index, v);
                }
                Ok(())
            }
            vb::VFIO_IRQ_SET_DATA_BOOL => {
                let bools = payload.get(size_of::<p::IrqSet>()..).ok_or(libc::EINVAL)?;
                if bools.len() < count as usize {
                    return Err(libc::EINVAL);
                }
                for (v, &b) in range.zip(bools) {
                    if b != 0 {
                        irqs.signal(index, v);
                    }
                }
                Ok(())
            }
            _ => Err(libc::EINVAL),
        }
    }
}

fn region_info(
    req: &p::RegionInfo,
    info: &vgpu_model::RegionInfo,
    vram: Option<&File>,
    reply: &mut Vec<u8>,
    reply_fds: &mut Vec<RawFd>,
) -> Result<(), i32> {
    let argsz = req.argsz.get() as usize;
    if argsz < size_of::<p::RegionInfo>() {
        return Err(libc::EINVAL);
    }
    let mut fl = 0;
    if info.size > 0 {
        if info.flags.read {
            fl |= vb::VFIO_REGION_INFO_FLAG_READ;
        }
        if info.flags.write {
            fl |= vb::VFIO_REGION_INFO_FLAG_WRITE;
        }
    }
    let areas = &info.mmap_areas;
    let cap_len = if info.flags.mmap && !areas.is_empty() {
        size_of::<p::SparseMmapCap>() + areas.len() * size_of::<p::SparseMmapArea>()
    } else {
        0
    };
    let needed = size_of::<p::RegionInfo>() + cap_len;
    let room = argsz >= needed;
    if cap_len > 0 {
        fl |= vb::VFIO_REGION_INFO_FLAG_MMAP | vb::VFIO_REGION_INFO_FLAG_CAPS;
    }
    put(
        reply,
        &p::RegionInfo {
            argsz: U32::new(needed as u32),
            flags: U32::new(fl),
            index: req.index,
            // Where the capability is (or will be, when asked with room): QEMU's vfio-user client
            // rejects a reply flagged CAPS whose cap_offset is not within [32, argsz], even one
            // too short to carry it (the kernel would send 0 there).
            cap_offset: U32::new(if cap_len > 0 {
                size_of::<p::RegionInfo>() as u32
            } else {
                0
            }),
            size: U64::new(info.size),
            offset: U64::new(0),
        },
    );
    if cap_len > 0 && room {
        put(
            reply,
            &p::SparseMmapCap {
                id: U16::new(vb::VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16),
                version: U16::new(1),
                next: U32::new(0),
                nr_areas: U32::new(areas.len() as u32),
                reserved: U32::new(0),
            },
        );
        for a in areas {
            put(
                reply,
                &p::SparseMmapArea {
                    offset: U64::new(a.offset),
                    size: U64::new(a.size),
                },
            );
        }
        // Only a personality with VRAM has mmap areas.
        reply_fds.extend(vram.map(|f| f.as_raw_fd()));
    }
    Ok(())
}
