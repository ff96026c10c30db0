//! Following a pod's addresses after enroll. The pod's policy (which destinations are local)
//! and its inbound set are made from the addresses the enroll read; an address added later
//! (IPv6 SLAAC, a second interface, an address added again) would be neither, so inbound
//! connections to it would reach the application around the proxy, where iptables'
//! PREROUTING rules, which match whatever address the pod has, would capture them.
//!
//! The agent therefore subscribes to the address changes of each enrolled pod's network
//! namespace (netlink `RTM_NEWADDR`/`RTM_DELADDR`) before the enroll reads the addresses, so
//! that no change between the read and the subscription is missed, and after each burst of
//! changes enrolls the pod again with the policy it was enrolled with (at once for the first
//! change of a burst, and once more when the burst goes quiet). Enrolling again stages
//! the new sets under a new generation and switches to them in one write, so the switch has
//! no gap and no mixed moment; a new address itself is without inbound capture from the
//! moment the kernel adds it until that enroll ends (netlink delivery plus one enroll). The standalone `redirector enroll` (no agent) does not follow.
use std::{
    fs, io,
    net::IpAddr,
    os::{
        fd::{AsFd, OwnedFd},
        unix::{fs::MetadataExt as _, net::UnixStream},
    },
    path::Path,
    thread::JoinHandle,
};

use nix::{
    errno::Errno,
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::socket::{
        bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
    },
};

use super::{
    api::EnrollRequest,
    node::{Node, NodeError},
    store::PodMeta,
};
use crate::{
    netns::{self, NetnsError, PodNetns},
    pods,
};

/// How long (ms) a burst of changes may go quiet before the pod is enrolled again for the
/// rest of the burst: an interface coming up, or a runtime configuring several addresses,
/// makes them within milliseconds, and they are followed with one more enroll.
const SETTLE_MS: u16 = 100;

/// The multicast groups of IPv4 and IPv6 address changes.
const ADDRESS_GROUPS: u32 = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;

/// Netlink's message header: length (u32), type (u16), flags, sequence, port.
const NLMSG_HEADER_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("subscribing to the address changes in {path}: {source}")]
    Subscribe {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("starting the thread that follows {path}: {source}")]
    Thread {
        path: std::path::PathBuf,
        source: io::Error,
    },
}

/// What a watch reports to its owner, on the watch's own thread.
#[derive(Debug)]
pub enum Event {
    /// The pod's addresses changed (one event for a burst); or the kernel dropped
    /// notifications because they came faster than they were read, so they may have.
    Changed,
    /// Waiting for changes failed; the watch has stopped.
    Failed(io::Error),
}

/// One pod's subscription, followed on a thread of its own until this value is dropped.
/// Dropping never waits for the thread, which may be busy enrolling the pod again: it ends at
/// its next wake-up.
#[derive(Debug)]
pub struct AddressWatch {
    /// Closed on drop, which wakes the thread to end.
    _stop: UnixStream,
    thread: JoinHandle<()>,
}

impl AddressWatch {
    /// Subscribes to the address changes in the network namespace at `netns` (when this
    /// returns, every later change will be reported) and calls `report` after each burst.
    pub fn start(
        netns: &Path,
        report: impl Fn(Event) + Send + 'static,
    ) -> Result<AddressWatch, WatchError> {
        // Checked as a namespace file before it is opened for reading: a pod author's FIFO
        // there would block a plain open, and with it the agent.
        let file = netns::open_nsfs(netns)?;
        let subscribe_error = |source| WatchError::Subscribe {
            path: netns.to_owned(),
            source,
        };
        // A netlink socket belongs to the namespace it was created in, whichever thread
        // reads it later.
        let socket = netns::within(&file, netns, subscribe)?.map_err(subscribe_error)?;
        let (stop, stopped) = UnixStream::pair().map_err(subscribe_error)?;
        let thread = std::thread::Builder::new()
            .name("addrwatch".into())
            .spawn(move || follow(&socket, &stopped, &report))
            .map_err(|source| WatchError::Thread {
                path: netns.to_owned(),
                source,
            })?;
        Ok(AddressWatch {
            _stop: stop,
            thread,
        })
    }

