//! The OAuth clients the sidecar acts as, and where each one's tokens live.
//!
//! INTERFACE STUB (issue 13): the signatures below are what the proxy (per-request targets,
//! wildcard host routes) and the loopback token endpoint call. The implementation here is a
//! placeholder: one client built from `[token]`, run-time keys in an unbounded map. The issue-13
//! token-layer work replaces the inside (several `[[client]]`s, a bounded moka cache with
//! per-entry expiry and idle eviction) and keeps the signatures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::histogram::Histogram;
use tokio::task::JoinHandle;

use crate::config::TokenConfig;
use crate::token::TokenKey;
use crate::token::cache::{Policy, Slot, start_runtime_slot};
use crate::token::client::TokenClient;

/// The name of the client a lone `[token]` section defines.
pub(crate) const DEFAULT_CLIENT: &str = "default";

/// A run-time slot and its supervised refresher.
type RuntimeSlot = (Arc<Slot>, JoinHandle<()>);

/// One OAuth client: its token settings, its token client, its slots.
pub(crate) struct ClientTokens {
    name: Arc<str>,
    config: TokenConfig,
    fetcher: Arc<TokenClient>,
    policy: Policy,
    fetch_duration: Histogram,
    /// Slots known at start (prefetched, refreshed ahead, awaited by `/readyz`).
    fixed: Vec<Arc<Slot>>,
    /// Slots created at run time. PLACEHOLDER: unbounded.
    runtime: Mutex<HashMap<TokenKey, RuntimeSlot>>,
}

impl std::fmt::Debug for ClientTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTokens")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClientTokens {
    pub(crate) fn new(
        name: &str,
        config: TokenConfig,
        fetcher: Arc<TokenClient>,
        fetch_duration: Histogram,
        fixed: Vec<Arc<Slot>>,
    ) -> ClientTokens {
        ClientTokens {
            name: Arc::from(name),
            policy: Policy::from_config(&config),
            config,
            fetcher,
            fetch_duration,
            fixed,
            runtime: Mutex::new(HashMap::new()),
        }
    }

    /// The client's name (`[[client]] name`, or [`DEFAULT_CLIENT`]).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The client's `[token]` settings.
    pub(crate) fn config(&self) -> &TokenConfig {
        &self.config
    }

    /// The slot for `key`: the one known at start when there is one, else a run-time slot,
    /// created (with its refresher) on first use. Must be called inside a Tokio runtime.
    pub(crate) fn slot(&self, key: TokenKey) -> Arc<Slot> {
        if let Some(s) = self.fixed.iter().find(|s| *s.key() == key) {
            return s.clone();
        }
        let mut map = self.runtime.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.clone())
            .or_insert_with(|| {
                start_runtime_slot(
                    key,
                    self.policy,
                    self.fetcher.clone(),
                    self.fetch_duration.clone(),
                )
            })
            .0
            .clone()
    }
}

impl Drop for ClientTokens {
    fn drop(&mut self) {
        for (_, (_, task)) in self
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            task.abort();
        }
    }
}

/// Every client, by name.
#[derive(Debug, Default)]
pub(crate) struct Clients {
    list: Vec<Arc<ClientTokens>>,
}

impl Clients {
    pub(crate) fn new(list: Vec<Arc<ClientTokens>>) -> Clients {
        Clients { list }
    }

    /// The client called `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<ClientTokens>> {
        self.list.iter().find(|c| c.name() == name)
    }

    /// Every client, in config order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<ClientTokens>> {
        self.list.iter()
    }
}
