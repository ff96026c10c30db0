//! The agent process: loads the programs once, adopts what is pinned, then serves the API on its
//! unix socket and /healthz, /readyz and /metrics over HTTP until SIGTERM or SIGINT.
//!
//! Stopping leaves every pin in place, so enrolled pods stay captured while no agent runs and
//! the next agent adopts them; only `redirector uninstall` removes them.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    future::IntoFuture as _,
    io::{self, IsTerminal as _},
    net::SocketAddr,
    os::unix::{
        fs::OpenOptionsExt as _,
        fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
        net::UnixListener as StdUnixListener,
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
    sys::stat::{umask, Mode},
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{watch, Semaphore},
    task::JoinSet,
};

use super::{
    addrwatch::{AddressWatch, Event, Followed},
    api::{
        beside, parse_request_line, ready_marker, AgentReport, ApiError, CniOutcome, CollectedPod,
        EnrollRequest, Envelope, ErrorKind, PodRef, ReconcileReport, Reply, Request, Response,
        StatusQuery, MAX_REQUEST_BYTES,
    },
    config::{AgentConfig, AgentFlags, ConfigError, LogFormat, NodeFlags},
    evidence::{Filesystem, PodSource},
    metrics::{self, Metrics},
    node::{Node, NodeError},
    reconcile::Suspects,
    runtime::{Cri, RuntimeSource},
    store::PodMeta,
};
use crate::{
    cni::install::{self, plugin_entry, Chained, Installation},
    loader::{Programs, UpgradeReport},
};

/// How long stopping waits for requests in progress.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send its request line: the CLI and the CNI plugin write it at
/// once, so only a stalled peer takes longer, and it must not hold a connection slot for long.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reply may wait for its client to take it (the request is carried out whatever).
const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// API connections served at once. Those past it are answered `busy` and closed at once (the
/// client retries), so a flood of connections costs neither memory nor a queue.
const MAX_CONNECTIONS: usize = 64;
/// How many collected pods the status keeps (the oldest are dropped first).
const COLLECTED_KEPT: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("API socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("API socket {path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("metrics address {addr}: {source}")]
    Metrics { addr: SocketAddr, source: io::Error },
    #[error("starting the async runtime: {0}")]
    Runtime(io::Error),
    #[error("loading the programs and adopting pinned state: {0}")]
    Startup(#[source] NodeError),
    #[error("the startup task failed: {0}")]
    StartupTask(#[from] tokio::task::JoinError),
}

/// Module paths of the programs' log lines (the eBPF binary is named `redirector`).
const KERNEL_LOG_TARGETS: [&str; 3] = [
    "redirector::connect",
    "redirector::sockops",
    "redirector::sockopt",
];

/// `redirector agent`: settings from the config file and flags, logging, then [`run`].
pub fn main(node: &NodeFlags, flags: &AgentFlags) -> Result<(), AgentError> {
    let config = AgentConfig::resolve(node, flags)?;
    init_logging(config.log_format, config.log_connections);
    tracing::info!(?config, "starting");
    run(config)
}

/// The log filter: RUST_LOG's directives (info when unset), plus the programs' own lines at
/// debug when `kernel_lines`, so that neither setting cancels the other.
pub fn log_filter(rust_log: Option<&str>, kernel_lines: bool) -> String {
    let mut filter = rust_log
        .map(str::trim)
        .filter(|directives| !directives.is_empty())
        .unwrap_or("info")
        .to_owned();
    if kernel_lines {
        KERNEL_LOG_TARGETS
            .iter()
            .for_each(|target| filter.push_str(&format!(",{target}=debug")));
    }
    filter
}

/// Logs go to stderr as [`log_filter`] says.
pub fn init_logging(format: LogFormat, kernel_lines: bool) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let directives = log_filter(rust_log.as_deref(), kernel_lines);
    let filter = tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|error| {
        eprintln!("RUST_LOG={rust_log:?}: {error}; logging at info");
        tracing_subscriber::EnvFilter::new(log_filter(None, kernel_lines))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        // Colours only for a person at a terminal: `kubectl logs` and files show escapes raw.
        .with_ansi(io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(config: AgentConfig) -> Result<(), AgentError> {
    // Before the runtime's threads exist.
    super::descriptors::prepare();
    // Held until this process exits: the socket is ours to bind and, at exit, to remove.
    let _owner = own_socket(&config.node.socket)?;
    let socket = bind_socket(&config.node.socket)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let socket_path = config.node.socket.clone();
    let result = runtime.block_on(serve(config, socket));
    // Requests still running finish before the runtime is gone (blocking tasks are waited for).
    drop(runtime);
    if let Err(error) = fs::remove_file(&socket_path) {
        tracing::warn!(socket = %socket_path.display(), %error, "removing the API socket");
    }
    result
}

/// Takes the lock beside the socket (`<socket>.lock`), waiting while another agent holds it:
/// during a rolling update the new agent starts while the old one still serves, and neither
/// may remove the other's socket. Only the lock's holder binds or removes the socket.
fn own_socket(path: &Path) -> Result<Flock<fs::File>, AgentError> {
    let io_error = |source| AgentError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_error)?;
    }
    let lock_path = beside(path, ".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_error)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, Errno::EWOULDBLOCK)) => {
            tracing::info!(lock = %lock_path.display(), "another agent serves on this socket; waiting for it to stop");
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| io_error(errno.into()))
        }
        Err((_, errno)) => Err(io_error(errno.into())),
    }
}

