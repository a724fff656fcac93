//! Where a repository lives: any `object_store` store, chosen by URL, wrapped in
//! [`CountingStore`] so every command can say what it cost in requests and bytes.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Open the store a repository URL names:
/// a plain path or `file:///path` (the embedded default), `s3://bucket[/prefix]` (endpoint and
/// credentials from the standard `AWS_*` environment), or `memory://` (unit tests only).
/// A local directory is created only with `create` (init): a mistyped path given to any other
/// command is an error, not a new empty directory.
pub fn open_url(url: &str, create: bool) -> Result<Arc<dyn ObjectStore>> {
    if url == "memory://" || url == "memory:" {
        return Ok(Arc::new(object_store::memory::InMemory::new()));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::Usage(format!("{url}: no bucket name")));
        }
        let s3 = s3_tuning(object_store::aws::AmazonS3Builder::from_env())?
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| Error::store(url, e))?;
        let prefix = prefix.trim_matches('/');
        return Ok(if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
        });
    }
    let Some(path) = local_path(url) else {
        return Err(Error::Usage(format!(
            "{url}: unsupported repository URL (use a path, file://, s3:// or memory://)"
        )));
    };
    if create {
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
    } else if !std::path::Path::new(path).is_dir() {
        return Err(Error::NotARepository(url.to_string()));
    }
    // Durable like a bucket: a successful put is synced (file and directory), so a snapshot
    // root is never on disk before the packs and index it names. Packs bypass the page cache.
    let local = object_store::local::LocalFileSystem::new_with_prefix(path)
        .map_err(|e| Error::store(url, e))?
        .with_fsync(true);
    let direct = crate::direct::DirectLocal::new(Arc::new(local));
    Ok(Arc::new(crate::cas::LocalCas::new(Arc::new(direct), path)))
}

/// The directory of a local repository URL (a plain path or `file://`); `None` for others.
pub fn local_path(url: &str) -> Option<&str> {
    // file:///abs or file://localhost/abs; file://host/path names another host's file.
    let path = match url.strip_prefix("file://") {
        Some(rest) => rest.strip_prefix("localhost").unwrap_or(rest),
        None => url,
    };
    if url.starts_with("file://") && !path.starts_with('/') {
        return None;
    }
    (!path.contains("://") && url != "memory:").then_some(path)
}

/// Timeouts and retries beyond object_store's defaults, from the environment:
/// `CAIRN_S3_TIMEOUT` (per request, default 30s), `CAIRN_S3_RETRY_TIMEOUT` (all retries of
/// one request, default 3m) and `CAIRN_S3_MAX_RETRIES` (default 10).
fn s3_tuning(mut b: object_store::aws::AmazonS3Builder) -> Result<object_store::aws::AmazonS3Builder> {
    use object_store::aws::AmazonS3ConfigKey;
    use object_store::ClientConfigKey;
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let duration =
        |k: &str, v: &str| humantime::parse_duration(v).map_err(|e| Error::Usage(format!("{k}={v:?}: {e}")));
    if let Some(v) = var("CAIRN_S3_TIMEOUT") {
        duration("CAIRN_S3_TIMEOUT", &v)?;
        b = b.with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), v);
    }
    let mut retry = object_store::RetryConfig::default();
    if let Some(v) = var("CAIRN_S3_RETRY_TIMEOUT") {
        retry.retry_timeout = duration("CAIRN_S3_RETRY_TIMEOUT", &v)?;
    }
    if let Some(v) = var("CAIRN_S3_MAX_RETRIES") {
        retry.max_retries =
            v.parse().map_err(|_| Error::Usage(format!("CAIRN_S3_MAX_RETRIES={v:?} is not a number")))?;
    }
    Ok(b.with_retry(retry))
}

