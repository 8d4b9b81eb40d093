//! The server side of an RFB session (RFC 6143) as a pure state machine: bytes from the viewer
//! go in through [`Session::feed`], bytes for the viewer come out of [`Session::output`].
//!
//! No sockets, no clocks, no threads: the caller owns the transport and decides when to sample a
//! head. Everything the peer sends is decoded once into a [`ClientMessage`]; anything malformed
//! is a [`ProtocolError`], after which the caller writes out what [`Session::output`] still holds
//! (a failure reason, if the handshake has one) and closes the connection.
//!
//! Memory is bounded whatever the peer sends: at most [`MAX_ENCODINGS`] encodings are kept from a
//! SetEncodings (the rest are read and dropped), ClientCutText is skipped as it streams in and
//! refused past [`MAX_CUT_TEXT`], and nothing is allocated with a size the peer chose beyond that.

use des::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};
use des::Des;

use super::encode::{Cursor, Encoder, EncodingSet, Rect, UpdateWriter};
use vgpu_model::Frame;

/// The version this server offers (RFC 6143 section 7.1.1).
pub const SERVER_VERSION: &[u8; 12] = b"RFB 003.008\n";
/// Encodings kept from one SetEncodings; the rest are read and dropped.
pub const MAX_ENCODINGS: usize = 64;
/// The longest ClientCutText accepted (its bytes are skipped, never buffered).
pub const MAX_CUT_TEXT: u32 = 1 << 20;

/// Security type "None" (RFC 6143 section 7.2.1).
const SEC_NONE: u8 = 1;
/// Security type "VNC Authentication" (RFC 6143 section 7.2.2).
const SEC_VNC_AUTH: u8 = 2;

/// Why a session ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The ProtocolVersion message is not `RFB xxx.yyy\n`.
    #[error("malformed protocol version {0:?}")]
    BadVersion([u8; 12]),
    /// A well-formed version this server does not speak.
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion {
        /// Major version the client sent.
        major: u16,
        /// Minor version the client sent.
        minor: u16,
    },
    /// The client chose a security type that was not offered.
    #[error("security type {0} was not offered")]
    BadSecurityType(u8),
    /// The VncAuth response does not match the challenge.
    #[error("authentication failed")]
    AuthFailed,
    /// A client-to-server message that does not decode.
    #[error("bad client message")]
    Decode(#[from] DecodeError),
    /// Input arrived after the session had failed.
    #[error("session is closed")]
    Closed,
}

/// Why a client-to-server message does not decode (RFC 6143 section 7.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A message type this server does not know.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// A SetPixelFormat this server cannot send.
    #[error("unsupported pixel format: {0}")]
    PixelFormat(&'static str),
    /// A ClientCutText longer than [`MAX_CUT_TEXT`].
    #[error("cut text of {0} bytes is over the limit")]
    CutTextTooLong(u32),
}

/// An RFB PIXEL_FORMAT (RFC 6143 section 7.4): how the viewer wants pixel values laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientPixelFormat {
    /// 8, 16 or 32.
    pub bits_per_pixel: u8,
    /// Useful bits in a pixel.
    pub depth: u8,
    /// Multi-byte pixels are big-endian.
    pub big_endian: bool,
    /// True colour (not a colour map).
    pub true_colour: bool,
    /// Largest red value (2^n - 1).
    pub red_max: u16,
    /// Largest green value.
    pub green_max: u16,
    /// Largest blue value.
    pub blue_max: u16,
    /// Bit position of red.
    pub red_shift: u8,
    /// Bit position of green.
    pub green_shift: u8,
    /// Bit position of blue.
    pub blue_shift: u8,
}

