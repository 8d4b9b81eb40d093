use des::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};
use vgpu_model::{Frame, PixelFormat};

use super::encode::number;
use super::refdec::RefDecoder;
use super::*;

fn config(security: Security) -> SessionConfig {
    SessionConfig {
        width: 100,
        height: 70,
        name: "vgpu head 0".into(),
        security,
        screen_id: 7,
    }
}

/// Feeds `input` one byte at a time, collecting decoded messages.
fn feed_bytewise(s: &mut Session, input: &[u8]) -> Result<Vec<ClientMessage>, ProtocolError> {
    let mut seen = Vec::new();
    for b in input {
        s.feed_with(std::slice::from_ref(b), |m| seen.push(m.clone()))?;
    }
    Ok(seen)
}

fn server_init_bytes() -> Vec<u8> {
    let mut v = vec![0, 100, 0, 70];
    v.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
    v.extend_from_slice(&[0, 0, 0, 11]);
    v.extend_from_slice(b"vgpu head 0");
    v
}

/// A session past the handshake (security None, 3.8), output drained.
fn ready() -> Session {
    let mut s = Session::new(config(Security::None));
    s.feed(b"RFB 003.008\n\x01\x01").unwrap();
    assert!(s.is_ready());
    s.take_output();
    s
}

#[test]
fn handshake_none_38_byte_for_byte() {
    let mut s = Session::new(config(Security::None));
    assert_eq!(s.take_output(), b"RFB 003.008\n");
    feed_bytewise(&mut s, b"RFB 003.008\n").unwrap();
    assert_eq!(s.take_output(), [1, 1]);
    feed_bytewise(&mut s, &[1]).unwrap();
    assert_eq!(s.take_output(), [0, 0, 0, 0]);
    assert!(!s.is_ready());
    feed_bytewise(&mut s, &[1]).unwrap();
    assert_eq!(s.take_output(), server_init_bytes());
    assert!(s.is_ready());
    assert_eq!(s.version(), Version::V3_8);
}

#[test]
fn handshake_older_versions() {
    // 3.3: the server picks the type as a U32; no SecurityResult for None.
    for v in [&b"RFB 003.003\n"[..], b"RFB 003.005\n"] {
        let mut s = Session::new(config(Security::None));
        s.take_output();
        feed_bytewise(&mut s, v).unwrap();
        assert_eq!(s.take_output(), [0, 0, 0, 1]);
        feed_bytewise(&mut s, &[0]).unwrap();
        assert_eq!(s.take_output(), server_init_bytes());
        assert_eq!(s.version(), Version::V3_3);
    }
    // 3.7: the client picks; no SecurityResult for None.
    let mut s = Session::new(config(Security::None));
    s.take_output();
    feed_bytewise(&mut s, b"RFB 003.007\n\x01").unwrap();
    assert_eq!(s.take_output(), [1, 1]);
    feed_bytewise(&mut s, &[1]).unwrap();
    assert_eq!(s.take_output(), server_init_bytes());
    // A later 3.x speaks 3.8.
    let mut s = Session::new(config(Security::None));
    feed_bytewise(&mut s, b"RFB 003.889\n").unwrap();
    assert_eq!(s.version(), Version::V3_8);
}

#[test]
fn bad_versions_are_refused() {
    let mut s = Session::new(config(Security::None));
    s.take_output();
    let e = feed_bytewise(&mut s, b"RFB 004.000\n").unwrap_err();
    assert_eq!(e, ProtocolError::UnsupportedVersion { major: 4, minor: 0 });
    let out = s.take_output();
    assert_eq!(&out[..4], [0, 0, 0, 0], "security type 0, then a reason");
    assert_eq!(&out[8..], b"unsupported protocol version");
    assert_eq!(s.feed(b"x"), Err(ProtocolError::Closed));
    for bad in [&b"GET / HTTP/1"[..], b"RFB 003.00a\n", b"RFB 003.008\r"] {
        let mut s = Session::new(config(Security::None));
        assert!(matches!(s.feed(bad), Err(ProtocolError::BadVersion(_))));
    }
}

/// The VncAuth response computed here with DES directly, not through `vnc_auth_response`.
fn independent_response(password: &[u8], challenge: &[u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (i, p) in password.iter().take(8).enumerate() {
        // VNC loads each key byte least significant bit first.
        let mut r = 0u8;
        for bit in 0..8 {
            if p & (1 << bit) != 0 {
                r |= 0x80 >> bit;
            }
        }
        key[i] = r;
    }
    let c = des::Des::new_from_slice(&key).unwrap();
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        c.encrypt_block(GenericArray::from_mut_slice(block));
    }
    out
}