/// Requests and bytes a command caused, by class (as S3 bills them).
#[derive(Debug, Default)]
pub struct Counters {
    gets: AtomicU64,
    puts: AtomicU64,
    lists: AtomicU64,
    heads: AtomicU64,
    deletes: AtomicU64,
    bytes_down: AtomicU64,
    bytes_up: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestStats {
    pub gets: u64,
    pub puts: u64,
    pub lists: u64,
    pub heads: u64,
    pub deletes: u64,
    pub bytes_down: u64,
    pub bytes_up: u64,
}

impl RequestStats {
    pub fn requests(&self) -> u64 {
        self.gets + self.puts + self.lists + self.heads + self.deletes
    }

    /// What was made since `before` (a command's own cost on a shared repository handle).
    pub fn since(&self, before: &RequestStats) -> RequestStats {
        RequestStats {
            gets: self.gets - before.gets,
            puts: self.puts - before.puts,
            lists: self.lists - before.lists,
            heads: self.heads - before.heads,
            deletes: self.deletes - before.deletes,
            bytes_down: self.bytes_down - before.bytes_down,
            bytes_up: self.bytes_up - before.bytes_up,
        }
    }
}

impl Counters {
    pub fn stats(&self) -> RequestStats {
        RequestStats {
            gets: self.gets.load(Relaxed),
            puts: self.puts.load(Relaxed),
            lists: self.lists.load(Relaxed),
            heads: self.heads.load(Relaxed),
            deletes: self.deletes.load(Relaxed),
            bytes_down: self.bytes_down.load(Relaxed),
            bytes_up: self.bytes_up.load(Relaxed),
        }
    }
}

/// Counts every request that reaches the inner store, like `object_store::limit::LimitStore`
/// wraps one to bound them.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    counters: Arc<Counters>,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> CountingStore {
        CountingStore { inner, counters: Arc::default() }
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.counters.puts.fetch_add(1, Relaxed);
        self.counters.bytes_up.fetch_add(payload.content_length() as u64, Relaxed);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.counters.puts.fetch_add(1, Relaxed);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        if options.head {
            self.counters.heads.fetch_add(1, Relaxed);
        } else {
            self.counters.gets.fetch_add(1, Relaxed);
        }
        let result = self.inner.get_opts(location, options).await?;
        self.counters.bytes_down.fetch_add(result.range.end - result.range.start, Relaxed);
        Ok(result)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        // Stores merge neighbouring ranges into one request; count what they send.
        self.counters.gets.fetch_add(merged_count(ranges), Relaxed);
        let out = self.inner.get_ranges(location, ranges).await?;
        self.counters.bytes_down.fetch_add(out.iter().map(|b| b.len() as u64).sum(), Relaxed);
        Ok(out)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let counters = self.counters.clone();
        let counted = locations.inspect(move |_| {
            counters.deletes.fetch_add(1, Relaxed);
        });
        self.inner.delete_stream(counted.boxed())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.counters.lists.fetch_add(1, Relaxed);
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.counters.lists.fetch_add(1, Relaxed);
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.counters.lists.fetch_add(1, Relaxed);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.counters.puts.fetch_add(1, Relaxed);
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        self.counters.puts.fetch_add(1, Relaxed);
        self.inner.rename_opts(from, to, options).await
    }
}

/// How many requests `get_ranges` makes after merging gaps of up to 1 MiB, as object_store does.
fn merged_count(ranges: &[Range<u64>]) -> u64 {
    let mut sorted: Vec<_> = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    let mut count = 0;
    let mut end: Option<u64> = None;
    for r in sorted {
        match end {
            Some(e) if r.start <= e + object_store::OBJECT_STORE_COALESCE_DEFAULT => end = Some(e.max(r.end)),
            _ => {
                count += 1;
                end = Some(r.end);
            }
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::merged_count;

    #[test]
    fn neighbouring_ranges_count_as_one_request() {
        assert_eq!(merged_count(&[]), 0);
        assert_eq!(merged_count(&[0..10, 10..20, 30..40]), 1);
        assert_eq!(merged_count(&[0..10, (10 + (2 << 20))..(20 + (2 << 20))]), 2);
        assert_eq!(merged_count(&[(5 << 20)..(6 << 20), 0..10]), 2);
    }
}