/// Binds the API socket, root-only (mode 0600 from the start), replacing a stale socket file
/// (the caller holds the socket's lock, so no live agent serves there).
fn bind_socket(path: &Path) -> Result<StdUnixListener, AgentError> {
    let io_error = |source| AgentError::Socket {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(metadata) if !metadata.file_type().is_socket() => {
            return Err(AgentError::NotASocket {
                path: path.to_owned(),
            })
        }
        Ok(_) => fs::remove_file(path).map_err(io_error)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(e)),
    }
    // Still single-threaded here, so the umask change affects nothing else.
    let previous = umask(Mode::from_bits_truncate(0o177));
    let bound = StdUnixListener::bind(path);
    umask(previous);
    let listener = bound.map_err(io_error)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_error)?;
    listener.set_nonblocking(true).map_err(io_error)?;
    Ok(listener)
}

/// The agent's shared state.
struct Agent {
    config: AgentConfig,
    node: Node,
    /// Changes to the node run one at a time (reads take no lock).
    operations: Mutex<()>,
    ready: AtomicBool,
    startup: Mutex<Option<ReconcileReport>>,
    collected_since: Mutex<Vec<CollectedPod>>,
    /// Which pods exist (see [`PodSource`]).
    source: Box<dyn PodSource>,
    suspects: Mutex<Suspects>,
    reconcile_error: Mutex<Option<String>>,
    in_flight: InFlight,
    metrics: Metrics,
    /// With `chain_cni`: whether redirector-cni is chained in the runtime's network config.
    chained: AtomicBool,
    /// Pinned programs of another build this agent replaced when it started.
    upgrade: Mutex<Option<UpgradeReport>>,
    expired_handshakes: AtomicU64,
    /// The address watch of each enrolled pod with a netns, by cgroup id. Changed with
    /// `operations` held (taken first), as are the pods.
    watches: Mutex<HashMap<u64, AddressWatch>>,
    enrolled_from_runtime: AtomicU64,
    /// Whether a removal of departed pods' policy sets is scheduled ([`Agent::sweep_soon`]).
    sweep_scheduled: AtomicBool,
}

/// A mutex's guard, also after a thread panicked holding it (what it guards stays usable).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Requests and passes in progress, with when they started: /healthz fails while one has run
/// longer than the deadline (a wedged agent, e.g. an open that never returns).
#[derive(Default)]
struct InFlight {
    next: AtomicU64,
    running: Mutex<BTreeMap<u64, (&'static str, Instant)>>,
}

struct Running<'a> {
    in_flight: &'a InFlight,
    id: u64,
}

impl InFlight {
    fn track(&self, name: &'static str) -> Running<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.running).insert(id, (name, Instant::now()));
        Running {
            in_flight: self,
            id,
        }
    }

    /// Those running longer than `deadline`, described.
    fn stuck(&self, deadline: Duration) -> Vec<String> {
        lock(&self.running)
            .values()
            .filter(|(_, started)| started.elapsed() > deadline)
            .map(|(name, started)| format!("{name} running for {}s", started.elapsed().as_secs()))
            .collect()
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        lock(&self.in_flight.running).remove(&self.id);
    }
}

/// How long the startup waits between its two reconcile passes (a pod is only collected when
/// seen gone twice).
const CONFIRM_DELAY: Duration = Duration::from_secs(2);

/// The source of truth about which pods exist: the container runtime when its socket is
/// configured, the node's files otherwise. Called on the agent's tokio runtime.
fn pod_source(config: &AgentConfig) -> Box<dyn PodSource> {
    let files = Filesystem {
        cgroup_root: config.node.cgroup_root.clone(),
    };
    match &config.runtime_endpoint {
        Some(socket) => Box::new(RuntimeSource::new(
            Cri {
                socket: socket.clone(),
                cgroup_root: config.node.cgroup_root.clone(),
                handle: tokio::runtime::Handle::current(),
            },
            files,
            Installation::plugin_config(&config.node),
        )),
        None => Box::new(files),
    }
}