impl ClientPixelFormat {
    /// The server's own format: 32 bpp, depth 24, little-endian x8r8g8b8.
    pub const SERVER: ClientPixelFormat = ClientPixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    /// Bytes per pixel on the wire.
    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// The 16-byte wire form (3 bytes of padding included).
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = u8::from(self.true_colour);
        b[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        b[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        b[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        b[10] = self.red_shift;
        b[11] = self.green_shift;
        b[12] = self.blue_shift;
        b
    }

    /// Parses the 16-byte wire form; call [`validate`](Self::validate) before using it.
    pub fn from_bytes(b: &[u8; 16]) -> ClientPixelFormat {
        ClientPixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16::from_be_bytes([b[4], b[5]]),
            green_max: u16::from_be_bytes([b[6], b[7]]),
            blue_max: u16::from_be_bytes([b[8], b[9]]),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        }
    }

    /// Accepts what the encoders can produce: true colour, 32 or 16 bpp, each channel's max of
    /// the form 2^n - 1 (n >= 1), channels inside the pixel and not overlapping, depth between
    /// the channel bits and the pixel size.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if !self.true_colour {
            return Err(DecodeError::PixelFormat("colour maps are not supported"));
        }
        if self.bits_per_pixel != 32 && self.bits_per_pixel != 16 {
            return Err(DecodeError::PixelFormat("only 32 and 16 bits per pixel"));
        }
        let bpp = u32::from(self.bits_per_pixel);
        let mut used = 0u64;
        let mut bits = 0u32;
        for (max, shift) in [
            (self.red_max, self.red_shift),
            (self.green_max, self.green_shift),
            (self.blue_max, self.blue_shift),
        ] {
            if max == 0 || (u32::from(max) + 1).count_ones() != 1 {
                return Err(DecodeError::PixelFormat("a colour max is not 2^n - 1"));
            }
            let n = max.count_ones();
            if u32::from(shift) + n > bpp {
                return Err(DecodeError::PixelFormat("a colour lies outside the pixel"));
            }
            let mask = u64::from(max) << shift;
            if used & mask != 0 {
                return Err(DecodeError::PixelFormat("colours overlap"));
            }
            used |= mask;
            bits += n;
        }
        let depth = u32::from(self.depth);
        if depth > bpp || depth == 0 {
            return Err(DecodeError::PixelFormat("depth does not fit the pixel"));
        }
        // Some viewers send depth 24 for 8+8+8 and others 32; only reject a depth that cannot
        // hold the colour bits at all (a 16-bpp depth 8 with 5+6+5, say).
        if depth < bits.min(24) && depth < bits {
            return Err(DecodeError::PixelFormat(
                "depth is smaller than the colour bits",
            ));
        }
        Ok(())
    }
}

/// A FramebufferUpdateRequest (RFC 6143 section 7.5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateRequest {
    /// Only changes are wanted (otherwise the whole area).
    pub incremental: bool,
    /// The area of interest.
    pub rect: Rect,
}

/// A decoded client-to-server message (RFC 6143 section 7.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientMessage {
    /// SetPixelFormat, already validated.
    SetPixelFormat(ClientPixelFormat),
    /// SetEncodings: the first [`MAX_ENCODINGS`] kept, in the client's order of preference.
    SetEncodings {
        /// Kept encodings.
        encodings: Vec<i32>,
        /// How many more were read and dropped.
        dropped: u32,
    },
    /// FramebufferUpdateRequest.
    FramebufferUpdateRequest(UpdateRequest),
    /// KeyEvent (view-only: the caller drops it).
    KeyEvent {
        /// Pressed (true) or released.
        down: bool,
        /// X keysym.
        key: u32,
    },
    /// PointerEvent (view-only: the caller drops it).
    PointerEvent {
        /// Button mask.
        buttons: u8,
        /// Position.
        x: u16,
        /// Position.
        y: u16,
    },
    /// SetDesktopSize (the ExtendedDesktopSize extension): a viewer asks for another size. A
    /// head's size is the guest's, so the answer is "prohibited"; the screen list is skipped.
    SetDesktopSize {
        /// Asked width.
        width: u16,
        /// Asked height.
        height: u16,
        /// Screens listed (skipped).
        screens: u8,
    },
    /// ClientCutText: only its length is reported; the text is skipped as it arrives.
    ClientCutText {
        /// Announced length in bytes (at most [`MAX_CUT_TEXT`]).
        len: u32,
    },
}

