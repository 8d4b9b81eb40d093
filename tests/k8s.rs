//! Kubernetes tier: a spawned `vgpu-emu device-plugin` beside a spawned `vgpu-emu daemon`,
//! driven by a fake kubelet written here with tonic: the Registration service on a temporary
//! `kubelet.sock`, the PodResources service, and a client of every plugin endpoint
//! (ListAndWatch, Allocate), as kubelet has. No cluster: scheduling and pod plumbing (the mounts
//! and variables reaching a container) are kubelet's and the runtime's, not tested here.
//!
//! The daemon needs root and /dev/fuse: `#[ignore]`d so `cargo test` stays quick, and run by the
//! README's full test command (`cargo test --workspace -- --include-ignored`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{vgpu_emu_ok, BIN};
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, Response, Status};
use vgpu_emu::integrate::k8s::kubelet::connect;
use vgpu_emu::integrate::k8s::proto::v1::{
    pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer},
    ContainerDevices, ContainerResources, ListPodResourcesRequest, ListPodResourcesResponse,
    PodResources,
};
use vgpu_emu::integrate::k8s::proto::v1beta1::{
    device_plugin_client::DevicePluginClient,
    registration_server::{Registration, RegistrationServer},
    AllocateRequest, AllocateResponse, ContainerAllocateRequest, Device, Empty, RegisterRequest,
};

const WAIT: Duration = Duration::from_secs(30);

/// Polls `cond` every 50 ms until it holds; panics with `what` after `WAIT`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running daemon on a fresh root; SIGTERM (a clean unmount) on drop.
struct Daemon {
    child: Child,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(parents: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let args: Vec<String> = parents.iter().map(|p| format!("--parent={p}")).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = common::spawn_daemon(&root, &args);
        Daemon {
            child,
            root,
            _dir: dir,
        }
    }

    fn types_dir(&self, parent: &str) -> PathBuf {
        self.root
            .join("sys/class/mdev_bus")
            .join(parent)
            .join("mdev_supported_types")
    }