#[test]
fn handshake_vnc_auth_byte_for_byte() {
    let challenge: [u8; 16] = *b"0123456789abcdef";
    // Only the first 8 bytes of the password count.
    let response = independent_response(b"s3cretpw", &challenge);
    assert_eq!(
        response,
        independent_response(b"s3cretpw and more", &challenge)
    );
    let mut s = Session::new(config(Security::vnc_auth(b"s3cretpw and more", challenge)));
    assert_eq!(s.take_output(), b"RFB 003.008\n");
    feed_bytewise(&mut s, b"RFB 003.008\n").unwrap();
    assert_eq!(s.take_output(), [1, 2]);
    feed_bytewise(&mut s, &[2]).unwrap();
    assert_eq!(s.take_output(), challenge);
    feed_bytewise(&mut s, &response).unwrap();
    assert_eq!(s.take_output(), [0, 0, 0, 0]);
    feed_bytewise(&mut s, &[0]).unwrap();
    assert_eq!(s.take_output(), server_init_bytes());
    assert!(s.is_ready());

    // A wrong response: SecurityResult failed with a reason, then closed.
    let mut s = Session::new(config(Security::vnc_auth(b"s3cretpw", challenge)));
    s.take_output();
    let mut wrong = response;
    wrong[15] ^= 1;
    s.feed(b"RFB 003.008\n\x02").unwrap();
    s.take_output();
    assert_eq!(
        feed_bytewise(&mut s, &wrong),
        Err(ProtocolError::AuthFailed)
    );
    let mut expected = vec![0, 0, 0, 1, 0, 0, 0, 21];
    expected.extend_from_slice(b"authentication failed");
    assert_eq!(s.take_output(), expected);

    // 3.3 with VncAuth: type as U32, then the challenge; no reason on failure.
    let mut s = Session::new(config(Security::vnc_auth(b"pw", challenge)));
    s.take_output();
    s.feed(b"RFB 003.003\n").unwrap();
    let mut expected = vec![0, 0, 0, 2];
    expected.extend_from_slice(&challenge);
    assert_eq!(s.take_output(), expected);
    assert_eq!(s.feed(&[0; 16]), Err(ProtocolError::AuthFailed));
    assert_eq!(s.take_output(), [0, 0, 0, 1]);
}

#[test]
fn security_type_not_offered_is_refused() {
    let mut s = Session::new(config(Security::vnc_auth(b"pw", [1; 16])));
    s.take_output();
    assert_eq!(
        s.feed(b"RFB 003.008\n\x01"),
        Err(ProtocolError::BadSecurityType(1))
    );
    assert_eq!(&s.take_output()[2..6], [0, 0, 0, 1]);
}

/// Every client message once, and what it decodes to.
fn all_messages() -> (Vec<u8>, Vec<ClientMessage>) {
    let mut b = Vec::new();
    let mut m = Vec::new();
    let pf = ClientPixelFormat {
        bits_per_pixel: 16,
        depth: 16,
        big_endian: true,
        true_colour: true,
        red_max: 31,
        green_max: 63,
        blue_max: 31,
        red_shift: 11,
        green_shift: 5,
        blue_shift: 0,
    };
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(&pf.to_bytes());
    m.push(ClientMessage::SetPixelFormat(pf));
    b.extend_from_slice(&[2, 0, 0, 3, 0, 0, 0, 16, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0x11]);
    m.push(ClientMessage::SetEncodings {
        encodings: vec![16, 7, -239],
        dropped: 0,
    });
    b.extend_from_slice(&[2, 0, 0, 0]);
    m.push(ClientMessage::SetEncodings {
        encodings: vec![],
        dropped: 0,
    });
    b.extend_from_slice(&[3, 1, 0, 1, 0, 2, 0, 30, 0, 40]);
    m.push(ClientMessage::FramebufferUpdateRequest(UpdateRequest {
        incremental: true,
        rect: Rect::new(1, 2, 30, 40),
    }));
    b.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 0x0d]);
    m.push(ClientMessage::KeyEvent {
        down: true,
        key: 0xff0d,
    });
    b.extend_from_slice(&[5, 3, 1, 2, 3, 4]);
    m.push(ClientMessage::PointerEvent {
        buttons: 3,
        x: 0x102,
        y: 0x304,
    });
    b.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 5]);
    b.extend_from_slice(b"hello");
    m.push(ClientMessage::ClientCutText { len: 5 });
    b.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]);
    m.push(ClientMessage::ClientCutText { len: 0 });
    // SetDesktopSize 800x600 with one screen (16 bytes, skipped).
    b.extend_from_slice(&[251, 0, 3, 0x20, 2, 0x58, 1, 0]);
    b.extend_from_slice(&[0xab; 16]);
    m.push(ClientMessage::SetDesktopSize {
        width: 800,
        height: 600,
        screens: 1,
    });
    b.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 100, 0, 70]);
    m.push(ClientMessage::FramebufferUpdateRequest(UpdateRequest {
        incremental: false,
        rect: Rect::new(0, 0, 100, 70),
    }));
    (b, m)
}