impl Agent {
    fn new(config: AgentConfig) -> Self {
        Self {
            node: config.node.node(),
            source: pod_source(&config),
            config,
            operations: Mutex::new(()),
            ready: AtomicBool::new(false),
            startup: Mutex::new(None),
            collected_since: Mutex::new(Vec::new()),
            upgrade: Mutex::new(None),
            expired_handshakes: AtomicU64::new(0),
            enrolled_from_runtime: AtomicU64::new(0),
            suspects: Mutex::default(),
            reconcile_error: Mutex::new(None),
            in_flight: InFlight::default(),
            metrics: Metrics::default(),
            chained: AtomicBool::new(false),
            watches: Mutex::default(),
            sweep_scheduled: AtomicBool::new(false),
        }
    }

    /// Ready for new pods: programs loaded, state reconciled, and (with `chain_cni`) chained.
    fn serves_new_pods(&self) -> bool {
        self.is_ready() && (!self.config.chain_cni || self.chained.load(Ordering::Acquire))
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn report(&self) -> AgentReport {
        AgentReport {
            ready: self.is_ready(),
            reconcile_error: lock(&self.reconcile_error).clone(),
            suspected: lock(&self.suspects).len(),
            stuck: self.in_flight.stuck(self.config.operation_deadline),
            startup: lock(&self.startup).clone(),
            collected_since: lock(&self.collected_since).clone(),
            cni: self.metrics.cni_counts(),
            upgrade: *lock(&self.upgrade),
            expired_handshakes: self.expired_handshakes.load(Ordering::Relaxed),
            address_follow_failures: self.metrics.address_follow_failures(),
            enrolled_from_runtime: self.enrolled_from_runtime.load(Ordering::Relaxed),
        }
    }

    /// A pod the CNI plugin did not enroll: logged here, where the operator looks, and counted.
    fn note_cni_outcome(&self, outcome: &CniOutcome) {
        let pod = outcome
            .pod
            .as_ref()
            .map(|p| format!("{}/{}", p.namespace, p.name));
        let reason = outcome.reason;
        if reason.fails_add() {
            tracing::warn!(
                ?pod,
                reason = reason.name(),
                why = reason.describe(),
                "CNI ADD failed"
            );
        } else {
            tracing::info!(
                ?pod,
                reason = reason.name(),
                why = reason.describe(),
                "CNI passed a pod through uncaptured"
            );
        }
        self.metrics.count_cni_outcome(reason);
    }

    /// Loads the programs (unless pinned), carries out pending CNI DELs, adopts what is pinned
    /// (two reconcile passes apart), then reports ready, also to the CNI plugin's STATUS (a
    /// marker beside the socket that lasts until reboot).
    fn start(self: &Arc<Self>) -> Result<(), NodeError> {
        let _running = self.in_flight.track("startup");
        {
            let _one_at_a_time = lock(&self.operations);
            if let Some(upgrade) = self.node.install()? {
                self.metrics.count_upgrade(&upgrade);
                *lock(&self.upgrade) = Some(upgrade);
            }
            if self.config.log_connections {
                self.node.set_connection_logging(true)?;
            }
            // Sets an earlier agent left when it stopped before removing them.
            self.node.remove_unused_sets()?;
        }
        let first = self.reconcile_pass();
        std::thread::sleep(CONFIRM_DELAY);
        let mut report = self.reconcile_pass().unwrap_or_default();
        // The second pass adopts what the first enrolled from the runtime: say how they came.
        if let Some(first) = first {
            report.enrolled.splice(0..0, first.enrolled);
        }
        for pod in &report.adopted {
            tracing::info!(cgroup_id = pod.cgroup_id, cgroup = ?pod.cgroup, pod = ?pod.pod, "adopted pod");
        }
        tracing::info!(
            adopted = report.adopted.len(),
            collected = report.collected.len(),
            enrolled_from_runtime = report.enrolled.len(),
            "reconciled with the pinned state; ready"
        );
        *lock(&self.startup) = Some(report);
        let marker = ready_marker(&self.config.node.socket);
        if let Err(error) = fs::write(&marker, format!("{}\n", std::process::id())) {
            tracing::warn!(marker = %marker.display(), %error, "writing the ready marker for the CNI plugin's STATUS");
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    fn note_collected(&self, collected: &[CollectedPod]) {
        for pod in collected {
            tracing::info!(cgroup_id = pod.pod.cgroup_id, cgroup = ?pod.pod.cgroup, pod = ?pod.pod.pod, reason = ?pod.reason, "collected pod");
        }
        self.metrics.count_collected(collected.len());
        let mut kept = lock(&self.collected_since);
        kept.extend_from_slice(collected);
        let excess = kept.len().saturating_sub(COLLECTED_KEPT);
        kept.drain(..excess);
    }

    /// Injected pods the runtime ran uncaptured, now enrolled: each is worth a line, as it
    /// means redirector-cni missed it (not chained, or no agent, when it started).
    fn note_enrolled(&self, enrolled: &[PodRef]) {
        for pod in enrolled {
            tracing::warn!(cgroup_id = pod.cgroup_id, cgroup = ?pod.cgroup, pod = ?pod.pod, "enrolled an injected pod the runtime ran uncaptured");
        }
        self.metrics.count_enrolled_from_runtime(enrolled.len());
        self.enrolled_from_runtime
            .fetch_add(enrolled.len() as u64, Ordering::Relaxed);
    }

    /// One reconcile pass: pending CNI DELs, then the evidence (read without the agent's lock),
    /// then the unenrolls it confirms (with it). A pass that cannot tell collects nothing and
    /// is reported (log, status, metric); None then.
    fn reconcile_pass(self: &Arc<Self>) -> Option<ReconcileReport> {
        let _running = self.in_flight.track("reconcile");
        let pending = {
            let _one_at_a_time = lock(&self.operations);
            self.node.run_pending_deletes()
        };
        if let Err(error) = pending {
            tracing::warn!(%error, "carrying out pending CNI DELs");
        }
        let mut suspects = lock(&self.suspects).clone();
        let plan = self
            .node
            .reconcile_plan(self.source.as_ref(), &mut suspects);
        let plan = match plan {
            Ok(plan) => plan,
            Err(error) => {
                tracing::warn!(%error, "reconcile pass stopped; nothing collected");
                self.metrics.count_reconcile_failure();
                *lock(&self.reconcile_error) = Some(error.to_string());
                return None;
            }
        };
        *lock(&self.suspects) = suspects;
        *lock(&self.reconcile_error) = None;
        let report = {
            let _one_at_a_time = lock(&self.operations);
            let report = self.node.apply(plan, &self.config.node.default_policy);
            self.forget_departed();
            report
        };
        self.sweep_soon();
        self.note_collected(&report.collected);
        self.note_enrolled(&report.enrolled);
        self.follow_adopted(&report.adopted);
        self.follow_adopted(&report.enrolled);
        self.maintain_records();
        Some(report)
    }

    /// Has the policy sets that unenrolls left removed `sweep_delay` from now, unless that is
    /// scheduled already or there are none.
    fn sweep_soon(self: &Arc<Self>) {
        if !self.node.has_departed_sets() || self.sweep_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let agent = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(agent.config.sweep_delay).await;
            let _ = tokio::task::spawn_blocking(move || agent.sweep()).await;
        });
    }

    fn sweep(&self) {
        let _running = self.in_flight.track("remove departed pods' policy sets");
        let _one_at_a_time = lock(&self.operations);
        self.sweep_scheduled.store(false, Ordering::Release);
        if let Err(error) = self.node.remove_unused_sets() {
            tracing::warn!(%error, "removing the policy sets of unenrolled pods (tried again after the next unenroll, and at start)");
        }
    }

    /// Stops the address watches of pods that are no longer enrolled (unenrolled, collected,
    /// a pending DEL carried out). Called with `operations` held.
    fn forget_departed(&self) {
        lock(&self.watches).retain(|&cgroup_id, _| self.node.store.contains(cgroup_id));
    }

    /// Starts the address watch of an enrolled pod: its changes enroll it again. None when
    /// the watch cannot start, which is logged and counted (the pod stays enrolled as it is).
    fn watch(self: &Arc<Self>, cgroup_id: u64, netns: &Path, pod: String) -> Option<AddressWatch> {
        let agent = Arc::downgrade(self);
        let label = pod.clone();
        let started = AddressWatch::start(netns, move |event| {
            if let Some(agent) = Weak::upgrade(&agent) {
                agent.on_address_event(cgroup_id, &label, event);
            }
        });
        match started {
            Ok(watch) => Some(watch),
            Err(error) => {
                tracing::warn!(%pod, cgroup_id, %error, "cannot follow the pod's address changes");
                self.metrics.count_address_follow_failure();
                None
            }
        }
    }

    /// The watch for the pod an enroll request names, started before the enroll reads the
    /// pod's addresses so that no change in between is missed.
    fn watch_before_enroll(
        self: &Arc<Self>,
        request: &EnrollRequest,
    ) -> Option<(u64, AddressWatch)> {
        let cgroup_id = fs::metadata(&request.cgroup).ok()?.ino();
        let recorded = match request.meta.netns {
            Some(_) => None,
            None => self.node.store.get(cgroup_id).ok().flatten(),
        };
        let netns = request.meta.netns.as_ref().or(recorded
            .as_ref()
            .and_then(|record| record.meta.netns.as_ref()))?;
        let meta = recorded
            .as_ref()
            .map_or(&request.meta, |record| &record.meta);
        let pod = pod_label(meta, &request.cgroup);
        self.watch(cgroup_id, netns, pod)
            .map(|watch| (cgroup_id, watch))
    }

    /// Follows the addresses of the adopted pods: starts the watch of those not watched (at
    /// startup, every pod with a netns; later, those whose watch could not start or stopped),
    /// and enrolls again those whose addresses differ from their last enroll (changed while
    /// nothing followed them, or a follow that failed).
    fn follow_adopted(self: &Arc<Self>, adopted: &[PodRef]) {
        for adopted in adopted {
            let cgroup_id = adopted.cgroup_id;
            let pod = {
                let _one_at_a_time = lock(&self.operations);
                let Ok(Some(record)) = self.node.store.get(cgroup_id) else {
                    continue;
                };
                let Some(netns) = &record.meta.netns else {
                    continue;
                };
                if record.follow.policy.is_none() {
                    tracing::debug!(cgroup_id, "enrolled by a version that did not record its policy; its addresses are followed after its next enroll");
                    continue;
                }
                let pod = pod_label(&record.meta, &record.cgroup);
                let mut watches = lock(&self.watches);
                if !watches
                    .get(&cgroup_id)
                    .is_some_and(AddressWatch::is_running)
                {
                    let Some(watch) = self.watch(cgroup_id, netns, pod.clone()) else {
                        continue;
                    };
                    watches.insert(cgroup_id, watch);
                }
                pod
            };
            self.follow(cgroup_id, &pod);
        }
    }

    fn on_address_event(&self, cgroup_id: u64, pod: &str, event: Event) {
        match event {
            Event::Changed => self.follow(cgroup_id, pod),
            Event::Failed(error) => {
                tracing::warn!(%pod, cgroup_id, %error, "stopped following the pod's address changes; the next reconcile pass starts again");
                self.metrics.count_address_follow_failure();
            }
        }
    }

    /// Enrolls the pod again if its addresses changed. A pod unenrolled meanwhile (its watch
    /// gone) is left alone. The enroll may carry out pending CNI DELs (an address still
    /// claimed), whose pods' watches then stop.
    fn follow(&self, cgroup_id: u64, pod: &str) {
        let _running = self.in_flight.track("follow addresses");
        let _one_at_a_time = lock(&self.operations);
        if !lock(&self.watches).contains_key(&cgroup_id) {
            return;
        }
        match self.node.follow_addresses(cgroup_id) {
            Ok(Followed::Changed { from, to }) => {
                tracing::info!(%pod, cgroup_id, ?from, ?to, "the pod's addresses changed; enrolled it again");
                self.metrics.count_addresses_followed();
            }
            Ok(Followed::Unchanged | Followed::NotFollowed) => {}
            Err(error) => {
                tracing::warn!(%pod, cgroup_id, %error, "following the pod's address change failed; it keeps its previous addresses until the next change or reconcile pass");
                self.metrics.count_address_follow_failure();
            }
        }
        self.forget_departed();
    }

    /// Removes handshakes no proxy took over, and warns while the handshake map is 80 % full.
    fn maintain_records(&self) {
        let maintained = {
            let _one_at_a_time = lock(&self.operations);
            self.node.maintain_records()
        };
        match maintained {
            Ok((expired, records)) => {
                if expired > 0 {
                    tracing::warn!(
                        expired,
                        "removed handshakes no proxy took over (a proxy stuck with a full accept queue?)"
                    );
                    self.expired_handshakes
                        .fetch_add(expired as u64, Ordering::Relaxed);
                }
                if records.nearly_full() {
                    tracing::warn!(
                        in_flight = records.in_flight,
                        capacity = records.capacity,
                        "the handshake map is 80 % full or more: raise max_connections (connections whose record cannot be kept fail at their proxy)"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "maintaining the connection records"),
        }
    }

    /// Carries out one API request (blocking: BPF syscalls and file I/O). Reads (status, pod)
    /// take no lock, so a slow one never delays an enroll.
    fn carry_out(self: &Arc<Self>, request: &Request) -> Result<Reply, NodeError> {
        let _running = self.in_flight.track(request.name());
        // Started before the lock is taken (entering the pod's netns, two threads): enrolls that
        // arrive together wait for each other only for the maps and links.
        let watch = match request {
            Request::Enroll(enroll) if !enroll.dry_run => self.watch_before_enroll(enroll),
            _ => None,
        };
        let _one_at_a_time = match request {
            Request::Status(_) | Request::Pod(_) => None,
            _ => Some(lock(&self.operations)),
        };
        let started = Instant::now();
        let result = self.node.handle(request, &self.config.node.default_policy);
        let elapsed = started.elapsed();
        self.sweep_soon();
        if let (Some((cgroup_id, watch)), Ok(Reply::Enrolled(_))) = (watch, &result) {
            lock(&self.watches).insert(cgroup_id, watch);
        }
        // Only these take pods away (an enroll's pending deletes are left to the next of them
        // or to reconcile). An unenroll takes its one pod; the check after a GC looks at every
        // watched pod's state file, which would make each DEL slower the more pods the node has.
        match (request, &result) {
            (Request::Unenroll(_), Ok(Reply::Unenrolled(unenrolled))) => {
                if let Some(cgroup_id) = unenrolled.cgroup_id {
                    lock(&self.watches).remove(&cgroup_id);
                }
            }
            (Request::Gc(_), _) => self.forget_departed(),
            _ => {}
        }
        match request {
            Request::Enroll(enroll) if !enroll.dry_run => self.metrics.observe_enroll(elapsed),
            Request::Unenroll(_) => self.metrics.observe_unenroll(elapsed),
            Request::Enroll(_)
            | Request::Status(_)
            | Request::Pod(_)
            | Request::Gc(_)
            | Request::CniOutcome(_) => {}
        }
        match &result {
            Ok(Reply::Enrolled(pod)) => {
                let done = match request {
                    Request::Enroll(enroll) if enroll.dry_run => {
                        "checked (dry run, nothing changed)"
                    }
                    _ => "enrolled",
                };
                tracing::info!(cgroup_id = pod.cgroup_id, cgroup = %pod.cgroup.display(), ?elapsed, "{done}")
            }
            Ok(Reply::Unenrolled(unenrolled)) => {
                tracing::info!(cgroup_id = ?unenrolled.cgroup_id, ?elapsed, "unenrolled")
            }
            Ok(Reply::Collected(report)) => {
                self.note_collected(&report.collected);
                for failed in &report.failed {
                    tracing::warn!(cgroup_id = failed.pod.cgroup_id, error = %failed.error, "CNI GC could not collect a pod");
                }
            }
            Ok(Reply::Status(_) | Reply::Pod(_) | Reply::Counted) => {}
            Err(error) => tracing::warn!(op = request.name(), %error, "request failed"),
        }
        result.map(|reply| match reply {
            Reply::Status(mut status) => {
                status.agent = Some(self.report());
                Reply::Status(status)
            }
            other => other,
        })
    }

    async fn respond(self: Arc<Self>, envelope: Envelope) -> Response {
        let Envelope { bpffs, request } = envelope;
        if let Some(wanted) = bpffs.filter(|wanted| *wanted != self.config.node.bpffs) {
            return Response::Error(ApiError {
                kind: ErrorKind::InvalidInput,
                message: format!(
                    "this agent serves the pins under {}, not {}",
                    self.config.node.bpffs.display(),
                    wanted.display()
                ),
            });
        }
        // Counting needs neither the node's state nor readiness.
        if let Request::CniOutcome(outcome) = &request {
            self.note_cni_outcome(outcome);
            return Response::Ok(Box::new(Reply::Counted));
        }
        // Reads work before ready (status says so); changes wait for the programs and reconcile.
        let read = matches!(request, Request::Status(_) | Request::Pod(_));
        if !self.is_ready() && !read {
            return Response::Error(ApiError {
                kind: ErrorKind::NotReady,
                message: "the agent is loading programs and reconciling; try again shortly".into(),
            });
        }
        match tokio::task::spawn_blocking(move || self.carry_out(&request)).await {
            Ok(Ok(reply)) => Response::Ok(Box::new(reply)),
            Ok(Err(error)) => Response::Error(ApiError {
                kind: error.kind(),
                message: error.to_string(),
            }),
            Err(error) => Response::Error(ApiError {
                kind: ErrorKind::Internal,
                message: format!("the request's task failed: {error}"),
            }),
        }
    }
}

async fn serve(config: AgentConfig, socket: StdUnixListener) -> Result<(), AgentError> {
    let socket = UnixListener::from_std(socket).map_err(|source| AgentError::Socket {
        path: config.node.socket.clone(),
        source,
    })?;
    let metrics_addr = config.metrics_addr;
    let http = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .map_err(|source| AgentError::Metrics {
            addr: metrics_addr,
            source,
        })?;
    let reconcile_interval = config.reconcile_interval;
    let agent = Arc::new(Agent::new(config));
    let (stop, stopping) = watch::channel(false);
    tracing::info!(socket = %agent.config.node.socket.display(), metrics = %metrics_addr, "serving");
    let http_task = tokio::spawn(
        axum::serve(http, router(agent.clone()))
            .with_graceful_shutdown(stopped(stopping.clone()))
            .into_future(),
    );
    let api_task = tokio::spawn(serve_api(agent.clone(), socket, stopping.clone()));
    let stop_chaining = Arc::new(AtomicBool::new(false));
    let chaining = agent
        .config
        .chain_cni
        .then(|| keep_chained(agent.clone(), stop_chaining.clone()));

    let signal = termination();
    tokio::pin!(signal);
    let starting = agent.clone();
    let started = tokio::select! {
        started = tokio::task::spawn_blocking(move || starting.start()) => Some(started),
        () = &mut signal => None,
    };
    let result = match started {
        Some(Ok(Err(error))) => Err(AgentError::Startup(error)),
        Some(Err(error)) => Err(error.into()),
        Some(Ok(Ok(()))) => {
            tokio::spawn(reconcile_every(
                agent.clone(),
                reconcile_interval,
                stopping.clone(),
            ));
            tokio::spawn(forward_kernel_log(agent.node.clone(), stopping.clone()));
            signal.await;
            Ok(())
        }
        None => Ok(()),
    };
    tracing::info!("stopping; pins stay in place, enrolled pods stay captured");
    let _ = stop.send(true);
    if agent.config.log_connections {
        let node = agent.node.clone();
        match tokio::task::spawn_blocking(move || node.set_connection_logging(false)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "switching connection logging off"),
            Err(error) => tracing::warn!(%error, "switching connection logging off"),
        }
    }
    if let Ok(Err(error)) = http_task.await {
        tracing::warn!(%error, "metrics server");
    }
    let _ = api_task.await;
    stop_chaining.store(true, Ordering::Relaxed);
    if let Some(chaining) = chaining {
        let _ = tokio::task::spawn_blocking(move || chaining.join()).await;
    }
    result
}

async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = interrupt.recv() => tracing::info!("SIGINT"),
    }
}

