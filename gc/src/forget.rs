//! `forget`: remove snapshot roots that expired or that no retention rule keeps.
//!
//! Only roots (and their access traces) are deleted here; the chunks they alone referenced
//! stay until `gc` proves nothing else needs them. Forgetting is therefore safe alongside any
//! writer: a push whose parent is forgotten still finds every chunk it deduplicated against.
//! The snapshot a volume's head names is never forgotten, whatever the rules say.

use std::time::SystemTime;

use cairn_store::backend::RequestStats;
use cairn_store::format::{snapshot, trace, volume};
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
    /// Only the versions of this volume are considered.
    pub volume: Option<String>,
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
        .filter(|(_, s)| opts.volume.as_ref().is_none_or(|v| s.tags.get(volume::TAG) == Some(v)))
        .collect();
    let mut decisions = retention::decide(&in_scope, &opts.policy, now);
    // Read after the listing: a head that moved meanwhile names a snapshot newer than any
    // listed one, and the head it moved from may go (it is history now).
    let heads = cairn_store::volume::list(repo).await?;
    // Only roots that volume commands wrote count (their source says so), and only for the
    // volume of the same id: not an earlier, deleted volume of the same name.
    let by_id: std::collections::HashMap<_, _> = in_scope.iter().map(|(id, s)| (id, s)).collect();
    let version_of = |id: &cairn_store::Id| {
        let s = by_id.get(id)?;
        let name = s.tags.get(volume::TAG)?;
        (s.source == format!("volume:{name}")).then_some(())?;
        let vid = s.tags.get(volume::ID_TAG)?;
        Some((name.clone(), vid.clone(), s.tags.get(volume::VERSION_TAG)?.parse::<u64>().ok()?))
    };
    for d in decisions.iter_mut() {
        for h in heads.iter().filter(|h| h.snapshot == d.id) {
            d.keep = true;
            d.reasons.insert(0, format!("head of volume {}", h.name));
        }
        // The lower layer of the writable mount that made the head: it still reads it.
        for h in heads.iter().filter(|h| h.history.last().and_then(|v| v.base) == Some(d.id)) {
            d.keep = true;
            d.reasons.insert(0, format!("base of volume {}'s head", h.name));
        }
        // A version newer than its head is a commit in flight: the head may move to it next.
        if let Some((name, vid, v)) = version_of(&d.id) {
            if heads.iter().any(|h| h.name == name && h.id == vid && v > h.version) {
                d.keep = true;
                d.reasons.insert(0, format!("volume {name} commit in flight"));
            }
        }
    }
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
