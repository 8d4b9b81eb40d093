//! The HTTP side of the viewer port: one page listing every head, noVNC's files, and a
//! WebSocket upgrade at `/ws/<uuid>/<head>` that carries RFB to noVNC. Pure functions, no
//! sockets: a server loop owns the transport and, per connection,
//!
//! 1. appends what it reads to a buffer and calls [`parse_request`] until it returns a request
//!    (or an error: write [`error_response`] and close);
//! 2. matches [`route`] on the request's target: [`index_page`] / [`heads_json`] through
//!    [`response`], [`static_file`] for noVNC, [`not_found`] otherwise; plain responses close
//!    the connection (`Connection: close`);
//! 3. for [`Route::Ws`] with [`Request::websocket`] set, writes [`upgrade_response`] (with
//!    [`choose_protocol`]) and speaks WebSocket from there on, with the bytes after the
//!    `consumed` ones already read; without it, answers [`HttpError::UpgradeRequired`].
//!
//! Every peer is untrusted: a request head is bounded by [`MAX_REQUEST_HEAD`] bytes and
//! [`MAX_HEADERS`] headers, nothing is allocated with a size the peer chose beyond the head it
//! sent, error messages never echo what the peer sent, and every string put in the page is
//! escaped. Paths are percent-decoded segment by segment and anything that could step out of
//! the noVNC directory (`..`, `.`, empty segments, `/` or `\` inside a segment, NUL) is not
//! found.

use std::io::Read;
use std::path::{Component, Path};

use serde::Serialize;

#[cfg(test)]
mod tests;

/// Largest request head (request line + headers) accepted.
pub const MAX_REQUEST_HEAD: usize = 8192;
/// Most headers accepted in a request head; more is [`HttpError::TooLarge`].
pub const MAX_HEADERS: usize = 32;
/// Most WebSocket subprotocols kept from a request; more is [`HttpError::BadUpgrade`].
pub const MAX_WS_PROTOCOLS: usize = 16;
/// Largest file [`static_file`] serves.
pub const MAX_STATIC_FILE: u64 = 16 << 20;
/// The WebSocket subprotocol accepted when offered (older noVNC releases ask for it).
pub const WS_PROTOCOL_BINARY: &str = "binary";
/// The only WebSocket version spoken (RFC 6455).
pub const WS_VERSION: &str = "13";

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// GET or HEAD.
    pub method: Method,
    /// The raw request target up to `?` (not decoded; [`route`] decodes it).
    pub target: String,
    /// The raw query after `?`, if any.
    pub query: Option<String>,
    /// Set when the request is a valid WebSocket upgrade.
    pub websocket: Option<WsUpgrade>,
}

/// The request methods served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// HEAD: the GET response's head only.
    Head,
}

/// A valid WebSocket opening handshake (RFC 6455 section 4.2.1): `Upgrade: websocket`,
/// `Connection` listing `upgrade`, `Sec-WebSocket-Version: 13`, a key that is base64 of 16 bytes,
/// GET over HTTP/1.1, and an `Origin`, if sent, naming the `Host` the request was sent to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsUpgrade {
    /// `Sec-WebSocket-Key`, as sent (24 base64 characters).
    pub key: String,
    /// `Sec-WebSocket-Protocol` tokens in the client's order (at most [`MAX_WS_PROTOCOLS`]).
    pub protocols: Vec<String>,
}

/// Why a request head is refused. Messages are fixed strings: nothing the peer sent is echoed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The head is over [`MAX_REQUEST_HEAD`] bytes or [`MAX_HEADERS`] headers.
    #[error("request head too large")]
    TooLarge,
    /// Not a well-formed HTTP/1.x request head.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A method other than GET or HEAD.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// An `Upgrade: websocket` request that is not a valid opening handshake.
    #[error("bad WebSocket upgrade: {0}")]
    BadUpgrade(&'static str),
    /// A WebSocket upgrade without `Sec-WebSocket-Version: 13`.
    #[error("unsupported WebSocket version")]
    WsVersion,
    /// A WebSocket upgrade whose `Origin` is not the host it was sent to (another site's page).
    #[error("cross-origin WebSocket refused")]
    CrossOrigin,
    /// A plain request for a WebSocket endpoint (for the server loop to answer with).
    #[error("this endpoint speaks WebSocket only")]
    UpgradeRequired,
}