/// How the viewer must prove itself.
#[derive(Clone, PartialEq, Eq)]
pub enum Security {
    /// No authentication (loopback use).
    None,
    /// VNC Authentication: DES of a 16-byte challenge with the password as key.
    VncAuth {
        /// The password's first 8 bytes, zero-padded.
        key: [u8; 8],
        /// The challenge to send; the caller draws it from a CSPRNG.
        challenge: [u8; 16],
    },
}

impl Security {
    /// VncAuth with `password` (only its first 8 bytes count, as in every VNC implementation)
    /// and a fresh random `challenge` from the caller.
    pub fn vnc_auth(password: &[u8], challenge: [u8; 16]) -> Security {
        let mut key = [0u8; 8];
        for (k, p) in key.iter_mut().zip(password) {
            *k = *p;
        }
        Security::VncAuth { key, challenge }
    }
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::None => f.write_str("None"),
            Security::VncAuth { .. } => f.write_str("VncAuth"),
        }
    }
}

/// The VncAuth response to `challenge` for `key`: DES-ECB of both 8-byte halves, with each key
/// byte's bits reversed (the historical quirk of VNC's d3des: it loads key bits LSB first).
pub fn vnc_auth_response(key: &[u8; 8], challenge: &[u8; 16]) -> [u8; 16] {
    let mut k = [0u8; 8];
    for (d, s) in k.iter_mut().zip(key) {
        *d = s.reverse_bits();
    }
    let cipher = Des::new(GenericArray::from_slice(&k));
    let mut out = *challenge;
    for half in out.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(half));
    }
    out
}

/// What a session is told when it starts.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Framebuffer width at connect time.
    pub width: u16,
    /// Framebuffer height at connect time.
    pub height: u16,
    /// Desktop name shown by the viewer (truncated to 255 bytes).
    pub name: String,
    /// Authentication.
    pub security: Security,
    /// Screen id reported in ExtendedDesktopSize (one screen per head).
    pub screen_id: u32,
}

/// The protocol version in use after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// RFB 3.3 (server picks the security type; no SecurityResult for None).
    V3_3,
    /// RFB 3.7 (client picks; no SecurityResult for None).
    V3_7,
    /// RFB 3.8.
    V3_8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Version,
    SecurityChoice,
    AuthResponse,
    ClientInit,
    Normal,
    Closed,
}

/// Incremental decoding of the message stream, one state per partially read message.
#[derive(Debug)]
enum Rx {
    /// Between messages, or inside a fixed-size one (its bytes are in `buf`).
    Fixed,
    /// Inside SetEncodings: entries still to read.
    Encodings {
        left: u32,
        kept: Vec<i32>,
        dropped: u32,
    },
    /// Inside ClientCutText: text bytes still to skip.
    Skip { left: u32 },
}

/// Decodes client-to-server messages from a byte stream split anywhere.
#[derive(Debug)]
pub struct MessageDecoder {
    buf: [u8; 20],
    have: usize,
    rx: Rx,
}

impl Default for MessageDecoder {
    fn default() -> Self {
        MessageDecoder {
            buf: [0; 20],
            have: 0,
            rx: Rx::Fixed,
        }
    }
}

/// Moves bytes from `input` into `buf[*have..need]`; true once `need` bytes are there.
fn fill(buf: &mut [u8], have: &mut usize, need: usize, input: &mut &[u8]) -> bool {
    let take = (need - *have).min(input.len());
    buf[*have..*have + take].copy_from_slice(&input[..take]);
    *have += take;
    *input = &input[take..];
    *have == need
}