    /// False once the watch has stopped on an error.
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }
}

/// A netlink route socket of the calling thread's namespace, subscribed to address changes.
fn subscribe() -> io::Result<OwnedFd> {
    let socket = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkRoute,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &NetlinkAddr::new(0, ADDRESS_GROUPS),
    )?;
    Ok(socket)
}

enum Wake {
    Messages,
    Quiet,
    Stop,
}

/// The watch's thread: waits for a change, reads the burst it starts, reports it, until the
/// stop stream closes.
fn follow(socket: &OwnedFd, stopped: &UnixStream, report: &impl Fn(Event)) {
    let mut buffer = vec![0; 64 * 1024];
    let outcome = (|| -> io::Result<()> {
        loop {
            match wait(socket, stopped, PollTimeout::NONE)? {
                Wake::Stop => return Ok(()),
                Wake::Quiet => continue,
                Wake::Messages => {}
            }
            // The first change is followed at once, so that a new address goes without
            // capture only for the time an enroll takes; what follows it within the burst is
            // followed with one more enroll once the burst goes quiet.
            if drain(socket, &mut buffer)? {
                report(Event::Changed);
            }
            let mut changed = false;
            loop {
                match wait(socket, stopped, PollTimeout::from(SETTLE_MS))? {
                    Wake::Stop => return Ok(()),
                    Wake::Quiet => break,
                    Wake::Messages => changed |= drain(socket, &mut buffer)?,
                }
            }
            if changed {
                report(Event::Changed);
            }
        }
    })();
    if let Err(error) = outcome {
        report(Event::Failed(error));
    }
}

fn wait(socket: &OwnedFd, stopped: &UnixStream, timeout: PollTimeout) -> io::Result<Wake> {
    let mut fds = [
        PollFd::new(socket.as_fd(), PollFlags::POLLIN),
        PollFd::new(stopped.as_fd(), PollFlags::POLLIN),
    ];
    match poll(&mut fds, timeout) {
        Ok(0) | Err(Errno::EINTR) => return Ok(Wake::Quiet),
        Ok(_) => {}
        Err(errno) => return Err(errno.into()),
    }
    let woke = |fd: &PollFd| fd.revents().is_some_and(|events| !events.is_empty());
    Ok(if woke(&fds[1]) {
        Wake::Stop
    } else if woke(&fds[0]) {
        Wake::Messages
    } else {
        Wake::Quiet
    })
}

