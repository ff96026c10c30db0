//! Loading the embedded eBPF object once per node and opening what is pinned.
use std::{
    fs,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::Path,
};

use aya::{
    maps::{MapData, MapError},
    pin::PinError,
    programs::{CgroupSockAddr, CgroupSockopt, Program, ProgramError, SkLookup, SockOps},
    EbpfLoader,
};
use redirector_common::{map_names, program_names, DEFAULT_HANDSHAKE_CAPACITY};

use crate::{
    link::{self, Hook},
    pins::PinRoot,
};

/// The eBPF object built by build.rs; embedding it makes the binary self-contained.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("loading program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("pinning program {name}: {source}")]
    PinProgram {
        name: &'static str,
        source: PinError,
    },
    #[error("opening pinned program {name}: {source}")]
    OpenProgram {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("opening pinned map {name}: {source}")]
    OpenMap {
        name: &'static str,
        source: MapError,
    },
    #[error("removing stale program pin {path}: {source}")]
    RemoveStale {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("reading the eBPF object's map definitions: {0}")]
    MapDefinitions(#[from] aya_obj::ParseError),
    #[error(
        "pinned map {map} has another layout than this build's ({pinned} pinned, {build} here): \
         this build cannot take over the pinned programs' state in place; drain the node, run \
         `redirector uninstall` (every pod leaves capture) and enroll the pods again, or go back \
         to the build that made the maps"
    )]
    LayoutMismatch {
        map: String,
        pinned: String,
        build: String,
    },
    #[error("replacing the program of link {pin}: {source}")]
    LinkUpdate {
        pin: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("replacing the pin of program {name}: {source}")]
    Repin {
        name: &'static str,
        source: std::io::Error,
    },
}

/// Settings of a node-wide load that the object's defaults do not fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Capacity of the handshake map (captured connections whose proxy side does not exist
    /// yet, node-wide). Only applies when the maps are created; pinned maps keep theirs.
    pub handshake_capacity: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            handshake_capacity: DEFAULT_HANDSHAKE_CAPACITY,
        }
    }
}

fn program_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Connect4 => program_names::CONNECT4,
        Hook::Connect6 => program_names::CONNECT6,
        Hook::SockOps => program_names::SOCKOPS,
        Hook::GetSockopt => program_names::GETSOCKOPT,
        Hook::GetPeerName4 => program_names::GETPEERNAME4,
        Hook::GetPeerName6 => program_names::GETPEERNAME6,
        Hook::GetSockName4 => program_names::GETSOCKNAME4,
        Hook::GetSockName6 => program_names::GETSOCKNAME6,
        Hook::SendMsg4 => program_names::SENDMSG4,
        Hook::SendMsg6 => program_names::SENDMSG6,
        Hook::RecvMsg4 => program_names::RECVMSG4,
        Hook::RecvMsg6 => program_names::RECVMSG6,
        Hook::Bind4 => program_names::BIND4,
        Hook::Bind6 => program_names::BIND6,
        Hook::Inbound => program_names::INBOUND,
    }
}

/// A program of the object as its aya type, behind the calls redirector makes on it.
fn typed(program: &mut Program, hook: Hook) -> Result<&mut dyn LoadPin, ProgramError> {
    Ok(match hook {
        Hook::Connect4
        | Hook::Connect6
        | Hook::GetPeerName4
        | Hook::GetPeerName6
        | Hook::GetSockName4
        | Hook::GetSockName6
        | Hook::SendMsg4
        | Hook::SendMsg6
        | Hook::RecvMsg4
        | Hook::RecvMsg6
        | Hook::Bind4
        | Hook::Bind6 => <&mut CgroupSockAddr>::try_from(program)?,
        Hook::SockOps => <&mut SockOps>::try_from(program)?,
        Hook::GetSockopt => <&mut CgroupSockopt>::try_from(program)?,
        Hook::Inbound => <&mut SkLookup>::try_from(program)?,
    })
}

/// Loads one program of the object (the verifier checks it).
fn load_only(program: &mut Program, hook: Hook) -> Result<(), ProgramError> {
    typed(program, hook)?.load_program()
}