async fn stopped(mut stopping: watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// Accepts API connections until stopping, then waits (bounded) for those in progress.
async fn serve_api(agent: Arc<Agent>, listener: UnixListener, stopping: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let stop = stopped(stopping);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let agent = agent.clone();
                        connections.spawn(async move {
                            answer(agent, stream).await;
                            drop(slot);
                        });
                    }
                    Err(_) => refuse_busy(&stream),
                },
                Err(error) => tracing::warn!(%error, "accepting an API connection"),
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut stop => break,
        }
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = connections.len(),
            "API requests still running when stopping"
        );
    }
}

/// One connection: one request line in, one response line out. Root only. A peer that stalls
/// sending its request or taking its reply is dropped after a timeout.
async fn answer(agent: Arc<Agent>, stream: UnixStream) {
    let peer_uid = stream.peer_cred().map(|cred| cred.uid());
    let (read, mut write) = stream.into_split();
    let response = if peer_uid.as_ref().ok() != Some(&0) {
        Response::Error(ApiError {
            kind: ErrorKind::InvalidInput,
            message: format!("only root may use the agent (peer uid: {peer_uid:?})"),
        })
    } else {
        match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_request(read)).await {
            Ok(Ok(request)) => agent.respond(request).await,
            Ok(Err(error)) => Response::Error(error),
            Err(_) => Response::Error(ApiError {
                kind: ErrorKind::InvalidInput,
                message: format!(
                    "no complete request line within {} s",
                    REQUEST_READ_TIMEOUT.as_secs()
                ),
            }),
        }
    };
    match tokio::time::timeout(
        REPLY_WRITE_TIMEOUT,
        write.write_all(&response_line(&response)),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(%error, "the API client left before the response"),
        Err(_) => tracing::warn!(
            timeout_s = REPLY_WRITE_TIMEOUT.as_secs(),
            "an API client did not take its response; dropped it"
        ),
    }
}

