//! UDP for `dns-query`, `connect-batch` and `listen --udp`: each client checks that the reply
//! came from the address it sent to, as resolvers do, and reports where it found itself.

use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nix::libc;
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrStorage,
};
use redirector_tests::{
    ConnectSummary, DnsQueryOptions, DnsQueryReport, ListenerReply, PlannedConnect, Transport,
};
use simple_dns::{rdata::RData, Name, Packet, PacketFlag, Question, CLASS, TYPE};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const DNS_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Room for any DNS reply over UDP (EDNS sizes included) and for the listener's JSON.
const DATAGRAM_MAX: usize = 4096;

/// A UDP socket of `destination`'s family, bound to `bind` and `port` when either is given
/// (the unspecified address, port 0 for what is not).
fn client_socket(
    destination: SocketAddr,
    bind: Option<IpAddr>,
    port: Option<u16>,
) -> Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(destination),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .context("creating a UDP socket")?;
    if bind.is_some() || port.is_some() {
        let unspecified = match destination {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let local = SocketAddr::new(bind.unwrap_or(unspecified), port.unwrap_or(0));
        socket
            .bind(&local.into())
            .with_context(|| format!("binding {local}"))?;
    }
    Ok(socket.into())
}

/// Sends `payload` to `destination` (connecting first when `connected`) and returns the reply
/// with its source. A connected socket's getpeername() goes into `report.peer`; getsockname()
/// after sending into `report.local`.
fn exchange(
    socket: &UdpSocket,
    destination: SocketAddr,
    connected: bool,
    payload: &[u8],
    timeout: Duration,
    report: &mut DnsQueryReport,
) -> Result<(Vec<u8>, SocketAddr)> {
    if connected {
        socket
            .connect(destination)
            .with_context(|| format!("connecting to {destination}"))?;
        report.peer = Some(socket.peer_addr().context("getpeername")?);
        socket.send(payload).context("send")?;
    } else {
        socket
            .send_to(payload, destination)
            .with_context(|| format!("sendto {destination}"))?;
    }
    report.local = Some(socket.local_addr().context("getsockname")?);
    socket.set_read_timeout(Some(timeout))?;
    let mut buffer = vec![0; DATAGRAM_MAX];
    // The io::Error stays reachable for connect-batch's short names (a timeout is EAGAIN).
    let (length, source) = socket
        .recv_from(&mut buffer)
        .with_context(|| format!("recvfrom, waiting at most {timeout:?} for the reply"))?;
    buffer.truncate(length);
    report.source = Some(source);
    Ok((buffer, source))
}

/// `e2e-helper dns-query`: one query with its report, or `count` of them with a summary.
pub fn dns_query(options: &DnsQueryOptions) -> Result<()> {
    let line = if options.count == 1 {
        serde_json::to_string(&one_query(options, 0))?
    } else {
        // Up to the first failure, which ends the run (no timeout per query thereafter).
        let mut summary = ConnectSummary::default();
        for index in 0..options.count {
            let report = one_query(options, index);
            if let Err(error) = judge(options, &report) {
                summary.failed = 1;
                summary.first_error = Some(format!("query {index}: {error:#}"));
                break;
            }
            summary.ok += 1;
        }
        serde_json::to_string(&summary)?
    };
    println!("{line}");
    Ok(())
}

/// A query of a summary is ok when it got an answer (the expected one, if given) from the
/// server it asked, which a connected socket also reports as its peer.
fn judge(options: &DnsQueryOptions, report: &DnsQueryReport) -> Result<()> {
    if let Some(error) = &report.error {
        bail!("{error}");
    }
    ensure!(
        report.source == Some(options.server),
        "the reply came from {:?}, not {}",
        report.source,
        options.server
    );
    if options.connected {
        ensure!(
            report.peer == Some(options.server),
            "getpeername is {:?}, not {}",
            report.peer,
            options.server
        );
    }
    match options.expect {
        Some(expected) => ensure!(
            report.answers.contains(&expected),
            "answers {:?} lack {expected}",
            report.answers
        ),
        None => ensure!(!report.answers.is_empty(), "no answer"),
    }
    Ok(())
}

/// A failure is part of the report, not an error of the helper.
fn one_query(options: &DnsQueryOptions, index: u32) -> DnsQueryReport {
    let mut report = DnsQueryReport::default();
    // Any id will do: one query per socket. It only ties the reply to the query.
    let id = (std::process::id() as u16).wrapping_add(index as u16);
    if let Err(error) = query(options, id, &mut report) {
        report.error = Some(format!("{error:#}"));
    }
    report
}

