//! The agent process: loads the programs once, adopts what is pinned, then serves the API on its
//! unix socket and /healthz, /readyz and /metrics over HTTP until SIGTERM or SIGINT.
//!
//! Stopping leaves every pin in place, so enrolled pods stay captured while no agent runs and
//! the next agent adopts them; only `redirector uninstall` removes them.
use std::{
    fs,
    future::IntoFuture as _,
    io,
    net::SocketAddr,
    os::unix::{
        fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _},
        net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
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
use nix::sys::stat::{umask, Mode};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
    task::JoinSet,
};

use super::{
    api::{
        AgentReport, ApiError, CollectedPod, Envelope, ErrorKind, ReconcileReport, Reply, Request,
        Response, MAX_REQUEST_BYTES,
    },
    config::{AgentConfig, AgentFlags, ConfigError, LogFormat, NodeFlags},
    metrics::{self, Metrics},
    node::{Node, NodeError},
};
use crate::loader::Programs;

/// How long stopping waits for requests in progress.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How many collected pods the status keeps (the oldest are dropped first).
const COLLECTED_KEPT: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("API socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("another agent is already serving on {path}")]
    AlreadyRunning { path: PathBuf },
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

/// Logs go to stderr at the level RUST_LOG gives: info by default, plus the programs' own lines
/// (at debug) when `kernel_lines`.
pub fn init_logging(format: LogFormat, kernel_lines: bool) {
    let mut default = String::from("info");
    if kernel_lines {
        KERNEL_LOG_TARGETS
            .iter()
            .for_each(|target| default.push_str(&format!(",{target}=debug")));
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(config: AgentConfig) -> Result<(), AgentError> {
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

/// Binds the API socket, root-only (mode 0600 from the start), replacing a stale socket file
/// but never a live agent's.
fn bind_socket(path: &Path) -> Result<StdUnixListener, AgentError> {
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
    match fs::symlink_metadata(path) {
        Ok(metadata) if !metadata.file_type().is_socket() => {
            return Err(AgentError::NotASocket {
                path: path.to_owned(),
            })
        }
        Ok(_) if StdUnixStream::connect(path).is_ok() => {
            return Err(AgentError::AlreadyRunning {
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
    /// Node operations run one at a time.
    operations: Mutex<()>,
    ready: AtomicBool,
    startup: Mutex<Option<ReconcileReport>>,
    collected_since: Mutex<Vec<CollectedPod>>,
    metrics: Metrics,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Agent {
    fn new(config: AgentConfig) -> Self {
        Self {
            node: config.node.node(),
            config,
            operations: Mutex::new(()),
            ready: AtomicBool::new(false),
            startup: Mutex::new(None),
            collected_since: Mutex::new(Vec::new()),
            metrics: Metrics::default(),
        }
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn report(&self) -> AgentReport {
        AgentReport {
            ready: self.is_ready(),
            startup: lock(&self.startup).clone(),
            collected_since: lock(&self.collected_since).clone(),
        }
    }

    /// Loads the programs (unless pinned), adopts what is pinned, then reports ready.
    fn start(&self) -> Result<(), NodeError> {
        let _one_at_a_time = lock(&self.operations);
        self.node.install()?;
        if self.config.log_connections {
            self.node.set_connection_logging(true)?;
        }
        let report = self.node.reconcile()?;
        for pod in &report.adopted {
            tracing::info!(cgroup_id = pod.cgroup_id, cgroup = ?pod.cgroup, pod = ?pod.pod, "adopted pod");
        }
        self.note_collected(&report.collected);
        tracing::info!(
            adopted = report.adopted.len(),
            collected = report.collected.len(),
            "reconciled with the pinned state; ready"
        );
        *lock(&self.startup) = Some(report);
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

    fn reconcile(&self) -> Result<(), NodeError> {
        let _one_at_a_time = lock(&self.operations);
        let report = self.node.reconcile()?;
        self.note_collected(&report.collected);
        Ok(())
    }

    /// Carries out one API request (blocking: BPF syscalls and file I/O).
    fn carry_out(&self, request: &Request) -> Result<Reply, NodeError> {
        let _one_at_a_time = lock(&self.operations);
        let started = Instant::now();
        let result = self.node.handle(request, &self.config.node.default_policy);
        let elapsed = started.elapsed();
        match request {
            Request::Enroll(_) => self.metrics.observe_enroll(elapsed),
            Request::Unenroll(_) => self.metrics.observe_unenroll(elapsed),
            Request::Status | Request::Gc(_) => {}
        }
        match &result {
            Ok(Reply::Enrolled(pod)) => {
                tracing::info!(cgroup_id = pod.cgroup_id, cgroup = %pod.cgroup.display(), ?elapsed, "enrolled")
            }
            Ok(Reply::Unenrolled(unenrolled)) => {
                tracing::info!(cgroup_id = ?unenrolled.cgroup_id, ?elapsed, "unenrolled")
            }
            Ok(Reply::Collected(collected)) => self.note_collected(collected),
            Ok(Reply::Status(_)) => {}
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
        // Status works before ready (it says so); changes wait for the programs and reconcile.
        if !self.is_ready() && request != Request::Status {
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
    let stop = stopped(stopping);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(answer(agent.clone(), stream));
                }
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

/// One connection: one request line in, one response line out. Root only.
async fn answer(agent: Arc<Agent>, stream: UnixStream) {
    let peer_uid = stream.peer_cred().map(|cred| cred.uid());
    let (read, mut write) = stream.into_split();
    let response = if peer_uid.as_ref().ok() != Some(&0) {
        Response::Error(ApiError {
            kind: ErrorKind::InvalidInput,
            message: format!("only root may use the agent (peer uid: {peer_uid:?})"),
        })
    } else {
        let mut line = String::new();
        let read = BufReader::new(read.take(MAX_REQUEST_BYTES as u64))
            .read_line(&mut line)
            .await;
        match read.map(|_| serde_json::from_str::<Envelope>(&line)) {
            Ok(Ok(request)) => agent.respond(request).await,
            Ok(Err(error)) => Response::Error(ApiError {
                kind: ErrorKind::InvalidInput,
                message: format!("not a request: {error}"),
            }),
            Err(error) => Response::Error(ApiError {
                kind: ErrorKind::InvalidInput,
                message: format!("reading the request: {error}"),
            }),
        }
    };
    let mut text = serde_json::to_vec(&response).expect("responses always serialize");
    text.push(b'\n');
    if let Err(error) = write.write_all(&text).await {
        tracing::debug!(%error, "the API client left before the response");
    }
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
        match tokio::task::spawn_blocking(move || agent.reconcile()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "periodic reconcile"),
            Err(error) => tracing::warn!(%error, "periodic reconcile task"),
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
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape))
        .with_state(agent)
}

async fn readyz(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    if agent.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "loading programs and reconciling\n",
        )
    }
}

async fn scrape(State(agent): State<Arc<Agent>>) -> axum::response::Response {
    let rendered = tokio::task::spawn_blocking(move || {
        agent
            .node
            .status()
            .map(|status| agent.metrics.render(&status, agent.is_ready()))
    })
    .await;
    match rendered {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Ok(Err(error)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
    }
}
