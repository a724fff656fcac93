//! Volumes: named, versioned heads over snapshots (format: [`crate::format::volume`]).
//!
//! Every version is an ordinary snapshot (tagged `volume=NAME`, parent = the version before),
//! so diff, check, mount and retention work on versions unchanged. What makes a volume is
//! its head, `volumes/<name>`, moved only by conditional writes: a commit reads the head,
//! builds its snapshot, then updates the head If-Match the ETag it read. Of two hosts
//! committing on one head exactly one wins; the other gets [`Error::Conflict`], and its
//! snapshot root is removed again, so history stays linear and nothing half-done remains.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use crate::error::{Error, Result};
use crate::format::snapshot::{self, Kind, Snapshot};
use crate::format::volume::{self, Head, Version};
use crate::id::Id;
use crate::lease::WriterLease;
use crate::push::overlay::{self, OverlayBase};
use crate::push::{self, host_name, ParentSpec, PushOptions, PushProgress, PushSummary};
use crate::repo::Repository;

/// A head as read, with the version a conditional update must match.
#[derive(Clone, Debug)]
pub struct ReadHead {
    pub head: Head,
    pub etag: UpdateVersion,
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn label(name: &str) -> String {
    format!("volume:{name}")
}

fn tags(name: &str, id: &str, version: u64) -> BTreeMap<String, String> {
    BTreeMap::from([
        (volume::TAG.into(), name.into()),
        (volume::ID_TAG.into(), id.into()),
        (volume::VERSION_TAG.into(), version.to_string()),
    ])
}

/// Where a new version comes from, as recorded in its history entry.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub how: String,
    /// The lower layer of the committing writable mount.
    pub base: Option<Id>,
    /// The committing writable mount's state directory id.
    pub writer: Option<String>,
}

impl Origin {
    pub fn how(how: impl Into<String>) -> Origin {
        Origin { how: how.into(), ..Default::default() }
    }
}

fn checked(name: &str) -> Result<()> {
    volume::check_name(name).map_err(Error::Usage)
}

pub async fn read(repo: &Repository, name: &str) -> Result<ReadHead> {
    checked(name)?;
    let object = volume::object_name(name);
    match repo.store().get(&ObjectPath::from(object.as_str())).await {
        Ok(r) => {
            let etag = UpdateVersion { e_tag: r.meta.e_tag.clone(), version: r.meta.version.clone() };
            let bytes = r.bytes().await.map_err(|e| Error::store(&object, e))?;
            Ok(ReadHead { head: Head::decode(&bytes, &object)?, etag })
        }
        Err(object_store::Error::NotFound { .. }) => Err(Error::NotFound(format!("volume {name}"))),
        Err(e) => Err(Error::store(object, e)),
    }
}

