//! `cargo xtask setup`: checks each piece that building and testing the redirector need on a
//! Debian 12 machine and installs what is missing. Running it again installs nothing.

use std::{fs, io::ErrorKind, process::Command};

use anyhow::{bail, Context, Result};

use crate::{
    cmd::{query, query_ok, run},
    debian::PrivateApt,
};

/// redirector's floor (`bpf_sock_ops.sk` arrived in Linux 5.10); redirector itself decides by
/// probing the kernel's features, this only stops a machine that cannot run the tests.
const MIN_KERNEL: (u32, u32) = (5, 10);

/// Debian packages, each with what needs it.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "bpf-linker build"),
    ("libpolly-22-dev", "bpf-linker build"),
    ("zlib1g-dev", "bpf-linker build"),
    ("libzstd-dev", "bpf-linker build"),
    // k8s-cri's build script compiles the CRI protobufs with protoc.
    ("protobuf-compiler", "redirector build (CRI client)"),
    ("iptables", "tests"),
    ("bpftool", "tests"),
    ("iproute2", "tests"),
    ("haproxy", "tests"),
    // The DNS suite's real server and proxy (the binary only: the `dnsmasq` package would
    // also start a system-wide service), its `dig`; glibc's `getent` comes with libc-bin.
    ("dnsmasq-base", "tests"),
    ("bind9-dnsutils", "tests"),
    // The record suite counts the bpf() calls of a `redirector status`.
    ("strace", "tests"),
    // The reference bridge, host-local and loopback CNI plugins, in /usr/lib/cni.
    ("containernetworking-plugins", "tests"),
    // Private containerds (their CRI plugin) with runc: the containerd suite runs pods in them,
    // the image suite imports and runs `cargo xtask image`'s archive. The packaged service is
    // never used.
    ("containerd", "tests"),
    ("runc", "tests"),
    // The image suite loads and runs the archive in a store of its own, too.
    ("podman", "tests"),
    // ... and in a dockerd of its own (docker.io brings dockerd and the docker client, and
    // needs containerd, runc, tini and iptables). The packaged service is never used nor
    // started: see DPKG_PATH_EXCLUDES.
    ("docker.io", "tests"),
    // The VM runs (xtask/src/vm): depmod on the host and modprobe in the guest, the guest's
    // shell and utilities, packing the initramfs, stripping debug info from what it carries.
    ("kmod", "VM tests"),
    ("busybox-static", "VM tests"),
    ("cpio", "VM tests"),
    ("binutils", "VM tests"),
];

/// Left out of the packages' install: docker.io's init script and systemd units. Its postinst
/// starts the machine's dockerd through them (the init script wherever no policy-rc.d forbids
/// it, /sbin/init being systemd's even where systemd does not run; the units where it runs),
/// which would take /var/lib/docker and the host's iptables; without them nothing starts it,
/// then or later.
const DPKG_PATH_EXCLUDES: &[&str] = &["/etc/init.d/docker", "/lib/systemd/system/docker.*"];

/// qemu for the VM runs; see [`qemu`] for the version.
const QEMU_PACKAGE: &str = "qemu-system-x86";

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The cargo feature of bpf-linker that selects the LLVM it links against.
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
const LLVM_DIR: &str = "/usr/lib/llvm-22";

/// A setup step: checks its piece, installs it when missing, and returns what it installed.
type Step = fn() -> Result<Option<String>>;

const STEPS: &[(&str, Step)] = &[
    ("kernel", kernel),
    ("cgroup2", cgroup2),
    ("debian packages", debian_packages),
    ("qemu", qemu),
    ("nightly toolchain", nightly_toolchain),
    ("rust-src (nightly)", rust_src),
    ("bpf-linker", bpf_linker),
];

pub fn run_all() -> Result<()> {
    let mut installed = Vec::new();
    for (name, step) in STEPS {
        if let Some(what) = step().with_context(|| format!("setup step `{name}` failed"))? {
            installed.push(what);
        }
    }
    if installed.is_empty() {
        eprintln!("setup: everything already installed");
    } else {
        eprintln!("setup: installed {}", installed.join(", "));
    }
    Ok(())
}