impl HttpError {
    /// The HTTP status answering this error.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::TooLarge => 431,
            HttpError::Malformed(_) | HttpError::BadUpgrade(_) => 400,
            HttpError::MethodNotAllowed => 405,
            HttpError::CrossOrigin => 403,
            HttpError::WsVersion | HttpError::UpgradeRequired => 426,
        }
    }
}

/// Where a request target leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/`: the page listing the heads.
    Index,
    /// `/heads.json`: the same list as JSON.
    HeadsJson,
    /// `/novnc/<rel>`: a file of noVNC; `rel` is decoded and validated (relative, no `.`, `..`
    /// or empty segments, no NUL, backslash or control characters).
    Novnc(String),
    /// `/ws/<uuid>/<head>` (also `/novnc/ws/<uuid>/<head>`, where noVNC 1.6 and later resolve
    /// the `path` parameter relative to `vnc.html`): the WebSocket carrying RFB for a head.
    Ws {
        /// The device.
        uuid: uuid::Uuid,
        /// The head index (decimal, at most `u32::MAX`).
        head: u32,
    },
    /// Anything else, including every target that does not decode or validate.
    NotFound,
}

/// Why [`static_file`] serves nothing.
#[derive(Debug, thiserror::Error)]
pub enum StaticError {
    /// `rel` is not a plain relative path.
    #[error("invalid path")]
    BadPath,
    /// Nothing there.
    #[error("not found")]
    NotFound,
    /// A directory, device, FIFO or socket.
    #[error("not a regular file")]
    NotAFile,
    /// Over [`MAX_STATIC_FILE`] bytes.
    #[error("file of {0} bytes is over the limit")]
    TooLarge(u64),
    /// Opening or reading failed otherwise.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

impl StaticError {
    /// The HTTP status answering this error.
    pub fn status(&self) -> u16 {
        match self {
            StaticError::BadPath | StaticError::NotFound | StaticError::NotAFile => 404,
            StaticError::TooLarge(_) | StaticError::Io(_) => 500,
        }
    }
}

/// One head as listed on the index page and in `heads.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeadLink {
    /// The device's UUID.
    pub uuid: String,
    /// The device type's key.
    pub type_key: String,
    /// The head index.
    pub head: u32,
    /// The current mode, as shown to people (e.g. `1024x768 XRGB8888` or `off`).
    pub mode: String,
    /// The raw RFB address (`host:port`), `""` when the head has none.
    pub vnc: String,
}

/// `heads.json`'s element: a [`HeadLink`] plus its viewer URL.
#[derive(Serialize)]
struct HeadJson<'a> {
    #[serde(flatten)]
    link: &'a HeadLink,
    viewer: String,
}

/// Parses a request head from the start of `buf`. `Ok(None)`: need more bytes (and
/// `buf.len() < MAX_REQUEST_HEAD`). `Ok(Some((request, consumed)))`: the head is
/// `buf[..consumed]`; what follows belongs to the connection (WebSocket frames after an upgrade).
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    let window = &buf[..buf.len().min(MAX_REQUEST_HEAD)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_HEAD => {
            return Err(HttpError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooLarge),
        Err(e) => return Err(HttpError::Malformed(httparse_reason(e))),
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HttpError::Malformed("incomplete request line"));
    };
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => return Err(HttpError::MethodNotAllowed),
    };
    let (target, query) = match path.split_once('?') {
        Some((t, q)) => (t, Some(q)),
        None => (path, None),
    };
    let h = Headers::collect(req.headers)?;
    if version >= 1 && h.host.is_none() {
        return Err(HttpError::Malformed("HTTP/1.1 request without Host"));
    }
    let websocket = if h.upgrade_websocket {
        Some(h.websocket(method, version)?)
    } else {
        None
    };
    Ok(Some((
        Request {
            method,
            target: target.to_owned(),
            query: query.map(str::to_owned),
            websocket,
        },
        consumed,
    )))
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid request line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// The headers this server reads, gathered from a parsed head.
#[derive(Default)]
struct Headers<'a> {
    host: Option<&'a str>,
    origin: Option<&'a str>,
    upgrade_websocket: bool,
    connection_upgrade: bool,
    ws_version: Option<&'a str>,
    ws_key: Option<&'a str>,
    protocols: Vec<String>,
    protocols_ok: bool,
}

