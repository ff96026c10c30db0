//! `redirector-cni`: a chained CNI plugin that hands each new pod to the node agent.
//!
//! - ADD: finds the pod's cgroup from K8S_POD_UID, has the agent enroll it, and returns the
//!   previous plugin's result unchanged. With no agent it fails with code 11 (try again later):
//!   a pod never starts uncaptured.
//! - DEL: unenrolls the pod by its container id; succeeds when the pod or the agent is gone.
//! - CHECK: the agent holds the pod with every hook attached. STATUS: the agent is ready.
//! - GC: unenrolls the pods of this network whose attachment the runtime no longer lists.
//!
//! The protocol (environment, stdin, version negotiation, result layouts, error JSON) is
//! rscni-plugin's.
use std::{fs::OpenOptions, path::Path, process::ExitCode, sync::Mutex};

use rscni_plugin::{
    cni::{Cni, Plugin},
    error::Error,
    types::{Args, CNIResult},
};
use tracing_subscriber::{fmt::writer::BoxMakeWriter, EnvFilter};

use super::{
    cgroup::find_pod_cgroup,
    config::{CniArgs, PluginConfig},
};
use crate::{
    agent::{
        api::{ApiError, EnrollRequest, ErrorKind, GcRequest, PodSelector, Reply, Request},
        client::{self, ClientError},
        store::{Attachment, PodIdentity, PodMeta},
    },
    cgroup,
    link::Hook,
};

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
            if let Some(reason) = skip_reason(config, &cni_args) {
                tracing::info!(reason, "pod skipped, not enrolled");
                return Ok(previous);
            }
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
            let request =
                Request::Unenroll(PodSelector::ContainerId(attachment(&args).container_id));
            match client::send(&config.agent_socket, None, &request, config.timeout()) {
                Ok(Some(Reply::Unenrolled(unenrolled))) => {
                    tracing::info!(cgroup_id = ?unenrolled.cgroup_id, "pod unenrolled");
                    Ok(())
                }
                Ok(Some(other)) => Err(unexpected(&request, &other)),
                // Nothing to ask: a new agent unenrolls the pod once its cgroup is gone.
                Ok(None) => {
                    tracing::warn!(socket = %config.agent_socket.display(), "no agent running; nothing to unenroll now");
                    Ok(())
                }
                Err(error) => Err(agent_error(&config.agent_socket, error)),
            }
        })
    }

    fn check(&self, args: Args) -> Result<(), Error> {
        with_config(&args, "CHECK", |config| {
            if let Some(reason) = skip_reason(config, &cni_args(&args)?) {
                tracing::debug!(reason, "pod skipped, nothing to check");
                return Ok(());
            }
            let container_id = attachment(&args).container_id;
            let Reply::Status(status) = ask_agent(config, &Request::Status)? else {
                return Err(Error::Custom(
                    CODE_AGENT_FAILED,
                    "unexpected agent reply".into(),
                    "the agent did not answer a status request with a status".into(),
                ));
            };
            let held = status.pods.iter().find(|pod| {
                pod.meta
                    .attachment
                    .as_ref()
                    .is_some_and(|a| a.container_id == container_id)
            });
            match held {
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
            let unavailable = |why: String| Error::PluginNotAvailable(why);
            match client::send(
                &config.agent_socket,
                None,
                &Request::Status,
                config.timeout(),
            ) {
                Ok(Some(Reply::Status(status)))
                    if status.agent.as_ref().is_some_and(|a| a.ready) =>
                {
                    Ok(())
                }
                Ok(Some(_)) => Err(unavailable("the redirector agent is not ready yet".into())),
                Ok(None) => Err(unavailable(format!(
                    "no redirector agent listens on {}",
                    config.agent_socket.display()
                ))),
                Err(error) => Err(unavailable(error.to_string())),
            }
        })
    }

    fn gc(&self, args: Args) -> Result<(), Error> {
        with_config(&args, "GC", |config| {
            let request = Request::Gc(GcRequest {
                network: args.config().name.clone(),
                valid_container_ids: args
                    .config()
                    .valid_attachments
                    .iter()
                    .flatten()
                    .map(|attachment| attachment.container_id.clone())
                    .collect(),
            });
            match client::send(&config.agent_socket, None, &request, config.timeout()) {
                Ok(Some(Reply::Collected(collected))) => {
                    tracing::info!(
                        pods = collected.len(),
                        "unenrolled pods the runtime no longer lists"
                    );
                    Ok(())
                }
                Ok(Some(other)) => Err(unexpected(&request, &other)),
                Ok(None) => {
                    tracing::warn!("no agent running; it collects gone pods when it starts");
                    Ok(())
                }
                Err(error) => Err(agent_error(&config.agent_socket, error)),
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

fn skip_reason(config: &PluginConfig, args: &CniArgs) -> Option<&'static str> {
    if args.skip {
        return Some("REDIRECTOR_SKIP in CNI_ARGS");
    }
    let namespace = args.pod_namespace.as_deref()?;
    config
        .skip_namespaces
        .iter()
        .any(|skipped| skipped == namespace)
        .then_some("namespace in skipNamespaces")
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
        Err(error) => Err(agent_error(&config.agent_socket, error)),
    }
}

fn agent_error(socket: &Path, error: ClientError) -> Error {
    match error {
        ClientError::Agent(ApiError {
            kind: ErrorKind::NotReady,
            message,
        }) => Error::TryAgainLater(format!("the redirector agent is not ready: {message}")),
        ClientError::Io { .. } | ClientError::Protocol { .. } => Error::TryAgainLater(format!(
            "the redirector agent on {} did not answer: {error}",
            socket.display()
        )),
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
