//! [`MountStats`]: what one mount cost and how fast it answered, readable as JSON.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use cairn_store::backend::RequestStats;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cache::CacheStats;

#[derive(Default)]
pub struct MountStats {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub read_errors: AtomicU64,
    pub lookups: AtomicU64,
    /// Chunk requests answered from this mount's memory, the host cache, or the bucket.
    pub memory_hits: AtomicU64,
    pub cache_hits: AtomicU64,
    pub misses: AtomicU64,
    /// Chunks a reader wanted while another reader was already fetching them.
    pub joined_fetches: AtomicU64,
    pub range_reads: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub fetched_chunks: AtomicU64,
    pub bad_chunks: AtomicU64,
    pub prefetched_chunks: AtomicU64,
    pub prefetched_bytes: AtomicU64,
    /// Files pushed into the kernel's page cache after a listing (see `prime`).
    pub primed_files: AtomicU64,
    pub primed_bytes: AtomicU64,
    latency_us: Mutex<Option<Histogram<u64>>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct StatsReport {
    pub snapshot: String,
    pub mountpoint: String,
    pub uptime_s: f64,
    pub reads: u64,
    pub read_bytes: u64,
    pub read_errors: u64,
    pub lookups: u64,
    pub memory_hits: u64,
    pub cache_hits: u64,
    pub misses: u64,
    pub joined_fetches: u64,
    pub range_reads: u64,
    pub fetched_bytes: u64,
    pub fetched_chunks: u64,
    pub bad_chunks: u64,
    pub prefetched_chunks: u64,
    pub prefetched_bytes: u64,
    pub primed_files: u64,
    pub primed_bytes: u64,
    pub read_latency: Latency,
    /// Every request this process made to the bucket (the mount's and the index sync's).
    pub requests: RequestStats,
    pub cache: CacheStats,
}

impl MountStats {
    pub fn bump(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn record_read(&self, took: Duration, bytes: u64, ok: bool) {
        Self::bump(&self.reads, 1);
        Self::bump(if ok { &self.read_bytes } else { &self.read_errors }, if ok { bytes } else { 1 });
        let mut h = self.latency_us.lock().expect("stats lock");
        let h = h.get_or_insert_with(|| Histogram::new(3).expect("3 significant figures is valid"));
        h.saturating_record(took.as_micros().max(1) as u64);
    }

    pub fn report(
        &self,
        snapshot: String,
        mountpoint: String,
        uptime: Duration,
        requests: RequestStats,
        cache: CacheStats,
    ) -> StatsReport {
        let get = |c: &AtomicU64| c.load(Relaxed);
        let read_latency = match self.latency_us.lock().expect("stats lock").as_ref() {
            Some(h) => Latency {
                p50_us: h.value_at_quantile(0.5),
                p90_us: h.value_at_quantile(0.9),
                p99_us: h.value_at_quantile(0.99),
                max_us: h.max(),
            },
            None => Latency { p50_us: 0, p90_us: 0, p99_us: 0, max_us: 0 },
        };
        StatsReport {
            snapshot,
            mountpoint,
            uptime_s: uptime.as_secs_f64(),
            reads: get(&self.reads),
            read_bytes: get(&self.read_bytes),
            read_errors: get(&self.read_errors),
            lookups: get(&self.lookups),
            memory_hits: get(&self.memory_hits),
            cache_hits: get(&self.cache_hits),
            misses: get(&self.misses),
            joined_fetches: get(&self.joined_fetches),
            range_reads: get(&self.range_reads),
            fetched_bytes: get(&self.fetched_bytes),
            fetched_chunks: get(&self.fetched_chunks),
            bad_chunks: get(&self.bad_chunks),
            prefetched_chunks: get(&self.prefetched_chunks),
            prefetched_bytes: get(&self.prefetched_bytes),
            primed_files: get(&self.primed_files),
            primed_bytes: get(&self.primed_bytes),
            read_latency,
            requests,
            cache,
        }
    }
}