impl<'a> Headers<'a> {
    fn collect(headers: &[httparse::Header<'a>]) -> Result<Headers<'a>, HttpError> {
        let mut h = Headers {
            protocols_ok: true,
            ..Headers::default()
        };
        for header in headers {
            let name = header.name;
            let is = |n: &str| name.eq_ignore_ascii_case(n);
            // Values of headers this server ignores may hold any obs-text; those it reads must
            // be UTF-8 (they are ASCII when valid).
            let value = || {
                std::str::from_utf8(header.value)
                    .map(str::trim)
                    .map_err(|_| HttpError::Malformed("header value is not UTF-8"))
            };
            if is("host") {
                once(&mut h.host, value()?, "duplicate Host")?;
            } else if is("transfer-encoding") {
                return Err(HttpError::Malformed("request bodies are not accepted"));
            } else if is("content-length") {
                if value()?.bytes().any(|b| b != b'0') || header.value.is_empty() {
                    return Err(HttpError::Malformed("request bodies are not accepted"));
                }
            } else if is("upgrade") {
                h.upgrade_websocket |= list(value()?).any(|t| t.eq_ignore_ascii_case("websocket"));
            } else if is("connection") {
                h.connection_upgrade |= list(value()?).any(|t| t.eq_ignore_ascii_case("upgrade"));
            } else if is("origin") {
                once(&mut h.origin, value()?, "duplicate Origin")?;
            } else if is("sec-websocket-version") {
                once(
                    &mut h.ws_version,
                    value()?,
                    "duplicate Sec-WebSocket-Version",
                )?;
            } else if is("sec-websocket-key") {
                once(&mut h.ws_key, value()?, "duplicate Sec-WebSocket-Key")?;
            } else if is("sec-websocket-protocol") {
                // Checked only if this turns out to be an upgrade.
                match value() {
                    Ok(v) => {
                        for p in list(v) {
                            if !is_token(p) || h.protocols.len() == MAX_WS_PROTOCOLS {
                                h.protocols_ok = false;
                                break;
                            }
                            h.protocols.push(p.to_owned());
                        }
                    }
                    Err(_) => h.protocols_ok = false,
                }
            }
        }
        Ok(h)
    }

    /// Validates the opening handshake of a request with `Upgrade: websocket`.
    fn websocket(self, method: Method, version: u8) -> Result<WsUpgrade, HttpError> {
        if method != Method::Get {
            return Err(HttpError::BadUpgrade("a WebSocket upgrade must be a GET"));
        }
        if version < 1 {
            return Err(HttpError::BadUpgrade("a WebSocket upgrade needs HTTP/1.1"));
        }
        if !self.connection_upgrade {
            return Err(HttpError::BadUpgrade("Connection does not list upgrade"));
        }
        if self.ws_version != Some(WS_VERSION) {
            return Err(HttpError::WsVersion);
        }
        let Some(key) = self.ws_key else {
            return Err(HttpError::BadUpgrade("no Sec-WebSocket-Key"));
        };
        if !is_ws_key(key) {
            return Err(HttpError::BadUpgrade(
                "Sec-WebSocket-Key is not base64 of 16 bytes",
            ));
        }
        if !self.protocols_ok {
            return Err(HttpError::BadUpgrade("malformed Sec-WebSocket-Protocol"));
        }
        if let (Some(origin), Some(host)) = (self.origin, self.host) {
            if !same_origin(origin, host) {
                return Err(HttpError::CrossOrigin);
            }
        }
        Ok(WsUpgrade {
            key: key.to_owned(),
            protocols: self.protocols,
        })
    }
}

/// Stores the first value of a header that may appear once.
fn once<'a>(slot: &mut Option<&'a str>, v: &'a str, dup: &'static str) -> Result<(), HttpError> {
    if slot.replace(v).is_some() {
        return Err(HttpError::Malformed(dup));
    }
    Ok(())
}

/// The non-empty elements of a comma-separated header list.
fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|t| !t.is_empty())
}

