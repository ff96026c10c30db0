//! `redirector-cni`: a chained CNI plugin that hands each new pod to the node agent.
//!
//! - ADD: decides whether to capture the pod ([`super::select`]: by default, the pods Istio's
//!   injector prepared, with their annotations' settings), finds its cgroup from K8S_POD_UID,
//!   has the agent enroll it, and returns the previous plugin's result unchanged. With no agent
//!   it fails with code 11 (try again later): a pod never starts uncaptured. Pods it passes
//!   through or refuses are logged with the reason and reported to the agent, which counts them.
//! - DEL: unenrolls the pod by its container id; succeeds when the pod is gone already. When the
//!   agent is not there, not ready, slow or fails, the DEL is recorded beside its socket and
//!   succeeds: the agent carries it out when it starts, at every reconcile pass, and before an
//!   enroll that finds the pod's addresses still claimed. A pod never hangs in Terminating
//!   for redirector.
//! - CHECK: a pod the selection passes through has nothing to check; otherwise the agent holds
//!   this pod (asked about it alone) with every hook attached, and the pod does not run in a
//!   sandboxed runtime.
//! - STATUS: success while an agent is ready, and also while it restarts once it has been ready
//!   since boot (captured pods keep working; ADD answers "try again later" meanwhile): a failing
//!   STATUS marks the node's network not ready, which evicts its pods after a few minutes.
//!   Error 50 only before any agent was ready on the node.
//! - GC: unenrolls the pods of this network whose attachment the runtime no longer lists; it
//!   needs `cni.dev/valid-attachments`, goes on past a failure and reports every one.
//!
//! The protocol (environment, stdin, version negotiation, result layouts, error JSON) is
//! rscni-plugin's.
use std::{fs::OpenOptions, path::Path, process::ExitCode, sync::Mutex, time::Duration};

use rscni_plugin::{
    cni::{Cni, Plugin},
    error::Error,
    types::{Args, CNIResult, NetConf},
};
use tracing_subscriber::{fmt::writer::BoxMakeWriter, EnvFilter};

use super::{
    annotations,
    cgroup::find_pod_cgroup,
    config::{CniArgs, PluginConfig},
    select::{self, Decision, Reason, Refusal},
};
use crate::{
    agent::{
        api::{
            ready_marker, ApiError, CniOutcome, EnrollRequest, ErrorKind, GcRequest, NodePod,
            PodSelector, Reply, Request, StatusQuery,
        },
        client::{self, ClientError},
        node::PendingDeletes,
        store::{Attachment, PodIdentity, PodMeta},
    },
    cgroup,
    link::Hook,
};

/// Longest wait for the agent to count a pod that is not enrolled (it does not hold the pod up
/// for long when the agent is stuck).
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Codes of this plugin's own errors (the spec leaves 100 and up to plugins).
pub const CODE_AGENT_FAILED: u32 = 100;
pub const CODE_NOT_CAPTURED: u32 = 101;

/// The binary's whole `main`.
pub fn main() -> ExitCode {
    let plugin = Plugin::default()
        .msg("redirector-cni: chained CNI plugin that enrolls pods with the redirector agent");
    match plugin.run(&RedirectorCni) {
        Ok(()) => ExitCode::SUCCESS,
        // rscni-plugin has written the error JSON to stdout already.
        Err(error) => {
            tracing::error!(%error, "redirector-cni failed");
            ExitCode::FAILURE
        }
    }
}

pub struct RedirectorCni;

