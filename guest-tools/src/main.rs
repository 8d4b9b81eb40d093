//! vgpu-guest: the guest tests' tool inside the guest (a static binary at /bin/vgpu-guest of
//! the test initramfs). It speaks the guest tests' line protocol on stdout: every line is
//! `VGPU: <key> <values>`; a failure is `VGPU: error <what>` and exit status 1.

use std::io;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use vgpu_guest::card::{card_paths, choose_mode, size_of, Card, Connector, Size};
use vgpu_guest::picture;
use vgpu_guest::scanout::Head;

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