/// An RFC 9110 token (`tchar`s, at least one).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Base64 (standard alphabet, padded) of exactly 16 bytes: 22 characters and `==`.
fn is_ws_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[22..] == *b"=="
        && b[..22]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
}

/// Whether a serialized `Origin` (`scheme://host[:port]`) names the authority in `Host`,
/// default ports aside.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // "null" and anything else opaque
    };
    let default_port = if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("ws") {
        ":80"
    } else if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("wss") {
        ":443"
    } else {
        return false;
    };
    let authority = authority.strip_suffix(default_port).unwrap_or(authority);
    let host = host.strip_suffix(default_port).unwrap_or(host);
    !authority.is_empty() && authority.eq_ignore_ascii_case(host)
}

/// Where `target` (a [`Request::target`]) leads. Each path segment is percent-decoded on its
/// own; a target that is not an absolute path, does not decode to UTF-8, or has a segment that is
/// empty, `.`, `..`, or holds `/`, `\`, NUL or another control character is [`Route::NotFound`].
pub fn route(target: &str) -> Route {
    let Some(rest) = target.strip_prefix('/') else {
        return Route::NotFound;
    };
    if rest.is_empty() {
        return Route::Index;
    }
    let Some(segments) = rest
        .split('/')
        .map(decode_segment)
        .collect::<Option<Vec<_>>>()
    else {
        return Route::NotFound;
    };
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    match seg.as_slice() {
        ["heads.json"] => Route::HeadsJson,
        ["ws", uuid, head] | ["novnc", "ws", uuid, head] => ws_route(uuid, head),
        ["novnc", rel @ ..] if !rel.is_empty() => Route::Novnc(rel.join("/")),
        _ => Route::NotFound,
    }
}

fn ws_route(uuid: &str, head: &str) -> Route {
    // The hyphenated form only: one URL per head.
    let uuid = match uuid::Uuid::try_parse(uuid) {
        Ok(u) if uuid.len() == 36 => u,
        _ => return Route::NotFound,
    };
    if head.is_empty() || head.len() > 10 || !head.bytes().all(|b| b.is_ascii_digit()) {
        return Route::NotFound;
    }
    match head.parse::<u32>() {
        Ok(head) => Route::Ws { uuid, head },
        Err(_) => Route::NotFound,
    }
}

/// Percent-decodes one path segment; `None` when it is malformed or not a plain name.
fn decode_segment(raw: &str) -> Option<String> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).ok()?;
    is_plain_segment(&s).then_some(s)
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// A decoded segment that names an entry of its directory and nothing else.
fn is_plain_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == '\\' || c.is_control())
}

/// Whether `rel` is what [`route`] hands out in [`Route::Novnc`]: plain segments joined by `/`.
pub fn is_valid_rel(rel: &str) -> bool {
    rel.split('/').all(is_plain_segment)
}