/// The request line, read up to its newline or [`MAX_REQUEST_BYTES`] (one more byte tells a
/// line that is too long).
async fn read_request(read: impl AsyncRead + Unpin) -> Result<Envelope, ApiError> {
    let mut line = Vec::new();
    BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1))
        .read_until(b'\n', &mut line)
        .await
        .map_err(|error| ApiError {
            kind: ErrorKind::InvalidInput,
            message: format!("reading the request: {error}"),
        })?;
    parse_request_line(&line)
}

/// A connection past [`MAX_CONNECTIONS`]: answered without waiting (a fresh socket's buffer
/// takes the short line; if it does not, closing says as much) and closed.
fn refuse_busy(stream: &UnixStream) {
    tracing::debug!(
        max = MAX_CONNECTIONS,
        "API connections at their bound; refusing one as busy"
    );
    let busy = Response::Error(ApiError {
        kind: ErrorKind::Busy,
        message: format!("the agent is serving {MAX_CONNECTIONS} connections; try again"),
    });
    let _ = stream.try_write(&response_line(&busy));
}

fn response_line(response: &Response) -> Vec<u8> {
    let mut text = serde_json::to_vec(response).expect("responses always serialize");
    text.push(b'\n');
    text
}

async fn reconcile_every(agent: Arc<Agent>, interval: Duration, stopping: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await; // the first tick is immediate; startup has just reconciled
    let stop = stopped(stopping);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = &mut stop => return,
        }
        let agent = agent.clone();
        if let Err(error) = tokio::task::spawn_blocking(move || agent.reconcile_pass()).await {
            tracing::warn!(%error, "periodic reconcile task");
        }
    }
}

