//! Lighting heads: a dumb XRGB8888 buffer with a framebuffer on it, and a head (connector,
//! CRTC, mode) showing one. A head keeps its buffers for as long as it lives: the kernel turns
//! a CRTC off when the framebuffer it scans out is removed, which happens when the process that
//! added it closes the card. Page flips add a second buffer per head and flip between them.

use std::io;

use drm::buffer::{Buffer, DrmFourcc};
use drm::control::dumbbuffer::DumbBuffer;
use drm::control::{connector, crtc, framebuffer, Device as ControlDevice, Mode};

use crate::card::{Card, Connector};

/// A dumb buffer in XRGB8888 and the framebuffer object on it.
#[derive(Debug)]
pub struct DumbFb {
    buffer: DumbBuffer,
    pub fb: framebuffer::Handle,
    pub width: u32,
    pub height: u32,
}

impl DumbFb {
    pub fn new(card: &Card, width: u32, height: u32) -> io::Result<DumbFb> {
        let buffer = card.create_dumb_buffer((width, height), DrmFourcc::Xrgb8888, 32)?;
        let fb = match card.add_framebuffer(&buffer, 24, 32) {
            Ok(fb) => fb,
            Err(e) => {
                let _ = card.destroy_dumb_buffer(buffer);
                return Err(e);
            }
        };
        Ok(DumbFb {
            buffer,
            fb,
            width,
            height,
        })
    }

    /// Maps the buffer and hands `draw` its bytes and pitch; unmapped again afterwards.
    pub fn draw(&mut self, card: &Card, draw: impl FnOnce(&mut [u8], usize)) -> io::Result<()> {
        let pitch = self.buffer.pitch() as usize;
        let mut map = card.map_dumb_buffer(&mut self.buffer)?;
        draw(map.as_mut(), pitch);
        Ok(())
    }

    /// Removes the framebuffer and frees the buffer.
    pub fn destroy(self, card: &Card) -> io::Result<()> {
        card.destroy_framebuffer(self.fb)?;
        card.destroy_dumb_buffer(self.buffer)
    }
}

/// One head: a connector driven by a CRTC in a mode, and the buffer it shows.
#[derive(Debug)]
pub struct Head {
    /// The head index (the connector's position on its card).
    pub index: u32,
    pub name: String,
    pub connector: connector::Handle,
    pub crtc: crtc::Handle,
    pub mode: Mode,
    pub front: DumbFb,
}

impl Head {
    /// Allocates a buffer of the mode's size, lets `draw` fill it, and shows it on `crtc`.
    pub fn light(
        card: &Card,
        connector: &Connector,
        crtc: crtc::Handle,
        mode: Mode,
        draw: impl FnOnce(&mut [u8], usize),
    ) -> io::Result<Head> {
        let (w, h) = mode.size();
        let mut front = DumbFb::new(card, w.into(), h.into())?;
        front.draw(card, draw)?;
        let lit = card.set_crtc(
            crtc,
            Some(front.fb),
            (0, 0),
            &[connector.info.handle()],
            Some(mode),
        );
        if let Err(e) = lit {
            let _ = front.destroy(card);
            return Err(e);
        }
        // Drivers that upload shadow buffers on damage (virtio-gpu) get the whole buffer.
        let _ = card.dirty_framebuffer(front.fb, &[]);
        Ok(Head {
            index: connector.head,
            name: connector.name(),
            connector: connector.info.handle(),
            crtc,
            mode,
            front,
        })
    }
}
