//! The browser tier's client: headless Chromium (from `qemu-scripts/provision-browser`) driven
//! over the Chrome DevTools Protocol, blocking, for tests.
//!
//! [`Browser::launch`] starts Chromium with a fresh profile and a DevTools port it picks itself;
//! [`Browser::open`] makes a page (a target of its own, with its own DevTools websocket), which
//! evaluates scripts, waits for conditions and reads back canvases and screenshots. Every wait is
//! bounded, and a failure panics with the end of Chromium's log. Dropping the browser kills
//! Chromium's whole process group and removes the profile.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Chromium may take to come up (the first start builds font caches).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a navigation may take to load.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The last lines of Chromium's log at `path`, without the noise of a machine that has no
/// D-Bus session.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains("dbus/")).collect();
    let start = lines.len().saturating_sub(30);
    lines[start..].join("\n")
}

/// A headless Chromium, killed (with every process it started) on drop.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    /// Chromium's HOME: holds `profile/` (the user data dir), `chromium.log` (its stdout and
    /// stderr) and whatever else it writes.
    dir: tempfile::TempDir,
    port: u16,
    novnc: PathBuf,
    /// The connection to the browser target (for `Target.*`).
    cdp: Cdp,
}

impl Browser {
    /// Provisions Chromium and noVNC (once; see `qemu-scripts/provision-browser`) and starts
    /// Chromium headless on a fresh profile.
    pub fn launch() -> Browser {
        let field = super::provisioned("provision-browser");
        let chromium = field("chromium");
        let novnc = field("novnc");

        let dir = tempfile::Builder::new()
            .prefix("vgpu-browser-")
            .tempdir()
            .expect("temp dir for Chromium");
        let profile = dir.path().join("profile");
        let log_path = dir.path().join("chromium.log");
        let log = std::fs::File::create(&log_path).expect("Chromium's log file");
        let mut child = Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-default-apps",
                "--disable-sync",
                "--no-proxy-server",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,1024",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            // Chromium keeps crash reports, keys and settings under HOME: the temp dir, too.
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path().join(".config"))
            .env("XDG_CACHE_HOME", dir.path().join(".cache"))
            .env("XDG_DATA_HOME", dir.path().join(".local/share"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("Chromium's log file"))
            .stderr(log)
            // A group of its own, so that drop can end every process Chromium starts.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", chromium.display()));

        // Chromium writes the port it listens on, then the browser target's path.
        let active = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        let (port, path) = loop {
            if let Ok(text) = std::fs::read_to_string(&active) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    if let Ok(port) = port.trim().parse::<u16>() {
                        break (port, path.trim().to_string());
                    }
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "Chromium ({}) exited before it listened: {status}\n{}",
                    chromium.display(),
                    log_tail(&log_path)
                );
            }
            if Instant::now() >= deadline {
                kill_group(&mut child);
                panic!(
                    "Chromium ({}) wrote no {} within {LAUNCH_TIMEOUT:?}\n{}",
                    chromium.display(),
                    active.display(),
                    log_tail(&log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let cdp = match Cdp::connect(&format!("ws://127.0.0.1:{port}{path}"), &log_path) {
            Ok(cdp) => cdp,
            Err(e) => {
                kill_group(&mut child);
                panic!("{e}\n{}", log_tail(&log_path));
            }
        };
        Browser {
            child,
            dir,
            port,
            novnc,
            cdp,
        }
    }

    /// The provisioned noVNC web client: a directory holding `vnc.html`, `app/`, `core/` and
    /// `vendor/`.
    pub fn novnc_dir(&self) -> PathBuf {
        self.novnc.clone()
    }

    /// The DevTools port Chromium listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir that holds everything Chromium writes (its HOME, with the user data dir
    /// `profile/` and the log `chromium.log`); removed on drop.
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The end of Chromium's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("chromium.log")
    }

    /// The ids of the browser's open pages.
    pub fn page_ids(&self) -> Vec<String> {
        let list = http_get_json(self.port, "/json/list")
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()));
        list.as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["type"] == "page")
            .filter_map(|t| t["id"].as_str().map(str::to_string))
            .collect()
    }

    /// Opens a new page (a target of its own) and loads `url` in it.
    pub fn open(&mut self, url: &str) -> Page {
        let created = self
            .cdp
            .call("Target.createTarget", json!({ "url": "about:blank" }));
        let id = created["targetId"]
            .as_str()
            .unwrap_or_else(|| panic!("Target.createTarget answered {created}"))
            .to_string();
        let deadline = Instant::now() + CALL_TIMEOUT;
        let ws = loop {
            let list = http_get_json(self.port, "/json/list")
                .unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()));
            let found = list
                .as_array()
                .and_then(|targets| targets.iter().find(|t| t["id"] == id.as_str()))
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                .map(str::to_string);
            if let Some(ws) = found {
                break ws;
            }
            assert!(
                Instant::now() < deadline,
                "target {id} is not in /json/list: {list}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let cdp = Cdp::connect(&ws, &self.log_path())
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()));
        let mut page = Page { cdp, id };
        page.cdp.call("Page.enable", json!({}));
        page.cdp
            .call("Page.setLifecycleEventsEnabled", json!({ "enabled": true }));
        page.navigate(url);
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        // Chromium's crash handler runs in a session of its own; it names the temp dir (its
        // database is there) and ends with Chromium: wait for it, kill it if it lingers.
        let home = self.dir.path().display().to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = processes_naming(&home);
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for pid in left {
                    // SAFETY: kill(2) takes plain integers and touches no memory of this
                    // process.
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Live processes whose command line names `needle` (a browser's temp dir, say).
pub fn processes_naming(needle: &str) -> Vec<u32> {
    super::processes_where(|proc| {
        std::fs::read(proc.join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
    })
}

/// Kills the process group led by `child` (Chromium and every process it started) and reaps
/// `child`.
fn kill_group(child: &mut Child) {
    let pgid = child.id() as libc::pid_t;
    // SAFETY: kill(2) takes plain integers and touches no memory of this process; the group is
    // the one Chromium was started in (`process_group(0)`), led by a child not yet reaped, so its
    // id cannot have been reused.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// One page of the browser, with its own DevTools connection.
#[derive(Debug)]
pub struct Page {
    cdp: Cdp,
    id: String,
}

impl Page {
    /// The page's target id.
    pub fn target_id(&self) -> &str {
        &self.id
    }

    /// Loads `url` and waits for the load event of the document it makes (a navigation within
    /// the document, to a `#fragment`, does not wait).
    pub fn navigate(&mut self, url: &str) {
        let r = self.cdp.call("Page.navigate", json!({ "url": url }));
        if let Some(err) = r.get("errorText").and_then(Value::as_str) {
            panic!("navigate to {url}: {err}\n{}", self.cdp.log_tail());
        }
        let Some(loader) = r.get("loaderId").and_then(Value::as_str) else {
            return;
        };
        let loader = loader.to_string();
        self.cdp
            .wait_event(LOAD_TIMEOUT, |e| {
                e["method"] == "Page.lifecycleEvent"
                    && e["params"]["name"] == "load"
                    && e["params"]["loaderId"] == loader.as_str()
            })
            .unwrap_or_else(|e| panic!("navigate to {url}: {e}\n{}", self.cdp.log_tail()));
    }

    /// Evaluates `js` in the page (awaiting a promise it returns) and returns its value as JSON
    /// (`null` for `undefined`). Panics if it throws.
    pub fn eval(&mut self, js: &str) -> Value {
        self.try_eval(js)
            .unwrap_or_else(|e| panic!("eval {js:?}: {e}\n{}", self.cdp.log_tail()))
    }

    /// Like [`Page::eval`], with a thrown exception (or a failed call) as the error.
    pub fn try_eval(&mut self, js: &str) -> Result<Value, String> {
        let r = self.cdp.try_call(
            "Runtime.evaluate",
            json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
            CALL_TIMEOUT,
        )?;
        if let Some(ex) = r.get("exceptionDetails") {
            let text = ex["exception"]["description"]
                .as_str()
                .or_else(|| ex["text"].as_str())
                .unwrap_or("an exception");
            return Err(format!("threw {text}"));
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Polls the JavaScript expression `cond` until it is truthy; panics (with the last error,
    /// if it threw) if it is not within `timeout`.
    pub fn wait_for(&mut self, cond: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let probe = format!("!!({cond})");
        loop {
            let last = match self.try_eval(&probe) {
                Ok(Value::Bool(true)) => return,
                Ok(v) => format!("it was {v}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {cond:?} ({last})\n{}",
                    self.cdp.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sets the page's viewport to `width`x`height` CSS pixels at a device scale of 1.
    pub fn set_viewport(&mut self, width: u32, height: u32) {
        self.cdp.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
    }

    /// The pixel buffer (not the CSS box) of the `<canvas>` that `selector` picks, as its width,
    /// height and packed RGB rows (alpha dropped).
    pub fn canvas_rgb(&mut self, selector: &str) -> (u32, u32, Vec<u8>) {
        let sel = serde_json::to_string(selector).unwrap();
        let js = format!(
            "(() => {{ const c = document.querySelector({sel}); \
             if (!c) return 'no element matches'; \
             if (!(c instanceof HTMLCanvasElement)) return 'not a canvas: ' + c.tagName; \
             return c.toDataURL('image/png'); }})()"
        );
        let v = self.eval(&js);
        let url = v.as_str().unwrap_or_default();
        let b64 = url
            .strip_prefix("data:image/png;base64,")
            .unwrap_or_else(|| panic!("canvas {selector:?}: {}", truncate(&v.to_string())));
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_else(|e| panic!("canvas {selector:?}: bad base64: {e}"));
        vgpu_emu::display::decode_png_rgb(&png)
            .unwrap_or_else(|e| panic!("canvas {selector:?}: bad PNG: {e}"))
    }

    /// Waits until noVNC's canvas holds exactly `want()` (width, height, RGB; asked again on
    /// each try, for a screen that may still change); the panic says how far it was.
    pub fn wait_novnc_shows(
        &mut self,
        mut want: impl FnMut() -> (u32, u32, Vec<u8>),
        timeout: Duration,
        what: &str,
    ) {
        const CANVAS: &str = "#noVNC_container canvas";
        let end = Instant::now() + timeout;
        loop {
            let w = want();
            let got = self.canvas_rgb_or_none(CANVAS);
            if got.as_ref() == Some(&w) {
                return;
            }
            if Instant::now() >= end {
                let why = match got {
                    None => "no canvas yet".to_string(),
                    Some(g) if (g.0, g.1) != (w.0, w.1) => {
                        format!("canvas {}x{}, want {}x{}", g.0, g.1, w.0, w.1)
                    }
                    Some(g) => format!(
                        "{} pixels differ",
                        g.2.chunks_exact(3)
                            .zip(w.2.chunks_exact(3))
                            .filter(|(a, b)| a != b)
                            .count()
                    ),
                };
                panic!(
                    "{what}: noVNC's canvas after {timeout:?}: {why}\n{}",
                    self.cdp.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Like [`Page::canvas_rgb`], `None` while no element matches.
    fn canvas_rgb_or_none(&mut self, selector: &str) -> Option<(u32, u32, Vec<u8>)> {
        let sel = serde_json::to_string(selector).unwrap();
        let present = self.eval(&format!("!!document.querySelector({sel})"));
        (present == Value::Bool(true)).then(|| self.canvas_rgb(selector))
    }

    /// A PNG screenshot of the page's viewport.
    pub fn screenshot_png(&mut self) -> Vec<u8> {
        let r = self
            .cdp
            .call("Page.captureScreenshot", json!({ "format": "png" }));
        let data = r["data"].as_str().unwrap_or_else(|| {
            panic!(
                "Page.captureScreenshot answered {}",
                truncate(&r.to_string())
            )
        });
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap_or_else(|e| panic!("screenshot: bad base64: {e}"))
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // Close the page; no answer is awaited (the browser may be gone already).
        let id = self.cdp.next_id;
        let msg = json!({ "id": id, "method": "Page.close", "params": {} });
        let _ = self.cdp.ws.send(Message::text(msg.to_string()));
        let _ = self.cdp.ws.close(None);
        let _ = self.cdp.ws.flush();
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// `GET path` from Chromium's DevTools HTTP endpoint, as JSON.
fn http_get_json(port: u16, path: &str) -> Result<Value, String> {
    let what = format!("GET http://127.0.0.1:{port}{path}");
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("{what}: {e}"))?;
    s.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(CALL_TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{what}: {e}"))?;
    // Chromium keeps the connection open: read the head, then Content-Length bytes.
    let mut resp = Vec::new();
    let mut buf = [0u8; 16384];
    let mut body_len = None;
    loop {
        if body_len.is_none() {
            if let Some(end) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&resp[..end]).to_string();
                if !head.starts_with("HTTP/1.1 200") {
                    return Err(format!("{what}: {}", head.lines().next().unwrap_or("")));
                }
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .ok_or_else(|| format!("{what}: no Content-Length in {head:?}"))?;
                resp.drain(..end + 4);
                body_len = Some(len);
            }
        }
        if let Some(len) = body_len {
            if resp.len() >= len {
                resp.truncate(len);
                break;
            }
        }
        let n = s.read(&mut buf).map_err(|e| format!("{what}: {e}"))?;
        if n == 0 {
            return Err(format!("{what}: the connection closed early"));
        }
        resp.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&resp);
    serde_json::from_str(&body).map_err(|e| format!("{what}: {e} in {body:?}"))
}

/// One DevTools websocket: numbered calls, events kept until asked for.
struct Cdp {
    ws: WebSocket<TcpStream>,
    next_id: u64,
    events: VecDeque<Value>,
    log: PathBuf,
}

impl std::fmt::Debug for Cdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cdp")
            .field("next_id", &self.next_id)
            .finish()
    }
}

impl Cdp {
    fn connect(url: &str, log: &Path) -> Result<Cdp, String> {
        let addr = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .ok_or_else(|| format!("not a ws:// URL: {url}"))?;
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect {url}: {e}"))?;
        stream.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(CALL_TIMEOUT)).unwrap();
        // Screenshots and canvases come as one base64 message: allow large ones.
        let config = WebSocketConfig::default()
            .max_message_size(Some(256 << 20))
            .max_frame_size(Some(256 << 20));
        let (ws, _) = tungstenite::client::client_with_config(url, stream, Some(config))
            .map_err(|e| format!("DevTools handshake with {url}: {e}"))?;
        Ok(Cdp {
            ws,
            next_id: 1,
            events: VecDeque::new(),
            log: log.to_path_buf(),
        })
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Calls `method`; panics if it fails.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params, CALL_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()))
    }

    /// Calls `method` and waits (at most `timeout`) for its answer, keeping the events that
    /// come before it.
    fn try_call(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::text(msg.to_string()))
            .map_err(|e| format!("send {method}: {e}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.read(deadline).map_err(|e| format!("{method}: {e}"))?;
            if m["id"] == id {
                if let Some(err) = m.get("error") {
                    return Err(format!("{method} failed: {err}"));
                }
                return Ok(m.get("result").cloned().unwrap_or(Value::Null));
            }
            if m.get("method").is_some() {
                self.keep(m);
            }
        }
    }

    /// Keeps an event for [`Cdp::wait_event`], the latest few hundred only.
    fn keep(&mut self, event: Value) {
        if self.events.len() >= 500 {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Waits (at most `timeout`) for an event that `wanted` picks, dropping the events before
    /// it.
    fn wait_event(
        &mut self,
        timeout: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(e) = self.events.pop_front() {
                if wanted(&e) {
                    return Ok(e);
                }
            }
            let m = self
                .read(deadline)
                .map_err(|e| format!("waiting for the load event: {e}"))?;
            if m.get("method").is_some() {
                self.events.push_back(m);
            }
        }
    }

    /// The next JSON message, read before `deadline`.
    fn read(&mut self, deadline: Instant) -> Result<Value, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out".into());
            }
            self.ws.get_ref().set_read_timeout(Some(left)).unwrap();
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return serde_json::from_str(t.as_str())
                        .map_err(|e| format!("bad DevTools message: {e}"))
                }
                Ok(Message::Close(c)) => return Err(format!("DevTools closed the socket: {c:?}")),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(format!("DevTools socket: {e}")),
            }
        }
    }
}