fn query(options: &DnsQueryOptions, id: u16, report: &mut DnsQueryReport) -> Result<()> {
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    let name = Name::new(&options.name).with_context(|| format!("name {:?}", options.name))?;
    packet
        .questions
        .push(Question::new(name, TYPE::A.into(), CLASS::IN.into(), false));
    let query = packet.build_bytes_vec().context("building the query")?;
    let socket = client_socket(options.server, None, None)?;
    let (reply, _) = exchange(
        &socket,
        options.server,
        options.connected,
        &query,
        DNS_REPLY_TIMEOUT,
        report,
    )?;
    let reply = Packet::parse(&reply).context("parsing the reply")?;
    ensure!(
        reply.id() == id,
        "reply id {} for query id {id}",
        reply.id()
    );
    report.answers = reply
        .answers
        .iter()
        .filter_map(|record| match &record.rdata {
            RData::A(a) => Some(IpAddr::from(Ipv4Addr::from(a.address))),
            RData::AAAA(aaaa) => Some(IpAddr::from(Ipv6Addr::from(aaaa.address))),
            _ => None,
        })
        .collect();
    Ok(())
}

/// A UDP probe of `connect-batch`: the listener's reply, which must come from the destination
/// as addressed (and a connected socket's peer must be it too), whoever really answered.
pub fn probe(connect: PlannedConnect, timeout: Duration) -> Result<ListenerReply> {
    let connected = connect.transport == Transport::UdpConnected;
    let socket = client_socket(connect.to, connect.bind, connect.source_port)?;
    let mut report = DnsQueryReport::default();
    let (reply, source) = exchange(
        &socket,
        connect.to,
        connected,
        b"probe",
        timeout,
        &mut report,
    )?;
    ensure!(
        source == connect.to,
        "the reply came from {source}, not {}",
        connect.to
    );
    if connected {
        ensure!(
            report.peer == Some(connect.to),
            "getpeername is {:?}, not {}",
            report.peer,
            connect.to
        );
    }
    serde_json::from_slice(&reply)
        .with_context(|| format!("reply {:?}", String::from_utf8_lossy(&reply)))
}

/// A UDP socket for `listen --udp` on `addr` that learns each datagram's destination address
/// (IP_PKTINFO) and may answer from it even when only an AnyIP route makes it local.
pub fn listener(addr: SocketAddr) -> Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        // IPv6 checks a chosen source address against the interfaces' addresses only.
        socket.set_freebind_v6(true)?;
        setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?;
    } else {
        setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?;
    }
    socket.set_reuse_address(true)?;
    socket
        .bind(&SockAddr::from(addr))
        .with_context(|| format!("binding UDP {addr}"))?;
    Ok(socket.into())
}

/// Answers every datagram with a [`ListenerReply`], sent from the address the datagram was
/// sent to, so that a connected client (or conntrack, after a REDIRECT) matches it.
pub fn answer_datagrams(socket: &UdpSocket, tag: &str) {
    loop {
        if let Err(error) = answer_one(socket, tag) {
            eprintln!("e2e-helper listen: UDP: {error:#}");
        }
    }
}

/// The packet info of a received datagram, turned into the one that sends its answer from
/// the datagram's destination address.
enum AnswerFrom {
    V4(libc::in_pktinfo),
    V6(libc::in6_pktinfo),
}

fn answer_one(socket: &UdpSocket, tag: &str) -> Result<()> {
    let fd = socket.as_raw_fd();
    let mut buffer = [0; DATAGRAM_MAX];
    let mut control = nix::cmsg_space!(libc::in6_pktinfo);
    let mut iov = [IoSliceMut::new(&mut buffer)];
    let message = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut control), MsgFlags::empty())?;
    let source = message.address.context("a datagram without a source")?;
    let from = message
        .cmsgs()?
        .find_map(|cmsg| match cmsg {
            ControlMessageOwned::Ipv4PacketInfo(info) => Some(AnswerFrom::V4(libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: info.ipi_addr,
                ipi_addr: libc::in_addr { s_addr: 0 },
            })),
            ControlMessageOwned::Ipv6PacketInfo(info) => Some(AnswerFrom::V6(libc::in6_pktinfo {
                ipi6_addr: info.ipi6_addr,
                ipi6_ifindex: 0,
            })),
            _ => None,
        })
        .context("a datagram without its destination address (IP_PKTINFO)")?;
    let (local, info) = match &from {
        AnswerFrom::V4(info) => (
            IpAddr::from(Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr))),
            ControlMessage::Ipv4PacketInfo(info),
        ),
        AnswerFrom::V6(info) => (
            IpAddr::from(Ipv6Addr::from(info.ipi6_addr.s6_addr)),
            ControlMessage::Ipv6PacketInfo(info),
        ),
    };
    let reply = ListenerReply {
        tag: tag.to_owned(),
        local: SocketAddr::new(local, socket.local_addr()?.port()),
    };
    let text = serde_json::to_vec(&reply)?;
    sendmsg(
        fd,
        &[IoSlice::new(&text)],
        &[info],
        MsgFlags::empty(),
        Some(&source),
    )
    .with_context(|| format!("answering {source} from {local}"))?;
    Ok(())
}
