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

/// How long the first version of a volume without a head is taken for a create in flight.
const CREATE_GRACE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

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
            // The first version of a volume whose head is not there yet: a create in flight
            // writes its root, then the head. Left to the next forget unless it is old; a
            // purge of an earlier volume of that name would otherwise take it from under the
            // create. (By this host's clock; a wrong clock only keeps it longer or, when the
            // purge and the create meet, loses the race as before.)
            let fresh = by_id
                .get(&d.id)
                .is_some_and(|s| now.duration_since(s.time()).map_or(true, |age| age < CREATE_GRACE));
            if v == 1 && fresh && !heads.iter().any(|h| h.id == vid) {
                d.keep = true;
                d.reasons.insert(0, format!("volume {name} create in flight"));
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

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_store::format::config::Chunking;

    /// `volume create` writes the first version's root, then the head. A purge of an
    /// earlier volume of that name meeting it in between must not take the root.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_volume_create_in_flight_survives_a_purge() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = Repository::init("memory://", Chunking::default(), None, tmp.path()).await.unwrap();
        let head = cairn_store::volume::create(&repo, "v", None).await.unwrap();
        // The moment between the root and the head: no head yet.
        repo.store().delete(&ObjectPath::from(volume::object_name("v"))).await.unwrap();
        let purge = ForgetOptions {
            policy: Policy { keep_last: Some(0), ..Default::default() },
            volume: Some("v".into()),
            dry_run: true,
            ..Default::default()
        };
        let now = SystemTime::now();
        let report = forget(&repo, &purge, now).await.unwrap();
        assert_eq!(report.removed, 0, "{report:?}");
        assert!(report.decisions[0].reasons[0].contains("create in flight"), "{report:?}");
        // An hour later it is a leftover of a create that never finished: purged.
        let later = forget(&repo, &purge, now + std::time::Duration::from_secs(3600)).await.unwrap();
        assert_eq!(later.removed, 1, "{later:?}");
        assert_eq!(later.decisions[0].id, head.snapshot);
    }
}