impl MessageDecoder {
    /// Decodes the next complete message from `input`, consuming what it reads. `Ok(None)`
    /// means `input` is used up and the message (if any) continues in the next call.
    pub fn next(&mut self, input: &mut &[u8]) -> Result<Option<ClientMessage>, DecodeError> {
        loop {
            match &mut self.rx {
                Rx::Skip { left } => {
                    let take = (*left as usize).min(input.len());
                    *input = &input[take..];
                    *left -= take as u32;
                    if *left > 0 {
                        return Ok(None);
                    }
                    self.rx = Rx::Fixed;
                }
                Rx::Encodings {
                    left,
                    kept,
                    dropped,
                } => {
                    while *left > 0 {
                        if !fill(&mut self.buf, &mut self.have, 4, input) {
                            return Ok(None);
                        }
                        self.have = 0;
                        *left -= 1;
                        let e = i32::from_be_bytes([
                            self.buf[0],
                            self.buf[1],
                            self.buf[2],
                            self.buf[3],
                        ]);
                        if kept.len() < MAX_ENCODINGS {
                            kept.push(e);
                        } else {
                            *dropped += 1;
                        }
                    }
                    let msg = ClientMessage::SetEncodings {
                        encodings: std::mem::take(kept),
                        dropped: *dropped,
                    };
                    self.rx = Rx::Fixed;
                    return Ok(Some(msg));
                }
                Rx::Fixed => {
                    if self.have == 0 {
                        if input.is_empty() {
                            return Ok(None);
                        }
                        self.buf[0] = input[0];
                        self.have = 1;
                        *input = &input[1..];
                    }
                    let need = match self.buf[0] {
                        0 => 20,
                        2 => 4,
                        3 => 10,
                        4 => 8,
                        5 => 6,
                        6 => 8,
                        251 => 8,
                        t => {
                            self.have = 0;
                            return Err(DecodeError::UnknownType(t));
                        }
                    };
                    if !fill(&mut self.buf, &mut self.have, need, input) {
                        return Ok(None);
                    }
                    self.have = 0;
                    if let Some(msg) = self.decode_fixed()? {
                        return Ok(Some(msg));
                    }
                }
            }
        }
    }

    /// Decodes the complete fixed part in `buf`.
    /// `None` when the message goes on with a variable part.
    fn decode_fixed(&mut self) -> Result<Option<ClientMessage>, DecodeError> {
        let b = &self.buf;
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Ok(Some(match b[0] {
            0 => {
                let mut pf = [0u8; 16];
                pf.copy_from_slice(&b[4..20]);
                let pf = ClientPixelFormat::from_bytes(&pf);
                pf.validate()?;
                ClientMessage::SetPixelFormat(pf)
            }
            2 => {
                let n = u32::from(u16_at(2));
                if n == 0 {
                    ClientMessage::SetEncodings {
                        encodings: Vec::new(),
                        dropped: 0,
                    }
                } else {
                    self.rx = Rx::Encodings {
                        left: n,
                        kept: Vec::with_capacity((n as usize).min(MAX_ENCODINGS)),
                        dropped: 0,
                    };
                    // The entries follow; `next` goes on in the Encodings state.
                    return Ok(None);
                }
            }
            3 => ClientMessage::FramebufferUpdateRequest(UpdateRequest {
                incremental: b[1] != 0,
                rect: Rect {
                    x: u16_at(2),
                    y: u16_at(4),
                    w: u16_at(6),
                    h: u16_at(8),
                },
            }),
            4 => ClientMessage::KeyEvent {
                down: b[1] != 0,
                key: u32_at(4),
            },
            5 => ClientMessage::PointerEvent {
                buttons: b[1],
                x: u16_at(2),
                y: u16_at(4),
            },
            6 => {
                let len = u32_at(4);
                if len > MAX_CUT_TEXT {
                    return Err(DecodeError::CutTextTooLong(len));
                }
                if len > 0 {
                    self.rx = Rx::Skip { left: len };
                }
                ClientMessage::ClientCutText { len }
            }
            251 => {
                let screens = b[6];
                if screens > 0 {
                    self.rx = Rx::Skip {
                        left: u32::from(screens) * 16,
                    };
                }
                ClientMessage::SetDesktopSize {
                    width: u16_at(2),
                    height: u16_at(4),
                    screens,
                }
            }
            t => return Err(DecodeError::UnknownType(t)),
        }))
    }
}

/// One head, plus the cursor, to show in an update: what the server loop hands
/// [`Session::send_update`] when a request is pending.
#[derive(Clone, Copy, Debug)]
pub struct Update<'a> {
    /// The head's current image (any size: a size change is announced first).
    pub frame: &'a Frame,
    /// Areas changed since this client's last update, in frame coordinates (clipped here).
    pub dirty: &'a [Rect],
    /// A new cursor image, if it changed since this client's last update.
    pub cursor: Option<&'a Cursor>,
}