/// The `101 Switching Protocols` answering a WebSocket upgrade with `key`, echoing `protocol`
/// when `Some` (it must be one the client offered, see [`choose_protocol`]; a value that is not
/// a token is left out).
pub fn upgrade_response(key: &str, protocol: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = protocol.filter(|p| is_token(p)) {
        out.push_str("Sec-WebSocket-Protocol: ");
        out.push_str(p);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// The subprotocol to answer with: `binary` if offered (as older noVNC releases do), else none
/// (current noVNC offers none and speaks binary frames).
pub fn choose_protocol(offered: &[String]) -> Option<&'static str> {
    offered
        .iter()
        .any(|p| p == WS_PROTOCOL_BINARY)
        .then_some(WS_PROTOCOL_BINARY)
}

/// The reason phrase for the statuses this server sends.
fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn build(
    status: u16,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
) -> Vec<u8> {
    // The caller's content type must not break the head.
    let content_type = if content_type.chars().any(|c| c.is_control()) {
        "application/octet-stream"
    } else {
        content_type
    };
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
        reason(status),
        body.len()
    );
    for (name, value) in extra {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// A complete HTTP/1.1 response: `Content-Type`, `Content-Length` (of `body`, also when
/// `head_only` leaves the body out for HEAD), `Cache-Control: no-store`,
/// `X-Content-Type-Options: nosniff` and `Connection: close`.
pub fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    build(status, content_type, &[], body, head_only)
}

/// The response to a refused request: its status, a short plain-text reason, and the headers
/// the status calls for (`Allow` for 405, `Sec-WebSocket-Version` for 426).
pub fn error_response(e: &HttpError) -> Vec<u8> {
    let status = e.status();
    let body = format!("{status} {}: {e}\n", reason(status));
    let extra: &[(&str, &str)] = match e {
        HttpError::MethodNotAllowed => &[("Allow", "GET, HEAD")],
        HttpError::WsVersion => &[("Sec-WebSocket-Version", WS_VERSION)],
        HttpError::UpgradeRequired => &[
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", WS_VERSION),
        ],
        _ => &[],
    };
    build(
        status,
        "text/plain; charset=utf-8",
        extra,
        body.as_bytes(),
        false,
    )
}

/// `404 Not Found`.
pub fn not_found() -> Vec<u8> {
    response(404, "text/plain; charset=utf-8", b"404 Not Found\n", false)
}

/// The content type served for a file, from its extension (case-insensitive).
pub fn content_type(rel: &str) -> &'static str {
    let ext = rel
        .rsplit('/')
        .next()
        .and_then(|name| name.rsplit_once('.'))
        .map(|(_, ext)| ext.to_ascii_lowercase());
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("webmanifest") => "application/manifest+json",
        Some("txt" | "md") => "text/plain; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("woff") => "font/woff",
        Some("woff2") => "font/woff2",
        Some("ttf") => "font/ttf",
        Some("otf") => "font/otf",
        Some("wasm") => "application/wasm",
        Some("oga" | "ogg") => "audio/ogg",
        Some("mp3") => "audio/mpeg",
        _ => "application/octet-stream",
    }
}