#[test]
fn every_message_decodes_at_every_split_point() {
    let (bytes, expected) = all_messages();
    for split in 0..=bytes.len() {
        let mut s = ready();
        let mut seen = Vec::new();
        s.feed_with(&bytes[..split], |m| seen.push(m.clone()))
            .unwrap();
        s.feed_with(&bytes[split..], |m| seen.push(m.clone()))
            .unwrap();
        assert_eq!(seen, expected, "split at {split}");
    }
    let mut s = ready();
    assert_eq!(feed_bytewise(&mut s, &bytes).unwrap(), expected);
    // The session applied them: format, encodings (the last list was empty: Raw), and the
    // two requests merged into one non-incremental request.
    assert_eq!(s.pixel_format().bits_per_pixel, 16);
    assert_eq!(s.encodings().preferred, Encoding::Raw);
    assert_eq!(
        s.pending_update(),
        Some(UpdateRequest {
            incremental: false,
            rect: Rect::new(0, 0, 100, 70)
        })
    );
}

#[test]
fn malformed_messages_are_errors() {
    let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
        (vec![9], DecodeError::UnknownType(9).into()),
        (vec![1, 0, 0, 0], DecodeError::UnknownType(1).into()),
        (
            vec![6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
            DecodeError::CutTextTooLong(u32::MAX).into(),
        ),
    ];
    for (bytes, err) in cases {
        let mut s = ready();
        assert_eq!(s.feed(&bytes), Err(err));
        assert_eq!(s.feed(&[3]), Err(ProtocolError::Closed));
    }
    type Tweak = Box<dyn Fn(&mut ClientPixelFormat)>;
    let mut tweaks: Vec<Tweak> = vec![
        Box::new(|p| p.true_colour = false),
        Box::new(|p| p.bits_per_pixel = 8),
        Box::new(|p| p.bits_per_pixel = 24),
        Box::new(|p| p.red_max = 0),
        Box::new(|p| p.green_max = 100),
        Box::new(|p| p.blue_shift = 30),
        Box::new(|p| p.red_shift = 8),
        Box::new(|p| p.depth = 33),
        Box::new(|p| p.depth = 0),
    ];
    for t in tweaks.drain(..) {
        let mut bad_pf = ClientPixelFormat::SERVER;
        t(&mut bad_pf);
        let mut msg = vec![0, 0, 0, 0];
        msg.extend_from_slice(&bad_pf.to_bytes());
        let mut s = ready();
        assert!(
            matches!(
                s.feed(&msg),
                Err(ProtocolError::Decode(DecodeError::PixelFormat(_)))
            ),
            "{bad_pf:?}"
        );
    }
}

#[test]
fn set_encodings_is_bounded() {
    // The count is a U16 on the wire: a million entries take 16 messages of 65535 and one
    // more; none keeps more than MAX_ENCODINGS, and the bytes stream through in small pieces.
    let mut s = ready();
    let mut total = 0u32;
    let mut messages = 0;
    while total < 1_000_000 {
        let n = (1_000_000 - total).min(0xffff) as u16;
        let mut msg = vec![2, 0];
        msg.extend_from_slice(&n.to_be_bytes());
        for i in 0..u32::from(n) {
            msg.extend_from_slice(&(i as i32 - 500).to_be_bytes());
        }
        for piece in msg.chunks(4093) {
            s.feed_with(piece, |m| {
                let ClientMessage::SetEncodings { encodings, dropped } = m else {
                    panic!("{m:?}");
                };
                assert_eq!(encodings.len(), MAX_ENCODINGS);
                assert_eq!(encodings.len() as u32 + dropped, u32::from(n));
                messages += 1;
            })
            .unwrap();
        }
        total += u32::from(n);
    }
    assert_eq!(messages, 16);
    // The next message still decodes.
    s.feed(&[3, 0, 0, 0, 0, 0, 0, 1, 0, 1]).unwrap();
    assert!(s.pending_update().is_some());
}

