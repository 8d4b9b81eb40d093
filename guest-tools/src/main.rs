//! vgpu-guest: the guest tests' tool inside the guest (a static binary at /bin/vgpu-guest of
//! the test initramfs). It speaks the guest tests' line protocol on stdout: every line is
//! `VGPU: <key> <values>`; a failure is `VGPU: error <what>` and exit status 1.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use drm::control::{Device as ControlDevice, Event, PageFlipFlags};

use vgpu_guest::card::{card_paths, choose_mode, size_of, Card, Connector, Size};
use vgpu_guest::flip::FlipStats;
use vgpu_guest::picture;
use vgpu_guest::scanout::{DumbFb, Head};

#[derive(Debug, Parser)]
#[command(
    name = "vgpu-guest",
    about = "DRM checks and test pictures inside a test guest"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reports every /dev/dri/cardN: its driver, each connector (connected or not) with its
    /// modes, the preferred and the largest one. Prints
    /// `VGPU: drm-card N driver=D pci=ADDRESS connectors=K`, one
    /// `VGPU: drm-connector cardN-NAME card=N head=I status=S preferred=WxH|none
    /// largest=WxH|none modes=WxH,...` per connector, then `VGPU: drm-cards COUNT`.
    Connectors,
    /// Lights every connector of one card (connected or not) with the test picture of its head
    /// index (see the `picture` module: a pure function of head index, width and height), one
    /// dumb XRGB8888 buffer per head. Prints `VGPU: head card=N index=I connector=NAME crtc=ID
    /// mode=WxH` per head, then `VGPU: drawn card=N heads=K`, and stays running, holding the
    /// buffers (a mode set by a process lasts only while its framebuffer exists), until it is
    /// killed; the console then comes back.
    Draw(DrawArgs),
    /// Page-flips every connector of one card at once, as fast as each goes: two dumb XRGB8888
    /// buffers per head (the head's test picture and its inverse, so every flip changes the
    /// image), the CRTC set on the first, then flips with DRM_MODE_PAGE_FLIP_EVENT, each head
    /// flipped again as soon as its previous flip's event arrives (all heads in flight
    /// together). Prints the `head` lines of `draw`, `VGPU: flipping card=N heads=K` when the
    /// buffers are drawn and the first flips are about to be asked for, then per head, from the
    /// events' timestamps, `VGPU: flips card=N head=H count=C seconds=S rate=R min_ms=A avg_ms=B
    /// max_ms=C` (the run from the first flip's request to the last event; intervals between
    /// consecutive completions), then `VGPU: flipped card=N heads=K`, and exits.
    Flip(FlipArgs),
}

#[derive(Debug, Args)]
struct FlipArgs {
    #[command(flatten)]
    card: CardChoice,
    /// The mode of every head, as for `draw`.
    #[arg(long, value_name = "WxH")]
    mode: Option<Size>,
    /// Flips per head [default: 300; no limit when only --seconds is given].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    count: Option<u32>,
    /// Stop asking for flips after this many seconds (flips in flight still complete).
    #[arg(long, value_name = "S")]
    seconds: Option<f64>,
}

#[derive(Debug, Args)]
struct DrawArgs {
    #[command(flatten)]
    card: CardChoice,
    /// The mode of every head: the connector's own mode of that size, else one made up (for
    /// connectors that list no modes). Without it: the preferred mode, else the first listed.
    #[arg(long, value_name = "WxH")]
    mode: Option<Size>,
}

/// Which card: by number, by driver name (the first such card), or the first card.
#[derive(Debug, Args)]
#[group(multiple = false)]
struct CardChoice {
    /// /dev/dri/cardN
    #[arg(long, value_name = "N")]
    card: Option<u32>,
    /// The first card whose driver is NAME (e.g. virtio_gpu, bochs-drm).
    #[arg(long, value_name = "NAME")]
    driver: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Connectors => connectors(),
        Command::Draw(args) => draw(args),
        Command::Flip(args) => flip(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("VGPU: error {e}");
            ExitCode::FAILURE
        }
    }
}