/// Reads `rel` (already validated by [`route`]; checked again) under `dir`: regular files only,
/// at most [`MAX_STATIC_FILE`] bytes, with the content type from its extension. Symlinks are
/// followed (the operator owns the directory; the peer cannot name `..`). The file is opened
/// non-blocking and checked once open, so a FIFO put there cannot stall the caller.
pub fn static_file(dir: &Path, rel: &str) -> Result<(Vec<u8>, &'static str), StaticError> {
    let rel_path = Path::new(rel);
    if !is_valid_rel(rel)
        || !rel_path
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(StaticError::BadPath);
    }
    let path = dir.join(rel_path);
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
    };
    let file = match file {
        Ok(f) => f,
        Err(e) => {
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::ENAMETOOLONG) => {
                    StaticError::NotFound
                }
                _ => StaticError::Io(e),
            })
        }
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(StaticError::NotAFile);
    }
    if meta.len() > MAX_STATIC_FILE {
        return Err(StaticError::TooLarge(meta.len()));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    // The file may grow after the check: read at most one byte past the limit.
    file.take(MAX_STATIC_FILE + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_STATIC_FILE {
        return Err(StaticError::TooLarge(data.len() as u64));
    }
    Ok((data, content_type(rel)))
}

/// `s` with `&`, `<`, `>`, `"` and `'` replaced by character references.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` with every byte but the URI unreserved ones percent-encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

const PAGE_STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse}th,td{padding:.3em .8em;border-bottom:1px solid #ccc;\
text-align:left}code{font-size:.95em}.note{background:#fff4d6;border:1px solid #e0c070;\
padding:.6em 1em;max-width:50em}.off{color:#888}";

/// The index page: a self-contained HTML page (no external resources, no script) listing
/// every head with its type, mode, raw VNC address and a link opening it in noVNC
/// ([`viewer_url`]). With `novnc_missing` (why), the page says noVNC is unavailable, names the
/// Debian package `novnc` and `--novnc-dir`, and leaves the viewer links out. Every string is
/// HTML-escaped.
pub fn index_page(heads: &[HeadLink], novnc_missing: Option<&str>) -> String {
    let mut p = String::new();
    p.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    p.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    p.push_str("<title>vgpu-emu heads</title>\n<style>");
    p.push_str(PAGE_STYLE);
    p.push_str("</style>\n</head>\n<body>\n<h1>vgpu-emu heads</h1>\n");
    if let Some(why) = novnc_missing {
        p.push_str("<p class=\"note\">noVNC is not available (");
        p.push_str(&html_escape(why));
        p.push_str(
            "), so heads cannot be opened in the browser. Install the Debian package \
                    <code>novnc</code>, or point <code>--novnc-dir</code> at a noVNC tree, \
                    and restart. The VNC addresses below work with any VNC viewer.</p>\n",
        );
    }
    if heads.is_empty() {
        p.push_str("<p>No heads.</p>\n");
    } else {
        p.push_str(
            "<table>\n<thead><tr><th>Device</th><th>Type</th><th>Head</th><th>Mode</th>\
             <th>VNC</th><th>View</th></tr></thead>\n<tbody>\n",
        );
        for h in heads {
            p.push_str("<tr><td><code>");
            p.push_str(&html_escape(&h.uuid));
            p.push_str("</code></td><td>");
            p.push_str(&html_escape(&h.type_key));
            p.push_str("</td><td>");
            p.push_str(&h.head.to_string());
            p.push_str("</td><td>");
            p.push_str(&html_escape(&h.mode));
            p.push_str("</td><td>");
            if h.vnc.is_empty() {
                p.push_str("<span class=\"off\">off</span>");
            } else {
                p.push_str("<code>");
                p.push_str(&html_escape(&h.vnc));
                p.push_str("</code>");
            }
            p.push_str("</td><td>");
            if novnc_missing.is_some() {
                p.push_str("<span class=\"off\">no noVNC</span>");
            } else {
                p.push_str("<a href=\"");
                p.push_str(&html_escape(&viewer_url(&h.uuid, h.head)));
                p.push_str("\" target=\"_blank\" rel=\"noopener noreferrer\">open in noVNC</a>");
            }
            p.push_str("</td></tr>\n");
        }
        p.push_str("</tbody>\n</table>\n");
    }
    p.push_str("<p><a href=\"/heads.json\">heads.json</a></p>\n</body>\n</html>\n");
    p
}

/// The noVNC page viewing one head: `vnc.html` told to connect at once to `ws/<uuid>/<head>`,
/// view-only, scaled to the window, reconnecting, with a dot for the cursor. (noVNC before 1.6
/// puts `path` after the page's host; 1.6 and later resolve it against `vnc.html`, which
/// [`route`] also maps to [`Route::Ws`].)
pub fn viewer_url(uuid: &str, head: u32) -> String {
    format!(
        "/novnc/vnc.html?path=ws/{}/{head}&autoconnect=true&view_only=true&resize=scale\
         &reconnect=true&show_dot=true",
        percent_encode(uuid)
    )
}

/// `heads.json`: an array of objects with every [`HeadLink`] field plus `viewer`
/// ([`viewer_url`]).
pub fn heads_json(heads: &[HeadLink]) -> String {
    let list: Vec<HeadJson<'_>> = heads
        .iter()
        .map(|link| HeadJson {
            link,
            viewer: viewer_url(&link.uuid, link.head),
        })
        .collect();
    // Serializing strings and integers cannot fail.
    serde_json::to_string(&list).unwrap_or_else(|_| "[]".to_owned())
}

/// Fuzz entry point (the `http` target and the corpus replay test): [`parse_request`] on
/// `data`, [`route`] on its target (and on `data` itself), and the responses and page built
/// from what was parsed, checking their invariants; [`static_file`] is never called.
pub fn fuzz_request(data: &[u8]) {
    route_checked(&String::from_utf8_lossy(
        &data[..data.len().min(MAX_REQUEST_HEAD)],
    ));
    let (req, consumed) = match parse_request(data) {
        Ok(None) => {
            assert!(data.len() < MAX_REQUEST_HEAD);
            return;
        }
        Ok(Some(parsed)) => parsed,
        Err(e) => {
            assert!(error_response(&e).starts_with(format!("HTTP/1.1 {} ", e.status()).as_bytes()));
            return;
        }
    };
    assert!(consumed > 0 && consumed <= data.len().min(MAX_REQUEST_HEAD));
    // The head alone parses the same, and one byte less is not yet a head.
    assert_eq!(
        parse_request(&data[..consumed]),
        Ok(Some((req.clone(), consumed)))
    );
    assert_eq!(parse_request(&data[..consumed - 1]), Ok(None));
    route_checked(&req.target);
    if let Some(ws) = &req.websocket {
        let r = upgrade_response(&ws.key, choose_protocol(&ws.protocols));
        assert!(r.starts_with(b"HTTP/1.1 101 "));
    }
    let link = HeadLink {
        uuid: req.target.clone(),
        type_key: req.query.clone().unwrap_or_default(),
        head: consumed as u32,
        mode: req.target.clone(),
        vnc: req.query.clone().unwrap_or_default(),
    };
    let page = index_page(std::slice::from_ref(&link), Some(&req.target));
    // Escaping leaves the markup as it is with harmless strings: no character that could open
    // or close a tag or an attribute comes from the request.
    let plain = HeadLink {
        uuid: "u".into(),
        type_key: "t".into(),
        mode: "m".into(),
        vnc: if link.vnc.is_empty() { "" } else { "v" }.into(),
        ..link.clone()
    };
    let skeleton = index_page(std::slice::from_ref(&plain), Some("w"));
    for c in ['<', '>', '"', '\''] {
        assert_eq!(page.matches(c).count(), skeleton.matches(c).count());
    }
    let json: Vec<HeadLink> =
        match serde_json::from_str::<serde_json::Value>(&heads_json(std::slice::from_ref(&link))) {
            Ok(serde_json::Value::Array(v)) => v
                .into_iter()
                .map(|o| HeadLink {
                    uuid: o["uuid"].as_str().unwrap_or_default().to_owned(),
                    type_key: o["type_key"].as_str().unwrap_or_default().to_owned(),
                    head: o["head"].as_u64().unwrap_or_default() as u32,
                    mode: o["mode"].as_str().unwrap_or_default().to_owned(),
                    vnc: o["vnc"].as_str().unwrap_or_default().to_owned(),
                })
                .collect(),
            other => panic!("heads.json is not an array: {other:?}"),
        };
    assert_eq!(json, [link]);
}

/// [`route`] with the invariants of what it returns.
fn route_checked(target: &str) {
    match route(target) {
        Route::Novnc(rel) => assert!(is_valid_rel(&rel) && !rel.starts_with('/')),
        Route::Index => assert_eq!(target, "/"),
        Route::HeadsJson | Route::Ws { .. } | Route::NotFound => {}
    }
}