#[test]
fn cut_text_is_skipped_and_bounded() {
    let mut s = ready();
    let mut msg = vec![6, 0, 0, 0];
    msg.extend_from_slice(&MAX_CUT_TEXT.to_be_bytes());
    let mut seen = Vec::new();
    s.feed_with(&msg, |m| seen.push(m.clone())).unwrap();
    let chunk = vec![b'x'; 65536];
    for _ in 0..MAX_CUT_TEXT / 65536 {
        s.feed(&chunk).unwrap();
    }
    s.feed_with(&[5, 0, 0, 1, 0, 2], |m| seen.push(m.clone()))
        .unwrap();
    assert_eq!(
        seen,
        [
            ClientMessage::ClientCutText { len: MAX_CUT_TEXT },
            ClientMessage::PointerEvent {
                buttons: 0,
                x: 1,
                y: 2
            }
        ]
    );
    // 4 GiB announced: refused at the header, nothing read or allocated.
    let mut s = ready();
    assert_eq!(
        s.feed(&[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
        Err(ProtocolError::Decode(DecodeError::CutTextTooLong(u32::MAX)))
    );
    let mut s = ready();
    assert!(s.feed(&[6, 0, 0, 0, 0, 0x10, 0, 1]).is_err());
}

fn pf(bpp: u8, depth: u8, be: bool, max: [u16; 3], shift: [u8; 3]) -> ClientPixelFormat {
    ClientPixelFormat {
        bits_per_pixel: bpp,
        depth,
        big_endian: be,
        true_colour: true,
        red_max: max[0],
        green_max: max[1],
        blue_max: max[2],
        red_shift: shift[0],
        green_shift: shift[1],
        blue_shift: shift[2],
    }
}

/// Client formats the round trips use: the common ones of real viewers and some odd ones.
fn client_formats() -> Vec<ClientPixelFormat> {
    vec![
        ClientPixelFormat::SERVER,
        pf(32, 24, true, [255; 3], [16, 8, 0]),
        pf(32, 24, false, [255; 3], [0, 8, 16]),
        pf(32, 24, true, [255; 3], [24, 16, 8]),
        pf(32, 32, false, [255; 3], [24, 16, 8]),
        pf(32, 30, false, [1023; 3], [20, 10, 0]),
        pf(16, 16, false, [31, 63, 31], [11, 5, 0]),
        pf(16, 16, true, [31, 63, 31], [11, 5, 0]),
        pf(16, 15, false, [31, 31, 31], [10, 5, 0]),
        pf(16, 12, true, [15, 15, 15], [0, 4, 8]),
    ]
}

#[test]
fn pixels_convert_to_client_formats() {
    // One pixel, red=0xff green=0x80 blue=0x01, in XRGB8888.
    let frame = Frame {
        width: 1,
        height: 1,
        format: PixelFormat::Xrgb8888,
        data: vec![0x01, 0x80, 0xff, 0],
    };
    let raw = |pf: &ClientPixelFormat| {
        let mut out = Vec::new();
        let mut w = UpdateWriter::begin(&mut out, false);
        w.rect(
            &mut Encoder::default(),
            &frame,
            Rect::new(0, 0, 1, 1),
            Encoding::Raw,
            pf,
        );
        w.finish();
        out[16..].to_vec()
    };
    let f = client_formats();
    assert_eq!(raw(&f[0]), [0x01, 0x80, 0xff, 0x00]);
    assert_eq!(raw(&f[1]), [0x00, 0xff, 0x80, 0x01]);
    assert_eq!(raw(&f[2]), [0xff, 0x80, 0x01, 0x00]);
    assert_eq!(raw(&f[3]), [0xff, 0x80, 0x01, 0x00]);
    assert_eq!(raw(&f[4]), [0x00, 0x01, 0x80, 0xff]);
    // 10 bits: 0xff -> 1023, 0x80 -> 514, 0x01 -> 4.
    assert_eq!(
        raw(&f[5]),
        ((1023u32 << 20) | (514 << 10) | 4).to_le_bytes()
    );
    // 565: r 31, g 32, b 0.
    let v565 = (31u16 << 11) | (32 << 5);
    assert_eq!(raw(&f[6]), v565.to_le_bytes());
    assert_eq!(raw(&f[7]), v565.to_be_bytes());
    // 555: r 31, g 16, b 0.
    assert_eq!(raw(&f[8]), ((31u16 << 10) | (16 << 5)).to_le_bytes());
    // 444 BGR: r 15 at 0, g 8 at 4, b 0 at 8.
    assert_eq!(raw(&f[9]), (15u16 | (8 << 4)).to_be_bytes());
}

/// Frame pixels chosen to hit every path: a solid block, a two-colour block, a few-colour
/// block and noise, in `format`.
fn test_frame(width: u32, height: u32, format: PixelFormat, seed: u32) -> Frame {
    let mut data = Vec::new();
    for y in 0..height {
        for x in 0..width {
            let (r, g, b) = if x < 70 && y < 70 {
                (10, 200, 30)
            } else if x < 140 {
                if (x / 3 + y) % 2 == 0 {
                    (255, 255, 255)
                } else {
                    (0, 0, 0)
                }
            } else if (100..120).contains(&y) {
                // Many colours in runs of four: plain RLE.
                ((x / 4) as u8, (y * 9) as u8, (x / 4 + y) as u8)
            } else if y < 100 {
                let k = ((x / 5 + y / 7) % 9) as u8;
                (k * 28, 255 - k * 20, k)
            } else {
                let n = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ seed)
                    .wrapping_mul(2_246_822_519);
                ((n >> 8) as u8, (n >> 16) as u8, (n >> 24) as u8)
            };
            let px: Vec<u8> = match format {
                PixelFormat::Xrgb8888 | PixelFormat::Argb8888 => vec![b, g, r, 0x5a],
                PixelFormat::Xrgb8888BigEndian | PixelFormat::Bgrx8888 | PixelFormat::Bgra8888 => {
                    vec![0x5a, r, g, b]
                }
                PixelFormat::Abgr8888 | PixelFormat::Xbgr8888 => vec![r, g, b, 0x5a],
                PixelFormat::Rgba8888 | PixelFormat::Rgbx8888 => vec![0x5a, b, g, r],
                PixelFormat::Rgb565 => {
                    let v =
                        (u16::from(r >> 3) << 11) | (u16::from(g >> 2) << 5) | u16::from(b >> 3);
                    v.to_le_bytes().to_vec()
                }
            };
            data.extend_from_slice(&px);
        }
    }
    Frame {
        width,
        height,
        format,
        data,
    }
}

/// The viewer's pixel values for `frame`, computed from its RGB8 form by rounding each channel
/// to the viewer's range.
fn expected_pixels(frame: &Frame, pf: &ClientPixelFormat) -> Vec<u32> {
    let scale = |c: u8, max: u16| (u32::from(c) * u32::from(max) * 2 + 255) / 510;
    frame
        .to_rgb8()
        .chunks_exact(3)
        .map(|p| {
            (scale(p[0], pf.red_max) << pf.red_shift)
                | (scale(p[1], pf.green_max) << pf.green_shift)
                | (scale(p[2], pf.blue_max) << pf.blue_shift)
        })
        .collect()
}

fn set_pixel_format(s: &mut Session, pf: &ClientPixelFormat) {
    let mut m = vec![0, 0, 0, 0];
    m.extend_from_slice(&pf.to_bytes());
    s.feed(&m).unwrap();
}

fn set_encodings(s: &mut Session, list: &[i32]) {
    let mut m = vec![2, 0];
    m.extend_from_slice(&(list.len() as u16).to_be_bytes());
    for e in list {
        m.extend_from_slice(&e.to_be_bytes());
    }
    s.feed(&m).unwrap();
}

fn request(s: &mut Session, incremental: bool, w: u16, h: u16) {
    let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
    m.extend_from_slice(&w.to_be_bytes());
    m.extend_from_slice(&h.to_be_bytes());
    s.feed(&m).unwrap();
}

#[test]
fn every_encoding_round_trips_through_an_independent_decoder() {
    let sources = [
        PixelFormat::Xrgb8888,
        PixelFormat::Rgb565,
        PixelFormat::Xrgb8888BigEndian,
        PixelFormat::Rgba8888,
    ];
    let encodings = [number::RAW, number::ZRLE, number::TIGHT];
    for (fi, pf) in client_formats().iter().enumerate() {
        for (ei, &enc) in encodings.iter().enumerate() {
            {
                let last_rect = (fi + ei) % 2 == 0;
                let source = sources[(fi + ei) % sources.len()];
                let mut s = ready();
                set_pixel_format(&mut s, pf);
                let mut list = vec![enc, number::DESKTOP_SIZE];
                if last_rect {
                    list.push(number::LAST_RECT);
                }
                set_encodings(&mut s, &list);
                let mut dec = RefDecoder::new(*pf, 100, 70);
                let what = format!("{pf:?} encoding {enc} from {}", source.as_str());

                // A full update at a new size: DesktopSize, then the whole frame.
                let frame = test_frame(2100, 150, source, 1);
                request(&mut s, false, 100, 70);
                assert!(s.send_update(&Update {
                    frame: &frame,
                    dirty: &[],
                    cursor: None
                }));
                let out = s.take_output();
                assert_eq!(dec.update(&out), out.len(), "{what}");
                assert_eq!(dec.seen[0], number::DESKTOP_SIZE, "{what}");
                assert_eq!((dec.width, dec.height), (2100, 150));
                assert!(dec.fb == expected_pixels(&frame, pf), "{what}: full update");

                // Nothing changed: an incremental request stays pending.
                request(&mut s, true, 2100, 150);
                assert!(!s.send_update(&Update {
                    frame: &frame,
                    dirty: &[],
                    cursor: None
                }));
                assert!(s.pending_update().is_some());

                // An incremental update of two areas of a changed frame.
                let frame2 = test_frame(2100, 150, source, 2);
                let dirty = [Rect::new(130, 95, 2000, 55), Rect::new(0, 0, 3, 1)];
                assert!(s.send_update(&Update {
                    frame: &frame2,
                    dirty: &dirty,
                    cursor: None
                }));
                let out = s.take_output();
                assert_eq!(dec.update(&out), out.len(), "{what}");
                assert!(
                    dec.fb == expected_pixels(&frame2, pf),
                    "{what}: incremental"
                );
                if last_rect {
                    assert_eq!(dec.seen.last(), Some(&number::LAST_RECT));
                }
                if enc == number::ZRLE {
                    let subs = &dec.zrle_subencodings;
                    assert!(subs.contains(&0) && subs.contains(&1), "{what}: {subs:?}");
                    assert!(subs.contains(&128), "{what}: {subs:?}");
                    assert!(
                        subs.iter().any(|s| (2..=16).contains(s)),
                        "{what}: {subs:?}"
                    );
                    assert!(subs.iter().any(|s| *s >= 130), "{what}: {subs:?}");
                }
            }
        }
    }
}

#[test]
fn zlib_streams_persist_across_updates() {
    // Several updates through one decoder: each encoder stream must continue, not restart.
    for enc in [number::ZRLE, number::TIGHT] {
        let mut s = ready();
        set_encodings(&mut s, &[enc]);
        let mut dec = RefDecoder::new(ClientPixelFormat::SERVER, 100, 70);
        for seed in 0..4 {
            let frame = test_frame(100, 70, PixelFormat::Xrgb8888, seed);
            request(&mut s, false, 100, 70);
            assert!(s.send_update(&Update {
                frame: &frame,
                dirty: &[],
                cursor: None
            }));
            let out = s.take_output();
            dec.update(&out);
            assert!(dec.fb == expected_pixels(&frame, &ClientPixelFormat::SERVER));
        }
    }
}

#[test]
fn extended_desktop_size_and_cursor() {
    let mut s = ready();
    let pf16 = client_formats()[7];
    set_pixel_format(&mut s, &pf16);
    set_encodings(
        &mut s,
        &[number::TIGHT, number::EXTENDED_DESKTOP_SIZE, number::CURSOR],
    );
    let mut dec = RefDecoder::new(pf16, 100, 70);
    let frame = test_frame(100, 70, PixelFormat::Xrgb8888, 0);
    // The cursor: 10x3, opaque where alpha >= 0x80.
    let argb: Vec<u32> = (0..30u32)
        .map(|i| ((i * 9) << 24) | 0x00ff_0000 | (i * 8))
        .collect();
    let cursor = Cursor {
        width: 10,
        height: 3,
        hot_x: 2,
        hot_y: 1,
        argb: argb.clone(),
    };
    // The first request after the viewer announced ExtendedDesktopSize gets the screen
    // layout even at an unchanged size.
    request(&mut s, true, 100, 70);
    assert!(s.send_update(&Update {
        frame: &frame,
        dirty: &[],
        cursor: Some(&cursor)
    }));
    let out = s.take_output();
    dec.update(&out);
    assert_eq!(dec.seen, [number::EXTENDED_DESKTOP_SIZE, number::CURSOR]);
    assert_eq!(dec.screens, [(7, 0, 0, 100, 70)]);
    let (hx, hy, w, h, px, mask) = dec.cursor.clone().unwrap();
    assert_eq!((hx, hy, w, h), (2, 1, 10, 3));
    let scale = |c: u32, max: u32| (c * max * 2 + 255) / 510;
    for (i, &p) in argb.iter().enumerate() {
        let want = (scale((p >> 16) & 0xff, 31) << 11)
            | (scale((p >> 8) & 0xff, 63) << 5)
            | scale(p & 0xff, 31);
        assert_eq!(px[i], want, "cursor pixel {i}");
        let opaque = mask[(i / 10) * 2 + (i % 10) / 8] & (0x80 >> (i % 10 % 8)) != 0;
        assert_eq!(opaque, p >> 24 >= 0x80, "cursor mask {i}");
    }
    // A mode change: ExtendedDesktopSize with the new size, then the whole frame.
    let big = test_frame(300, 120, PixelFormat::Rgb565, 3);
    request(&mut s, true, 100, 70);
    assert!(s.send_update(&Update {
        frame: &big,
        dirty: &[Rect::new(1, 1, 1, 1)],
        cursor: None
    }));
    dec.seen.clear();
    dec.update(&s.take_output());
    assert_eq!(dec.seen[0], number::EXTENDED_DESKTOP_SIZE);
    assert_eq!(dec.screens, [(7, 0, 0, 300, 120)]);
    assert!(dec.fb == expected_pixels(&big, &pf16));
}

#[test]
fn a_viewer_asking_for_another_size_is_told_it_is_prohibited_and_stays() {
    let mut s = ready();
    set_encodings(&mut s, &[number::RAW, number::EXTENDED_DESKTOP_SIZE]);
    let frame = test_frame(100, 70, PixelFormat::Xrgb8888, 0);
    request(&mut s, false, 100, 70);
    assert!(s.send_update(&Update {
        frame: &frame,
        dirty: &[],
        cursor: None
    }));
    s.take_output();
    // noVNC's "remote resizing": SetDesktopSize 640x480, one screen.
    let mut m = vec![251, 0, 2, 0x80, 1, 0xe0, 1, 0];
    m.extend_from_slice(&[0; 16]);
    s.feed(&m).expect("SetDesktopSize is not an error");
    request(&mut s, true, 100, 70);
    // Nothing changed, yet the refusal is owed: an update with only that rectangle.
    assert!(s.send_update(&Update {
        frame: &frame,
        dirty: &[],
        cursor: None
    }));
    let out = s.take_output();
    assert_eq!(&out[..4], &[0, 0, 0, 1], "one rectangle");
    // x = 1 (this client), y = 1 (prohibited), the unchanged size, ExtendedDesktopSize.
    assert_eq!(&out[4..12], &[0, 1, 0, 1, 0, 100, 0, 70]);
    assert_eq!(
        i32::from_be_bytes(out[12..16].try_into().unwrap()),
        number::EXTENDED_DESKTOP_SIZE
    );
    // Answered once.
    request(&mut s, true, 100, 70);
    assert!(!s.send_update(&Update {
        frame: &frame,
        dirty: &[],
        cursor: None
    }));
}

#[test]
fn a_viewer_without_resize_support_gets_what_fits() {
    let mut s = ready();
    let mut dec = RefDecoder::new(ClientPixelFormat::SERVER, 100, 70);
    let frame = test_frame(150, 50, PixelFormat::Xrgb8888, 0);
    request(&mut s, false, 100, 70);
    assert!(s.send_update(&Update {
        frame: &frame,
        dirty: &[],
        cursor: None
    }));
    dec.update(&s.take_output());
    let want = expected_pixels(&frame, &ClientPixelFormat::SERVER);
    for y in 0..50 {
        assert_eq!(dec.fb[y * 100..y * 100 + 100], want[y * 150..y * 150 + 100]);
    }
}

#[test]
fn short_frames_do_not_panic() {
    let mut s = ready();
    set_encodings(&mut s, &[number::ZRLE]);
    let frame = Frame {
        width: 100,
        height: 70,
        format: PixelFormat::Xrgb8888,
        data: vec![1; 13],
    };
    request(&mut s, false, 100, 70);
    assert!(s.send_update(&Update {
        frame: &frame,
        dirty: &[],
        cursor: None
    }));
    let mut dec = RefDecoder::new(ClientPixelFormat::SERVER, 100, 70);
    let out = s.take_output();
    assert_eq!(dec.update(&out), out.len());
}

#[test]
fn vnc_auth_response_matches_des_directly() {
    let challenge = [0x5au8; 16];
    let key = *b"abc\0\0\0\0\0";
    assert_eq!(
        vnc_auth_response(&key, &challenge),
        independent_response(b"abc", &challenge)
    );
}

#[test]
fn fuzz_entry_point_survives_a_session() {
    let (msgs, _) = all_messages();
    let mut data = vec![0x30];
    data.extend_from_slice(b"RFB 003.008\n\x01\x01");
    data.extend_from_slice(&[
        2, 0, 0, 4, 0, 0, 0, 16, 0xff, 0xff, 0xff, 0x11, 0xff, 0xff, 0xfe, 0xcc, 0xff, 0xff, 0xff,
        0x20,
    ]);
    data.extend_from_slice(&msgs);
    fuzz_session(&data);
}

/// Pairs computed by a third DES implementation (OpenSSL's des-ecb, key bytes bit-reversed by
/// hand). The first is the one the fuzz entry point expects.
#[test]
fn vnc_auth_known_pairs() {
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    assert_eq!(
        vnc_auth_response(b"secret\0\0", &[7; 16]).to_vec(),
        hex("02b048d0348e647602b048d0348e6476")
    );
    assert_eq!(
        vnc_auth_response(b"s3cretpw", b"0123456789abcdef").to_vec(),
        hex("0ceb4047296a28740312627a53866661")
    );
    assert_eq!(
        independent_response(b"s3cretpw", b"0123456789abcdef").to_vec(),
        hex("0ceb4047296a28740312627a53866661")
    );
}

/// `(r, g, b)` as one pixel of `format`, the padding or alpha byte 0x5a.
fn source_pixel(format: PixelFormat, (r, g, b): (u8, u8, u8)) -> Vec<u8> {
    match format {
        PixelFormat::Xrgb8888 | PixelFormat::Argb8888 => vec![b, g, r, 0x5a],
        PixelFormat::Xrgb8888BigEndian | PixelFormat::Bgrx8888 | PixelFormat::Bgra8888 => {
            vec![0x5a, r, g, b]
        }
        PixelFormat::Abgr8888 | PixelFormat::Xbgr8888 => vec![r, g, b, 0x5a],
        PixelFormat::Rgba8888 | PixelFormat::Rgbx8888 => vec![0x5a, b, g, r],
        PixelFormat::Rgb565 => {
            let v = (u16::from(r >> 3) << 11) | (u16::from(g >> 2) << 5) | u16::from(b >> 3);
            v.to_le_bytes().to_vec()
        }
    }
}

fn frame_of(w: u32, h: u32, format: PixelFormat, f: impl Fn(u32, u32) -> (u8, u8, u8)) -> Frame {
    let mut data = Vec::new();
    for y in 0..h {
        for x in 0..w {
            data.extend_from_slice(&source_pixel(format, f(x, y)));
        }
    }
    Frame {
        width: w,
        height: h,
        format,
        data,
    }
}

/// Frames for the byte-for-byte comparison: the round-trip frame; a console (runs of a dark
/// background, glyph-like dots in five colours, a status bar); tiles of exactly 1 to 130
/// colours in runs of varying length (the palette limits: 2, 4, 16 and 127 of ZRLE, 16 of
/// Tight); noise; and a frame whose data stops short.
fn comparison_frames(format: PixelFormat) -> Vec<Frame> {
    let hash = |x: u32, y: u32, s: u32| {
        let mut h = x.wrapping_mul(0x9e37_79b1) ^ y.wrapping_mul(0x85eb_ca77) ^ s;
        h ^= h >> 15;
        h = h.wrapping_mul(0x2c1b_3c6d);
        h ^ (h >> 13)
    };
    let colours = [
        (16, 18, 24),
        (204, 204, 204),
        (78, 201, 112),
        (229, 192, 80),
        (224, 88, 80),
        (86, 182, 194),
    ];
    let console = frame_of(333, 97, format, |x, y| {
        if y >= 85 {
            if hash(x / 2, y, 9) % 3 == 0 {
                (240, 240, 240)
            } else {
                (32, 74, 135)
            }
        } else if (x / 8) % 31 < 22 && y % 16 > 2 && y % 16 < 14 && hash(x, y, 1) % 4 == 0 {
            colours[1 + (hash(x / 40, y / 16, 2) % 5) as usize]
        } else {
            colours[0]
        }
    });
    let counts = [1u32, 2, 3, 4, 5, 16, 17, 126, 127, 128, 130];
    let limits = frame_of(64 * counts.len() as u32 + 5, 131, format, |x, y| {
        let k = counts[((x / 64) as usize).min(counts.len() - 1)];
        let run = 1 + (y % 7) * 40;
        let i = (x % 64 + (y % 64) * 64) / run % k;
        ((i * 37) as u8, (i * 11 + y / 64) as u8, (255 - i) as u8)
    });
    let noise = frame_of(129, 67, format, |x, y| {
        let n = hash(x, y, 3);
        (n as u8, (n >> 8) as u8, (n >> 16) as u8)
    });
    let mut short = test_frame(150, 90, format, 5);
    short.data.truncate(short.data.len() / 2 + 7);
    vec![
        test_frame(2100, 150, format, 1),
        console,
        limits,
        noise,
        short,
    ]
}

/// Every source format, every client format, every encoding: the optimised encoders write the
/// same bytes as the plain ones of `oracle` for whole frames, odd rectangles away from the
/// origin, rectangles reaching past the frame and single pixels, with zlib streams carried
/// across rectangles.
#[test]
fn encoders_match_the_plain_encoders_byte_for_byte() {
    use super::oracle::Oracle;
    let sources = [
        PixelFormat::Xrgb8888,
        PixelFormat::Xrgb8888BigEndian,
        PixelFormat::Rgb565,
        PixelFormat::Argb8888,
        PixelFormat::Bgra8888,
        PixelFormat::Bgrx8888,
        PixelFormat::Abgr8888,
        PixelFormat::Xbgr8888,
        PixelFormat::Rgba8888,
        PixelFormat::Rgbx8888,
    ];
    let mut formats = client_formats();
    // 8-8-8 at other shifts, and 24-bit colour in the high bytes (ZRLE's other 3-byte CPIXEL).
    formats.push(pf(32, 24, false, [255; 3], [8, 16, 24]));
    formats.push(pf(32, 24, true, [255; 3], [0, 16, 8]));
    formats.push(pf(32, 16, false, [31, 63, 31], [27, 21, 16]));
    for (si, &source) in sources.iter().enumerate() {
        let frames = comparison_frames(source);
        for (fi, pf) in formats.iter().enumerate() {
            // All pairs for the common sources, two formats each for the rest.
            if si > 2 && fi != 0 && fi != si * 3 % formats.len() {
                continue;
            }
            for encoding in [Encoding::Raw, Encoding::Zrle, Encoding::Tight] {
                let mut enc = Encoder::default();
                let mut oracle = Oracle::default();
                for (ni, frame) in frames.iter().enumerate() {
                    // The wide frame (Tight's split at 2048 columns) is slow in a debug build.
                    if ni == 0 && (si + fi) % 5 != 0 {
                        continue;
                    }
                    let (w, h) = (frame.width as u16, frame.height as u16);
                    let rects = [
                        Rect::new(0, 0, w, h),
                        Rect::new(1, 1, w - 2, h - 2),
                        Rect::new(63, 5, 131, h - 7),
                        Rect::new(130, 95, 2000, 55),
                        Rect::new(w - 3, h - 2, 100, 100),
                        Rect::new(7, 3, 1, 1),
                        Rect::new(64, 64, 64, 64),
                    ];
                    for r in rects {
                        let what = format!(
                            "{} frame {ni} to {pf:?} in {encoding:?}, {r:?}",
                            source.as_str()
                        );
                        let mut want = Vec::new();
                        let n = oracle.rect(&mut want, frame, r, encoding, pf);
                        let mut got = Vec::new();
                        let mut wr = UpdateWriter::begin(&mut got, false);
                        wr.rect(&mut enc, frame, r, encoding, pf);
                        wr.finish();
                        assert_eq!(u16::from_be_bytes([got[2], got[3]]), n as u16, "{what}");
                        assert!(got[4..] == want[..], "{what}: bytes differ");
                    }
                }
            }
        }
    }
}
