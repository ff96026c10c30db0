//! Debian's cloud kernels: a request (`5.10`, or an exact ABI like `6.1.0-57`) resolved to a
//! package, downloaded once, unpacked with its modules indexed by depmod.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{cmd::run, debian, debian::PrivateApt};

/// Cloud kernels boot in about half the time of the generic ones and carry every module the
/// suites need (veth, netfilter, bridge).
const FLAVOUR: &str = "cloud-amd64";

/// An unpacked kernel package.
pub struct Kernel {
    /// `uname -r` of the kernel, e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    /// The Debian package and version it came from.
    pub package: String,
    pub version: String,
    /// The unpacked package: boot/, lib/modules/RELEASE/ (with depmod's index).
    pub root: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    pub fn config(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("config-{}", self.release))
    }

    pub fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// Resolves `request` to a kernel package, then downloads and unpacks it unless the cache under
/// `cache` has it.
pub fn fetch(apt: &PrivateApt, cache: &Path, request: &str) -> Result<Kernel> {
    let package = resolve(apt, request)?;
    let version = apt.candidate(&package)?;
    let root = cache.join(format!("{package}_{version}"));
    let release = package
        .strip_prefix("linux-image-")
        .expect("resolve returns linux-image-* names")
        .to_owned();
    let kernel = Kernel {
        release,
        package,
        version,
        root,
    };
    // Written last: its presence means the unpacking and depmod finished.
    let done = kernel.root.join(".unpacked");
    if done.exists() {
        eprintln!("vm: kernel {} {} (cached)", kernel.package, kernel.version);
        return Ok(kernel);
    }
    eprintln!("vm: kernel {} {}", kernel.package, kernel.version);
    let deb = apt.download(&kernel.package, &kernel.version)?;
    if kernel.root.exists() {
        fs::remove_dir_all(&kernel.root)
            .with_context(|| format!("removing the partial {}", kernel.root.display()))?;
    }
    debian::extract(&deb, &kernel.root)?;
    if !kernel.vmlinuz().is_file() {
        bail!("{} has no {}", deb.display(), kernel.vmlinuz().display());
    }
    // The package has no module index (depmod runs when it is installed): build it, so that
    // modprobe in the guest resolves dependencies and the kernel's requests by alias.
    run(Command::new("depmod")
        .arg("-b")
        .arg(&kernel.root)
        .arg(&kernel.release))?;
    fs::write(&done, "")?;
    Ok(kernel)
}

/// The package for `request`: a series (`5.10`, `6.1`, `6.12`) picks the newest cloud kernel
/// of that series in the lists; anything else is taken as the ABI part of the package name
/// (`6.1.0-57`, `6.12.117+deb12`).
fn resolve(apt: &PrivateApt, request: &str) -> Result<String> {
    let names = apt.package_names("linux-image-")?;
    if !is_series(request) {
        let wanted = format!("linux-image-{request}-{FLAVOUR}");
        if names.contains(&wanted) {
            return Ok(wanted);
        }
        bail!("Debian's archive has no {wanted} (kernels are asked for as a series like 5.10, 6.1, 6.12, or as the ABI of a package name like 6.1.0-57)");
    }
    names
        .iter()
        .filter_map(|name| Some((abi_in_series(name, request)?, name)))
        .max_by(|(a, _), (b, _)| abi_order(a).cmp(&abi_order(b)))
        .map(|(_, name)| name.clone())
        .with_context(|| {
            format!("Debian's archive (bookworm, bookworm-backports, bullseye) has no linux-image-{request}.*-{FLAVOUR}")
        })
}

fn is_series(request: &str) -> bool {
    let mut parts = request.split('.');
    let numeric = |part: Option<&str>| {
        part.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    numeric(parts.next()) && numeric(parts.next()) && parts.next().is_none()
}

/// The ABI of a signed cloud kernel package of `series`: `linux-image-6.1.0-57-cloud-amd64`
/// gives `6.1.0-57`; debug symbols, unsigned twins and other series give None.
fn abi_in_series<'a>(name: &'a str, series: &str) -> Option<&'a str> {
    let abi = name
        .strip_prefix("linux-image-")?
        .strip_suffix(&format!("-{FLAVOUR}"))?;
    let rest = abi.strip_prefix(series)?.strip_prefix('.')?;
    rest.starts_with(|c: char| c.is_ascii_digit())
        .then_some(abi)
}

/// Orders ABIs by their numbers in turn: `6.1.0-57` > `6.1.0-0.deb11.52` (a backport built
/// for the older release), `6.12.117+deb12` > `6.12.95+deb12`.
fn abi_order(abi: &str) -> Vec<u64> {
    abi.split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(|part| part.parse().unwrap_or(u64::MAX))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_and_abis() {
        assert!(is_series("5.10"));
        assert!(is_series("6.12"));
        assert!(!is_series("6.1.0-57"));
        assert!(!is_series("6"));
        assert!(!is_series("6."));
        assert_eq!(
            abi_in_series("linux-image-6.1.0-57-cloud-amd64", "6.1"),
            Some("6.1.0-57")
        );
        assert_eq!(
            abi_in_series("linux-image-6.12.117+deb12-cloud-amd64", "6.1"),
            None
        );
        assert_eq!(
            abi_in_series("linux-image-6.1.0-57-cloud-amd64-unsigned", "6.1"),
            None
        );
        assert_eq!(
            abi_in_series("linux-image-6.1.0-57-cloud-amd64-dbg", "6.1"),
            None
        );
        assert_eq!(abi_in_series("linux-image-6.1.0-57-amd64", "6.1"), None);
    }

    #[test]
    fn newest_abi_wins() {
        assert!(abi_order("6.1.0-57") > abi_order("6.1.0-0.deb11.52"));
        assert!(abi_order("6.12.117+deb12") > abi_order("6.12.95+deb12"));
        assert!(abi_order("6.12.90+deb12.1") > abi_order("6.12.90+deb12"));
        assert!(abi_order("5.10.0-46") > abi_order("5.10.0-9"));
    }
}