/// Reads every message waiting; true when one of them is an address change, or when the
/// kernel dropped some (ENOBUFS: the socket's buffer overflowed).
fn drain(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<bool> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(socket);
    let mut changed = false;
    loop {
        match recv(fd, buffer, MsgFlags::empty()) {
            Ok(read) => changed |= has_address_change(&buffer[..read]),
            Err(Errno::EAGAIN) => return Ok(changed),
            Err(Errno::ENOBUFS) => changed = true,
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// Whether a datagram of netlink messages holds an `RTM_NEWADDR` or `RTM_DELADDR`.
fn has_address_change(mut messages: &[u8]) -> bool {
    while messages.len() >= NLMSG_HEADER_LEN {
        let length = u32::from_ne_bytes(messages[..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(messages[4..6].try_into().expect("2 bytes"));
        if kind == libc::RTM_NEWADDR || kind == libc::RTM_DELADDR {
            return true;
        }
        if length < NLMSG_HEADER_LEN {
            return false;
        }
        // Messages are aligned to 4 bytes.
        messages = messages
            .get(length.next_multiple_of(4)..)
            .unwrap_or_default();
    }
    false
}

/// What following a pod's addresses did.
#[derive(Debug, PartialEq, Eq)]
pub enum Followed {
    /// The pod was enrolled again: its addresses were `from` and are `to`.
    Changed { from: Vec<IpAddr>, to: Vec<IpAddr> },
    /// Its addresses are those of its last enroll (an IPv6 lifetime update, a change undone).
    Unchanged,
    /// Nothing to follow: the pod has no record or netns any more, its cgroup is another, or
    /// it was enrolled by a version that did not record its policy (then its next enroll
    /// does).
    NotFollowed,
}

impl Node {
    /// Enrolls the pod again with the policy it was enrolled with when its addresses differ
    /// from those of its last enroll.
    pub fn follow_addresses(&self, cgroup_id: u64) -> Result<Followed, NodeError> {
        let Some(record) = self.store.get(cgroup_id)? else {
            return Ok(Followed::NotFollowed);
        };
        let (Some(netns), Some(policy)) = (&record.meta.netns, &record.follow.policy) else {
            return Ok(Followed::NotFollowed);
        };
        if !fs::metadata(&record.cgroup).is_ok_and(|m| m.ino() == cgroup_id) {
            return Ok(Followed::NotFollowed);
        }
        let now = PodNetns::read(netns)
            .map_err(pods::Error::from)?
            .network
            .addresses;
        if now == record.follow.addresses {
            return Ok(Followed::Unchanged);
        }
        let request = EnrollRequest {
            cgroup: record.cgroup.clone(),
            // The record's meta is kept as it is.
            meta: PodMeta::default(),
            policy: Some(policy.clone()),
            pod_settings: None,
            dry_run: false,
        };
        let enrolled = self.enroll_counting(&request, policy, true)?;
        Ok(Followed::Changed {
            from: record.follow.addresses,
            to: enrolled.addresses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, payload: usize) -> Vec<u8> {
        let length = (NLMSG_HEADER_LEN + payload) as u32;
        let mut bytes = length.to_ne_bytes().to_vec();
        bytes.extend(kind.to_ne_bytes());
        bytes.resize(NLMSG_HEADER_LEN + payload, 0);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    #[test]
    fn an_address_change_is_found_among_other_messages() {
        let mut datagram = message(libc::RTM_NEWLINK, 13);
        assert!(!has_address_change(&datagram));
        datagram.extend(message(libc::RTM_DELADDR, 24));
        assert!(has_address_change(&datagram));
        assert!(has_address_change(&message(libc::RTM_NEWADDR, 40)));
        assert!(!has_address_change(&[]));
        // A header whose length is shorter than a header ends the walk.
        assert!(!has_address_change(&message(libc::RTM_NEWLINK, 0)[..8]));
        let mut truncated = message(libc::RTM_NEWROUTE, 0);
        truncated[..4].copy_from_slice(&4u32.to_ne_bytes());
        truncated.extend(message(libc::RTM_NEWADDR, 0));
        assert!(!has_address_change(&truncated));
    }

    /// Several changes waiting together (an interface brought up with its addresses) are
    /// reported once; closing the stop stream ends the thread. A datagram socket pair stands
    /// in for the kernel's netlink socket.
    #[test]
    fn a_burst_is_reported_once_and_the_stop_stream_ends_the_thread() {
        use std::os::unix::net::UnixDatagram;
        let (kernel, socket) = UnixDatagram::pair().unwrap();
        socket.set_nonblocking(true).unwrap();
        for kind in [
            libc::RTM_NEWADDR,
            libc::RTM_NEWLINK,
            libc::RTM_DELADDR,
            libc::RTM_NEWADDR,
        ] {
            kernel.send(&message(kind, 8)).unwrap();
        }
        let (stop, stopped) = UnixStream::pair().unwrap();
        let (events, reported) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            follow(&OwnedFd::from(socket), &stopped, &|event| {
                events.send(format!("{event:?}")).unwrap()
            })
        });
        assert_eq!(reported.recv().unwrap(), "Changed");
        drop(stop);
        thread.join().unwrap();
        assert_eq!(
            reported.try_iter().collect::<Vec<_>>(),
            Vec::<String>::new()
        );
    }
}