fn kernel() -> Result<Option<String>> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    let release = release.trim();
    let version = major_minor(release)
        .with_context(|| format!("cannot read a version in kernel release {release:?}"))?;
    if version < MIN_KERNEL {
        bail!("redirector needs Linux >= 5.10 (bpf_sock_ops.sk); this machine runs {release}");
    }
    eprintln!("ok: kernel {release} (>= 5.10)");
    Ok(None)
}

fn major_minor(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release.split(|c: char| !c.is_ascii_digit());
    Some((numbers.next()?.parse().ok()?, numbers.next()?.parse().ok()?))
}

/// Mounting cgroup2 (and bpffs) is the runtime's business; setup only reports it, and stops when
/// there is no cgroup2 hierarchy at all, since the redirector attaches its programs to one.
fn cgroup2() -> Result<Option<String>> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let Some(dir) = cgroup2_mount(&mountinfo) else {
        bail!(
            "no cgroup2 filesystem is mounted (none in /proc/self/mountinfo); redirector \
             attaches its programs to a cgroup2 hierarchy: mount one, e.g. \
             `mount -t cgroup2 none /sys/fs/cgroup`"
        );
    };
    eprintln!("info: cgroup2 mounted at {dir}");
    Ok(None)
}

/// The mount point of the first cgroup2 filesystem in a /proc/PID/mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<&str> {
    mountinfo.lines().find_map(|line| {
        // "ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS"
        let (mount, fs) = line.split_once(" - ")?;
        let fstype = fs.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| mount.split_whitespace().nth(4))?
    })
}

