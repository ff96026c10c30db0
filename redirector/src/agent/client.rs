//! Talking to the agent, and the CLI's switch: each operation goes to the agent when one listens
//! on the socket, and is carried out directly on the node when none does, with the same result
//! (the agent runs the same [`Node::handle`]).
use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    api::{
        ApiError, EnrollRequest, EnrolledPod, Envelope, ErrorKind, NodePod, NodeStatus,
        PodSelector, Reply, Request, Response, StatusQuery, MAX_REPLY_BYTES,
    },
    node::{Node, NodeError},
};
use crate::policy::Policy;

/// Long enough for an enroll that loads the programs on a busy node.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent socket {socket}: {source}")]
    Io { socket: PathBuf, source: io::Error },
    #[error("the agent at {socket} did not answer within {} s", timeout.as_secs_f32())]
    TimedOut { socket: PathBuf, timeout: Duration },
    #[error("the agent at {socket} answered something that is not a response: {source}")]
    Protocol {
        socket: PathBuf,
        source: serde_json::Error,
    },
    #[error("the agent answered `{reply}` to a `{request}` request")]
    UnexpectedReply {
        request: &'static str,
        reply: &'static str,
    },
    #[error("agent: {0}")]
    Agent(#[from] ApiError),
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// Who carried out a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Agent,
    Standalone,
}

/// Sends one request to the agent at `socket`; `None` when no agent listens there (no socket
/// file, or a stale one nobody accepts on). With `bpffs`, the agent must serve that root.
/// An agent too busy to take the connection is asked again until `timeout` has passed (it
/// refuses before reading the request, so nothing was done).
pub fn send(
    socket: &Path,
    bpffs: Option<&Path>,
    request: &Request,
    timeout: Duration,
) -> Result<Option<Reply>, ClientError> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        match send_once(socket, bpffs, request, timeout) {
            Err(ClientError::Agent(ApiError {
                kind: ErrorKind::Busy,
                ..
            })) if Instant::now() + pause < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            result => return result,
        }
    }
}

fn send_once(
    socket: &Path,
    bpffs: Option<&Path>,
    request: &Request,
    timeout: Duration,
) -> Result<Option<Reply>, ClientError> {
    let io_error = |source: io::Error| match source.kind() {
        // What a read or write past the socket's timeout returns (EAGAIN).
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::TimedOut {
            socket: socket.to_owned(),
            timeout,
        },
        _ => ClientError::Io {
            socket: socket.to_owned(),
            source,
        },
    };
    let stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io_error(e)),
    };
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(io_error)?;
    let envelope = Envelope {
        bpffs: bpffs.map(Path::to_owned),
        request: request.clone(),
    };
    let mut line = serde_json::to_vec(&envelope).expect("requests always serialize");
    line.push(b'\n');
    // An agent too busy to read the request answers and closes at once, which can fail the
    // write: its answer is read all the same.
    let written = (&stream).write_all(&line);
    let mut answer = String::new();
    let read = BufReader::new((&stream).take(MAX_REPLY_BYTES)).read_line(&mut answer);
    match (written, read) {
        (Err(error), _) if answer.is_empty() => return Err(io_error(error)),
        (_, Err(error)) => return Err(io_error(error)),
        _ => {}
    }
    let response: Response =
        serde_json::from_str(&answer).map_err(|source| ClientError::Protocol {
            socket: socket.to_owned(),
            source,
        })?;
    match response {
        Response::Ok(reply) => Ok(Some(*reply)),
        Response::Error(error) => Err(error.into()),
    }
}

/// Where the CLI sends its requests.
#[derive(Clone, Debug)]
pub struct Target {
    /// The agent's socket.
    pub socket: PathBuf,
    /// The pin root the user asked for, if they did; the agent must serve that one.
    pub bpffs: Option<PathBuf>,
    /// The node to work on directly when no agent runs.
    pub node: Node,
}

/// Carries out `request` through the agent, or directly on the node when no agent runs.
pub fn call(target: &Target, request: &Request) -> Result<(Reply, Via), ClientError> {
    match send(
        &target.socket,
        target.bpffs.as_deref(),
        request,
        DEFAULT_TIMEOUT,
    )? {
        Some(reply) => Ok((reply, Via::Agent)),
        None => Ok((
            target.node.handle(request, &Policy::default())?,
            Via::Standalone,
        )),
    }
}

fn unexpected(request: &Request, reply: &Reply) -> ClientError {
    ClientError::UnexpectedReply {
        request: request.name(),
        reply: reply.name(),
    }
}

pub fn enroll(target: &Target, request: EnrollRequest) -> Result<(EnrolledPod, Via), ClientError> {
    let request = Request::Enroll(Box::new(request));
    match call(target, &request)? {
        (Reply::Enrolled(pod), via) => Ok((pod, via)),
        (other, _) => Err(unexpected(&request, &other)),
    }
}

/// Returns the cgroup id of the pod that was unenrolled, if there was one.
pub fn unenroll(target: &Target, selector: PodSelector) -> Result<(Option<u64>, Via), ClientError> {
    let request = Request::Unenroll(selector);
    match call(target, &request)? {
        (Reply::Unenrolled(unenrolled), via) => Ok((unenrolled.cgroup_id, via)),
        (other, _) => Err(unexpected(&request, &other)),
    }
}

/// Every pod of the node, asked for a page at a time.
pub fn status(target: &Target) -> Result<(NodeStatus, Via), ClientError> {
    let mut query = StatusQuery::default();
    let mut whole: Option<(NodeStatus, Via)> = None;
    loop {
        let request = Request::Status(query.clone());
        let (page, via) = match call(target, &request)? {
            (Reply::Status(status), via) => (status, via),
            (other, _) => return Err(unexpected(&request, &other)),
        };
        let next = page.next;
        match &mut whole {
            None => whole = Some((page, via)),
            Some((status, _)) => status.pods.extend(page.pods),
        }
        match next {
            // Pages move forward by cgroup id: a reply that does not is not followed.
            Some(after) if query.after.is_none_or(|before| after > before) => {
                query.after = Some(after)
            }
            _ => break,
        }
    }
    let (mut status, via) = whole.expect("one page at least");
    status.next = None;
    Ok((status, via))
}

/// One pod (by cgroup or CNI container), or None when it is not enrolled.
pub fn pod(target: &Target, selector: PodSelector) -> Result<(Option<NodePod>, Via), ClientError> {
    let request = Request::Pod(selector);
    match call(target, &request)? {
        (Reply::Pod(pod), via) => Ok((pod, via)),
        (other, _) => Err(unexpected(&request, &other)),
    }
}