/// One viewer's RFB session, server side.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    version: Version,
    buf: [u8; 16],
    have: usize,
    decoder: MessageDecoder,
    out: Vec<u8>,
    format: ClientPixelFormat,
    encodings: EncodingSet,
    pending: Option<UpdateRequest>,
    /// The framebuffer size the viewer knows.
    size: (u16, u16),
    /// An ExtendedDesktopSize is owed (first request after the viewer announced support).
    announce_screen: bool,
    /// A SetDesktopSize is to be answered "prohibited".
    refuse_resize: bool,
    encoder: Encoder,
}

impl Session {
    /// Starts a session; its output already holds the server's ProtocolVersion.
    pub fn new(config: SessionConfig) -> Session {
        let size = (config.width, config.height);
        Session {
            config,
            state: State::Version,
            version: Version::V3_8,
            buf: [0; 16],
            have: 0,
            decoder: MessageDecoder::default(),
            out: SERVER_VERSION.to_vec(),
            format: ClientPixelFormat::SERVER,
            encodings: EncodingSet::default(),
            pending: None,
            size,
            announce_screen: false,
            refuse_resize: false,
            encoder: Encoder::default(),
        }
    }

    /// Bytes waiting to go to the viewer.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Drops the first `n` output bytes, once the transport has written them.
    pub fn consume_output(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    /// Takes every output byte.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// True once the handshake is over and the viewer may ask for updates.
    pub fn is_ready(&self) -> bool {
        self.state == State::Normal
    }

    /// The protocol version agreed on (meaningful once past the version exchange).
    pub fn version(&self) -> Version {
        self.version
    }

    /// The viewer's pixel format.
    pub fn pixel_format(&self) -> ClientPixelFormat {
        self.format
    }

    /// What the viewer's encodings allow.
    pub fn encodings(&self) -> &EncodingSet {
        &self.encodings
    }

    /// The merged update request waiting for an answer, if any: the server loop samples the
    /// head only while this is `Some`.
    pub fn pending_update(&self) -> Option<UpdateRequest> {
        self.pending
    }

    /// Feeds bytes from the viewer. On error, write out [`output`](Self::output) and close.
    pub fn feed(&mut self, input: &[u8]) -> Result<(), ProtocolError> {
        self.feed_with(input, |_| {})
    }

    /// [`feed`](Self::feed), also showing each decoded message to `seen` (after the session
    /// applied it): for logging and tests.
    pub fn feed_with(
        &mut self,
        mut input: &[u8],
        mut seen: impl FnMut(&ClientMessage),
    ) -> Result<(), ProtocolError> {
        let r = self.run(&mut input, &mut seen);
        if r.is_err() {
            self.state = State::Closed;
        }
        r
    }

    fn run(
        &mut self,
        input: &mut &[u8],
        seen: &mut impl FnMut(&ClientMessage),
    ) -> Result<(), ProtocolError> {
        loop {
            match self.state {
                State::Closed => return Err(ProtocolError::Closed),
                State::Normal => {
                    while let Some(msg) = self.decoder.next(input)? {
                        self.apply(&msg);
                        seen(&msg);
                    }
                    return Ok(());
                }
                State::Version => {
                    if !fill(&mut self.buf, &mut self.have, 12, input) {
                        return Ok(());
                    }
                    self.have = 0;
                    self.on_version()?;
                }
                State::SecurityChoice => {
                    if !fill(&mut self.buf, &mut self.have, 1, input) {
                        return Ok(());
                    }
                    self.have = 0;
                    self.on_security_choice(self.buf[0])?;
                }
                State::AuthResponse => {
                    if !fill(&mut self.buf, &mut self.have, 16, input) {
                        return Ok(());
                    }
                    self.have = 0;
                    self.on_auth_response()?;
                }
                State::ClientInit => {
                    if !fill(&mut self.buf, &mut self.have, 1, input) {
                        return Ok(());
                    }
                    self.have = 0;
                    // The shared flag is ignored: every viewer of a head shares it.
                    self.server_init();
                    self.state = State::Normal;
                }
            }
        }
    }

    fn security_type(&self) -> u8 {
        match self.config.security {
            Security::None => SEC_NONE,
            Security::VncAuth { .. } => SEC_VNC_AUTH,
        }
    }

    /// RFC 6143 section 7.1.1: "The only published protocol versions at this time are 3.3,
    /// 3.7, and 3.8. Other version numbers are reported by some servers and clients, but
    /// should be interpreted as 3.3 since they do not implement the different handshake in 3.7
    /// or 3.8." A 3.x above 3.8 gets 3.8 (the client must then speak the version we offered).
    fn on_version(&mut self) -> Result<(), ProtocolError> {
        let mut v = [0u8; 12];
        v.copy_from_slice(&self.buf[..12]);
        let digits = |r: std::ops::Range<usize>| -> Option<u16> {
            v[r].iter().try_fold(0u16, |acc, &c| {
                c.is_ascii_digit().then(|| acc * 10 + u16::from(c - b'0'))
            })
        };
        let (Some(major), Some(minor)) = (digits(4..7), digits(8..11)) else {
            return Err(ProtocolError::BadVersion(v));
        };
        if &v[..4] != b"RFB " || v[7] != b'.' || v[11] != b'\n' {
            return Err(ProtocolError::BadVersion(v));
        }
        if major != 3 {
            // Refuse cleanly in the oldest form every client reads: security type 0 and a
            // reason (3.3 layout, since we do not know what the peer speaks).
            self.out.extend_from_slice(&0u32.to_be_bytes());
            put_reason(&mut self.out, "unsupported protocol version");
            return Err(ProtocolError::UnsupportedVersion { major, minor });
        }
        self.version = match minor {
            7 => Version::V3_7,
            m if m >= 8 => Version::V3_8,
            _ => Version::V3_3,
        };
        let ty = self.security_type();
        if self.version == Version::V3_3 {
            // 3.3: the server decides and sends the type as a U32.
            self.out.extend_from_slice(&u32::from(ty).to_be_bytes());
            self.after_security_chosen(ty);
        } else {
            self.out.extend_from_slice(&[1, ty]);
            self.state = State::SecurityChoice;
        }
        Ok(())
    }

    fn on_security_choice(&mut self, ty: u8) -> Result<(), ProtocolError> {
        if ty != self.security_type() {
            self.security_failed("security type not offered");
            return Err(ProtocolError::BadSecurityType(ty));
        }
        self.after_security_chosen(ty);
        Ok(())
    }

    fn after_security_chosen(&mut self, ty: u8) {
        if let Security::VncAuth { challenge, .. } = &self.config.security {
            self.out.extend_from_slice(challenge);
            self.state = State::AuthResponse;
            return;
        }
        debug_assert_eq!(ty, SEC_NONE);
        // "The protocol continues with the SecurityResult message" for None only from 3.8 on
        // (RFC 6143 section 7.2.1 and appendix A).
        if self.version == Version::V3_8 {
            self.out.extend_from_slice(&0u32.to_be_bytes());
        }
        self.state = State::ClientInit;
    }

    fn on_auth_response(&mut self) -> Result<(), ProtocolError> {
        let Security::VncAuth { key, challenge } = &self.config.security else {
            return Err(ProtocolError::Closed);
        };
        let expected = vnc_auth_response(key, challenge);
        // Constant-time compare: no early exit on the first wrong byte.
        let diff = expected
            .iter()
            .zip(&self.buf[..16])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            self.security_failed("authentication failed");
            return Err(ProtocolError::AuthFailed);
        }
        self.out.extend_from_slice(&0u32.to_be_bytes());
        self.state = State::ClientInit;
        Ok(())
    }

