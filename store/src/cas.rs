//! [`LocalCas`]: conditional updates (`PutMode::Update`) for a local-directory repository.
//!
//! `object_store`'s `LocalFileSystem` creates conditionally but cannot compare-and-swap. Volume
//! heads, GC state and writer leases need it, so this wrapper serialises conditional writes
//! of all processes on the host with an exclusive `flock` on `<repo>/.cairn-cas.lock`, checks
//! the current ETag under it, and only then writes. Plain writes and reads pass through.
//! (A local repository is only shared by processes of one host, so one lock file suffices.)

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, PutResult};

#[derive(Debug)]
pub struct LocalCas {
    inner: Arc<dyn ObjectStore>,
    lock_file: PathBuf,
    /// Threads of this process queue here before taking the file lock.
    local: tokio::sync::Mutex<()>,
}

impl LocalCas {
    pub fn new(inner: Arc<dyn ObjectStore>, root: impl Into<PathBuf>) -> LocalCas {
        LocalCas { inner, lock_file: root.into().join(".cairn-cas.lock"), local: tokio::sync::Mutex::new(()) }
    }

    async fn locked<T>(
        &self,
        f: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        let _local = self.local.lock().await;
        let guard = take_lock(&self.lock_file).await?;
        let out = f.await;
        drop(guard);
        out
    }
}

/// The repository's exclusive lock, waited for up to [`LOCK_WAIT`]: held only around one
/// compare-and-swap or delete, so a holder that stays (stopped with Ctrl-Z, or hung) must not
/// hang every push and gc of the host without a word.
async fn take_lock(path: &std::path::Path) -> object_store::Result<nix::fcntl::Flock<std::fs::File>> {
    let fail = |e: std::io::Error| object_store::Error::Generic {
        store: "LocalCas",
        source: format!("{}: {e}", path.display()).into(),
    };
    let mut file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(fail)?;
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(guard) => return Ok(guard),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if tokio::time::Instant::now() < deadline => {
                file = back;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(fail(std::io::Error::other(format!(
                    "another process has held this lock for over {} s",
                    LOCK_WAIT.as_secs()
                ))))
            }
            Err((_, e)) => return Err(fail(e.into())),
        }
    }
}

/// How long a compare-and-swap waits for the repository's lock before failing.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl fmt::Display for LocalCas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalCas({})", self.inner)
    }
}

object_store_changing_puts!(LocalCas {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        match opts.mode.clone() {
            PutMode::Overwrite => self.inner.put_opts(location, payload, opts).await,
            PutMode::Create => self.locked(self.inner.put_opts(location, payload, opts)).await,
            PutMode::Update(version) => {
                self.locked(async {
                    let current = match self.inner.head(location).await {
                        Ok(meta) => meta,
                        Err(object_store::Error::NotFound { path, .. }) => {
                            return Err(object_store::Error::Precondition {
                                path,
                                source: "object does not exist".into(),
                            })
                        }
                        Err(e) => return Err(e),
                    };
                    if current.e_tag != version.e_tag {
                        return Err(object_store::Error::Precondition {
                            path: location.to_string(),
                            source: format!("ETag {:?} is not {:?}", current.e_tag, version.e_tag).into(),
                        });
                    }
                    let overwrite = PutOptions { mode: PutMode::Overwrite, ..opts };
                    self.inner.put_opts(location, payload, overwrite).await
                })
                .await
            }
        }
    }
} deletes {
    /// Under the lock too: a delete between a compare-and-swap's ETag check and its write
    /// would be undone by that write (a deleted volume head coming back), where S3 refuses
    /// the write instead.
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
        use futures::StreamExt;
        let (inner, lock) = (self.inner.clone(), self.lock_file.clone());
        locations
            .then(move |location| {
                let (inner, lock) = (inner.clone(), lock.clone());
                async move {
                    let location = location?;
                    let _guard = take_lock(&lock).await?;
                    inner.delete(&location).await?;
                    Ok(location)
                }
            })
            .boxed()
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::UpdateVersion;

    /// A delete waits for a compare-and-swap in progress (here: another process's lock), so
    /// it cannot fall between the ETag check and the write that would undo it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deletes_wait_for_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let local = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let store = Arc::new(LocalCas::new(Arc::new(local), dir.path()));
        let path = Path::from("head");
        store.put(&path, "v0".into()).await.unwrap();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.path().join(".cairn-cas.lock"))
            .unwrap();
        let held =
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).unwrap();
        let deleting = tokio::spawn({
            let (store, path) = (store.clone(), path.clone());
            async move { store.delete(&path).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!deleting.is_finished(), "deleted while another process held the lock");
        assert!(store.head(&path).await.is_ok());
        drop(held);
        deleting.await.unwrap().unwrap();
        assert!(matches!(store.head(&path).await, Err(object_store::Error::NotFound { .. })));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exactly_one_of_racing_updates_wins() {
        let dir = tempfile::tempdir().unwrap();
        let local = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let store = Arc::new(LocalCas::new(Arc::new(local), dir.path()));
        let path = Path::from("head");
        let first = store.put_opts(&path, "v0".into(), PutMode::Create.into()).await.unwrap();
        let racers: Vec<_> = (0..8)
            .map(|i| {
                let (store, path, e_tag) = (store.clone(), path.clone(), first.e_tag.clone());
                tokio::spawn(async move {
                    let mode = PutMode::Update(UpdateVersion { e_tag, version: None });
                    store.put_opts(&path, format!("v{i}").into(), mode.into()).await
                })
            })
            .collect();
        let mut wins = 0;
        for r in racers {
            match r.await.unwrap() {
                Ok(_) => wins += 1,
                Err(object_store::Error::Precondition { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(wins, 1);
        let create_again = store.put_opts(&path, "x".into(), PutMode::Create.into()).await;
        assert!(matches!(create_again, Err(object_store::Error::AlreadyExists { .. })));
        let missing = PutMode::Update(UpdateVersion { e_tag: Some("nope".into()), version: None });
        let r = store.put_opts(&Path::from("absent"), "x".into(), missing.into()).await;
        assert!(matches!(r, Err(object_store::Error::Precondition { .. })));
    }
}
