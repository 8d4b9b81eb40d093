use super::*;

const UUID: &str = "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b";

/// A browser-like WebSocket upgrade for `path`, with `extra` header lines.
fn ws_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:6080\r\nUpgrade: websocket\r\n\
         Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:6080\r\n{extra}\r\n"
    )
}

fn parse(s: &str) -> Result<Option<(Request, usize)>, HttpError> {
    parse_request(s.as_bytes())
}

fn parsed(s: &str) -> Request {
    let (req, consumed) = parse(s).unwrap().unwrap();
    assert_eq!(consumed, s.len());
    req
}

/// The WebSocket request with the line starting with `old_prefix` replaced by `line` ("" drops
/// it; appended when there was none).
fn ws_with(old_prefix: &str, line: &str) -> String {
    let mut lines: Vec<&str> = Vec::new();
    let mut replaced = false;
    let base = ws_request("/ws/x/0", "");
    for l in base.split("\r\n").filter(|l| !l.is_empty()) {
        if l.starts_with(old_prefix) {
            replaced = true;
            lines.push(line);
        } else {
            lines.push(l);
        }
    }
    if !replaced {
        lines.push(line);
    }
    lines.retain(|l| !l.is_empty());
    lines.join("\r\n") + "\r\n\r\n"
}

#[test]
fn simple_get_and_head() {
    let req = parsed("GET /heads.json?x=1&y HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(req.method, Method::Get);
    assert_eq!(req.target, "/heads.json");
    assert_eq!(req.query.as_deref(), Some("x=1&y"));
    assert_eq!(req.websocket, None);
    let req = parsed("HEAD / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(req.method, Method::Head);
    assert_eq!(req.query, None);
    // HTTP/1.0 needs no Host.
    assert_eq!(parsed("GET / HTTP/1.0\r\n\r\n").target, "/");
}

#[test]
fn head_response_has_length_but_no_body() {
    let get = response(200, "text/html; charset=utf-8", b"<p>hi</p>", false);
    let head = response(200, "text/html; charset=utf-8", b"<p>hi</p>", true);
    let text = String::from_utf8(get.clone()).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
    for h in [
        "Content-Type: text/html; charset=utf-8\r\n",
        "Content-Length: 9\r\n",
        "Connection: close\r\n",
        "Cache-Control: no-store\r\n",
        "X-Content-Type-Options: nosniff\r\n",
    ] {
        assert!(text.contains(h), "{h:?} missing");
    }
    assert!(text.ends_with("\r\n\r\n<p>hi</p>"));
    assert_eq!(&get[..head.len()], &head[..]);
    assert!(head.ends_with(b"\r\n\r\n"));
    // A content type that would break the head is replaced.
    let bad = response(200, "text/html\r\nSet-Cookie: a=b", b"", false);
    assert!(!String::from_utf8(bad).unwrap().contains("Set-Cookie"));
}

#[test]
fn partial_requests_byte_by_byte() {
    let full = ws_request(
        &format!("/ws/{UUID}/1"),
        "Sec-WebSocket-Protocol: binary\r\n",
    );
    let mut with_frames = full.clone().into_bytes();
    with_frames.extend_from_slice(&[0x82, 0x80, 1, 2, 3, 4]);
    for n in 0..full.len() {
        assert_eq!(parse_request(&with_frames[..n]), Ok(None), "prefix of {n}");
    }
    for n in full.len()..=with_frames.len() {
        let (req, consumed) = parse_request(&with_frames[..n]).unwrap().unwrap();
        assert_eq!(consumed, full.len());
        let ws = req.websocket.unwrap();
        assert_eq!(ws.key, "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(ws.protocols, ["binary"]);
    }
}

#[test]
fn oversized_heads() {
    // Exactly at the limit and still incomplete: too large.
    let mut big = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: ".to_vec();
    big.resize(MAX_REQUEST_HEAD - 1, b'a');
    assert_eq!(parse_request(&big), Ok(None));
    big.push(b'a');
    assert_eq!(parse_request(&big), Err(HttpError::TooLarge));
    big.extend_from_slice(b"\r\n\r\n");
    assert_eq!(parse_request(&big), Err(HttpError::TooLarge));
    // A head that ends right at the limit is fine.
    let mut fits = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: ".to_vec();
    fits.resize(MAX_REQUEST_HEAD - 4, b'a');
    fits.extend_from_slice(b"\r\n\r\n");
    fits.extend_from_slice(b"trailing bytes past the limit");
    assert_eq!(parse_request(&fits).unwrap().unwrap().1, MAX_REQUEST_HEAD);
    // Too many headers.
    let mut many = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
    for i in 0..MAX_HEADERS {
        many.push_str(&format!("X-{i}: v\r\n"));
    }
    assert_eq!(parse(&many), Err(HttpError::TooLarge));
    assert_eq!(HttpError::TooLarge.status(), 431);
}

#[test]
fn bad_methods_and_malformed_heads() {
    for m in [
        "POST", "PUT", "DELETE", "OPTIONS", "CONNECT", "get", "TRACE",
    ] {
        let r = parse(&format!("{m} / HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert_eq!(r, Err(HttpError::MethodNotAllowed), "{m}");
    }
    let r = error_response(&HttpError::MethodNotAllowed);
    let text = String::from_utf8(r).unwrap();
    assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
    assert!(text.contains("Allow: GET, HEAD\r\n"));
    for bad in [
        "GET / HTTP/2.0\r\n\r\n",
        "GET /\r\n\r\n",
        "GET  HTTP/1.1\r\n\r\n",
        "\x00GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
        "GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        let r = parse(bad);
        assert!(matches!(r, Err(HttpError::Malformed(_))), "{bad:?}: {r:?}");
        assert_eq!(r.unwrap_err().status(), 400);
    }
    // A zero length is no body.
    parsed("GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n");
}

#[test]
fn valid_upgrades() {
    let req = parsed(&ws_request(&format!("/ws/{UUID}/0"), ""));
    let ws = req.websocket.unwrap();
    assert!(ws.protocols.is_empty());
    assert_eq!(choose_protocol(&ws.protocols), None);
    // Header names and tokens are case-insensitive; protocols may span several headers.
    let req = parsed(
        "GET /ws/a/0 HTTP/1.1\r\nhost: H:80\r\nUPGRADE: WebSocket\r\nconnection: UPGRADE\r\n\
         sec-websocket-key: AAAAAAAAAAAAAAAAAAAAAA==\r\nSEC-WEBSOCKET-VERSION: 13\r\n\
         Sec-WebSocket-Protocol: base64, chat\r\nSec-WebSocket-Protocol: binary\r\n\
         Origin: HTTP://h\r\n\r\n",
    );
    let ws = req.websocket.unwrap();
    assert_eq!(ws.protocols, ["base64", "chat", "binary"]);
    assert_eq!(choose_protocol(&ws.protocols), Some("binary"));
    // No Origin (a non-browser client) is accepted.
    assert!(parsed(&ws_with("Origin", "")).websocket.is_some());
    // An Upgrade to something else is ignored, not refused.
    let req = parsed("GET / HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n");
    assert_eq!(req.websocket, None);
}

#[test]
fn missing_or_invalid_upgrade_headers() {
    let bad = |s: &str| match parse(s) {
        Err(HttpError::BadUpgrade(_)) => {}
        r => panic!("{s:?}: {r:?}"),
    };
    bad(&ws_with("Connection", "Connection: keep-alive"));
    bad(&ws_with("Connection", ""));
    bad(&ws_with("Sec-WebSocket-Key", ""));
    for key in [
        "dGhlIHNhbXBsZSBub25jZQ=",
        "dGhlIHNhbXBsZSBub25jZQ===",
        "dGhlIHNhbXBsZSBub25jZ===",
        "dGhlIHNhbXBsZSBub25jZQ!=",
        "dGhlIHNhbXBsZSBub25jZSBh",
        "",
    ] {
        bad(&ws_with(
            "Sec-WebSocket-Key",
            &format!("Sec-WebSocket-Key: {key}"),
        ));
    }
    bad(&ws_with(
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Protocol: bin ary",
    ));
    bad(&ws_with("GET", "HEAD /ws/x/0 HTTP/1.1"));
    bad(&ws_with("GET", "GET /ws/x/0 HTTP/1.0"));
    let many: Vec<String> = (0..=MAX_WS_PROTOCOLS).map(|i| format!("p{i}")).collect();
    bad(&ws_with(
        "Sec-WebSocket-Protocol",
        &format!("Sec-WebSocket-Protocol: {}", many.join(", ")),
    ));
    // A duplicated key is malformed whatever it holds.
    let dup = ws_request("/ws/x/0", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
    assert!(matches!(parse(&dup), Err(HttpError::Malformed(_))));
    // Versions: missing or other than 13 is 426 with the version spoken.
    for line in [
        "",
        "Sec-WebSocket-Version: 8",
        "Sec-WebSocket-Version: 13, 8",
    ] {
        assert_eq!(
            parse(&ws_with("Sec-WebSocket-Version", line)),
            Err(HttpError::WsVersion)
        );
    }
    let text = String::from_utf8(error_response(&HttpError::WsVersion)).unwrap();
    assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
    assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
    let text = String::from_utf8(error_response(&HttpError::UpgradeRequired)).unwrap();
    assert!(text.contains("Upgrade: websocket\r\n"));
}

#[test]
fn cross_origin_upgrades_are_refused() {
    for origin in [
        "http://evil.example",
        "http://127.0.0.1:6081",
        "null",
        "file://",
        "ftp://127.0.0.1:6080",
    ] {
        let r = parse(&ws_with("Origin", &format!("Origin: {origin}")));
        assert_eq!(r, Err(HttpError::CrossOrigin), "{origin}");
    }
    assert_eq!(HttpError::CrossOrigin.status(), 403);
    for (origin, host) in [
        ("https://viewer.example", "viewer.example:443"),
        ("http://[::1]:6080", "[::1]:6080"),
        ("http://Host.Example", "host.example"),
    ] {
        let s = ws_with("Origin", &format!("Origin: {origin}")).replace("127.0.0.1:6080", host);
        assert!(parsed(&s).websocket.is_some(), "{origin} {host}");
    }
}

#[test]
fn upgrade_response_matches_rfc6455_example() {
    let r = String::from_utf8(upgrade_response("dGhlIHNhbXBsZSBub25jZQ==", None)).unwrap();
    assert_eq!(
        r,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    );
    let r =
        String::from_utf8(upgrade_response("dGhlIHNhbXBsZSBub25jZQ==", Some("binary"))).unwrap();
    assert!(r.contains("Sec-WebSocket-Protocol: binary\r\n"));
    assert!(r.ends_with("\r\n\r\n"));
    let r = String::from_utf8(upgrade_response("x", Some("a\r\nSet-Cookie: b"))).unwrap();
    assert!(!r.contains("Sec-WebSocket-Protocol"));
}

#[test]
fn routes() {
    assert_eq!(route("/"), Route::Index);
    assert_eq!(route("/heads.json"), Route::HeadsJson);
    assert_eq!(route("/%68eads.json"), Route::HeadsJson);
    assert_eq!(route("/novnc/vnc.html"), Route::Novnc("vnc.html".into()));
    assert_eq!(
        route("/novnc/app/images/icons/novnc-16x16.png"),
        Route::Novnc("app/images/icons/novnc-16x16.png".into())
    );
    assert_eq!(
        route("/novnc/app/my%20file.js"),
        Route::Novnc("app/my file.js".into())
    );
    for bad in [
        "",
        "heads.json",
        "//",
        "/heads.json/",
        "/novnc",
        "/novnc/",
        "/novnc//vnc.html",
        "/novnc/app/",
        "http://host/novnc/vnc.html",
        "*",
        "/index.html",
    ] {
        assert_eq!(route(bad), Route::NotFound, "{bad:?}");
    }
}

#[test]
fn percent_encoding_tricks_are_not_found() {
    for bad in [
        "/novnc/../etc/passwd",
        "/novnc/%2e%2e/etc/passwd",
        "/novnc/%2E%2E/etc/passwd",
        "/novnc/.%2e/x",
        "/novnc/app/%2e/ui.js",
        "/novnc/./vnc.html",
        "/novnc/..%2fetc%2fpasswd",
        "/novnc/%2fetc%2fpasswd",
        "/novnc/app%2f..%2f..%2fx",
        "/novnc/vnc.html%00.png",
        "/novnc/%00",
        "/novnc/..%5c..%5cx",
        "/novnc/app\\ui.js",
        "/novnc/%0a",
        "/novnc/%",
        "/novnc/%2",
        "/novnc/%zz",
        "/novnc/%ff",
        "/novnc/%c0%ae%c0%ae/x",
        "/%2e%2e/novnc/vnc.html",
        "/ws/..%2f/0",
    ] {
        assert_eq!(route(bad), Route::NotFound, "{bad:?}");
    }
    // Decoding happens once: an encoded percent stays a percent.
    assert_eq!(route("/novnc/%252e%252e"), Route::Novnc("%2e%2e".into()));
}

#[test]
fn ws_uuid_and_head_parsing() {
    let uuid = uuid::Uuid::parse_str(UUID).unwrap();
    assert_eq!(route(&format!("/ws/{UUID}/0")), Route::Ws { uuid, head: 0 });
    assert_eq!(
        route(&format!("/ws/{}/4294967295", UUID.to_uppercase())),
        Route::Ws {
            uuid,
            head: u32::MAX
        }
    );
    // Where noVNC 1.6 and later resolve `path`.
    assert_eq!(
        route(&format!("/novnc/ws/{UUID}/3")),
        Route::Ws { uuid, head: 3 }
    );
    assert_eq!(
        route(&format!("/ws/{UUID}/%33")),
        Route::Ws { uuid, head: 3 }
    );
    let simple = UUID.replace('-', "");
    for bad in [
        format!("/ws/{UUID}/4294967296"),
        format!("/ws/{UUID}/99999999999999999999"),
        format!("/ws/{UUID}/-1"),
        format!("/ws/{UUID}/+1"),
        format!("/ws/{UUID}/1a"),
        format!("/ws/{UUID}/ 1"),
        format!("/ws/{UUID}/"),
        format!("/ws/{UUID}"),
        format!("/ws/{UUID}/0/"),
        format!("/ws/{UUID}/0/1"),
        format!("/ws/{simple}/0"),
        format!("/ws/{{{UUID}}}/0"),
        format!("/ws/urn:uuid:{UUID}/0"),
        "/ws/not-a-uuid/0".to_string(),
        "/ws/6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4g/0".to_string(),
    ] {
        assert_eq!(route(&bad), Route::NotFound, "{bad:?}");
    }
}

fn heads() -> Vec<HeadLink> {
    vec![
        HeadLink {
            uuid: UUID.into(),
            type_key: "virtio-gpu-2".into(),
            head: 1,
            mode: "1024x768 XRGB8888".into(),
            vnc: "127.0.0.1:5901".into(),
        },
        HeadLink {
            uuid: "<script>alert(1)</script>".into(),
            type_key: "a&b\"c'd".into(),
            head: 0,
            mode: "<b>off</b>".into(),
            vnc: String::new(),
        },
    ]
}

#[test]
fn index_page_lists_and_escapes() {
    let page = index_page(&heads(), None);
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains(UUID));
    assert!(page.contains("virtio-gpu-2"));
    assert!(page.contains("1024x768 XRGB8888"));
    assert!(page.contains("127.0.0.1:5901"));
    let link = viewer_url(UUID, 1).replace('&', "&amp;");
    assert!(page.contains(&format!("href=\"{link}\"")));
    // Nothing a head carries reaches the page unescaped.
    assert!(!page.contains("<script"));
    assert!(!page.contains("<b>"));
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(page.contains("a&amp;b&quot;c&#39;d"));
    assert!(page.contains("&lt;b&gt;off&lt;/b&gt;"));
    // The viewer URL percent-encodes the uuid, and is escaped in the attribute.
    assert!(page.contains("path=ws/%3Cscript%3Ealert%281%29%3C%2Fscript%3E/0&amp;"));
    // No external resources and no script.
    assert!(!page.contains("src="));
    assert!(!page.contains("http://"));
    assert!(!page.contains("https://"));
    assert!(!page.contains("<link"));
    assert!(!page.contains("noVNC is not available"));
}

#[test]
fn index_page_without_novnc() {
    let page = index_page(&heads(), Some("/usr/share/novnc/vnc.html: <missing>"));
    assert!(page.contains("noVNC is not available"));
    assert!(page.contains("<code>novnc</code>"));
    assert!(page.contains("<code>--novnc-dir</code>"));
    assert!(page.contains("/usr/share/novnc/vnc.html: &lt;missing&gt;"));
    assert!(!page.contains("vnc.html?"));
    assert!(page.contains("127.0.0.1:5901"));
    let empty = index_page(&[], None);
    assert!(empty.contains("No heads."));
}

#[test]
fn viewer_url_uses_novnc_parameters() {
    assert_eq!(
        viewer_url(UUID, 2),
        format!(
            "/novnc/vnc.html?path=ws/{UUID}/2&autoconnect=true&view_only=true&resize=scale\
             &reconnect=true&show_dot=true"
        )
    );
    // Its path routes back to the head, both as older noVNC (after the host) and newer noVNC
    // (relative to vnc.html) build it.
    let uuid = uuid::Uuid::parse_str(UUID).unwrap();
    assert_eq!(route(&format!("/ws/{UUID}/2")), Route::Ws { uuid, head: 2 });
    assert_eq!(
        route(&format!("/novnc/ws/{UUID}/2")),
        Route::Ws { uuid, head: 2 }
    );
}

#[test]
fn heads_json_round_trips() {
    let json: serde_json::Value = serde_json::from_str(&heads_json(&heads())).unwrap();
    let list = json.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["uuid"], UUID);
    assert_eq!(list[0]["type_key"], "virtio-gpu-2");
    assert_eq!(list[0]["head"], 1);
    assert_eq!(list[0]["mode"], "1024x768 XRGB8888");
    assert_eq!(list[0]["vnc"], "127.0.0.1:5901");
    assert_eq!(list[0]["viewer"], viewer_url(UUID, 1));
    assert_eq!(list[1]["uuid"], "<script>alert(1)</script>");
    assert_eq!(list[1]["vnc"], "");
    assert_eq!(heads_json(&[]), "[]");
}

#[test]
fn content_types() {
    for (name, ct) in [
        ("vnc.html", "text/html; charset=utf-8"),
        ("app/ui.js", "text/javascript; charset=utf-8"),
        ("core/x.MJS", "text/javascript; charset=utf-8"),
        ("app/styles/base.css", "text/css; charset=utf-8"),
        ("app/images/a.svg", "image/svg+xml"),
        ("app/images/icons/n.png", "image/png"),
        ("favicon.ico", "image/x-icon"),
        ("app/locale/de.json", "application/json"),
        ("f.woff", "font/woff"),
        ("f.woff2", "font/woff2"),
        ("m.wasm", "application/wasm"),
        ("app/sounds/bell.oga", "audio/ogg"),
        ("README", "application/octet-stream"),
        ("dir.js/README", "application/octet-stream"),
    ] {
        assert_eq!(content_type(name), ct, "{name}");
    }
}

#[test]
fn static_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("app/styles")).unwrap();
    std::fs::write(root.join("vnc.html"), b"<html></html>").unwrap();
    std::fs::write(root.join("app/ui.js"), b"export {};").unwrap();
    // Outside the tree, reached through a symlink the operator put there.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("base.css"), b"body{}").unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("base.css"),
        root.join("app/styles/base.css"),
    )
    .unwrap();
    std::os::unix::fs::symlink("missing", root.join("dangling.js")).unwrap();
    std::os::unix::fs::symlink("app", root.join("applink")).unwrap();

    assert_eq!(
        static_file(root, "vnc.html").unwrap(),
        (b"<html></html>".to_vec(), "text/html; charset=utf-8")
    );
    assert_eq!(
        static_file(root, "app/ui.js").unwrap().1,
        "text/javascript; charset=utf-8"
    );
    assert_eq!(
        static_file(root, "app/styles/base.css").unwrap(),
        (b"body{}".to_vec(), "text/css; charset=utf-8")
    );
    assert_eq!(static_file(root, "applink/ui.js").unwrap().0, b"export {};");

    let err = |rel: &str| static_file(root, rel).unwrap_err();
    assert!(matches!(err("missing.html"), StaticError::NotFound));
    assert!(matches!(err("dangling.js"), StaticError::NotFound));
    assert!(matches!(err("vnc.html/x"), StaticError::NotFound));
    assert!(matches!(err("app"), StaticError::NotAFile));
    assert!(matches!(err("applink"), StaticError::NotAFile));
    assert_eq!(err("app").status(), 404);
    // Paths route() never hands out are refused before touching the file system.
    for bad in [
        "",
        "/etc/passwd",
        "../x",
        "app/../vnc.html",
        "./vnc.html",
        "app//ui.js",
    ] {
        assert!(matches!(err(bad), StaticError::BadPath), "{bad:?}");
    }

    // One byte over the limit, as a sparse file.
    let f = std::fs::File::create(root.join("big.js")).unwrap();
    f.set_len(MAX_STATIC_FILE + 1).unwrap();
    assert!(matches!(
        err("big.js"),
        StaticError::TooLarge(n) if n == MAX_STATIC_FILE + 1
    ));
    assert_eq!(err("big.js").status(), 500);
    f.set_len(MAX_STATIC_FILE).unwrap();
    assert_eq!(
        static_file(root, "big.js").unwrap().0.len() as u64,
        MAX_STATIC_FILE
    );
}

#[test]
fn static_file_does_not_block_on_a_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipe.js");
    let status = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(matches!(
        static_file(dir.path(), "pipe.js"),
        Err(StaticError::NotAFile)
    ));
}

#[test]
fn error_responses_do_not_echo_the_request() {
    let r = parse("GET / HTTP/1.1\r\nHost: h\r\nX: \x7f<script>\r\n\r\n");
    if let Err(e) = r {
        let text = String::from_utf8(error_response(&e)).unwrap();
        assert!(!text.contains("<script>"));
    }
    let text = String::from_utf8(not_found()).unwrap();
    assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
    assert!(text.contains("Connection: close\r\n"));
}

#[test]
fn fuzz_entry_point_takes_anything() {
    fuzz_request(b"");
    fuzz_request(ws_request(&format!("/ws/{UUID}/0"), "").as_bytes());
    fuzz_request(b"GET /novnc/%2e%2e/x?<q> HTTP/1.1\r\nHost: h\r\n\r\n");
    fuzz_request(b"GET /<a>\"b\" HTTP/1.1\r\nHost: h\r\n\r\n");
    fuzz_request(&[0xff; 100]);
    fuzz_request(&vec![b'A'; MAX_REQUEST_HEAD + 10]);
}