/// Pins one loaded program.
fn pin_loaded(
    program: &mut Program,
    hook: Hook,
    name: &'static str,
    pin: &Path,
) -> Result<(), LoadError> {
    typed(program, hook)
        .map_err(|source| LoadError::Program { name, source })?
        .pin_program(pin)
        .map_err(|source| LoadError::PinProgram { name, source })
}

/// The load and pin calls that aya gives each program type separately.
trait LoadPin {
    fn load_program(&mut self) -> Result<(), ProgramError>;
    fn pin_program(&mut self, pin: &Path) -> Result<(), PinError>;
}

macro_rules! impl_load_pin {
    ($($program:ty),+) => {$(
        impl LoadPin for $program {
            fn load_program(&mut self) -> Result<(), ProgramError> {
                self.load()
            }
            fn pin_program(&mut self, pin: &Path) -> Result<(), PinError> {
                self.pin(pin)
            }
        }
    )+};
}
impl_load_pin!(CgroupSockAddr, SockOps, CgroupSockopt, SkLookup);

/// Identifies this build's programs: a digest of the embedded object, so that a build with
/// other programs is told apart from the pinned ones. `REDIRECTOR_TEST_PROGRAM_REVISION` makes
/// it another build's (the upgrade tests load the same programs as if they had changed).
/// Computed once per process: every enroll asks, and hashing the 1 MB object takes about 0.8 ms
/// here, a third of a pod's whole setup through the CNI plugin.
pub fn build_id() -> [u8; 16] {
    static BUILD_ID: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *BUILD_ID.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let mut digest = Sha256::new();
        digest.update(EBPF_OBJECT);
        if let Ok(revision) = std::env::var(TEST_REVISION_ENV) {
            digest.update(revision.as_bytes());
        }
        let mut id = [0; 16];
        id.copy_from_slice(&digest.finalize()[..16]);
        id
    })
}

/// See [`build_id`].
pub const TEST_REVISION_ENV: &str = "REDIRECTOR_TEST_PROGRAM_REVISION";

/// What an upgrade in place did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpgradeReport {
    /// Pods whose links now run this build's programs.
    pub pods: usize,
    /// Links whose program was replaced.
    pub links: usize,
}

/// Replaces the pinned programs with this build's in every pod's links, atomically per link
/// (`BPF_LINK_UPDATE`: a link never runs no program), keeping the maps and their entries. The
/// pinned maps must have this build's layout. The caller holds the root's lock.
pub fn upgrade_programs(root: &PinRoot, options: &LoadOptions) -> Result<UpgradeReport, LoadError> {
    check_map_layouts(root)?;
    let mut ebpf = load_object(root, options)?;
    let mut loaded = Vec::new();
    for hook in Hook::ALL {
        let name = program_name(hook);
        let program = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram { name })?;
        load_only(program, hook).map_err(|source| LoadError::Program { name, source })?;
        loaded.push((hook, name));
    }
    let mut report = UpgradeReport::default();
    for pod in root.pinned_pods().unwrap_or_default() {
        let mut updated = false;
        for &(hook, name) in &loaded {
            let pin = root.pod_dir(pod).join(hook.pin_name());
            if !pin.exists() {
                continue;
            }
            let program = ebpf
                .program(name)
                .ok_or(LoadError::MissingProgram { name })?
                .fd()
                .map_err(|source| LoadError::Program { name, source })?;
            link::update_pinned(&pin, program.as_fd())
                .map_err(|source| LoadError::LinkUpdate { pin, source })?;
            report.links += 1;
            updated = true;
        }
        report.pods += usize::from(updated);
    }
    // The new programs take the old ones' pins (rename replaces a pin at once).
    for (hook, name) in loaded {
        let next = root.program(&format!("{name}-next"));
        let _ = fs::remove_file(&next);
        let program = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram { name })?;
        pin_loaded(program, hook, name, &next)?;
        fs::rename(&next, root.program(name))
            .map_err(|source| LoadError::Repin { name, source })?;
    }
    Ok(report)
}