impl Cni for RedirectorCni {
    fn add(&self, args: Args) -> Result<CNIResult, Error> {
        with_config(&args, "ADD", |config| {
            let previous = args.config().prev_result.clone().ok_or_else(|| {
                Error::InvalidNetworkConfig(
                    "redirector-cni is a chained plugin: it needs prevResult, so list it after the plugin that creates the pod's interface".into(),
                )
            })?;
            let cni_args = cni_args(&args)?;
            let pod_settings = match decide(config, args.config(), &cni_args) {
                Ok(Decision::Enroll(settings)) => settings,
                Ok(Decision::Skip(reason)) => {
                    tracing::info!(
                        reason = reason.name(),
                        why = reason.describe(),
                        "pod passed through, not enrolled"
                    );
                    report(config, &cni_args, reason);
                    return Ok(previous);
                }
                Err(refusal) => {
                    report(config, &cni_args, refusal.reason());
                    return Err(refused(refusal));
                }
            };
            let uid = cni_args.pod_uid.clone().ok_or_else(|| {
                Error::InvalidEnvValue(
                    "CNI_ARGS has no K8S_POD_UID: the pod's cgroup cannot be found without it"
                        .into(),
                )
            })?;
            let cgroup_root = match &config.cgroup_root {
                Some(root) => root.clone(),
                None => cgroup::cgroup2_mount().map_err(|e| {
                    Error::InvalidNetworkConfig(format!("cgroupRoot not set and {e}"))
                })?,
            };
            let cgroup = find_pod_cgroup(&cgroup_root, config.cgroup_driver, &uid)
                .map_err(|e| Error::InvalidNetworkConfig(e.to_string()))?;
            let request = Request::Enroll(Box::new(EnrollRequest {
                cgroup,
                meta: PodMeta {
                    pod: Some(PodIdentity {
                        uid,
                        namespace: cni_args.pod_namespace.clone().unwrap_or_default(),
                        name: cni_args.pod_name.clone().unwrap_or_default(),
                    }),
                    netns: args.netns().cloned(),
                    attachment: Some(attachment(&args)),
                },
                policy: config.policy.clone(),
                pod_settings,
                dry_run: false,
            }));
            match ask_agent(config, &request)? {
                Reply::Enrolled(pod) => {
                    tracing::info!(cgroup = %pod.cgroup.display(), cgroup_id = pod.cgroup_id, "pod enrolled");
                    Ok(previous)
                }
                other => Err(unexpected(&request, &other)),
            }
        })
    }

    fn del(&self, args: Args) -> Result<(), Error> {
        with_config(&args, "DEL", |config| {
            let attachment = attachment(&args);
            let request =
                Request::Unenroll(PodSelector::ContainerId(attachment.container_id.clone()));
            let why = match client::send(&config.agent_socket, None, &request, config.timeout()) {
                Ok(Some(Reply::Unenrolled(unenrolled))) => {
                    tracing::info!(cgroup_id = ?unenrolled.cgroup_id, "pod unenrolled");
                    return Ok(());
                }
                Ok(Some(other)) => unexpected(&request, &other).to_string(),
                Ok(None) => format!("no agent listens on {}", config.agent_socket.display()),
                Err(error) => error.to_string(),
            };
            let pending = PendingDeletes::beside(&config.agent_socket);
            let recorded = pending.add(&attachment).map_err(|e| {
                Error::TryAgainLater(format!(
                    "{why}; and recording the DEL for later failed: {e}"
                ))
            })?;
            tracing::warn!(reason = %why, recorded = %recorded.display(), "DEL recorded for the agent to carry out");
            Ok(())
        })
    }

    fn check(&self, args: Args) -> Result<(), Error> {
        with_config(&args, "CHECK", |config| {
            if let Decision::Skip(reason) =
                decide(config, args.config(), &cni_args(&args)?).map_err(refused)?
            {
                tracing::debug!(
                    reason = reason.name(),
                    "pod passed through, nothing to check"
                );
                return Ok(());
            }
            let container_id = attachment(&args).container_id;
            let request = Request::Pod(PodSelector::ContainerId(container_id.clone()));
            let held = match ask_agent(config, &request)? {
                Reply::Pod(pod) => pod,
                other => return Err(unexpected(&request, &other)),
            };
            match held {
                Some(NodePod {
                    sandboxed: Some(runtime),
                    ..
                }) => Err(not_captured(format!(
                    "the pod runs in a sandboxed runtime ({runtime}): its sockets are not in the host kernel"
                ))),
                Some(pod)
                    if Hook::CGROUP
                        .iter()
                        .all(|hook| pod.status.attached.iter().any(|a| a == hook.pin_name())) =>
                {
                    Ok(())
                }
                Some(pod) => Err(not_captured(format!(
                    "the pod's cgroup {} has only {:?} attached",
                    pod.status.cgroup_id, pod.status.attached
                ))),
                None => Err(not_captured(format!(
                    "the agent holds no pod for container {container_id}"
                ))),
            }
        })
    }

