//! `SETTINGS`: node-wide run-time switches (one entry).
use aya::maps::{Array, MapData};
use redirector_common::{map_names, Settings};

use super::{access_error, open_map, MapAccessError};
use crate::{loader::LoadError, pins::PinRoot};

pub struct Switches {
    map: Array<MapData, Settings>,
}

impl Switches {
    const NAME: &'static str = map_names::SETTINGS;

    pub fn open(root: &PinRoot) -> Result<Self, LoadError> {
        Ok(Self {
            map: open_map(root, Self::NAME)?,
        })
    }

    pub fn get(&self) -> Result<Settings, MapAccessError> {
        self.map.get(&0, 0).map_err(access_error(Self::NAME))
    }

    /// Changes the switches with `change`, keeping the others.
    pub fn update(&mut self, change: impl FnOnce(&mut Settings)) -> Result<(), MapAccessError> {
        let mut settings = self.get()?;
        change(&mut settings);
        self.map
            .set(0, settings, 0)
            .map_err(access_error(Self::NAME))
    }
}