/// The pinned maps have this build's layout: type, key and value sizes and flags (capacities
/// may differ: the handshake map's is a setting). Without this a program would read a map of
/// another layout; aya reuses pinned maps by name without looking.
pub(crate) fn check_map_layouts(root: &PinRoot) -> Result<(), LoadError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT)?;
    for (name, map) in &object.maps {
        let pin = root.map(name);
        if !pin.exists() {
            continue;
        }
        let info = MapData::from_pin(&pin)
            .and_then(|data| data.info())
            .map_err(|source| LoadError::OpenMap {
                name: "pinned map",
                source,
            })?;
        let pinned_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let pinned = (
            pinned_type,
            info.key_size(),
            info.value_size(),
            info.map_flags(),
        );
        let build = (
            map.map_type(),
            map.key_size(),
            map.value_size(),
            map.map_flags(),
        );
        if pinned != build {
            let show = |(t, k, v, f): (u32, u32, u32, u32)| {
                format!("type {t}, key {k} B, value {v} B, flags {f:#x}")
            };
            return Err(LoadError::LayoutMismatch {
                map: name.clone(),
                pinned: show(pinned),
                build: show(build),
            });
        }
    }
    Ok(())
}

/// Whether every program is pinned under `root` (the node is installed).
pub fn programs_pinned(root: &PinRoot) -> bool {
    Hook::ALL
        .iter()
        .all(|&hook| root.program(program_name(hook)).exists())
}

/// Loads and pins the programs unless they are pinned already; maps are pinned by name
/// under `<root>/maps` (existing pins are reused, so state survives reloads). The caller
/// holds the root's lock.
pub fn ensure_programs_pinned(root: &PinRoot, options: &LoadOptions) -> Result<(), LoadError> {
    if programs_pinned(root) {
        return Ok(());
    }
    let pins = Hook::ALL.map(|hook| root.program(program_name(hook)));
    // A previous load died half-way, or an older version left fewer programs: start the
    // programs afresh (maps are kept).
    for pin in pins.iter().filter(|pin| pin.exists()) {
        fs::remove_file(pin).map_err(|source| LoadError::RemoveStale {
            path: pin.clone(),
            source,
        })?;
    }
    let mut ebpf = load_object(root, options)?;
    for hook in Hook::ALL {
        let name = program_name(hook);
        let program = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram { name })?;
        load_only(program, hook).map_err(|source| LoadError::Program { name, source })?;
        pin_loaded(program, hook, name, &root.program(name))?;
    }
    Ok(())
}

/// The embedded object with its maps created or, where pinned, reused (aya reuses a pinned
/// map by name: [`check_map_layouts`] is what makes that safe across builds).
fn load_object(root: &PinRoot, options: &LoadOptions) -> Result<aya::Ebpf, LoadError> {
    // SOCKET_RECORDS is a BTF-defined map (socket storage needs BTF), which carries no pinning
    // attribute of its own: its pin path is given by name.
    let socket_records_pin = root.map(map_names::SOCKET_RECORDS);
    Ok(EbpfLoader::new()
        .default_map_pin_directory(root.maps_dir())
        .map_pin_path(map_names::SOCKET_RECORDS, socket_records_pin.as_path())
        .map_max_entries(map_names::HANDSHAKES, options.handshake_capacity)
        .load(EBPF_OBJECT)?)
}

/// The pinned programs, opened to be attached.
pub struct Programs {
    fds: Vec<(Hook, OwnedFd)>,
}

impl Programs {
    pub fn open(root: &PinRoot) -> Result<Self, LoadError> {
        let fds = Hook::ALL
            .into_iter()
            .map(|hook| {
                let name = program_name(hook);
                link::open_pinned(&root.program(name))
                    .map(|fd| (hook, fd))
                    .map_err(|source| LoadError::OpenProgram { name, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { fds })
    }

    pub fn fd(&self, hook: Hook) -> BorrowedFd<'_> {
        let (_, fd) = self
            .fds
            .iter()
            .find(|(h, _)| *h == hook)
            .expect("every hook is opened");
        fd.as_fd()
    }

    /// Id of a program whose log buffer carries every program's lines (they share one).
    pub fn log_program_id(root: &PinRoot) -> Result<u32, LoadError> {
        let name = program_names::SOCKOPS;
        let open = || {
            SockOps::from_pin(root.program(name))?
                .info()
                .map(|info| info.id())
        };
        open().map_err(|source| LoadError::OpenProgram {
            name,
            source: std::io::Error::other(source),
        })
    }
}
