//! A client of the container runtime's CRI `RuntimeService` (API v1, containerd 1.6 and later,
//! CRI-O), over the runtime's unix socket, as kubelet calls it. The agent reads pod sandboxes
//! from it to reconcile against what the runtime runs; the end-to-end tests also create pods
//! and containers through it, exactly as kubelet does.
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ContainerConfig, ContainerStatusRequest,
    ContainerStatusResponse, CreateContainerRequest, ExecSyncRequest, ExecSyncResponse,
    ListPodSandboxRequest, PodSandbox, PodSandboxConfig, PodSandboxStatusRequest,
    PodSandboxStatusResponse, RemoveContainerRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
    VersionRequest, VersionResponse,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The CRI v1 messages, for callers that build requests or read answers.
pub use k8s_cri::v1 as api;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("CRI socket {socket}: cannot connect: {source}")]
    Connect {
        socket: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("CRI socket {socket}: {call} failed: {status}")]
    Call {
        socket: PathBuf,
        call: &'static str,
        // Boxed: a Status is large, and every Result of this module carries the error.
        status: Box<tonic::Status>,
    },
}

/// A connection to one runtime's CRI socket.
#[derive(Clone, Debug)]
pub struct CriClient {
    socket: PathBuf,
    runtime: RuntimeServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the runtime listening on the unix socket `socket` (containerd's is
    /// `/run/containerd/containerd.sock`).
    pub async fn connect(socket: &Path) -> Result<Self, CriError> {
        let path = socket.to_owned();
        // gRPC needs an HTTP/2 URI; the authority is never used, every connection goes to the
        // socket.
        let channel =
            Endpoint::from_static("http://cri.invalid")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|source| CriError::Connect {
                    socket: socket.to_owned(),
                    source,
                })?;
        Ok(Self {
            socket: socket.to_owned(),
            runtime: RuntimeServiceClient::new(channel),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn failed(&self, call: &'static str) -> impl FnOnce(tonic::Status) -> CriError + '_ {
        move |status| CriError::Call {
            socket: self.socket.clone(),
            call,
            status: Box::new(status),
        }
    }

    /// The runtime's name and version, and the CRI version it speaks.
    pub async fn version(&mut self) -> Result<VersionResponse, CriError> {
        let request = VersionRequest {
            version: "v1".into(),
        };
        let answer = self.runtime.version(request).await;
        answer
            .map(|r| r.into_inner())
            .map_err(self.failed("Version"))
    }

    /// Every pod sandbox the runtime knows, ready or not.
    pub async fn list_pod_sandboxes(&mut self) -> Result<Vec<PodSandbox>, CriError> {
        let answer = self
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await;
        answer
            .map(|r| r.into_inner().items)
            .map_err(self.failed("ListPodSandbox"))
    }

    /// A sandbox's status, with the runtime's verbose `info` (containerd's carries the
    /// sandbox's network namespace path, its PID and its configuration).
    pub async fn pod_sandbox_status(
        &mut self,
        pod_sandbox_id: &str,
    ) -> Result<PodSandboxStatusResponse, CriError> {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: pod_sandbox_id.into(),
            verbose: true,
        };
        let answer = self.runtime.pod_sandbox_status(request).await;
        answer
            .map(|r| r.into_inner())
            .map_err(self.failed("PodSandboxStatus"))
    }

    /// Creates and starts a pod sandbox (its network through the CNI plugins); returns its ID.
    pub async fn run_pod_sandbox(
        &mut self,
        config: PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String, CriError> {
        let request = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: runtime_handler.into(),
        };
        let answer = self.runtime.run_pod_sandbox(request).await;
        answer
            .map(|r| r.into_inner().pod_sandbox_id)
            .map_err(self.failed("RunPodSandbox"))
    }

    /// Stops a sandbox's containers and tears its network down (CNI DEL).
    pub async fn stop_pod_sandbox(&mut self, pod_sandbox_id: &str) -> Result<(), CriError> {
        let request = StopPodSandboxRequest {
            pod_sandbox_id: pod_sandbox_id.into(),
        };
        let answer = self.runtime.stop_pod_sandbox(request).await;
        answer.map(drop).map_err(self.failed("StopPodSandbox"))
    }

    /// Removes a sandbox and its containers (stopping them first, as the runtime must).
    pub async fn remove_pod_sandbox(&mut self, pod_sandbox_id: &str) -> Result<(), CriError> {
        let request = RemovePodSandboxRequest {
            pod_sandbox_id: pod_sandbox_id.into(),
        };
        let answer = self.runtime.remove_pod_sandbox(request).await;
        answer.map(drop).map_err(self.failed("RemovePodSandbox"))
    }

    /// Creates a container in a sandbox (`sandbox_config` is the one the sandbox was run with,
    /// as kubelet passes it); returns its ID.
    pub async fn create_container(
        &mut self,
        pod_sandbox_id: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> Result<String, CriError> {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod_sandbox_id.into(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        let answer = self.runtime.create_container(request).await;
        answer
            .map(|r| r.into_inner().container_id)
            .map_err(self.failed("CreateContainer"))
    }

    pub async fn start_container(&mut self, container_id: &str) -> Result<(), CriError> {
        let request = StartContainerRequest {
            container_id: container_id.into(),
        };
        let answer = self.runtime.start_container(request).await;
        answer.map(drop).map_err(self.failed("StartContainer"))
    }

    /// Stops a container: SIGTERM, then SIGKILL after `timeout_seconds`.
    pub async fn stop_container(
        &mut self,
        container_id: &str,
        timeout_seconds: i64,
    ) -> Result<(), CriError> {
        let request = StopContainerRequest {
            container_id: container_id.into(),
            timeout: timeout_seconds,
        };
        let answer = self.runtime.stop_container(request).await;
        answer.map(drop).map_err(self.failed("StopContainer"))
    }

    pub async fn remove_container(&mut self, container_id: &str) -> Result<(), CriError> {
        let request = RemoveContainerRequest {
            container_id: container_id.into(),
        };
        let answer = self.runtime.remove_container(request).await;
        answer.map(drop).map_err(self.failed("RemoveContainer"))
    }

    /// A container's status, with the runtime's verbose `info` (containerd's carries its PID).
    pub async fn container_status(
        &mut self,
        container_id: &str,
    ) -> Result<ContainerStatusResponse, CriError> {
        let request = ContainerStatusRequest {
            container_id: container_id.into(),
            verbose: true,
        };
        let answer = self.runtime.container_status(request).await;
        answer
            .map(|r| r.into_inner())
            .map_err(self.failed("ContainerStatus"))
    }

    /// Runs `command` in a container, as the container's user, to completion or until
    /// `timeout_seconds` pass (0: no limit); its exit code and output.
    pub async fn exec_sync(
        &mut self,
        container_id: &str,
        command: Vec<String>,
        timeout_seconds: i64,
    ) -> Result<ExecSyncResponse, CriError> {
        let request = ExecSyncRequest {
            container_id: container_id.into(),
            cmd: command,
            timeout: timeout_seconds,
        };
        let answer = self.runtime.exec_sync(request).await;
        answer
            .map(|r| r.into_inner())
            .map_err(self.failed("ExecSync"))
    }
}
