//! What every command needs: the configuration, the store, and the fetcher built from them.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use kof_node_api::config::Config;
use kof_store::Store;

/// Configuration and paths resolved from flags, environment and config file.
pub struct Context {
    /// The loaded configuration (with `--store` applied).
    pub config: Config,
}

impl Context {
    /// Loads the configuration: `--config`/`KOF_CONFIG`, else `/etc/kof/config.toml`, else
    /// defaults; `--store`/`KOF_STORE` overrides `store_dir`.
    pub fn load(config: Option<PathBuf>, store: Option<PathBuf>) -> Result<Self> {
        let mut config = Config::load(config.as_deref())?;
        if let Some(dir) = store {
            config.store_dir = dir;
        }
        Ok(Context { config })
    }

    /// Opens (creating if needed) the store.
    pub fn open_store(&self) -> Result<Store> {
        Store::open(&self.config.store_dir)
            .with_context(|| format!("opening store {}", self.config.store_dir.display()))
    }
}