/// Passes the programs' aya-log lines (there are some while connection logging is on: the
/// agent's `--log-connections`, or `redirector log`, which then shares them) to the agent's log.
async fn forward_kernel_log(node: Node, stopping: watch::Receiver<bool>) {
    let logger = Programs::log_program_id(&node.root)
        .map_err(|e| e.to_string())
        .and_then(|id| aya_log::EbpfLogger::init_from_id(id).map_err(|e| e.to_string()))
        .and_then(|logger| {
            // SAFETY: the logger owns its ring buffer's fd and returns that same fd for as long
            // as it lives, which is as long as the AsyncFd.
            unsafe { tokio::io::unix::AsyncFd::register(logger) }.map_err(|e| e.to_string())
        });
    let mut logger = match logger {
        Ok(logger) => logger,
        Err(error) => {
            tracing::warn!(%error, "the programs' log lines will not be forwarded");
            return;
        }
    };
    let stop = stopped(stopping);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            ready = logger.readable_mut() => match ready {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(error) => {
                    tracing::warn!(%error, "waiting for the programs' log lines");
                    return;
                }
            },
            () = &mut stop => return,
        }
    }
}

fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape))
        .with_state(agent)
}

async fn healthz(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let stuck = agent.in_flight.stuck(agent.config.operation_deadline);
    if stuck.is_empty() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stuck: {}\n", stuck.join("; ")),
        )
    }
}

