//! An RFB 3.8 (RFC 6143) server for viewing a head: the protocol as a pure state machine
//! ([`proto`]) and the FramebufferUpdate encoders ([`encode`]). No sockets here: a server loop
//! owns the transport and drives a [`Session`] per viewer:
//!
//! 1. `Session::new(config)`; write [`Session::output`] to the socket as it drains
//!    ([`Session::consume_output`]).
//! 2. Hand every byte read to [`Session::feed`]; on `Err`, write what output remains (a
//!    failure reason) and close.
//! 3. While [`Session::pending_update`] is `Some` and the output is drained, sample the head
//!    (at most at its FRL) and call [`Session::send_update`] with the frame, this viewer's dirty
//!    rectangles and a changed cursor; keep the dirty state when it returns false.

pub mod encode;
pub mod proto;

#[cfg(test)]
mod oracle;
#[cfg(test)]
mod refdec;
#[cfg(test)]
mod tests;

pub use encode::{Converter, Cursor, Encoder, Encoding, EncodingSet, Rect, UpdateWriter};
pub use proto::{
    vnc_auth_response, ClientMessage, ClientPixelFormat, DecodeError, MessageDecoder,
    ProtocolError, Security, Session, SessionConfig, Update, UpdateRequest, Version, MAX_CUT_TEXT,
    MAX_ENCODINGS, SERVER_VERSION,
};

/// Fuzz entry point (the `rfb` target and the corpus replay test): the first byte picks the
/// security type and how the rest is split into `feed` calls; every pending update request is
/// answered with a frame in a format and size taken from the input.
pub fn fuzz_session(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let security = if ctl & 1 == 0 {
        Security::None
    } else {
        Security::vnc_auth(b"secret", [7; 16])
    };
    let mut s = Session::new(SessionConfig {
        width: 70,
        height: 40,
        name: "fuzz".into(),
        security,
        screen_id: 0,
    });
    let formats = [
        vgpu_model::PixelFormat::Xrgb8888,
        vgpu_model::PixelFormat::Rgb565,
        vgpu_model::PixelFormat::Xrgb8888BigEndian,
        vgpu_model::PixelFormat::Abgr8888,
    ];
    let chunk = usize::from(ctl >> 4) + 1;
    let mut frame_no = 0u32;
    for piece in rest.chunks(chunk) {
        if s.feed(piece).is_err() {
            return;
        }
        s.take_output();
        if s.pending_update().is_some() {
            frame_no += 1;
            // Sizes change now and then, so resizes are exercised.
            let (w, h) = if frame_no.is_multiple_of(3) {
                (70u32, 40u32)
            } else {
                (67, 130)
            };
            let format = formats[(frame_no as usize + usize::from(ctl >> 1)) % formats.len()];
            let bpp = format.bytes_per_pixel() as usize;
            let data: Vec<u8> = (0..w as usize * h as usize * bpp)
                .map(|i| {
                    let p = i / bpp;
                    // Areas of few colours and of many, for every subencoding.
                    if p % (w as usize) < 40 {
                        (p / 97) as u8 & 0x3
                    } else {
                        (i * 7 + p) as u8
                    }
                })
                .collect();
            let frame = vgpu_model::Frame {
                width: w,
                height: h,
                format,
                data,
            };
            let cursor = Cursor {
                width: 5,
                height: 3,
                hot_x: 1,
                hot_y: 1,
                argb: (0..15u32).map(|i| i.wrapping_mul(0x1234_5678)).collect(),
            };
            let dirty = [Rect::new(3, 5, 66, 20), Rect::new(60, 100, 200, 200)];
            s.send_update(&Update {
                frame: &frame,
                dirty: &dirty,
                cursor: (frame_no % 2 == 1).then_some(&cursor),
            });
            s.take_output();
        }
    }
}