    fn status(&self, args: Args) -> Result<(), Error> {
        with_config(&args, "STATUS", |config| {
            let summary_only = Request::Status(StatusQuery {
                after: None,
                limit: Some(0),
            });
            let why =
                match client::send(&config.agent_socket, None, &summary_only, config.timeout()) {
                    Ok(Some(Reply::Status(status)))
                        if status.agent.as_ref().is_some_and(|a| a.ready) =>
                    {
                        return Ok(())
                    }
                    Ok(Some(_)) => "the redirector agent is not ready".to_owned(),
                    Ok(None) => format!(
                        "no redirector agent listens on {}",
                        config.agent_socket.display()
                    ),
                    Err(error) => error.to_string(),
                };
            let marker = ready_marker(&config.agent_socket);
            if marker.exists() {
                tracing::info!(reason = %why, "an agent was ready since boot; captured pods keep working, ADD retries until it is back");
                Ok(())
            } else {
                Err(Error::PluginNotAvailable(format!(
                    "{why}, and no agent has been ready on this node since boot ({} is missing)",
                    marker.display()
                )))
            }
        })
    }

    fn gc(&self, args: Args) -> Result<(), Error> {
        with_config(&args, "GC", |config| {
            // Without the list every pod of the network would look stale.
            let valid = args.config().valid_attachments.as_ref().ok_or_else(|| {
                Error::InvalidNetworkConfig(
                    "GC without cni.dev/valid-attachments: refusing to collect every pod of the network".into(),
                )
            })?;
            let request = Request::Gc(GcRequest {
                network: args.config().name.clone(),
                valid_container_ids: valid
                    .iter()
                    .map(|attachment| attachment.container_id.clone())
                    .collect(),
            });
            match client::send(&config.agent_socket, None, &request, config.timeout()) {
                Ok(Some(Reply::Collected(report))) if report.failed.is_empty() => {
                    tracing::info!(
                        pods = report.collected.len(),
                        "unenrolled pods the runtime no longer lists"
                    );
                    Ok(())
                }
                Ok(Some(Reply::Collected(report))) => Err(Error::Custom(
                    CODE_AGENT_FAILED,
                    format!(
                        "GC could not collect {} pods ({} collected)",
                        report.failed.len(),
                        report.collected.len()
                    ),
                    report
                        .failed
                        .iter()
                        .map(|failed| {
                            format!("cgroup id {}: {}", failed.pod.cgroup_id, failed.error)
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                )),
                Ok(Some(other)) => Err(unexpected(&request, &other)),
                Ok(None) => {
                    tracing::warn!("no agent running; it collects gone pods when it starts");
                    Ok(())
                }
                Err(error) => Err(agent_error(error)),
            }
        })
    }
}

/// Reads the plugin's keys from the network config, then runs `body` with logging set up
/// as they say.
fn with_config<T>(
    args: &Args,
    operation: &'static str,
    body: impl FnOnce(&PluginConfig) -> Result<T, Error>,
) -> Result<T, Error> {
    let config = PluginConfig::from_keys(&args.config().custom)
        .map_err(|e| Error::InvalidNetworkConfig(format!("redirector-cni: {e}")))?;
    let filter = EnvFilter::try_new(config.log_level.as_deref().unwrap_or("info"))
        .map_err(|e| Error::InvalidNetworkConfig(format!("redirector-cni: logLevel: {e}")))?;
    let writer = match &config.log_file {
        Some(path) => log_file(path)?,
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!(
            "redirector-cni",
            op = operation,
            container = args
                .container_id()
                .map(|id| id.to_string())
                .unwrap_or_default()
        );
        let _entered = span.enter();
        let result = body(&config);
        if let Err(error) = &result {
            tracing::error!(code = u32::from(error), %error, "failed");
        }
        result
    })
}

fn log_file(path: &Path) -> Result<BoxMakeWriter, Error> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            Error::InvalidNetworkConfig(format!("redirector-cni: logFile {}: {e}", path.display()))
        })?;
    Ok(BoxMakeWriter::new(Mutex::new(file)))
}