fn mode_list(c: &Connector) -> String {
    c.info
        .modes()
        .iter()
        .map(|m| size_of(m).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn or_none(size: Option<Size>) -> String {
    size.map_or_else(|| "none".into(), |s| s.to_string())
}

fn connectors() -> io::Result<()> {
    let cards = card_paths()?;
    for &(index, _) in &cards {
        let card = Card::open(index)?;
        let connectors = card.connectors()?;
        println!(
            "VGPU: drm-card {index} driver={} pci={} connectors={}",
            card.driver()?,
            card.pci(),
            connectors.len()
        );
        for c in &connectors {
            println!(
                "VGPU: drm-connector card{index}-{} card={index} head={} status={} preferred={} largest={} modes={}",
                c.name(),
                c.head,
                if c.connected() { "connected" } else { "disconnected" },
                or_none(c.preferred().as_ref().map(size_of)),
                or_none(c.largest().as_ref().map(size_of)),
                mode_list(c),
            );
        }
    }
    println!("VGPU: drm-cards {}", cards.len());
    Ok(())
}

fn select_card(choice: &CardChoice) -> io::Result<Card> {
    if let Some(n) = choice.card {
        return Card::open(n);
    }
    for (index, _) in card_paths()? {
        let card = Card::open(index)?;
        match &choice.driver {
            Some(driver) if card.driver()? != *driver => continue,
            _ => return Ok(card),
        }
    }
    Err(io::Error::other(match &choice.driver {
        Some(d) => format!("no card driven by {d}"),
        None => "no DRM card".into(),
    }))
}

/// Lights every head of the chosen card; the heads, in head order.
fn light_all(card: &Card, mode: Option<Size>) -> io::Result<Vec<Head>> {
    let connectors = card.connectors()?;
    if connectors.is_empty() {
        return Err(io::Error::other(format!(
            "card{} has no connectors",
            card.index
        )));
    }
    let crtcs = card.assign_crtcs(&connectors)?;
    let mut heads = Vec::with_capacity(connectors.len());
    for (c, crtc) in connectors.iter().zip(crtcs) {
        let mode = choose_mode(c, mode).ok_or_else(|| {
            io::Error::other(format!(
                "connector {} lists no modes: give --mode WxH",
                c.name()
            ))
        })?;
        let size = size_of(&mode);
        let (w, h) = (u32::from(size.width), u32::from(size.height));
        let head = Head::light(card, c, crtc, mode, |buf, pitch| {
            picture::fill_xrgb8888(c.head, w, h, pitch, buf)
        })
        .map_err(|e| io::Error::other(format!("lighting {} in {size}: {e}", c.name())))?;
        println!(
            "VGPU: head card={} index={} connector={} crtc={} mode={size}",
            card.index,
            head.index,
            head.name,
            u32::from(head.crtc),
        );
        heads.push(head);
    }
    Ok(heads)
}

fn draw(args: DrawArgs) -> io::Result<()> {
    let card = select_card(&args.card)?;
    let heads = light_all(&card, args.mode)?;
    println!("VGPU: drawn card={} heads={}", card.index, heads.len());
    // The heads show their buffers while this process holds them: wait to be killed.
    loop {
        std::thread::park();
    }
}

/// How long a flip may take before the tool gives up (the kernel itself waits at most 50 ms
/// for a fenced plane update; a slow TCG guest needs more than that, never this much).
const FLIP_TIMEOUT: Duration = Duration::from_secs(10);

/// The monotonic clock, which DRM stamps its events with.
fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_MONOTONIC is always there");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Waits until the card has an event to read; false after `timeout`.
fn wait_readable(card: &Card, timeout: Duration) -> io::Result<bool> {
    let mut fds = [libc::pollfd {
        fd: card.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    loop {
        // SAFETY: `fds` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout.as_millis() as libc::c_int) };
        match n {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// One head being flipped.
struct Flipping {
    head: Head,
    /// The buffer that is not the head's `front` (the inverse picture).
    back: DumbFb,
    /// Whether the last flip asked for shows `back`.
    on_back: bool,
    in_flight: bool,
    start: Duration,
    events: Vec<Duration>,
}

impl Flipping {
    fn flip(&mut self, card: &Card) -> io::Result<()> {
        let fb = if self.on_back {
            self.head.front.fb
        } else {
            self.back.fb
        };
        if self.events.is_empty() {
            self.start = monotonic_now();
        }
        card.page_flip(self.head.crtc, fb, PageFlipFlags::EVENT, None)
            .map_err(|e| io::Error::other(format!("page flip of {}: {e}", self.head.name)))?;
        self.on_back = !self.on_back;
        self.in_flight = true;
        Ok(())
    }
}

fn flip(args: FlipArgs) -> io::Result<()> {
    let card = select_card(&args.card)?;
    let heads = light_all(&card, args.mode)?;
    let mut flipping = Vec::with_capacity(heads.len());
    for head in heads {
        let (w, h) = (head.front.width, head.front.height);
        let mut back = DumbFb::new(&card, w, h)?;
        let index = head.index;
        back.draw(&card, |buf, pitch| {
            picture::fill_inverse_xrgb8888(index, w, h, pitch, buf)
        })?;
        flipping.push(Flipping {
            head,
            back,
            on_back: false,
            in_flight: false,
            start: Duration::ZERO,
            events: Vec::new(),
        });
    }
    let count = match (args.count, args.seconds) {
        (Some(n), _) => Some(n as usize),
        (None, Some(_)) => None,
        (None, None) => Some(300),
    };
    let deadline = args
        .seconds
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let more = |f: &Flipping| {
        count.is_none_or(|n| f.events.len() < n) && deadline.is_none_or(|d| Instant::now() < d)
    };
    println!(
        "VGPU: flipping card={} heads={}",
        card.index,
        flipping.len()
    );
    for f in &mut flipping {
        if more(f) {
            f.flip(&card)?;
        }
    }
    while flipping.iter().any(|f| f.in_flight) {
        if !wait_readable(&card, FLIP_TIMEOUT)? {
            let stuck: Vec<&str> = flipping
                .iter()
                .filter(|f| f.in_flight)
                .map(|f| f.head.name.as_str())
                .collect();
            return Err(io::Error::other(format!(
                "no flip event within {FLIP_TIMEOUT:?} on {}",
                stuck.join(",")
            )));
        }
        for event in card.receive_events()? {
            let Event::PageFlip(e) = event else { continue };
            let Some(f) = flipping.iter_mut().find(|f| f.head.crtc == e.crtc) else {
                continue;
            };
            // The drm crate calls the event's tv_sec/tv_usec `duration`: it is the timestamp.
            f.events.push(e.duration);
            f.in_flight = false;
            if more(f) {
                f.flip(&card)?;
            }
        }
    }
    for f in &flipping {
        let stats = FlipStats::from_timestamps(f.start, &f.events)
            .ok_or_else(|| io::Error::other(format!("no flip completed on {}", f.head.name)))?;
        println!(
            "VGPU: flips card={} head={} {stats}",
            card.index, f.head.index
        );
    }
    println!("VGPU: flipped card={} heads={}", card.index, flipping.len());
    Ok(())
}