    /// `available_instances` of every type (by `NAME@VERSION`), summed over the parents.
    fn available(&self) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for p in std::fs::read_dir(self.root.join("sys/class/mdev_bus")).unwrap() {
            let parent = p.unwrap().file_name();
            for t in std::fs::read_dir(self.types_dir(parent.to_str().unwrap())).unwrap() {
                let t = t.unwrap().path();
                let name = std::fs::read_to_string(t.join("name")).unwrap();
                let key = name.trim().trim_end_matches(" (deprecated)").to_string();
                let n: u32 = std::fs::read_to_string(t.join("available_instances"))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                *out.entry(key).or_default() += n;
            }
        }
        out
    }

    /// `vgpu-emu list --json`: UUID -> socket.
    fn instances(&self) -> HashMap<String, String> {
        let out = vgpu_emu_ok(&[
            "list".as_ref(),
            "--json".as_ref(),
            "--root".as_ref(),
            self.root.as_os_str(),
        ]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        list.iter()
            .map(|i| {
                (
                    i["uuid"].as_str().unwrap().to_string(),
                    i["socket"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn remove(&self, uuid: &str) {
        vgpu_emu_ok(&[
            "remove".as_ref(),
            "--root".as_ref(),
            self.root.as_os_str(),
            uuid.as_ref(),
        ]);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        common::terminate(&mut self.child);
    }
}

/// Recorded registrations.
#[derive(Clone, Default)]
struct Registrar {
    seen: Arc<Mutex<Vec<RegisterRequest>>>,
}

#[tonic::async_trait]
impl Registration for Registrar {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        if req.version != "v1beta1" {
            return Err(Status::invalid_argument("unsupported version"));
        }
        self.seen.lock().unwrap().push(req);
        Ok(Response::new(Empty {}))
    }
}

/// The pods the fake kubelet says hold devices.
#[derive(Clone, Default)]
struct Pods {
    pods: Arc<Mutex<Vec<PodResources>>>,
}

#[tonic::async_trait]
impl PodResourcesLister for Pods {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        Ok(Response::new(ListPodResourcesResponse {
            pod_resources: self.pods.lock().unwrap().clone(),
        }))
    }
}

/// A fake kubelet: its own runtime on a thread (the test thread blocks freely), the two
/// services on UNIX sockets in a temporary directory, and watchers of the plugin's endpoints.
struct Kubelet {
    rt: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: tempfile::TempDir,
    registrar: Registrar,
    registration: Option<tokio::task::JoinHandle<()>>,
    pods: Pods,
    /// The last device list of each resource name, as ListAndWatch sent it.
    lists: Arc<Mutex<HashMap<String, Vec<Device>>>>,
    /// How many lists each resource name sent.
    sends: Arc<Mutex<HashMap<String, usize>>>,
}

impl Kubelet {
    fn start() -> Kubelet {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt.block_on(async {
                let _ = stopped.await;
            })
        });
        let mut k = Kubelet {
            rt: handle,
            stop: Some(stop),
            thread: Some(thread),
            dir: tempfile::tempdir().unwrap(),
            registrar: Registrar::default(),
            registration: None,
            pods: Pods::default(),
            lists: Default::default(),
            sends: Default::default(),
        };
        std::fs::create_dir(k.plugins_dir()).unwrap();
        std::fs::create_dir(k.dir.path().join("pod-resources")).unwrap();
        let pods = k.pods.clone();
        let socket = k.pod_resources_socket();
        k.serve(socket, move |s| {
            s.add_service(PodResourcesListerServer::new(pods))
        });
        k.start_registration();
        k
    }

    fn plugins_dir(&self) -> PathBuf {
        self.dir.path().join("device-plugins")
    }

    fn pod_resources_socket(&self) -> PathBuf {
        self.dir.path().join("pod-resources/kubelet.sock")
    }

    /// Runs `f` on the kubelet's runtime and waits for its result.
    fn call<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv_timeout(WAIT)
            .expect("a call to the plugin timed out")
    }

    fn serve(
        &self,
        socket: PathBuf,
        add: impl FnOnce(&mut tonic::transport::Server) -> tonic::transport::server::Router
            + Send
            + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let _ = std::fs::remove_file(&socket);
        let listener = {
            let _enter = self.rt.enter();
            tokio::net::UnixListener::bind(&socket).unwrap()
        };
        self.rt.spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let mut server = tonic::transport::Server::builder();
            add(&mut server)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        })
    }

    fn start_registration(&mut self) {
        let registrar = self.registrar.clone();
        let socket = self.plugins_dir().join("kubelet.sock");
        self.registration = Some(self.serve(socket, move |s| {
            s.add_service(RegistrationServer::new(registrar))
        }));
    }

    /// What kubelet does when it restarts: a new kubelet.sock, the plugins' sockets deleted.
    fn restart(&mut self) {
        if let Some(r) = self.registration.take() {
            r.abort();
        }
        for e in std::fs::read_dir(self.plugins_dir()).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        self.start_registration();
    }

    fn registrations(&self) -> Vec<RegisterRequest> {
        self.registrar.seen.lock().unwrap().clone()
    }

    /// Waits for `n` registrations in all and returns them.
    fn wait_registrations(&self, n: usize) -> Vec<RegisterRequest> {
        wait_for(&format!("{n} registrations"), || {
            self.registrations().len() >= n
        });
        self.registrations()
    }

    /// Opens ListAndWatch on the endpoint of `reg`, keeping its last list in `lists`.
    fn watch(&self, reg: &RegisterRequest) {
        let path = self.plugins_dir().join(&reg.endpoint);
        let name = reg.resource_name.clone();
        let (lists, sends) = (self.lists.clone(), self.sends.clone());
        self.rt.spawn(async move {
            let channel = connect(&path)
                .await
                .expect("connect to the plugin endpoint");
            let mut client = DevicePluginClient::new(channel);
            let mut stream = client
                .list_and_watch(Empty {})
                .await
                .expect("ListAndWatch")
                .into_inner();
            while let Some(Ok(resp)) = stream.next().await {
                lists.lock().unwrap().insert(name.clone(), resp.devices);
                *sends.lock().unwrap().entry(name.clone()).or_default() += 1;
            }
        });
    }

    fn devices(&self, resource: &str) -> Option<Vec<Device>> {
        self.lists.lock().unwrap().get(resource).cloned()
    }

    /// Waits until the list of `resource` satisfies `cond`; returns it.
    fn wait_devices(
        &self,
        resource: &str,
        what: &str,
        cond: impl Fn(&[Device]) -> bool,
    ) -> Vec<Device> {
        wait_for(&format!("{resource}: {what}"), || {
            self.devices(resource).is_some_and(|d| cond(&d))
        });
        self.devices(resource).unwrap()
    }

    fn allocate(
        &self,
        reg: &RegisterRequest,
        containers: &[&[&str]],
    ) -> Result<AllocateResponse, Status> {
        let path = self.plugins_dir().join(&reg.endpoint);
        let req = AllocateRequest {
            container_requests: containers
                .iter()
                .map(|ids| ContainerAllocateRequest {
                    devices_ids: ids.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        };
        self.call(async move {
            let channel = connect(&path)
                .await
                .expect("connect to the plugin endpoint");
            DevicePluginClient::new(channel)
                .allocate(req)
                .await
                .map(Response::into_inner)
        })
    }

    /// Says pod `name` holds `devices` (resource name, device ID).
    fn set_pod(&self, name: &str, devices: &[(&str, &str)]) {
        let mut pods = self.pods.pods.lock().unwrap();
        pods.retain(|p| p.name != name);
        if devices.is_empty() {
            return;
        }
        pods.push(PodResources {
            name: name.into(),
            namespace: "default".into(),
            containers: vec![ContainerResources {
                name: "c".into(),
                devices: devices
                    .iter()
                    .map(|(r, id)| ContainerDevices {
                        resource_name: r.to_string(),
                        device_ids: vec![id.to_string()],
                    })
                    .collect(),
            }],
        });
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running `vgpu-emu device-plugin`; SIGTERM on drop.
struct Plugin {
    child: Child,
}

impl Plugin {
    fn start(d: &Daemon, k: &Kubelet, state: &Path, args: &[&str]) -> Plugin {
        let mut child = Command::new(BIN)
            .arg("device-plugin")
            .arg("--root")
            .arg(&d.root)
            .arg("--kubelet-dir")
            .arg(k.plugins_dir())
            .arg("--pod-resources-socket")
            .arg(k.pod_resources_socket())
            .arg("--state-dir")
            .arg(state)
            .args(["--poll-interval", "0.2", "--reconcile-interval", "0.3"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the device plugin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("vgpu-emu device-plugin: registered"),
            "device plugin: {line:?}"
        );
        Plugin { child }
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "device plugin exited with {status}");
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn by_name<'a>(regs: &'a [RegisterRequest], name: &str) -> &'a RegisterRequest {
    regs.iter()
        .find(|r| r.resource_name == name)
        .unwrap_or_else(|| panic!("{name} not registered"))
}

fn healthy(devices: &[Device]) -> usize {
    devices.iter().filter(|d| d.health == "Healthy").count()
}

fn health_of(devices: &[Device], id: &str) -> Option<String> {
    devices
        .iter()
        .find(|d| d.id == id)
        .map(|d| d.health.clone())
}

/// Every servable type version of the daemon's parents is registered, versioned and bare, each
/// on its own endpoint; each resource lists as many devices as the tree's
/// `available_instances` (summed over parents) says.
#[test]
#[ignore = "needs root and FUSE; run by the README's full test command"]
fn registers_every_type_with_the_daemons_capacity() {
    let d = Daemon::start(&["emu0=emu", "m60-0=m60", "m60-1=m60"]);
    let k = Kubelet::start();
    let state = tempfile::tempdir().unwrap();
    let _p = Plugin::start(&d, &k, state.path(), &[]);
    let available = d.available();
    let want: usize = available.len() * 2;
    let regs = k.wait_registrations(want);
    assert_eq!(regs.len(), want, "{regs:?}");
    for key in available.keys() {
        let (name, version) = key.split_once('@').unwrap();
        for suffix in [format!("{name}.v{version}"), name.to_string()] {
            let r = by_name(&regs, &format!("vgpu-emu.io/{suffix}"));
            assert_eq!(r.version, "v1beta1");
            assert_eq!(r.endpoint, format!("vgpu-emu-{suffix}.sock"));
            assert!(k.plugins_dir().join(&r.endpoint).exists());
            let o = r.options.clone().unwrap_or_default();
            assert!(!o.pre_start_required && !o.get_preferred_allocation_available);
            k.watch(r);
        }
    }
    for (key, n) in &available {
        let (name, version) = key.split_once('@').unwrap();
        for suffix in [format!("{name}.v{version}"), name.to_string()] {
            let res = format!("vgpu-emu.io/{suffix}");
            let list = k.wait_devices(&res, "a device list", |_| true);
            assert_eq!(list.len(), *n as usize, "{res}: {list:?}");
            assert_eq!(healthy(&list), *n as usize);
            let ids: Vec<String> = list.iter().map(|d| d.id.clone()).collect();
            let want: Vec<String> = (0..*n).map(|i| format!("{suffix}-{i}")).collect();
            assert_eq!(ids, want);
        }
    }
    // Two parents of a family: their capacity adds up.
    assert_eq!(available["M60-2Q@1"], 8);
}

/// Allocate makes an instance whose socket is mounted into the container; the device follows
/// the instance's health; the instance goes once no pod holds its device.
#[test]
#[ignore = "needs root and FUSE; run by the README's full test command"]
fn allocate_watch_and_clean_up() {
    let d = Daemon::start(&["m60-0=m60", "m60-1=m60"]);
    let k = Kubelet::start();
    let state = tempfile::tempdir().unwrap();
    let _p = Plugin::start(
        &d,
        &k,
        state.path(),
        &["--types", "M60-2Q,M60-2Q@1", "--grace", "1"],
    );
    let regs = k.wait_registrations(2);
    let bare = by_name(&regs, "vgpu-emu.io/M60-2Q").clone();
    let versioned = by_name(&regs, "vgpu-emu.io/M60-2Q.v1").clone();
    k.watch(&bare);
    k.watch(&versioned);
    k.wait_devices("vgpu-emu.io/M60-2Q", "8 devices", |l| l.len() == 8);

    // Two devices for one container, one for another.
    let resp = k
        .allocate(&bare, &[&["M60-2Q-3", "M60-2Q-0"], &["M60-2Q-5"]])
        .expect("Allocate");
    assert_eq!(resp.container_responses.len(), 2);
    let instances = d.instances();
    assert_eq!(instances.len(), 3);
    let c0 = &resp.container_responses[0];
    assert_eq!(c0.mounts.len(), 2);
    let uuids: Vec<&str> = c0.envs["VGPU_EMU_UUID"].split(',').collect();
    assert_eq!(uuids.len(), 2);
    for (i, m) in c0.mounts.iter().enumerate() {
        assert_eq!(
            m.container_path,
            format!("/var/run/vgpu-emu/M60-2Q/{i}.sock")
        );
        assert!(!m.read_only);
        // The host path is the live instance's socket: a vfio-user client negotiates on it.
        assert_eq!(instances[uuids[i]], m.host_path);
        let client = vfio_user::Client::new(Path::new(&m.host_path))
            .expect("a vfio-user client connects to the mounted socket");
        drop(client);
    }
    assert_eq!(
        c0.envs["VGPU_EMU_SOCKET"],
        "/var/run/vgpu-emu/M60-2Q/0.sock,/var/run/vgpu-emu/M60-2Q/1.sock"
    );
    assert_eq!(c0.envs["VGPU_EMU_TYPE"], "M60-2Q@1,M60-2Q@1");
    assert_eq!(
        c0.envs["VGPU_EMU_M60_2Q_SOCKET"],
        c0.envs["VGPU_EMU_SOCKET"]
    );
    assert_eq!(c0.envs["VGPU_EMU_M60_2Q_UUID"], c0.envs["VGPU_EMU_UUID"]);
    assert_eq!(c0.annotations["vgpu-emu.io/M60-2Q-3"], uuids[0]);
    assert_eq!(c0.annotations["vgpu-emu.io/M60-2Q-0"], uuids[1]);
    let c1 = &resp.container_responses[1];
    assert_eq!(
        c1.mounts[0].container_path,
        "/var/run/vgpu-emu/M60-2Q/0.sock"
    );
    let u5 = c1.envs["VGPU_EMU_UUID"].clone();
    assert!(instances.contains_key(&u5));
    // The same device asked again: the same instance, nothing new.
    let again = k.allocate(&bare, &[&["M60-2Q-5"]]).unwrap();
    assert_eq!(again.container_responses[0].envs["VGPU_EMU_UUID"], u5);
    assert_eq!(d.instances().len(), 3);
    // The instances show in `vgpu-emu list` (above) and their capacity is taken: the versioned
    // resource, which shares it, lists 5 free devices.
    k.wait_devices("vgpu-emu.io/M60-2Q.v1", "5 devices", |l| l.len() == 5);
    assert_eq!(d.available()["M60-2Q@1"], 5);

    // The pods show up in the pod-resources list.
    k.set_pod(
        "a",
        &[
            ("vgpu-emu.io/M60-2Q", "M60-2Q-3"),
            ("vgpu-emu.io/M60-2Q", "M60-2Q-0"),
        ],
    );
    k.set_pod("b", &[("vgpu-emu.io/M60-2Q", "M60-2Q-5")]);

    // An instance removed by hand: its device turns Unhealthy.
    d.remove(&u5);
    k.wait_devices("vgpu-emu.io/M60-2Q", "M60-2Q-5 Unhealthy", |l| {
        health_of(l, "M60-2Q-5").as_deref() == Some("Unhealthy")
    });
    // Held pods keep their instances past the grace period.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.instances().len(), 2);
    // Pod b goes: its (dead) device is forgotten and listed free again.
    k.set_pod("b", &[]);
    k.wait_devices("vgpu-emu.io/M60-2Q", "M60-2Q-5 healthy again", |l| {
        health_of(l, "M60-2Q-5").as_deref() == Some("Healthy")
    });
    // Pod a goes: the plugin removes both its instances.
    k.set_pod("a", &[]);
    wait_for("pod a's instances removed", || d.instances().is_empty());
    k.wait_devices("vgpu-emu.io/M60-2Q", "8 free devices", |l| {
        l.len() == 8 && healthy(l) == 8
    });
    let state_file = std::fs::read_to_string(state.path().join("allocations.json")).unwrap();
    assert!(state_file.contains("\"allocations\": []"), "{state_file}");
}

/// Malformed or impossible Allocate requests get gRPC errors and leave no instance behind.
#[test]
#[ignore = "needs root and FUSE; run by the README's full test command"]
fn bad_allocations_leak_nothing() {
    let d = Daemon::start(&["m60-0=m60"]);
    let k = Kubelet::start();
    let state = tempfile::tempdir().unwrap();
    let _p = Plugin::start(&d, &k, state.path(), &["--types", "M60-8Q,M60-4Q"]);
    let regs = k.wait_registrations(2);
    let r8 = by_name(&regs, "vgpu-emu.io/M60-8Q").clone();
    let r4 = by_name(&regs, "vgpu-emu.io/M60-4Q").clone();
    k.watch(&r8);
    k.watch(&r4);
    k.wait_devices("vgpu-emu.io/M60-4Q", "2 devices", |l| l.len() == 2);
    let code = |r: Result<AllocateResponse, Status>| r.unwrap_err().code();
    assert_eq!(code(k.allocate(&r4, &[])), Code::InvalidArgument);
    assert_eq!(code(k.allocate(&r4, &[&[]])), Code::InvalidArgument);
    assert_eq!(
        code(k.allocate(&r4, &[&["M60-4Q-9"]])),
        Code::InvalidArgument
    );
    assert_eq!(
        code(k.allocate(&r4, &[&["M60-8Q-0"]])),
        Code::InvalidArgument
    );
    assert_eq!(
        code(k.allocate(&r4, &[&["M60-4Q-0"], &["M60-4Q-0"]])),
        Code::InvalidArgument
    );
    assert_eq!(
        code(k.allocate(&r4, &[&["M60-4Q-0", "M60-4Q-1", "M60-4Q-2"]])),
        Code::ResourceExhausted
    );
    let many: Vec<String> = (0..300).map(|n| format!("M60-4Q-{n}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(code(k.allocate(&r4, &[&many])), Code::InvalidArgument);
    assert!(d.instances().is_empty());
    // Capacity is shared: one 8Q takes the whole parent, so the 4Q devices still listed
    // (until the next poll) cannot be had: RESOURCE_EXHAUSTED, nothing created.
    k.allocate(&r8, &[&["M60-8Q-0"]]).expect("Allocate an 8Q");
    assert_eq!(d.instances().len(), 1);
    let r = k.allocate(&r4, &[&["M60-4Q-0"]]);
    assert!(
        matches!(&r, Err(s) if matches!(s.code(), Code::ResourceExhausted | Code::InvalidArgument)),
        "{r:?}"
    );
    assert_eq!(d.instances().len(), 1);
    k.wait_devices("vgpu-emu.io/M60-4Q", "no 4Q device", <[Device]>::is_empty);
}

/// kubelet restarting (a new kubelet.sock, the plugin sockets deleted): the plugin registers
/// again on new endpoints, which serve the same devices.
#[test]
#[ignore = "needs root and FUSE; run by the README's full test command"]
fn registers_again_when_kubelet_restarts() {
    let d = Daemon::start(&["emu0=emu"]);
    let mut k = Kubelet::start();
    let state = tempfile::tempdir().unwrap();
    let _p = Plugin::start(&d, &k, state.path(), &["--types", "EMU-1G@1"]);
    let regs = k.wait_registrations(1);
    assert_eq!(regs[0].resource_name, "vgpu-emu.io/EMU-1G.v1");
    k.restart();
    assert!(!k.plugins_dir().join(&regs[0].endpoint).exists());
    let regs = k.wait_registrations(2);
    assert_eq!(regs[1], regs[0]);
    wait_for("the endpoint socket again", || {
        k.plugins_dir().join(&regs[1].endpoint).exists()
    });
    k.watch(&regs[1]);
    k.wait_devices("vgpu-emu.io/EMU-1G.v1", "4 devices", |l| l.len() == 4);
    // Only the kubelet socket replaced (the plugin's left in place) is a restart too.
    let registration = k.registration.take().unwrap();
    registration.abort();
    k.start_registration();
    k.wait_registrations(3);
}

/// A plugin restart keeps the instances pods hold (same device IDs) and removes the ones
/// it created that no pod holds.
#[test]
#[ignore = "needs root and FUSE; run by the README's full test command"]
fn restart_removes_stale_instances() {
    let d = Daemon::start(&["emu0=emu"]);
    let k = Kubelet::start();
    let state = tempfile::tempdir().unwrap();
    // A long grace: this run removes nothing.
    let p = Plugin::start(
        &d,
        &k,
        state.path(),
        &["--types", "EMU-1G", "--grace", "3600"],
    );
    let regs = k.wait_registrations(1);
    let r = regs[0].clone();
    let resp = k.allocate(&r, &[&["EMU-1G-0"], &["EMU-1G-1"]]).unwrap();
    let held = resp.container_responses[0].envs["VGPU_EMU_UUID"].clone();
    let stale = resp.container_responses[1].envs["VGPU_EMU_UUID"].clone();
    // An instance someone else made: never the plugin's to remove.
    let foreign = "00000000-0000-4000-8000-00000000f00d";
    vgpu_emu_ok(&[
        "create".as_ref(),
        "--root".as_ref(),
        d.root.as_os_str(),
        "--parent".as_ref(),
        "emu0".as_ref(),
        "--type".as_ref(),
        "EMU-1G".as_ref(),
        "--uuid".as_ref(),
        foreign.as_ref(),
    ]);
    k.set_pod("a", &[("vgpu-emu.io/EMU-1G", "EMU-1G-0")]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(d.instances().len(), 3);
    p.stop();
    assert!(
        !k.plugins_dir().join(&r.endpoint).exists(),
        "a stopped plugin deletes its endpoint"
    );
    assert_eq!(
        d.instances().len(),
        3,
        "a stopped plugin leaves instances to their pods"
    );

    let _p = Plugin::start(&d, &k, state.path(), &["--types", "EMU-1G", "--grace", "0"]);
    // Removed at start, before registering.
    let left = d.instances();
    assert!(!left.contains_key(&stale), "{left:?}");
    assert!(
        left.contains_key(&held) && left.contains_key(foreign),
        "{left:?}"
    );
    let regs = k.wait_registrations(2);
    k.watch(&regs[1]);
    let list = k.wait_devices("vgpu-emu.io/EMU-1G", "the held device", |l| {
        health_of(l, "EMU-1G-0").as_deref() == Some("Healthy")
    });
    // 4 GiB: the held and the foreign instance leave two free.
    assert_eq!(list.len(), 3, "{list:?}");
    let again = k.allocate(&regs[1], &[&["EMU-1G-0"]]).unwrap();
    assert_eq!(again.container_responses[0].envs["VGPU_EMU_UUID"], held);
}
