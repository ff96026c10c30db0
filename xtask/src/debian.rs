//! Debian's archive through apt with private state: package lists, downloads and the sources
//! list live under one folder of the target dir, so that suites the machine does not use
//! (bullseye, bookworm-backports) are reached without touching /etc/apt.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};

use crate::cmd::{query_ok, run};

/// Lists older than this are fetched again; a younger cache answers without the network.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The suites the VM kernels and the qemu backport come from: bookworm (6.1, and 6.12 in its
/// security updates), bookworm-backports (6.12, qemu 10) and bullseye (5.10).
const SOURCES: &[(&str, &str)] = &[
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian", "bookworm-updates"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
    ("http://deb.debian.org/debian", "bookworm-backports"),
    ("http://deb.debian.org/debian", "bullseye"),
    ("http://deb.debian.org/debian-security", "bullseye-security"),
];

/// apt with its lists, cache and sources list under `dir`.
pub struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    /// Creates the folders and the sources list, and fetches the package lists unless a copy
    /// younger than a day is there.
    pub fn open(dir: PathBuf) -> Result<PrivateApt> {
        let apt = PrivateApt { dir };
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            let path = apt.dir.join(sub);
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        let sources: String = SOURCES
            .iter()
            .map(|(uri, suite)| format!("deb [signed-by={KEYRING}] {uri} {suite} main\n"))
            .collect();
        let list = apt.sources_list();
        if fs::read_to_string(&list).ok().as_deref() != Some(sources.as_str()) {
            fs::write(&list, sources).with_context(|| format!("writing {}", list.display()))?;
            // New sources: the lists in the cache are not theirs.
            let _ = fs::remove_file(apt.updated_stamp());
        }
        if apt.lists_age().is_none_or(|age| age > LISTS_MAX_AGE) {
            eprintln!(
                "vm: fetching Debian's package lists into {}",
                apt.dir.display()
            );
            run(apt.command("apt-get").arg("update"))?;
            fs::write(apt.updated_stamp(), "")?;
        }
        Ok(apt)
    }

    fn sources_list(&self) -> PathBuf {
        self.dir.join("sources.list")
    }

    fn updated_stamp(&self) -> PathBuf {
        self.dir.join("lists/updated")
    }

    fn lists_age(&self) -> Option<Duration> {
        let modified = fs::metadata(self.updated_stamp()).ok()?.modified().ok()?;
        SystemTime::now().duration_since(modified).ok()
    }

    /// `program` (apt-get, apt-cache) with this private state. The system's dpkg status is
    /// still the one apt reads, which only matters for installing.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let opt = |name: &str, value: &Path| format!("{name}={}", value.display());
        cmd.arg("-o")
            .arg(opt("Dir::Etc::SourceList", &self.sources_list()))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null", "-o"])
            .arg(opt("Dir::State::Lists", &self.dir.join("lists")))
            .arg("-o")
            .arg(opt("Dir::Cache", &self.dir.join("cache")))
            // The downloads go to a folder root owns; apt's sandbox user could not write there.
            .args(["-o", "APT::Sandbox::User=root"])
            .current_dir(self.dir.join("debs"));
        cmd
    }

    /// Names of the packages in the lists that start with `prefix`.
    pub fn package_names(&self, prefix: &str) -> Result<Vec<String>> {
        let out = query_ok(self.command("apt-cache").args(["pkgnames", prefix]))?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// The candidate version of `package` (what `apt-get download` would fetch).
    pub fn candidate(&self, package: &str) -> Result<String> {
        let out = query_ok(self.command("apt-cache").args(["policy", package]))?;
        out.lines()
            .find_map(|line| line.trim().strip_prefix("Candidate: "))
            .filter(|version| *version != "(none)")
            .map(str::to_owned)
            .with_context(|| format!("Debian's archive has no candidate for {package}"))
    }

    /// The .deb of `package` at `version`, downloaded unless it already is.
    pub fn download(&self, package: &str, version: &str) -> Result<PathBuf> {
        // apt names the file <package>_<version without epoch>_<arch>.deb.
        let plain_version = version.split_once(':').map_or(version, |(_, rest)| rest);
        let prefix = format!("{package}_{plain_version}_");
        let debs = self.dir.join("debs");
        let find = || -> Result<Option<PathBuf>> {
            for entry in fs::read_dir(&debs)? {
                let path = entry?.path();
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                if name.starts_with(&prefix) && name.ends_with(".deb") {
                    return Ok(Some(path));
                }
            }
            Ok(None)
        };
        if let Some(deb) = find()? {
            return Ok(deb);
        }
        run(self
            .command("apt-get")
            .arg("download")
            .arg(format!("{package}={version}")))?;
        match find()? {
            Some(deb) => Ok(deb),
            None => bail!(
                "apt-get download {package}={version} left no {prefix}*.deb in {}",
                debs.display()
            ),
        }
    }
}

/// Unpacks a .deb into `dir` (`dpkg -x`: files only, no maintainer scripts).
pub fn extract(deb: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    run(Command::new("dpkg").arg("-x").arg(deb).arg(dir))
}
