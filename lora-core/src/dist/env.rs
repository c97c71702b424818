//! [`DistEnv`]: where this process sits in a distributed run, read from the environment
//! `torchrun` (and accelerate, and most cluster launchers) set.

use crate::{Error, Result};

/// The launcher's description of this process: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
/// `MASTER_ADDR`, `MASTER_PORT` (the names `torchrun --no-python` exports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank on this machine (the CUDA device index to use).
    pub local_rank: usize,
    /// Host of rank 0, which serves the rendezvous store.
    pub master_addr: String,
    /// Port of the rendezvous store.
    pub master_port: u16,
}

fn bad(key: &str, reason: impl Into<String>) -> Error {
    Error::Config { key: key.into(), reason: reason.into() }
}

fn parse<T: std::str::FromStr>(key: &str, value: &str) -> Result<T> {
    value.trim().parse().map_err(|_| bad(key, format!("`{value}` is not a valid number")))
}

impl DistEnv {
    /// Reads the process environment. `Ok(None)` when `WORLD_SIZE` is unset (a plain,
    /// single-process run).
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable: `WORLD_SIZE` set but `RANK`, `MASTER_ADDR` or
    /// `MASTER_PORT` missing, values that are not numbers, a rank outside the world.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`DistEnv::from_env`], reading variables through `var` (for tests and for
    /// launchers that pass settings another way).
    ///
    /// # Errors
    /// As [`DistEnv::from_env`].
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = var("WORLD_SIZE") else { return Ok(None) };
        let world_size: usize = parse("WORLD_SIZE", &world)?;
        if world_size == 0 {
            return Err(bad("WORLD_SIZE", "must be at least 1"));
        }
        let need = |k: &str| {
            var(k).ok_or_else(|| bad(k, format!("WORLD_SIZE is set ({world_size}) but {k} is not")))
        };
        let rank: usize = parse("RANK", &need("RANK")?)?;
        if rank >= world_size {
            return Err(bad("RANK", format!("{rank} is outside WORLD_SIZE {world_size}")));
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => parse("LOCAL_RANK", &v)?,
            None => rank,
        };
        let master_addr = need("MASTER_ADDR")?;
        let master_port = parse("MASTER_PORT", &need("MASTER_PORT")?)?;
        Ok(Some(Self { rank, world_size, local_rank, master_addr, master_port }))
    }

    /// Whether this is rank 0 (the one that writes files).
    #[must_use]
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}