async fn readyz(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    if agent.serves_new_pods() {
        (StatusCode::OK, "ready\n")
    } else if agent.is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "redirector-cni is not chained in the runtime's network config yet\n",
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "loading programs and reconciling\n",
        )
    }
}

/// With `chain_cni`: keeps redirector-cni chained in the runtime's network config (a thread:
/// inotify and file I/O), until stopping.
fn keep_chained(agent: Arc<Agent>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let node = &agent.config.node;
        let entry = plugin_entry(&Installation::plugin_config(node));
        let result = install::watch(
            &node.cni_conf_dir,
            &entry,
            CHAIN_RESYNC,
            &stop,
            &|outcome| match outcome {
                Ok(chained) => {
                    if !matches!(chained, Chained::Already(_)) {
                        tracing::info!(
                            ?chained,
                            "chained redirector-cni in the runtime's network config"
                        );
                    }
                    agent.chained.store(true, Ordering::Release);
                }
                Err(error) => {
                    tracing::warn!(%error, "chaining redirector-cni");
                    agent.chained.store(false, Ordering::Release);
                }
            },
        );
        if let Err(error) = result {
            tracing::error!(%error, dir = %node.cni_conf_dir.display(), "cannot watch the CNI conf dir; redirector-cni is not kept chained");
            agent.chained.store(false, Ordering::Release);
        }
    })
}

