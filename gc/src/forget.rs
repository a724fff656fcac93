//! `forget`: remove snapshot roots that expired or that no retention rule keeps.
//!
//! Only roots (and their access traces) are deleted here; the chunks they alone referenced
//! stay until `gc` proves nothing else needs them. Forgetting is therefore safe alongside any
//! writer: a push whose parent is forgotten still finds every chunk it deduplicated against.

use std::time::SystemTime;

use cairn_store::backend::RequestStats;
use cairn_store::format::{snapshot, trace};
use cairn_store::{Error, Repository, Result};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use serde::Serialize;

use crate::retention::{self, Decision, Policy};

#[derive(Clone, Debug, Default)]
pub struct ForgetOptions {
    pub policy: Policy,
    /// Only snapshots of this host are considered (others are neither kept nor removed).
    pub host: Option<String>,
    /// Only snapshots carrying all these tags are considered.
    pub tags: Vec<(String, String)>,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ForgetReport {
    pub dry_run: bool,
    pub decisions: Vec<Decision>,
    pub kept: usize,
    pub removed: usize,
    pub requests: RequestStats,
}

pub async fn forget(repo: &Repository, opts: &ForgetOptions, now: SystemTime) -> Result<ForgetReport> {
    let before = repo.requests();
    let in_scope: Vec<_> = repo
        .snapshots()
        .await?
        .into_iter()
        .filter(|(_, s)| opts.host.as_ref().is_none_or(|h| &s.host == h))
        .filter(|(_, s)| opts.tags.iter().all(|(k, v)| s.tags.get(k) == Some(v)))
        .collect();
    let decisions = retention::decide(&in_scope, &opts.policy, now);
    let mut removed = 0;
    for d in decisions.iter().filter(|d| !d.keep) {
        if !opts.dry_run {
            delete(repo, &snapshot::object_name(&d.id)).await?;
            delete(repo, &trace::object_name(&d.id)).await?;
        }
        removed += 1;
    }
    let after = repo.requests();
    Ok(ForgetReport {
        dry_run: opts.dry_run,
        kept: decisions.len() - removed,
        removed,
        decisions,
        requests: after.since(&before),
    })
}

/// Delete an object; one that is already gone is fine (another forget got there first).
async fn delete(repo: &Repository, name: &str) -> Result<()> {
    match repo.store().delete(&ObjectPath::from(name)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(Error::store(name, e)),
    }
}
