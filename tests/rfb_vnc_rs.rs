//! Our RFB session against an independent client implementation (the `vnc` crate, an RFB
//! client engine): it connects over an in-memory stream, negotiates an encoding, and the image
//! it reconstructs must equal the frame, pixel for pixel.

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use vgpu_emu::display::rfb::{Encoding, Security, Session, SessionConfig, Update};
use vgpu_model::{Frame, PixelFormat};

fn frame(width: u32, height: u32) -> Frame {
    let mut data = Vec::new();
    for y in 0..height {
        for x in 0..width {
            let (r, g, b) = if x < 64 {
                (20u8, 40u8, 60u8)
            } else if x < 128 {
                if (x + y) % 3 == 0 {
                    (255, 255, 255)
                } else {
                    (0, 0, 128)
                }
            } else {
                let n = x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503);
                (n as u8, (n >> 8) as u8, (n >> 16) as u8)
            };
            data.extend_from_slice(&[b, g, r, 0]);
        }
    }
    Frame {
        width,
        height,
        format: PixelFormat::Xrgb8888,
        data,
    }
}

/// The server side: feed what the client sends, answer every update request with the frame.
async fn serve(mut io: DuplexStream, frame: Frame, want: Encoding) {
    let mut s = Session::new(SessionConfig {
        width: frame.width as u16,
        height: frame.height as u16,
        name: "head 0".into(),
        security: Security::None,
        screen_id: 0,
    });
    let mut buf = vec![0u8; 4096];
    loop {
        let out = s.take_output();
        if !out.is_empty() && io.write_all(&out).await.is_err() {
            return;
        }
        if s.pending_update().is_some() {
            assert_eq!(s.encodings().preferred, want, "the encoding in use");
        }
        if s.pending_update().is_some()
            && s.send_update(&Update {
                frame: &frame,
                dirty: &[],
                cursor: None,
            })
        {
            continue;
        }
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.feed(&buf[..n]).is_err() {
                    let _ = io.write_all(&s.take_output()).await;
                    return;
                }
            }
        }
    }
}

async fn view(encoding: vnc::VncEncoding, want: Encoding) {
    let (w, h) = (300u32, 90u32);
    let f = frame(w, h);
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve(server_io, f.clone(), want));
    let vnc = vnc::VncConnector::new(client_io)
        .set_auth_method(async move { Ok(String::new()) })
        .add_encoding(encoding)
        .add_encoding(vnc::VncEncoding::Raw)
        .allow_shared(true)
        .set_pixel_format(vnc::PixelFormat::bgra())
        .build()
        .unwrap()
        .try_start()
        .await
        .unwrap()
        .finish()
        .unwrap();
    let mut fb = vec![0u8; (w * h * 4) as usize];
    let mut covered = vec![false; (w * h) as usize];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while covered.iter().any(|c| !c) {
        let e = tokio::time::timeout_at(deadline, vnc.recv_event())
            .await
            .unwrap_or_else(|_| panic!("{encoding:?}: no complete image in time"))
            .unwrap();
        if let vnc::VncEvent::RawImage(r, px) = e {
            for j in 0..usize::from(r.height) {
                for i in 0..usize::from(r.width) {
                    let (x, y) = (usize::from(r.x) + i, usize::from(r.y) + j);
                    let src = (j * usize::from(r.width) + i) * 4;
                    let dst = (y * w as usize + x) * 4;
                    fb[dst..dst + 4].copy_from_slice(&px[src..src + 4]);
                    covered[y * w as usize + x] = true;
                }
            }
        }
    }
    let got: Vec<u8> = fb
        .chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect();
    assert!(got == f.to_rgb8(), "{encoding:?}: image differs");
    let _ = vnc.close().await;
    drop(vnc);
    server.abort();
    if let Err(e) = server.await {
        assert!(
            e.is_cancelled(),
            "{encoding:?}: the server side failed: {e}"
        );
    }
}

#[tokio::test]
async fn vnc_crate_decodes_raw() {
    view(vnc::VncEncoding::Raw, Encoding::Raw).await;
}

#[tokio::test]
async fn vnc_crate_decodes_zrle() {
    view(vnc::VncEncoding::Zrle, Encoding::Zrle).await;
}

#[tokio::test]
async fn vnc_crate_decodes_tight() {
    view(vnc::VncEncoding::Tight, Encoding::Tight).await;
}
