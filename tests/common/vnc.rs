//! An independent VNC viewer for tests: the `vnc` crate's client engine over TCP, with the
//! framebuffer it reconstructs from the updates it decodes.

use std::time::{Duration, Instant};

/// One viewer connected to a head.
pub struct VncView {
    rt: tokio::runtime::Runtime,
    client: ::vnc::VncClient,
    /// Framebuffer size as the server announced it.
    pub width: u32,
    /// Framebuffer size as the server announced it.
    pub height: u32,
    /// BGRA pixels.
    fb: Vec<u8>,
    /// Updates (rectangles) decoded so far.
    pub rects: usize,
    /// Cursor shapes received (size and hot spot).
    pub cursors: Vec<(u16, u16)>,
    last_refresh: Instant,
}

impl VncView {
    /// Connects to `addr` preferring `encoding`, with no password.
    pub fn connect(addr: &str, encoding: ::vnc::VncEncoding) -> VncView {
        VncView::connect_with(addr, encoding, "")
    }

    /// Connects to `addr` preferring `encoding`, answering VNC authentication with `password`.
    pub fn connect_with(addr: &str, encoding: ::vnc::VncEncoding, password: &str) -> VncView {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let password = password.to_string();
        let client = rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
            ::vnc::VncConnector::new(tcp)
                .set_auth_method(async move { Ok(password) })
                .add_encoding(encoding)
                .add_encoding(::vnc::VncEncoding::Raw)
                .add_encoding(::vnc::VncEncoding::CursorPseudo)
                .add_encoding(::vnc::VncEncoding::DesktopSizePseudo)
                .allow_shared(true)
                .set_pixel_format(::vnc::PixelFormat::bgra())
                .build()
                .unwrap()
                .try_start()
                .await
                .unwrap_or_else(|e| panic!("VNC handshake with {addr}: {e:?}"))
                .finish()
                .unwrap()
        });
        VncView {
            rt,
            client,
            width: 0,
            height: 0,
            fb: Vec::new(),
            rects: 0,
            cursors: Vec::new(),
            last_refresh: Instant::now(),
        }
    }

    /// The image as packed RGB.
    pub fn rgb(&self) -> (u32, u32, Vec<u8>) {
        (
            self.width,
            self.height,
            self.fb
                .chunks_exact(4)
                .flat_map(|p| [p[2], p[1], p[0]])
                .collect(),
        )
    }

    fn resize(&mut self, w: u32, h: u32) {
        if (w, h) != (self.width, self.height) {
            self.width = w;
            self.height = h;
            self.fb = vec![0; (w * h * 4) as usize];
        }
    }

    fn apply(&mut self, e: ::vnc::VncEvent) -> Result<(), String> {
        match e {
            ::vnc::VncEvent::SetResolution(s) => self.resize(s.width.into(), s.height.into()),
            ::vnc::VncEvent::DesktopUpdate(u) => {
                if let Some(l) = u.layout {
                    self.resize(l.width.into(), l.height.into());
                }
            }
            ::vnc::VncEvent::RawImage(r, px) => {
                self.rects += 1;
                let w = self.width as usize;
                for j in 0..usize::from(r.height) {
                    for i in 0..usize::from(r.width) {
                        let (x, y) = (usize::from(r.x) + i, usize::from(r.y) + j);
                        if x >= w || y >= self.height as usize {
                            return Err(format!("rectangle {r:?} outside {}x{}", w, self.height));
                        }
                        let src = (j * usize::from(r.width) + i) * 4;
                        let dst = (y * w + x) * 4;
                        self.fb[dst..dst + 4].copy_from_slice(&px[src..src + 4]);
                    }
                }
            }
            ::vnc::VncEvent::SetCursor(r, _) => self.cursors.push((r.width, r.height)),
            ::vnc::VncEvent::Error(e) => return Err(format!("client error: {e}")),
            _ => {}
        }
        Ok(())
    }

    /// Takes updates for `for_`, asking for incremental ones every 20 ms.
    pub fn pump(&mut self, for_: Duration) -> Result<(), String> {
        let end = Instant::now() + for_;
        while Instant::now() < end {
            if self.last_refresh.elapsed() >= Duration::from_millis(20) {
                self.last_refresh = Instant::now();
                self.rt
                    .block_on(self.client.input(::vnc::X11Event::Refresh))
                    .map_err(|e| format!("refresh: {e:?}"))?;
            }
            let ev = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(20), self.client.recv_event()).await
            });
            match ev {
                Ok(Ok(e)) => self.apply(e)?,
                Ok(Err(e)) => return Err(format!("connection: {e:?}")),
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Takes updates until the image equals `want` (width, height, RGB); the error says how
    /// it differs at the deadline.
    pub fn wait_for(
        &mut self,
        want: &(u32, u32, Vec<u8>),
        timeout: Duration,
    ) -> Result<(), String> {
        let end = Instant::now() + timeout;
        loop {
            if self.rgb() == *want {
                return Ok(());
            }
            if Instant::now() >= end {
                let got = self.rgb();
                let differ = if (got.0, got.1) == (want.0, want.1) {
                    got.2
                        .chunks_exact(3)
                        .zip(want.2.chunks_exact(3))
                        .filter(|(a, b)| a != b)
                        .count()
                } else {
                    usize::MAX
                };
                return Err(format!(
                    "after {timeout:?}: viewer has {}x{}, want {}x{}; {differ} pixels differ",
                    got.0, got.1, want.0, want.1
                ));
            }
            self.pump(Duration::from_millis(40))?;
        }
    }

    /// Closes the connection.
    pub fn close(self) {
        let VncView { rt, client, .. } = self;
        let _ = rt.block_on(client.close());
    }
}