/// A pod as logs name it: namespace/name when known, else its cgroup.
fn pod_label(meta: &PodMeta, cgroup: &Path) -> String {
    meta.pod.as_ref().map_or_else(
        || cgroup.display().to_string(),
        |pod| format!("{}/{}", pod.namespace, pod.name),
    )
}

/// How often the chain is checked even without a change seen in the conf dir.
const CHAIN_RESYNC: Duration = Duration::from_secs(60);

async fn scrape(State(agent): State<Arc<Agent>>) -> axum::response::Response {
    let rendered = tokio::task::spawn_blocking(move || {
        let all = StatusQuery {
            after: None,
            limit: Some(u32::MAX),
        };
        agent.node.status(&all).map(|mut status| {
            status.agent = Some(agent.report());
            agent.metrics.render(&status, agent.config.per_pod_metrics)
        })
    })
    .await;
    match rendered {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Ok(Err(error)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_and_connection_lines_do_not_cancel_each_other() {
        assert_eq!(log_filter(None, false), "info");
        assert_eq!(
            log_filter(Some("warn,redirector=debug"), false),
            "warn,redirector=debug"
        );
        let both = log_filter(Some("warn"), true);
        assert!(both.starts_with("warn,"), "{both}");
        for target in KERNEL_LOG_TARGETS {
            assert!(both.contains(&format!("{target}=debug")), "{both}");
        }
        assert!(log_filter(Some(" "), true).starts_with("info,"));
    }
}
