//! `cargo xtask demo`: shows, on a throwaway pod, what redirector does. An app's connect() to a
//! server is rewritten in the kernel to the pod's sidecar proxy, which learns the original
//! destination with SO_ORIGINAL_DST and forwards there: no iptables rule involved.
//! Needs root. Exits non-zero if the connection was not redirected.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use redirector_tests::{
    binary, client_result, nat_rules, ConnectOptions, ConnectReport, Identity, Output, Sandbox,
    PROXY_ADDR,
};

const MESSAGE: &str = "hello from the demo app";

fn main() {
    match run() {
        Ok(()) => println!("\nResult: the connection was transparently redirected through the proxy. Everything was cleaned up."),
        Err(error) => {
            eprintln!("\nredirector-demo FAILED: {error:#}");
            std::process::exit(1);
        }
    }
}

/// Command lines with the target directory cut off, to keep them readable.
struct Shell {
    binary_dir: String,
}

impl Shell {
    fn new() -> Result<Shell> {
        let e2e_helper = binary("e2e-helper")?;
        let dir = e2e_helper.parent().context("binary dir")?;
        Ok(Shell {
            binary_dir: format!("{}/", dir.display()),
        })
    }

    fn show(&self, command_line: &str) {
        println!("   $ {}", command_line.replace(&self.binary_dir, ""));
    }

    fn show_output(&self, output: &Output) {
        self.show(&output.command_line);
        for line in output.stdout.lines().chain(output.stderr.lines()) {
            println!("     {line}");
        }
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn run() -> Result<()> {
    let shell = Shell::new()?;
    println!(
        "redirector demo: intercepting a pod's outbound TCP with eBPF (binaries in {})",
        shell.binary_dir
    );

    step("1. A throwaway pod and a server reachable over a veth");
    let sandbox = Sandbox::new("demo")?;
    let pod = sandbox.pod("demo", 8080)?;
    println!(
        "   pod:    netns {}, address {}, cgroup {}",
        pod.netns.name(),
        pod.addr(),
        pod.cgroup.path().display()
    );
    println!(
        "   server: netns {}, listening on {}",
        pod.server_netns.name(),
        pod.server.addr
    );
    shell.show(pod.server.process.command_line());

    step("2. The sidecar proxy, as UID/GID 1337 in the pod's netns and cgroup");
    let proxy = pod.start_proxy()?;
    shell.show(proxy.process.command_line());
    println!("   listening on {PROXY_ADDR}");

    step("3. Enrolling the pod's cgroup (redirector exits once interception is active)");
    shell.show_output(&sandbox.enroll(&pod.cgroup)?);
    sandbox.ensure_no_redirector_running()?;

    step(&format!(
        "4. The app (UID {}) connects to the server {}",
        Identity::APP.uid,
        pod.server.addr
    ));
    let client = pod.spawn_client(
        &pod.cgroup,
        Identity::APP,
        &ConnectOptions::to(pod.server.addr).message(MESSAGE),
    )?;
    shell.show(client.command_line());
    let report: ConnectReport = client_result(&client, Duration::from_secs(15))?;
    let client_local = report.local_addr()?;
    println!(
        "   app:    connected from {client_local}{}; getpeername() = {} (the original destination, as after an iptables REDIRECT)",
        if client_local.ip() == PROXY_ADDR.ip() { " (loopback: the kernel rewrote the connect() to the proxy)" } else { "" },
        report.peer.map_or_else(|| "none".to_owned(), |peer| peer.to_string())
    );
    if let Some(error) = &report.error {
        println!("   app:    error: {error}");
    }
    let forward = proxy.forward_event(client_local);
    match &forward {
        Ok(forward) => {
            println!(
                "   proxy:  accepted {}, SO_ORIGINAL_DST = {}",
                forward.peer, forward.orig_dst
            );
            println!(
                "   proxy:  connected upstream from {}",
                forward.upstream_local
            );
        }
        Err(_) => println!("   proxy:  logged no forward event for this connection"),
    }
    let reply = report.server_reply();
    if let Ok(reply) = &reply {
        println!(
            "   server: connection from {} to {}, received {:?}",
            reply.peer, reply.local, reply.line
        );
    }
    if let Ok(done) = proxy.done_event(client_local) {
        println!(
            "   proxy:  done, {} bytes up, {} bytes down",
            done.bytes_up, done.bytes_down
        );
    }

    step("5. redirector status");
    let status_args = [
        "status".as_ref(),
        "--bpffs".as_ref(),
        sandbox.root().as_os_str(),
    ];
    shell.show_output(&redirector_tests::redirector(status_args)?);

    step(&format!(
        "6. The nat table of the pod netns (ip netns exec {} iptables-save -t nat)",
        pod.netns.name()
    ));
    let rules = nat_rules(&pod.netns)?;
    if rules.is_empty() {
        println!("   no rules: the redirect happened in eBPF, not iptables");
    } else {
        rules.iter().for_each(|rule| println!("   {rule}"));
    }

    step("7. Unenrolling the pod");
    shell.show_output(&sandbox.unenroll(&pod.cgroup)?.ensure_success()?);

    // The verdict, after the whole story has been told.
    ensure!(
        client_local.ip() == PROXY_ADDR.ip() && report.peer == Some(pod.server.addr),
        "the app was not connected to the proxy over loopback: {report:?}"
    );
    let forward = forward.context("the proxy did not forward the connection")?;
    ensure!(
        forward.orig_dst == pod.server.addr,
        "the proxy's original destination was {}",
        forward.orig_dst
    );
    let reply = reply.context("the app got no reply from the server")?;
    ensure!(
        reply.peer == forward.upstream_local,
        "the server did not see the proxy's upstream connection"
    );
    ensure!(rules.is_empty(), "unexpected nat rules in the pod netns");
    Ok(())
}
