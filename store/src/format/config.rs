//! `config`: the repository's immutable parameters, fixed at `init`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const CONFIG_OBJECT: &str = "config";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Format version of the repository; readers refuse versions they do not know.
    pub format: u32,
    /// Random id; also names the local cache directory of this repository.
    pub id: String,
    pub created: String,
    pub chunking: Chunking,
    /// Packs are closed once they reach this many bytes.
    pub pack_size: u32,
    pub zstd_level: i32,
}

/// Chunk sizes, chosen by measurement on real data (`docs/chunking.md`): 64 KiB average
/// content-defined chunks for files (the least stored bytes of the sizes measured, and the
/// least read amplification for lazy mounts), page-aligned content-defined chunks of about
/// 256 KiB for memory images (a guest holds the same pages at many offsets: a fixed grid
/// dedups them only when the offsets agree modulo the chunk size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunking {
    pub fs_min: u32,
    pub fs_avg: u32,
    pub fs_max: u32,
    /// Memory images: the fixed chunk size, or for [`MemoryCut::Pages`] the average; a
    /// multiple of 4096.
    pub memory: u32,
    /// Repositories made before page-aligned CDC existed have no such field: fixed.
    #[serde(default)]
    pub memory_cut: MemoryCut,
}

/// How memory images are cut. Either way every cut is on a 4 KiB page boundary and runs of
/// all-zero pages (fixed: all-zero chunks) are holes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryCut {
    /// Chunks of exactly `memory` bytes on a grid of that size.
    #[default]
    Fixed,
    /// A chunk ends after a page whose content hash says so (probability 4096 / `memory`
    /// once the chunk holds `memory / 4`), at a zero page, or at `memory * 4`.
    Pages,
}

impl Default for Chunking {
    fn default() -> Chunking {
        Chunking {
            fs_min: 16 * 1024,
            fs_avg: 64 * 1024,
            fs_max: 256 * 1024,
            memory: 256 * 1024,
            memory_cut: MemoryCut::Pages,
        }
    }
}

impl Config {
    pub fn new(chunking: Chunking) -> Result<Config> {
        chunking.validate()?;
        Ok(Config {
            format: 1,
            id: hex::encode(rand::random::<[u8; 16]>()),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            chunking,
            pack_size: 16 * 1024 * 1024,
            // Level 2 pushes 15-20% faster on the benchmark data but stores 1-2% more: a first
            // push of fs-v1 took 125.1 MB against restic's 124.5 MB (level 3: 124.0 MB).
            zstd_level: 3,
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<Config> {
        let config: Config = serde_json::from_slice(bytes).map_err(|e| Error::corrupt(CONFIG_OBJECT, e))?;
        if config.format != 1 {
            return Err(Error::corrupt(CONFIG_OBJECT, format!("unsupported format {}", config.format)));
        }
        if config.id.is_empty() || !config.id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(Error::corrupt(CONFIG_OBJECT, "repository id must be alphanumeric"));
        }
        if !(1 << 20..=1 << 30).contains(&config.pack_size) {
            return Err(Error::corrupt(CONFIG_OBJECT, "pack_size out of range"));
        }
        if !(1..=19).contains(&config.zstd_level) {
            return Err(Error::corrupt(CONFIG_OBJECT, "zstd_level out of range 1..=19"));
        }
        config.chunking.validate().map_err(|e| Error::corrupt(CONFIG_OBJECT, e))?;
        Ok(config)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("config serializes")
    }
}

impl Chunking {
    pub fn validate(&self) -> Result<()> {
        let ok_fs = self.fs_min >= 64
            && self.fs_min <= self.fs_avg
            && self.fs_avg <= self.fs_max
            && self.fs_avg >= 256
            && self.fs_avg <= 4 << 20
            && self.fs_max <= 16 << 20
            && self.fs_min % 2 == 0
            && self.fs_avg % 2 == 0
            && self.fs_max % 2 == 0
            && self.fs_min <= 1 << 20;
        let ok_mem = self.memory % 4096 == 0
            && match self.memory_cut {
                MemoryCut::Fixed => self.memory >= 4096 && self.memory <= 16 << 20,
                // min = memory / 4 must itself be whole pages; max = memory * 4 <= 16 MiB.
                MemoryCut::Pages => {
                    self.memory >= 16384 && self.memory % 16384 == 0 && self.memory <= 4 << 20
                }
            };
        if ok_fs && ok_mem {
            Ok(())
        } else {
            Err(Error::Usage(format!("invalid chunk sizes {self:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_cut_defaults_to_pages_and_old_configs_read_as_fixed() {
        let new = Config::new(Chunking::default()).unwrap();
        assert_eq!(new.chunking.memory_cut, MemoryCut::Pages);
        assert_eq!(Config::decode(&new.encode()).unwrap(), new);
        // A config written before `memory_cut` existed.
        let mut json: serde_json::Value = serde_json::from_slice(&new.encode()).unwrap();
        json["chunking"].as_object_mut().unwrap().remove("memory_cut");
        let old = Config::decode(&serde_json::to_vec(&json).unwrap()).unwrap();
        assert_eq!(old.chunking.memory_cut, MemoryCut::Fixed);
        // Pages needs whole pages at memory / 4.
        for (cut, memory, ok) in [
            (MemoryCut::Pages, 16384, true),
            (MemoryCut::Pages, 4096, false),
            (MemoryCut::Pages, 20480, false),
            (MemoryCut::Pages, 8 << 20, false),
            (MemoryCut::Fixed, 4096, true),
            (MemoryCut::Fixed, 8 << 20, true),
        ] {
            let c = Chunking { memory, memory_cut: cut, ..Chunking::default() };
            assert_eq!(c.validate().is_ok(), ok, "{cut:?} {memory}");
        }
    }
}