/// Every volume, by name. Fails on the first unreadable head, naming it.
pub async fn list(repo: &Repository) -> Result<Vec<Head>> {
    let mut out = Vec::new();
    for (object, _) in repo.list(volume::PREFIX.trim_end_matches('/')).await? {
        let Some(name) = object.strip_prefix(volume::PREFIX) else { continue };
        match read(repo, name).await {
            Ok(r) => out.push(r.head),
            Err(Error::NotFound(_)) => {} // deleted since the listing
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Create a volume at version 1: empty, or holding what snapshot `from` holds.
pub async fn create(repo: &Repository, name: &str, from: Option<&str>) -> Result<Head> {
    checked(name)?;
    let object = volume::object_name(name);
    if repo.store().head(&ObjectPath::from(object.as_str())).await.is_ok() {
        return Err(Error::Conflict(format!("volume {name} already exists")));
    }
    let volume_id = hex::encode(rand::random::<[u8; 16]>());
    let (snapshot, how) = match from {
        Some(spec) => {
            let (id, snap) = repo.resolve_snapshot(spec).await?;
            let derived = derive(repo, name, &volume_id, 1, id, &snap, None).await?;
            (derived, format!("create from {}", id.short()))
        }
        None => {
            let empty = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
            // An empty volume's root looks like any new directory, not like a private tempdir.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(empty.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(|e| Error::io(empty.path(), e))?;
            let mut opts = PushOptions::new(empty.path(), Kind::Fs);
            opts.parent = ParentSpec::None;
            opts.label = Some(label(name));
            opts.tags = tags(name, &volume_id, 1);
            let summary = push::push(repo, &opts, &push::NoProgress, &AtomicBool::new(false)).await?;
            (summary.snapshot, "create".to_string())
        }
    };
    let first =
        Version { version: 1, snapshot, time: now(), host: host_name(), how, base: None, writer: None };
    let head =
        Head { format: 1, name: name.into(), id: volume_id, version: 1, snapshot, history: vec![first] };
    let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
    let put = repo
        .store()
        .put_opts(&ObjectPath::from(object.as_str()), PutPayload::from(head.encode()), opts)
        .await;
    if let Err(e) = put {
        // A create retried after a lost reply finds its own head: decide by what is there.
        return match read(repo, name).await {
            Ok(now) if now.head.id == head.id => Ok(now.head),
            Ok(_) if matches!(e, object_store::Error::AlreadyExists { .. }) => {
                forget_root(repo, &snapshot).await;
                Err(Error::Conflict(format!("volume {name} already exists")))
            }
            _ => Err(Error::store(object, e)),
        };
    }
    // The root existed before the head did, so no rule of forget protected it: a purge of
    // an earlier volume of this name may have removed it meanwhile.
    if overlay::check_base_alive(repo, &snapshot).await.is_err() {
        let _ = repo.store().delete(&ObjectPath::from(object.as_str())).await;
        return Err(Error::Conflict(format!(
            "the first version of volume {name} was forgotten while it was created; nothing was created, retry"
        )));
    }
    Ok(head)
}

/// Move the head from `current` to `snapshot` as the next version. A head that moved since
/// `current` was read is a [`Error::Conflict`] and `snapshot` is forgotten again.
///
/// The store retries a conditional write whose reply was lost; the retry then fails its
/// precondition although the first attempt landed. So on any error the head is read again
/// and decides: if its history holds `snapshot`, the commit happened. The root is only
/// forgotten when the store refused the write and the head does not hold it — never after
/// an ambiguous error (a timed-out write may still land), where it stays as a commit in
/// flight for forget to keep.
pub async fn advance(repo: &Repository, current: &ReadHead, snapshot: Id, origin: Origin) -> Result<Head> {
    let mut head = current.head.clone();
    head.record(Version {
        version: current.head.version + 1,
        snapshot,
        time: now(),
        host: host_name(),
        how: origin.how,
        base: origin.base,
        writer: origin.writer,
    });
    let object = volume::object_name(&head.name);
    let opts = PutOptions { mode: PutMode::Update(current.etag.clone()), ..Default::default() };
    let put = repo
        .store()
        .put_opts(&ObjectPath::from(object.as_str()), PutPayload::from(head.encode()), opts)
        .await;
    let Err(e) = put else { return Ok(head) };
    let refused =
        matches!(e, object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. });
    let now = match read(repo, &head.name).await {
        // Ours landed. What we wrote, not the head as it is now: another host may have
        // committed on top since, and a caller that took that version for its own would
        // commit over it next time without a conflict.
        Ok(now) if now.head.id == head.id && now.head.history.iter().any(|v| v.snapshot == snapshot) => {
            return Ok(head);
        }
        Ok(r) => format!(
            "it is now at version {} ({})",
            r.head.version,
            r.head.history.last().map(|v| v.host.as_str()).unwrap_or("?")
        ),
        Err(Error::NotFound(_)) => "it was deleted".into(),
        Err(_) => return Err(Error::store(object, e)),
    };
    if !refused {
        return Err(Error::store(object, e));
    }
    forget_root(repo, &snapshot).await;
    Err(Error::Conflict(format!(
        "volume {} moved while committing on version {}: {now}; nothing was committed, retry on the new head",
        head.name, current.head.version
    )))
}

/// A loser's snapshot root is removed so only the head's history holds volume versions.
/// Failing to remove it loses nothing (it is an extra snapshot), so errors are only logged.
async fn forget_root(repo: &Repository, id: &Id) {
    if let Err(e) = repo.store().delete(&ObjectPath::from(snapshot::object_name(id))).await {
        tracing::warn!("could not remove the uncommitted snapshot {id}: {e}");
    }
}

/// Fail early, before any work, when the head is no longer `expected`.
fn expect_version(current: &ReadHead, expected: Option<u64>) -> Result<()> {
    match expected {
        Some(v) if v != current.head.version => Err(Error::Conflict(format!(
            "volume {} is at version {}, not {v}; nothing was committed",
            current.head.name, current.head.version
        ))),
        _ => Ok(()),
    }
}

/// `cairn push --volume NAME DIR`: commit a directory as the volume's next version; with
/// `expected`, only if the head is still at that version when the commit lands.
pub async fn push_dir(
    repo: &Repository,
    name: &str,
    source: &Path,
    expected: Option<u64>,
    progress: &dyn PushProgress,
    cancel: &AtomicBool,
) -> Result<(PushSummary, Head)> {
    let current = read(repo, name).await?;
    expect_version(&current, expected)?;
    let mut opts = PushOptions::new(source, Kind::Fs);
    opts.parent = ParentSpec::Id(current.head.snapshot.to_hex());
    opts.label = Some(label(name));
    opts.tags = tags(name, &current.head.id, current.head.version + 1);
    let summary = push::push(repo, &opts, progress, cancel).await?;
    let head = advance(repo, &current, summary.snapshot, Origin::how("push")).await?;
    Ok((summary, head))
}

/// Which volume a writable mount commits to, and what it last saw of it.
#[derive(Clone, Debug)]
pub struct OverlayCommit<'a> {
    pub name: &'a str,
    /// The volume's [`Head::id`] when the mount was made: a volume deleted and created again
    /// under the same name is not this one.
    pub volume_id: &'a str,
    /// The version the mount's state was last committed as (or mounted from).
    pub expected: u64,
    /// The snapshot the mount's lower layer shows.
    pub base: Id,
    /// The id of the mount's state directory.
    pub writer: &'a str,
}

/// Commit an overlay: `upper` holds the changes made over `c.base`; the result becomes the
/// version after `c.expected`.
pub async fn commit_overlay(
    repo: &Repository,
    c: &OverlayCommit<'_>,
    upper: &Path,
    cancel: &AtomicBool,
) -> Result<(PushSummary, Head)> {
    let (name, base) = (c.name, &c.base);
    let current = read(repo, name).await?;
    if current.head.id != c.volume_id {
        return Err(Error::Conflict(format!(
            "volume {name} was deleted and created again since this mount was made; nothing was committed"
        )));
    }
    // Versions after `expected` that this writer made itself are not a conflict: they are
    // commits whose reply, or whose record in the writer's state, was lost. Versions the head
    // no longer lists cannot be told apart, so they count as someone else's.
    let ours = current.head.first_listed() <= c.expected + 1
        && current
            .head
            .history
            .iter()
            .filter(|v| v.version > c.expected)
            .all(|v| v.writer.as_deref() == Some(c.writer));
    if !ours {
        expect_version(&current, Some(c.expected))?;
    }
    let base_snap = repo.resolve_snapshot(&base.to_hex()).await?.1;
    let mut opts = PushOptions::new(upper, Kind::Fs);
    opts.parent = ParentSpec::Id(current.head.snapshot.to_hex());
    opts.label = Some(label(name));
    opts.tags = tags(name, &current.head.id, current.head.version + 1);
    opts.overlay = Some(OverlayBase { snapshot: *base, root: base_snap.root });
    let summary = push::push(repo, &opts, &push::NoProgress, cancel).await?;
    let origin = Origin { how: "commit".into(), base: Some(*base), writer: Some(c.writer.to_string()) };
    let head = advance(repo, &current, summary.snapshot, origin).await?;
    Ok((summary, head))
}

/// Make version `version` hold what `version` held before: a new version, never a rewrite
/// of history.
pub async fn rollback(repo: &Repository, name: &str, version: u64) -> Result<Head> {
    let current = read(repo, name).await?;
    let target = match current.head.find(version) {
        Some(v) => v.snapshot,
        None if version >= 1 && version < current.head.first_listed() => {
            older_version(repo, &current.head, version).await?
        }
        None => return Err(Error::NotFound(format!("version {version} of volume {name}"))),
    };
    let snap = repo.fetch_snapshot(&target).await.map_err(|e| match e {
        Error::NotFound(_) => Error::Usage(format!(
            "version {version} of volume {name} (snapshot {target}) was forgotten and cannot be restored"
        )),
        e => e,
    })?;
    let next = current.head.version + 1;
    let id = derive(repo, name, &current.head.id, next, target, &snap, Some(current.head.snapshot)).await?;
    advance(repo, &current, id, Origin::how(format!("rollback to {version}"))).await
}

/// A version older than the head lists: the snapshot tagged with the volume's id and that
/// version. A root left by a commit whose outcome was unknown carries the same tags; then
/// the candidates are named rather than guessed between.
async fn older_version(repo: &Repository, head: &Head, version: u64) -> Result<Id> {
    let want = version.to_string();
    let found: Vec<Id> = repo
        .snapshots()
        .await?
        .into_iter()
        .filter(|(_, s)| {
            s.tags.get(volume::ID_TAG) == Some(&head.id) && s.tags.get(volume::VERSION_TAG) == Some(&want)
        })
        .map(|(id, _)| id)
        .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(Error::Usage(format!(
            "version {version} of volume {} was forgotten and cannot be restored",
            head.name
        ))),
        many => Err(Error::Usage(format!(
            "version {version} of volume {} is older than its head lists and {} snapshots carry its tags: {}; \
             restore the right one by id",
            head.name,
            many.len(),
            many.iter().map(|i| i.to_hex()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Delete a volume's head. Its versions stay as ordinary snapshots until forgotten.
pub async fn delete(repo: &Repository, name: &str) -> Result<Head> {
    let current = read(repo, name).await?;
    let object = volume::object_name(name);
    repo.store().delete(&ObjectPath::from(object.as_str())).await.map_err(|e| Error::store(object, e))?;
    Ok(current.head)
}

/// A new snapshot root holding `from`'s tree, tagged as version `version` of `name`. It
/// references chunks it did not store, so it is written under a lease, and only once `from`
/// is known to still exist (see [`overlay::check_base_alive`]).
async fn derive(
    repo: &Repository,
    name: &str,
    volume_id: &str,
    version: u64,
    from_id: Id,
    from: &Snapshot,
    parent: Option<Id>,
) -> Result<Id> {
    let host = host_name();
    let lease = WriterLease::acquire(repo.store().clone(), &host).await?;
    let result = async {
        overlay::check_base_alive(repo, &from_id).await?;
        let snap = Snapshot {
            format: 1,
            time: humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
            host: host.clone(),
            source: label(name),
            kind: from.kind,
            tags: tags(name, volume_id, version),
            parent: parent.or(Some(from_id)),
            expires: None,
            root: from.root.clone(),
            meta_packs: from.meta_packs.clone(),
            stats: snapshot::SnapshotStats {
                new_chunks: 0,
                new_bytes: 0,
                stored_bytes: 0,
                ..from.stats.clone()
            },
        };
        let (id, bytes) = snap.encode();
        lease.commit(id, &bytes).await?;
        // Again after the commit point: see `overlay::check_base_alive`.
        overlay::check_base_alive(repo, &from_id).await?;
        repo.put(&snapshot::object_name(&id), bytes).await?;
        Ok(id)
    }
    .await;
    let _ = lease.release().await;
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::format::config::Chunking;

    use super::*;

    async fn repo(dir: &Path) -> Repository {
        let store = Arc::new(object_store::memory::InMemory::new());
        Repository::init_on(store, "memory://v", Chunking::default(), &dir.join("cache")).await.unwrap()
    }

    async fn rewrite_head(repo: &Repository, head: &Head) {
        let path = ObjectPath::from(volume::object_name(&head.name).as_str());
        repo.store().put(&path, PutPayload::from(head.encode())).await.unwrap();
    }

    /// A version the head no longer lists is found by its snapshot's tags; a version with two
    /// tagged candidates is refused rather than guessed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rollback_reaches_versions_the_head_no_longer_lists() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo(tmp.path()).await;
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        create(&repo, "v", None).await.unwrap();
        let mut roots = Vec::new();
        for n in 0..3 {
            std::fs::write(src.join("f"), format!("content {n}")).unwrap();
            let (summary, _) =
                push_dir(&repo, "v", &src, None, &push::NoProgress, &AtomicBool::new(false)).await.unwrap();
            roots.push(repo.load_snapshot(&summary.snapshot).await.unwrap().root);
        }
        // Versions 2..=4 are the pushes; the head forgets 1 and 2, as a long-lived one would.
        let mut head = read(&repo, "v").await.unwrap().head;
        assert_eq!(head.version, 4);
        head.history.drain(..2);
        rewrite_head(&repo, &head).await;
        assert_eq!(read(&repo, "v").await.unwrap().head.first_listed(), 3);

        let rolled = rollback(&repo, "v", 2).await.unwrap();
        assert_eq!(rolled.version, 5);
        let snap = repo.load_snapshot(&rolled.snapshot).await.unwrap();
        assert_eq!(snap.root, roots[0], "version 5 holds what version 2 held");

        // A second snapshot tagged as version 2 (a commit whose outcome was unknown) is named.
        std::fs::write(src.join("f"), "in flight").unwrap();
        let mut opts = PushOptions::new(&src, Kind::Fs);
        opts.tags = tags("v", &head.id, 2);
        let stray = push::push(&repo, &opts, &push::NoProgress, &AtomicBool::new(false)).await.unwrap();
        let err = rollback(&repo, "v", 2).await.unwrap_err().to_string();
        assert!(err.contains(&stray.snapshot.to_hex()), "{err}");
        assert!(matches!(rollback(&repo, "v", 99).await, Err(Error::NotFound(_))));
        assert!(matches!(rollback(&repo, "v", 0).await, Err(Error::NotFound(_))));
    }
}