fn debian_packages() -> Result<Option<String>> {
    let mut missing = Vec::new();
    for &(package, purpose) in DEBIAN_PACKAGES {
        if is_installed(package)? {
            eprintln!("ok: debian package {package} ({purpose})");
        } else {
            eprintln!("missing: debian package {package} ({purpose})");
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(None);
    }
    let list = missing.join(" ");
    eprintln!("installing: debian packages {list}");
    if !crate::is_root()? {
        bail!("installing {list} needs root: run this as root, or `apt-get install {list}`");
    }
    run(Command::new("apt-get").arg("update"))?;
    let mut install = Command::new("apt-get");
    install.args(["install", "-y", "--no-install-recommends"]);
    for pattern in DPKG_PATH_EXCLUDES {
        install.arg(format!("-oDPkg::Options::=--path-exclude={pattern}"));
    }
    run(install
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(Some(format!("debian packages ({list})")))
}

fn is_installed(package: &str) -> Result<bool> {
    let out = query(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))?;
    // dpkg-query exits non-zero for a package it has never heard of: that is missing too.
    Ok(out.status.success() && out.stdout == b"install ok installed")
}

/// qemu-system-x86 at the version of the installed qemu-utils when that is a bookworm backport
/// (this machine kind has qemu-utils 10.0 from bookworm-backports, which bookworm's qemu 7.2
/// would remove: qemu-utils 10 breaks qemu-system-common < 8), else bookworm's.
fn qemu() -> Result<Option<String>> {
    if is_installed(QEMU_PACKAGE)? {
        eprintln!("ok: debian package {QEMU_PACKAGE} (VM tests)");
        return Ok(None);
    }
    let utils = query(Command::new("dpkg-query").args(["-W", "-f=${Version}", "qemu-utils"]))?;
    let backport =
        utils.status.success() && String::from_utf8_lossy(&utils.stdout).contains("~bpo12");
    let from = if backport {
        " from bookworm-backports, as the installed qemu-utils"
    } else {
        ""
    };
    eprintln!("installing: debian package {QEMU_PACKAGE}{from} (VM tests)");
    if !crate::is_root()? {
        bail!("installing {QEMU_PACKAGE} needs root: run this as root");
    }
    let mut install = if backport {
        let apt = PrivateApt::open(crate::target_dir(crate::workspace_root()).join("vm/apt"))?;
        let mut install = apt.command("apt-get");
        install.args(["-t", "bookworm-backports"]);
        install
    } else {
        run(Command::new("apt-get").arg("update"))?;
        Command::new("apt-get")
    };
    run(install
        .args(["install", "-y", "--no-install-recommends", QEMU_PACKAGE])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(Some(QEMU_PACKAGE.into()))
}

/// cargo-fuzz, for `cargo xtask fuzz` only (the other tasks do without it).
pub fn cargo_fuzz() -> Result<Option<String>> {
    let version = query(Command::new("cargo").args(["fuzz", "--version"]))?;
    if version.status.success() {
        eprintln!("ok: {}", String::from_utf8_lossy(&version.stdout).trim());
        return Ok(None);
    }
    eprintln!("installing: cargo-fuzz");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    Ok(Some("cargo-fuzz".into()))
}

fn nightly_toolchain() -> Result<Option<String>> {
    let toolchains = query_ok(Command::new("rustup").args(["toolchain", "list"]))?;
    if toolchains.lines().any(is_nightly) {
        eprintln!("ok: nightly toolchain");
        return Ok(None);
    }
    eprintln!("installing: nightly toolchain");
    run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    Ok(Some("nightly toolchain".into()))
}

/// Whether a line of `rustup toolchain list` is the toolchain `nightly` names: `nightly-HOST`,
/// not a dated `nightly-YYYY-MM-DD-HOST`.
fn is_nightly(line: &str) -> bool {
    line.split_whitespace()
        .next()
        .and_then(|name| name.strip_prefix("nightly-"))
        .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
}

fn rust_src() -> Result<Option<String>> {
    let components = query_ok(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if components
        .lines()
        .any(|line| line.split_whitespace().next() == Some("rust-src"))
    {
        eprintln!("ok: rust-src (nightly)");
        return Ok(None);
    }
    eprintln!("installing: rust-src (nightly)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    Ok(Some("rust-src (nightly)".into()))
}

fn bpf_linker() -> Result<Option<String>> {
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION} ({BPF_LINKER_LLVM_FEATURE})");
    let Some(why) = bpf_linker_problem()? else {
        eprintln!("ok: {wanted}");
        return Ok(None);
    };
    eprintln!("installing: {wanted}: {why}");
    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        // --force: rebuild even when cargo already records this version (with other features,
        // or with a binary that no longer runs).
        cmd.args(["install", "bpf-linker", "--version"])
            .arg(format!("={BPF_LINKER_VERSION}"))
            .arg("--force");
        if locked {
            cmd.arg("--locked");
        }
        cmd.args(["--no-default-features", "--features"])
            .arg(format!("{BPF_LINKER_LLVM_FEATURE},llvm-link-static"))
            // /usr/bin/llvm-config is LLVM 14 on Debian 12: llvm-sys needs LLVM_SYS_221_PREFIX
            // to find LLVM 22, and bpf-linker's own build script needs LLVM_PREFIX, without
            // which linking fails with `unable to find library -lLLVM`.
            .env("LLVM_SYS_221_PREFIX", LLVM_DIR)
            .env("LLVM_PREFIX", LLVM_DIR);
        run(&mut cmd)
    };
    install(true).or_else(|err| {
        eprintln!("warning: {err:#}; trying again without --locked");
        install(false)
    })?;
    if let Some(why) = bpf_linker_problem()? {
        bail!("bpf-linker is still not usable after installing it: {why}");
    }
    Ok(Some(wanted))
}

/// Why the bpf-linker at hand is not the one wanted, or None when it is.
fn bpf_linker_problem() -> Result<Option<String>> {
    match Command::new("bpf-linker").arg("--version").output() {
        Err(err) if err.kind() == ErrorKind::NotFound => {
            return Ok(Some("bpf-linker is not in PATH".into()))
        }
        Err(err) => return Ok(Some(format!("`bpf-linker --version` could not run: {err}"))),
        Ok(out) if !out.status.success() => {
            return Ok(Some(format!(
                "`bpf-linker --version` failed ({})",
                out.status
            )))
        }
        Ok(out) => {
            let said = String::from_utf8_lossy(&out.stdout);
            if !said
                .split_whitespace()
                .any(|word| word == BPF_LINKER_VERSION)
            {
                return Ok(Some(format!(
                    "`bpf-linker --version` says {:?}, not {BPF_LINKER_VERSION}",
                    said.trim()
                )));
            }
        }
    }
    let path = crate::cargo_home()?.join(".crates2.json");
    match fs::read_to_string(&path) {
        Ok(json) => crates2_problem(&json).with_context(|| format!("reading {}", path.display())),
        Err(err) if err.kind() == ErrorKind::NotFound => {
            Ok(Some(format!("{} does not exist", path.display())))
        }
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// Why cargo's install record (.crates2.json) does not show the wanted bpf-linker, or None.
fn crates2_problem(json: &str) -> Result<Option<String>> {
    let record: serde_json::Value = serde_json::from_str(json)?;
    let installs = record["installs"]
        .as_object()
        .context("no `installs` object")?;
    // Keys look like "bpf-linker 0.13.0 (registry+https://...)".
    let Some((key, install)) = installs
        .iter()
        .find(|(key, _)| key.split(' ').next() == Some("bpf-linker"))
    else {
        return Ok(Some("cargo has no record of installing bpf-linker".into()));
    };
    let version = key.split(' ').nth(1).unwrap_or_default();
    if version != BPF_LINKER_VERSION {
        return Ok(Some(format!("cargo installed bpf-linker {version}")));
    }
    let features: Vec<&str> = install["features"]
        .as_array()
        .map(|features| features.iter().filter_map(|f| f.as_str()).collect())
        .unwrap_or_default();
    if !features.contains(&BPF_LINKER_LLVM_FEATURE) {
        return Ok(Some(format!(
            "bpf-linker was built without feature {BPF_LINKER_LLVM_FEATURE} (features: {features:?})"
        )));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(major_minor("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(major_minor("5.15.0-91-generic"), Some((5, 15)));
        assert!(major_minor("5.4.0-150-generic").unwrap() < MIN_KERNEL);
        assert!(major_minor("5.10.0-46-cloud-amd64").unwrap() >= MIN_KERNEL);
        assert_eq!(major_minor("weird"), None);
    }

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime shared:9 - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount(mountinfo), Some("/sys/fs/cgroup/unified"));
        assert_eq!(cgroup2_mount(mountinfo.lines().next().unwrap()), None);
    }

    #[test]
    fn nightly_toolchain_names() {
        assert!(is_nightly("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_nightly("nightly-x86_64-unknown-linux-gnu (active)"));
        assert!(!is_nightly("nightly-2025-01-01-x86_64-unknown-linux-gnu"));
        assert!(!is_nightly(
            "stable-x86_64-unknown-linux-gnu (active, default)"
        ));
    }

    #[test]
    fn reads_bpf_linker_install_record() {
        let record = |key: &str, features: &str| {
            format!(r#"{{"installs":{{"{key} (registry+https://x)":{{"features":{features}}}}}}}"#)
        };
        let ok = record("bpf-linker 0.13.0", r#"["llvm-22","llvm-link-static"]"#);
        assert_eq!(crates2_problem(&ok).unwrap(), None);
        let old = record("bpf-linker 0.9.13", r#"["llvm-22"]"#);
        assert!(crates2_problem(&old).unwrap().unwrap().contains("0.9.13"));
        let llvm21 = record("bpf-linker 0.13.0", r#"["llvm-21"]"#);
        assert!(crates2_problem(&llvm21)
            .unwrap()
            .unwrap()
            .contains("llvm-22"));
        let other = record("cargo-edit 0.13.0", "[]");
        assert!(crates2_problem(&other).unwrap().is_some());
        assert!(crates2_problem("{}").is_err());
    }
}