    /// SecurityResult "failed"; only 3.8 carries a reason string.
    fn security_failed(&mut self, reason: &str) {
        self.out.extend_from_slice(&1u32.to_be_bytes());
        if self.version == Version::V3_8 {
            put_reason(&mut self.out, reason);
        }
    }

    fn server_init(&mut self) {
        self.out.extend_from_slice(&self.size.0.to_be_bytes());
        self.out.extend_from_slice(&self.size.1.to_be_bytes());
        self.out
            .extend_from_slice(&ClientPixelFormat::SERVER.to_bytes());
        let name = truncate_utf8(&self.config.name, 255);
        put_reason(&mut self.out, name);
    }

    fn apply(&mut self, msg: &ClientMessage) {
        match msg {
            ClientMessage::SetPixelFormat(pf) => self.format = *pf,
            ClientMessage::SetEncodings { encodings, .. } => {
                let before = self.encodings.extended_desktop_size;
                self.encodings = EncodingSet::from_list(encodings);
                if self.encodings.extended_desktop_size && !before {
                    self.announce_screen = true;
                }
            }
            ClientMessage::FramebufferUpdateRequest(req) => {
                self.pending = Some(match self.pending {
                    None => *req,
                    Some(p) => UpdateRequest {
                        incremental: p.incremental && req.incremental,
                        rect: p.rect.union(&req.rect),
                    },
                });
            }
            // The guest owns the size: refused in the next update (if the viewer announced the
            // extension; otherwise ignored).
            ClientMessage::SetDesktopSize { .. } => {
                if self.encodings.extended_desktop_size {
                    self.refuse_resize = true;
                }
            }
            // View-only: input belongs to the guest's own devices, and the cut text was
            // skipped as it arrived.
            ClientMessage::KeyEvent { .. }
            | ClientMessage::PointerEvent { .. }
            | ClientMessage::ClientCutText { .. } => {}
        }
    }

