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
/// least read amplification for lazy mounts), 256 KiB fixed chunks for memory images (stored
/// bytes below restic's; smaller chunks dedup more but compress worse).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunking {
    pub fs_min: u32,
    pub fs_avg: u32,
    pub fs_max: u32,
    /// Fixed chunk size for memory images; a multiple of 4096.
    pub memory: u32,
}

impl Default for Chunking {
    fn default() -> Chunking {
        Chunking { fs_min: 16 * 1024, fs_avg: 64 * 1024, fs_max: 256 * 1024, memory: 256 * 1024 }
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
        let ok_mem = self.memory >= 4096 && self.memory % 4096 == 0 && self.memory <= 16 << 20;
        if ok_fs && ok_mem {
            Ok(())
        } else {
            Err(Error::Usage(format!("invalid chunk sizes {self:?}")))
        }
    }
}
