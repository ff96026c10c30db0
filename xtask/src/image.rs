//! Container images with no base image: statically linked binaries in one layer, written as an
//! OCI image layout archive that containerd (`ctr images import`), podman and docker (`load`)
//! and skopeo (`oci-archive:`) all read.
//!
//! The archive carries, besides the OCI layout (`oci-layout`, `index.json`, `blobs/sha256/`), the
//! `manifest.json` of `docker save`, pointing at the same blobs: the format docker itself writes
//! since version 25, which older docker releases load through `manifest.json`. Every timestamp,
//! owner and order in it is fixed, so the same binaries give the same digests.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};
use flate2::{write::GzEncoder, Compression};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{
    cmd::{query_ok, run_json},
    suites::binaries_in_cargo_messages,
};

/// A file of the image's only layer.
pub struct LayerFile {
    /// Where it is in the image, absolute (`/usr/local/bin/redirector`).
    pub path: String,
    /// The file on this machine that is copied there.
    pub source: PathBuf,
    /// Its permission bits (`0o755`).
    pub mode: u32,
}

/// What the image's config says; the rest (OS, architecture, layers) follows from the build.
pub struct ImageConfig {
    /// The full reference the image is imported under (`localhost/redirector:0.1.0`).
    pub name: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value` pairs.
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The annotation containerd, docker and podman name an imported image by: the full reference
/// (the OCI `ref.name` annotation holds only the tag, as `docker save` writes it).
const CONTAINERD_NAME: &str = "io.containerd.image.name";
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Writes an image of `files` (one layer, with the folders above them) and `config` as an OCI
/// image layout archive at `archive`.
pub fn write_archive(archive: &Path, files: &[LayerFile], config: &ImageConfig) -> Result<()> {
    let layer_tar = layer(files)?;
    let diff_id = digest(&layer_tar);
    let mut gzip = GzEncoder::new(Vec::new(), Compression::default());
    gzip.write_all(&layer_tar)?;
    let layer = Blob::new(LAYER_TYPE, gzip.finish()?);
    let config_json = Blob::json(
        CONFIG_TYPE,
        &json!({
            "architecture": oci_architecture(),
            "os": "linux",
            "config": {
                "Entrypoint": config.entrypoint,
                "Cmd": config.cmd,
                "Env": config.env,
                "Labels": config.labels,
            },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            "history": [{ "created_by": "cargo xtask image" }],
        }),
    )?;
    let manifest = Blob::json(
        MANIFEST_TYPE,
        &json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": config_json.descriptor(),
            "layers": [layer.descriptor()],
        }),
    )?;
    let tag = config
        .name
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .map(|(_, tag)| tag)
        .with_context(|| format!("image name {} has no tag", config.name))?;
    let mut manifest_descriptor = manifest.descriptor();
    manifest_descriptor["annotations"] = json!({ CONTAINERD_NAME: config.name, OCI_REF_NAME: tag });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    });
    let docker_manifest = json!([{
        "Config": config_json.path(),
        "RepoTags": [config.name],
        "Layers": [layer.path()],
    }]);

    let out = File::create(archive).with_context(|| format!("creating {}", archive.display()))?;
    let mut tar = tar::Builder::new(BufWriter::new(out));
    append(
        &mut tar,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    append(&mut tar, "index.json", &serde_json::to_vec(&index)?, 0o644)?;
    append(
        &mut tar,
        "manifest.json",
        &serde_json::to_vec(&docker_manifest)?,
        0o644,
    )?;
    append_folder(&mut tar, "blobs")?;
    append_folder(&mut tar, "blobs/sha256")?;
    for blob in [&layer, &config_json, &manifest] {
        append(&mut tar, &blob.path(), &blob.bytes, 0o644)?;
    }
    tar.into_inner()?
        .flush()
        .with_context(|| format!("writing {}", archive.display()))
}

/// The layer, uncompressed: the folders above the files first (root's, 0755), then the files.
fn layer(files: &[LayerFile]) -> Result<Vec<u8>> {
    let mut folders = BTreeSet::new();
    let mut paths = Vec::new();
    for file in files {
        let path = file
            .path
            .strip_prefix('/')
            .with_context(|| format!("{} is not an absolute path in the image", file.path))?;
        ensure!(
            !path.split('/').any(|part| part.is_empty() || part == ".."),
            "{} is not a plain path",
            file.path
        );
        let mut folder = Path::new(path).parent();
        while let Some(f) = folder.filter(|f| !f.as_os_str().is_empty()) {
            folders.insert(f.to_string_lossy().into_owned());
            folder = f.parent();
        }
        paths.push(path);
    }
    let mut tar = tar::Builder::new(Vec::new());
    for folder in &folders {
        append_folder(&mut tar, folder)?;
    }
    for (file, path) in files.iter().zip(paths) {
        let bytes =
            fs::read(&file.source).with_context(|| format!("reading {}", file.source.display()))?;
        append(&mut tar, path, &bytes, file.mode)?;
    }
    Ok(tar.into_inner()?)
}

fn append<W: Write>(tar: &mut tar::Builder<W>, path: &str, bytes: &[u8], mode: u32) -> Result<()> {
    let mut header = header(tar::EntryType::Regular, mode);
    header.set_size(bytes.len() as u64);
    tar.append_data(&mut header, path, bytes)
        .with_context(|| format!("adding {path} to a tar"))
}

fn append_folder<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> Result<()> {
    let mut header = header(tar::EntryType::Directory, 0o755);
    header.set_size(0);
    tar.append_data(&mut header, format!("{path}/"), std::io::empty())
        .with_context(|| format!("adding {path}/ to a tar"))
}

/// Owned by root, dated 1970: nothing of the build machine ends up in the image.
fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

/// A content-addressed blob of the layout.
struct Blob {
    media_type: &'static str,
    digest: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(media_type: &'static str, bytes: Vec<u8>) -> Self {
        Self {
            media_type,
            digest: digest(&bytes),
            bytes,
        }
    }

    fn json(media_type: &'static str, value: &Value) -> Result<Self> {
        Ok(Self::new(media_type, serde_json::to_vec(value)?))
    }

    fn descriptor(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len() })
    }

    fn path(&self) -> String {
        blob_path(&self.digest)
    }
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

/// The OCI name of this machine's architecture, which the binaries are built for.
fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The Rust target of this machine with glibc, named explicitly so that the static flag reaches
/// only the binaries, not the build scripts and proc-macros (which cargo then builds for the
/// host without it).
fn static_target() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// Builds `bins` of `package` in release mode, statically linked (glibc's static-pie), and
/// returns their paths; fails if one of them would need a loader or a library from the image.
pub fn static_binaries(root: &Path, package: &str, bins: &[&str]) -> Result<Vec<PathBuf>> {
    let target = static_target();
    let rustflags_var = format!(
        "CARGO_TARGET_{}_RUSTFLAGS",
        target.to_uppercase().replace('-', "_")
    );
    let mut build = Command::new("cargo");
    build
        .current_dir(root)
        .args(["build", "--release", "--target", &target, "-p", package])
        .args(bins.iter().flat_map(|bin| ["--bin", bin]))
        .arg("--message-format=json-render-diagnostics")
        .env(&rustflags_var, "-C target-feature=+crt-static");
    let binaries = binaries_in_cargo_messages(&run_json(&mut build)?);
    ensure!(
        binaries.len() == bins.len(),
        "cargo built {binaries:?}, expected {bins:?}"
    );
    for binary in &binaries {
        if let Some(interpreter) = interpreter(binary)? {
            bail!(
                "{} is dynamically linked (loader {interpreter}): is RUSTFLAGS set? It overrides \
                 {rustflags_var}",
                binary.display()
            );
        }
    }
    Ok(binaries)
}

/// The dynamic loader an ELF executable asks for (PT_INTERP), if any.
fn interpreter(path: &Path) -> Result<Option<String>> {
    use object::read::elf::{ElfFile64, ProgramHeader};
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let elf = ElfFile64::<object::Endianness>::parse(&*data)
        .with_context(|| format!("{} is not a 64-bit ELF file", path.display()))?;
    for segment in elf.elf_program_headers() {
        if let Some(interpreter) = segment.interpreter(elf.endian(), &*data)? {
            return Ok(Some(String::from_utf8_lossy(interpreter).into_owned()));
        }
    }
    Ok(None)
}

/// `cargo xtask image`: the agent, CLI and CNI plugin (`redirector`, `redirector-cni`) in
/// `/usr/local/bin` of an image named `localhost/redirector:<version>`; returns the archive's
/// path.
pub fn redirector_image(root: &Path, target_dir: &Path) -> Result<PathBuf> {
    let binaries = static_binaries(root, "redirector", &["redirector", "redirector-cni"])?;
    let redirector = binaries
        .iter()
        .find(|path| path.file_name().is_some_and(|name| name == "redirector"))
        .context("cargo built no redirector binary")?;
    // The built binary says its version, which also shows that it starts.
    let version_line = query_ok(Command::new(redirector).arg("--version"))?;
    let version = version_line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("`redirector --version` printed {version_line:?}"))?;
    let files: Vec<LayerFile> = binaries
        .iter()
        .map(|binary| LayerFile {
            path: format!(
                "/usr/local/bin/{}",
                binary.file_name().unwrap_or_default().to_string_lossy()
            ),
            source: binary.clone(),
            mode: 0o755,
        })
        .collect();
    let config = ImageConfig {
        name: format!("localhost/redirector:{version}"),
        entrypoint: vec!["redirector".into()],
        cmd: vec!["--help".into()],
        env: vec!["PATH=/usr/local/bin".into()],
        labels: BTreeMap::from([
            ("org.opencontainers.image.title".into(), "redirector".into()),
            ("org.opencontainers.image.version".into(), version.into()),
            (
                "org.opencontainers.image.description".into(),
                "iptables-free traffic interception for service-mesh sidecars: agent, CLI \
                 (redirector) and CNI plugin (redirector-cni)"
                    .into(),
            ),
            (
                "org.opencontainers.image.licenses".into(),
                "Apache-2.0".into(),
            ),
        ]),
    };
    let folder = target_dir.join("image");
    fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    let archive = folder.join(format!("redirector-{version}.oci.tar"));
    write_archive(&archive, &files, &config)?;
    Ok(archive)
}

/// The reference the containerd suite runs its containers and pod sandboxes from.
const E2E_IMAGE_NAME: &str = "localhost/redirector-e2e:1";
/// The workspace binaries the containerd suite runs in containers: the test tools and the
/// proxy.
const E2E_IMAGE_BINARIES: [&str; 2] = ["e2e-helper", "redirector-proxy"];

/// The containerd suite's image, from the binaries `cargo xtask test` built (among `binaries`):
/// `e2e-helper` and `redirector-proxy` in /usr/local/bin, with the libraries `ldd` lists at
/// their host paths (the test build is not static). It is also the pod sandbox ("pause") image:
/// its default command is `e2e-helper pause`. Returns the archive's path.
pub fn e2e_image(target_dir: &Path, binaries: &[PathBuf]) -> Result<PathBuf> {
    let mut files = Vec::new();
    let mut libraries = BTreeSet::new();
    for name in E2E_IMAGE_BINARIES {
        let binary = binaries
            .iter()
            .find(|path| path.file_name().is_some_and(|file| file == name))
            .with_context(|| format!("the test build made no {name} binary"))?;
        files.push(LayerFile {
            path: format!("/usr/local/bin/{name}"),
            source: binary.clone(),
            mode: 0o755,
        });
        libraries.extend(crate::vm::ldd_libraries(binary)?);
    }
    for library in libraries {
        files.push(LayerFile {
            path: library.display().to_string(),
            source: fs::canonicalize(&library)
                .with_context(|| format!("resolving {}", library.display()))?,
            mode: 0o755,
        });
    }
    let config = ImageConfig {
        name: E2E_IMAGE_NAME.into(),
        entrypoint: Vec::new(),
        cmd: vec!["/usr/local/bin/e2e-helper".into(), "pause".into()],
        env: vec!["PATH=/usr/local/bin".into()],
        labels: BTreeMap::new(),
    };
    let folder = target_dir.join("image");
    fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    let archive = folder.join("redirector-e2e.oci.tar");
    write_archive(&archive, &files, &config)?;
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, io::Read};

    use super::*;

    /// The archive's entries by path.
    fn entries(bytes: &[u8]) -> HashMap<String, (Vec<u8>, u32)> {
        let mut archive = tar::Archive::new(bytes);
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let path = entry.path().unwrap().to_string_lossy().into_owned();
                let mode = entry.header().mode().unwrap();
                let mut content = Vec::new();
                entry.read_to_end(&mut content).unwrap();
                (path, (content, mode))
            })
            .collect()
    }

    /// The blob a descriptor points at, checked against its digest and size.
    fn blob<'a>(archive: &'a HashMap<String, (Vec<u8>, u32)>, descriptor: &Value) -> &'a [u8] {
        let digest = descriptor["digest"].as_str().unwrap();
        let (bytes, _) = &archive[&blob_path(digest)];
        assert_eq!(super::digest(bytes), digest);
        assert_eq!(descriptor["size"], bytes.len());
        bytes
    }

    #[test]
    fn writes_an_archive_that_reads_back() {
        let dir = std::env::temp_dir().join(format!("xtask-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let tool = dir.join("tool");
        fs::write(&tool, b"#!/bin/true\n").unwrap();
        let files = [
            LayerFile {
                path: "/usr/local/bin/tool".into(),
                source: tool.clone(),
                mode: 0o755,
            },
            LayerFile {
                path: "/etc/tool.conf".into(),
                source: tool,
                mode: 0o644,
            },
        ];
        let config = ImageConfig {
            name: "localhost/tool:1.2.3".into(),
            entrypoint: vec!["tool".into()],
            cmd: vec!["--help".into()],
            env: vec!["PATH=/usr/local/bin".into()],
            labels: BTreeMap::from([("purpose".into(), "test".into())]),
        };
        let path = dir.join("tool.oci.tar");
        write_archive(&path, &files, &config).unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::remove_dir_all(&dir).unwrap();

        let archive = entries(&bytes);
        let read_json = |name: &str| -> Value { serde_json::from_slice(&archive[name].0).unwrap() };
        assert_eq!(read_json("oci-layout")["imageLayoutVersion"], "1.0.0");
        let index = read_json("index.json");
        let manifest_descriptor = &index["manifests"][0];
        assert_eq!(
            manifest_descriptor["annotations"][CONTAINERD_NAME],
            "localhost/tool:1.2.3"
        );
        assert_eq!(manifest_descriptor["annotations"][OCI_REF_NAME], "1.2.3");
        let manifest: Value = serde_json::from_slice(blob(&archive, manifest_descriptor)).unwrap();
        let image_config: Value =
            serde_json::from_slice(blob(&archive, &manifest["config"])).unwrap();
        assert_eq!(image_config["config"]["Entrypoint"], json!(["tool"]));
        assert_eq!(image_config["config"]["Labels"]["purpose"], "test");

        let mut layer_tar = Vec::new();
        flate2::read::GzDecoder::new(blob(&archive, &manifest["layers"][0]))
            .read_to_end(&mut layer_tar)
            .unwrap();
        assert_eq!(image_config["rootfs"]["diff_ids"][0], digest(&layer_tar));
        let layer = entries(&layer_tar);
        let mut listed: Vec<(&str, u32)> = layer
            .iter()
            .map(|(path, (_, mode))| (path.as_str(), *mode))
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            [
                ("etc/", 0o755),
                ("etc/tool.conf", 0o644),
                ("usr/", 0o755),
                ("usr/local/", 0o755),
                ("usr/local/bin/", 0o755),
                ("usr/local/bin/tool", 0o755),
            ]
        );
        assert_eq!(layer["usr/local/bin/tool"].0, b"#!/bin/true\n");

        // docker's manifest.json points at the same blobs.
        let docker = read_json("manifest.json");
        assert_eq!(docker[0]["RepoTags"], json!(["localhost/tool:1.2.3"]));
        assert_eq!(
            docker[0]["Config"],
            blob_path(manifest["config"]["digest"].as_str().unwrap())
        );
        assert_eq!(
            docker[0]["Layers"][0],
            blob_path(manifest["layers"][0]["digest"].as_str().unwrap())
        );
    }
}