fn cni_args(args: &Args) -> Result<CniArgs, Error> {
    CniArgs::parse(args.args()).map_err(|e| Error::InvalidEnvValue(e.to_string()))
}

/// [`select::decide`] on what the runtime passed in the network config.
pub(crate) fn decide(
    config: &PluginConfig,
    net_conf: &NetConf,
    cni_args: &CniArgs,
) -> Result<Decision, Refusal> {
    let declared = net_conf
        .capabilities
        .as_ref()
        .and_then(|capabilities| capabilities.get(annotations::CAPABILITY))
        .is_some_and(|&on| on);
    let passed = net_conf
        .runtime_config
        .as_ref()
        .and_then(|runtime| runtime.custom.get(annotations::CAPABILITY));
    select::decide(config, cni_args, declared, passed)
}

/// The CNI error of a refused pod: "try again later" while the runtime passes no annotations
/// (a fixed runtime or conflist will), "unsupported field" for a setting redirector does not
/// implement, "invalid network config" for a malformed annotation (they arrive in it).
fn refused(refusal: Refusal) -> Error {
    let message = refusal.to_string();
    match refusal.reason() {
        Reason::NoAnnotations => Error::TryAgainLater(message),
        Reason::Unsupported => Error::UnsupportedNetworkConfiguration(message),
        _ => Error::InvalidNetworkConfig(message),
    }
}

/// Tells the agent about a pod that is not enrolled, so that its metrics and status count it.
/// Best effort: without an agent the plugin's log line is the record.
fn report(config: &PluginConfig, args: &CniArgs, reason: Reason) {
    let outcome = CniOutcome {
        pod: args.pod_uid.clone().map(|uid| PodIdentity {
            uid,
            namespace: args.pod_namespace.clone().unwrap_or_default(),
            name: args.pod_name.clone().unwrap_or_default(),
        }),
        reason,
    };
    let timeout = config.timeout().min(REPORT_TIMEOUT);
    match client::send(
        &config.agent_socket,
        None,
        &Request::CniOutcome(outcome),
        timeout,
    ) {
        Ok(Some(_)) => {}
        Ok(None) => tracing::debug!("no agent to report to"),
        Err(error) => tracing::warn!(%error, "reporting to the agent"),
    }
}

/// The attachment the runtime names; rscni-plugin has checked that ADD, DEL and CHECK carry
/// CNI_CONTAINERID and CNI_IFNAME.
fn attachment(args: &Args) -> Attachment {
    Attachment {
        network: args.config().name.clone(),
        container_id: args
            .container_id()
            .map(|id| id.to_string())
            .unwrap_or_default(),
        ifname: args
            .ifname()
            .map(|name| name.to_string())
            .unwrap_or_default(),
    }
}

/// A request the agent must answer: no agent is a retryable failure.
fn ask_agent(config: &PluginConfig, request: &Request) -> Result<Reply, Error> {
    match client::send(&config.agent_socket, None, request, config.timeout()) {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(Error::TryAgainLater(format!(
            "no redirector agent listens on {}; the pod must not run uncaptured, so this fails until the agent is up",
            config.agent_socket.display()
        ))),
        Err(error) => Err(agent_error(error)),
    }
}

fn agent_error(error: ClientError) -> Error {
    match error {
        ClientError::Agent(ApiError {
            kind: ErrorKind::NotReady,
            message,
        }) => Error::TryAgainLater(format!("the redirector agent is not ready: {message}")),
        ClientError::Io { .. } | ClientError::TimedOut { .. } | ClientError::Protocol { .. } => {
            Error::TryAgainLater(format!("talking to the redirector agent: {error}"))
        }
        other => Error::Custom(
            CODE_AGENT_FAILED,
            "the redirector agent failed".into(),
            other.to_string(),
        ),
    }
}

fn unexpected(request: &Request, reply: &Reply) -> Error {
    Error::Custom(
        CODE_AGENT_FAILED,
        "unexpected agent reply".into(),
        format!("`{}` to a `{}` request", reply.name(), request.name()),
    )
}

fn not_captured(details: String) -> Error {
    Error::Custom(CODE_NOT_CAPTURED, "pod is not captured".into(), details)
}