    /// Answers the pending update request with `update`, in the viewer's format and preferred
    /// encoding, appending a FramebufferUpdate to the output. Returns false (and sends
    /// nothing) when no request is pending, or when the request is incremental and nothing
    /// changed: the request then stays pending.
    ///
    /// A frame whose size differs from what the viewer knows is announced first (DesktopSize
    /// or ExtendedDesktopSize) and then sent whole; a viewer that supports neither gets the
    /// part that fits its old size. Dirty areas are sent even outside the requested area
    /// (RFC 6143 allows it), so no damage is lost.
    pub fn send_update(&mut self, update: &Update<'_>) -> bool {
        let Some(req) = self.pending else {
            return false;
        };
        let fw = update.frame.width.min(u32::from(u16::MAX)) as u16;
        let fh = update.frame.height.min(u32::from(u16::MAX)) as u16;
        let can_resize = self.encodings.desktop_size || self.encodings.extended_desktop_size;
        let resize = (fw, fh) != self.size && can_resize;
        let mut rects: Vec<Rect> = Vec::new();
        if resize {
            self.size = (fw, fh);
            rects.push(Rect::new(0, 0, fw, fh));
        } else {
            if !req.incremental {
                rects.push(req.rect);
            }
            rects.extend_from_slice(update.dirty);
        }
        let bound = Rect::new(0, 0, self.size.0.min(fw), self.size.1.min(fh));
        let mut rects: Vec<Rect> = rects.iter().filter_map(|r| r.intersect(&bound)).collect();
        rects.sort_by_key(|r| (r.y, r.x));
        rects.dedup();
        let cursor = update.cursor.filter(|_| self.encodings.cursor);
        let announce = resize || (self.announce_screen && self.encodings.extended_desktop_size);
        let refuse = std::mem::take(&mut self.refuse_resize) && !resize;
        if rects.is_empty() && cursor.is_none() && !announce && !refuse && req.incremental {
            return false;
        }
        self.pending = None;
        self.announce_screen = false;
        let mut w = UpdateWriter::begin(&mut self.out, self.encodings.last_rect);
        if announce {
            if self.encodings.extended_desktop_size {
                w.extended_desktop_size(self.size.0, self.size.1, self.config.screen_id);
            } else {
                w.desktop_size(self.size.0, self.size.1);
            }
        }
        if refuse {
            // Reason 1 (this client's request), status 1 (prohibited).
            w.extended_desktop_size_reply(self.size.0, self.size.1, self.config.screen_id, 1, 1);
        }
        if let Some(c) = cursor {
            w.cursor(c, &self.format);
        }
        for r in &rects {
            w.rect(
                &mut self.encoder,
                update.frame,
                *r,
                self.encodings.preferred,
                &self.format,
            );
        }
        w.finish();
        true
    }
}

/// A U32 length and the bytes of `s` (reason strings, the desktop name).
fn put_reason(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
