//! Loading the embedded eBPF object once per node and opening what is pinned.
use std::{
    fs,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
};

use aya::{
    maps::{lpm_trie::LpmTrie, Array, HashMap, Map, MapData, MapError, PerCpuHashMap},
    pin::PinError,
    programs::{CgroupSockAddr, CgroupSockopt, Program, ProgramError, SkLookup, SockOps},
    EbpfLoader,
};
use redirector_common::{
    map_names, program_names, ConnectionRecord, InboundAddrKey, InboundNetns, InboundPod, OwnerKey,
    PeerKey, PodAddrKey, PodConfig, PodStats, PortKey, RawSockAddr, Settings,
};

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
}

fn program_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Connect4 => program_names::CONNECT4,
        Hook::Connect6 => program_names::CONNECT6,
        Hook::SockOps => program_names::SOCKOPS,
        Hook::GetSockopt => program_names::GETSOCKOPT,
        Hook::GetPeerName4 => program_names::GETPEERNAME4,
        Hook::GetPeerName6 => program_names::GETPEERNAME6,
        Hook::Inbound => program_names::INBOUND,
    }
}

/// Loads one program of the object and pins it.
fn load_and_pin(
    program: &mut Program,
    hook: Hook,
    pin: &Path,
) -> Result<Result<(), PinError>, ProgramError> {
    fn load<P>(program: &mut Program, pin: &Path) -> Result<Result<(), PinError>, ProgramError>
    where
        for<'p> &'p mut P: TryFrom<&'p mut Program, Error = ProgramError>,
        P: LoadPin,
    {
        let program = <&mut P>::try_from(program)?;
        program.load_program()?;
        Ok(program.pin_program(pin))
    }
    match hook {
        Hook::Connect4 | Hook::Connect6 | Hook::GetPeerName4 | Hook::GetPeerName6 => {
            load::<CgroupSockAddr>(program, pin)
        }
        Hook::SockOps => load::<SockOps>(program, pin),
        Hook::GetSockopt => load::<CgroupSockopt>(program, pin),
        Hook::Inbound => load::<SkLookup>(program, pin),
    }
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

/// Whether every program is pinned under `root` (the node is installed).
pub fn programs_pinned(root: &PinRoot) -> bool {
    Hook::ALL
        .iter()
        .all(|&hook| root.program(program_name(hook)).exists())
}

/// Loads and pins the programs unless they are pinned already; maps are pinned by name
/// under `<root>/maps` (existing pins are reused, so state survives reloads). The caller
/// holds the root's lock.
pub fn ensure_programs_pinned(root: &PinRoot) -> Result<(), LoadError> {
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
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(root.maps_dir())
        .load(EBPF_OBJECT)?;
    for hook in Hook::ALL {
        let name = program_name(hook);
        let program = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram { name })?;
        load_and_pin(program, hook, &root.program(name))
            .map_err(|source| LoadError::Program { name, source })?
            .map_err(|source| LoadError::PinProgram { name, source })?;
    }
    Ok(())
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

/// The pinned maps, typed.
pub struct Maps {
    pub pod_config: HashMap<MapData, u64, PodConfig>,
    pub owners: HashMap<MapData, OwnerKey, u8>,
    pub ports: HashMap<MapData, PortKey, u32>,
    pub pod_addrs: LpmTrie<MapData, PodAddrKey, u32>,
    pub pod_stats: PerCpuHashMap<MapData, u64, PodStats>,
    pub orig_by_cookie: HashMap<MapData, u64, ConnectionRecord>,
    pub orig_by_peer: HashMap<MapData, PeerKey, RawSockAddr>,
    pub settings: Array<MapData, Settings>,
    pub inbound_addrs: HashMap<MapData, InboundAddrKey, InboundPod>,
    pub inbound_netns: HashMap<MapData, u64, InboundNetns>,
}

impl Maps {
    pub fn open(root: &PinRoot) -> Result<Self, LoadError> {
        Ok(Self {
            pod_config: open_map(root, map_names::POD_CONFIG)?,
            owners: open_map(root, map_names::OWNERS)?,
            ports: open_map(root, map_names::PORTS)?,
            pod_addrs: open_map(root, map_names::POD_ADDRS)?,
            pod_stats: open_map(root, map_names::POD_STATS)?,
            orig_by_cookie: open_map(root, map_names::ORIG_BY_COOKIE)?,
            orig_by_peer: open_map(root, map_names::ORIG_BY_PEER)?,
            settings: open_map(root, map_names::SETTINGS)?,
            inbound_addrs: open_map(root, map_names::INBOUND_ADDRS)?,
            inbound_netns: open_map(root, map_names::INBOUND_NETNS)?,
        })
    }
}

/// Opens one pinned map as its typed wrapper.
pub fn open_map<T: TryFrom<Map, Error = MapError>>(
    root: &PinRoot,
    name: &'static str,
) -> Result<T, LoadError> {
    let open = || {
        let data = MapData::from_pin(root.map(name))?;
        T::try_from(Map::from_map_data(data)?)
    };
    open().map_err(|source| LoadError::OpenMap { name, source })
}
