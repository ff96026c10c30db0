//! Loading the embedded eBPF object once per node and opening what is pinned.
use std::{
    fs,
    os::fd::{AsFd, BorrowedFd},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuHashMap},
    programs::{
        cgroup_sock_addr::CgroupSockAddrAttachType, cgroup_sockopt::CgroupSockoptAttachType,
        CgroupSockAddr, CgroupSockopt, ProgramError, SockOps,
    },
    EbpfLoader,
};
use redirector_common::{
    map_names, program_names, ConnectionRecord, ExemptOwnerKey, PeerKey, PodConfig, PodStats,
    RawSockAddr, Settings,
};

use crate::{link::CgroupHook, pins::PinRoot};

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
        source: aya::pin::PinError,
    },
    #[error("opening pinned program {name}: {source}")]
    OpenProgram {
        name: &'static str,
        source: ProgramError,
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

fn program_name(hook: CgroupHook) -> &'static str {
    match hook {
        CgroupHook::Connect4 => program_names::CONNECT4,
        CgroupHook::SockOps => program_names::SOCKOPS,
        CgroupHook::GetSockopt => program_names::GETSOCKOPT,
    }
}

/// Loads and pins the programs unless they are pinned already; maps are pinned by name
/// under `<root>/maps` (existing pins are reused, so state survives reloads). The caller
/// holds the root's lock.
pub fn ensure_programs_pinned(root: &PinRoot) -> Result<(), LoadError> {
    let pins = CgroupHook::ALL.map(|hook| root.program(program_name(hook)));
    if pins.iter().all(|pin| pin.exists()) {
        return Ok(());
    }
    // A previous load died half-way: start the programs afresh (maps are kept).
    for pin in pins.iter().filter(|pin| pin.exists()) {
        fs::remove_file(pin).map_err(|source| LoadError::RemoveStale {
            path: pin.clone(),
            source,
        })?;
    }
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(root.maps_dir())
        .load(EBPF_OBJECT)?;
    for hook in CgroupHook::ALL {
        let name = program_name(hook);
        let program = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram { name })?;
        let loaded = match hook {
            CgroupHook::Connect4 => <&mut CgroupSockAddr>::try_from(program)
                .and_then(|p| p.load().map(|()| p.pin(root.program(name)))),
            CgroupHook::SockOps => <&mut SockOps>::try_from(program)
                .and_then(|p| p.load().map(|()| p.pin(root.program(name)))),
            CgroupHook::GetSockopt => <&mut CgroupSockopt>::try_from(program)
                .and_then(|p| p.load().map(|()| p.pin(root.program(name)))),
        };
        loaded
            .map_err(|source| LoadError::Program { name, source })?
            .map_err(|source| LoadError::PinProgram { name, source })?;
    }
    Ok(())
}

/// The pinned programs, opened to be attached.
pub struct Programs {
    connect4: CgroupSockAddr,
    sockops: SockOps,
    getsockopt: CgroupSockopt,
}

impl Programs {
    pub fn open(root: &PinRoot) -> Result<Self, LoadError> {
        let open_error = |hook| {
            move |source| LoadError::OpenProgram {
                name: program_name(hook),
                source,
            }
        };
        Ok(Self {
            connect4: CgroupSockAddr::from_pin(
                root.program(program_names::CONNECT4),
                CgroupSockAddrAttachType::Connect4,
            )
            .map_err(open_error(CgroupHook::Connect4))?,
            sockops: SockOps::from_pin(root.program(program_names::SOCKOPS))
                .map_err(open_error(CgroupHook::SockOps))?,
            getsockopt: CgroupSockopt::from_pin(
                root.program(program_names::GETSOCKOPT),
                CgroupSockoptAttachType::Get,
            )
            .map_err(open_error(CgroupHook::GetSockopt))?,
        })
    }

    pub fn fd(&self, hook: CgroupHook) -> Result<BorrowedFd<'_>, ProgramError> {
        Ok(match hook {
            CgroupHook::Connect4 => self.connect4.fd()?.as_fd(),
            CgroupHook::SockOps => self.sockops.fd()?.as_fd(),
            CgroupHook::GetSockopt => self.getsockopt.fd()?.as_fd(),
        })
    }
}

/// The pinned maps, typed.
pub struct Maps {
    pub pod_config: HashMap<MapData, u64, PodConfig>,
    pub exempt_owners: HashMap<MapData, ExemptOwnerKey, u8>,
    pub pod_stats: PerCpuHashMap<MapData, u64, PodStats>,
    pub orig_by_cookie: HashMap<MapData, u64, ConnectionRecord>,
    pub orig_by_peer: HashMap<MapData, PeerKey, RawSockAddr>,
    pub settings: Array<MapData, Settings>,
}

impl Maps {
    pub fn open(root: &PinRoot) -> Result<Self, LoadError> {
        Ok(Self {
            pod_config: open_map(root, map_names::POD_CONFIG)?,
            exempt_owners: open_map(root, map_names::EXEMPT_OWNERS)?,
            pod_stats: open_map(root, map_names::POD_STATS)?,
            orig_by_cookie: open_map(root, map_names::ORIG_BY_COOKIE)?,
            orig_by_peer: open_map(root, map_names::ORIG_BY_PEER)?,
            settings: open_map(root, map_names::SETTINGS)?,
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

impl Programs {
    /// Id of a program whose log buffer carries every program's lines (they share one).
    pub fn log_program_id(&self) -> Result<u32, ProgramError> {
        Ok(self.connect4.info()?.id())
    }
}
