//! `cairn forget`: a thin adapter over `cairn_gc::forget`.

use anyhow::{anyhow, Result};
use cairn_gc::{ForgetOptions, Policy};
use clap::Args;

#[derive(Args)]
pub struct ForgetArgs {
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Keep the newest snapshot of each of the N most recent hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<usize>,
    /// Keep the newest snapshot of each of the N most recent days that have one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<usize>,
    /// Keep the newest snapshot of each of the N most recent weeks that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<usize>,
    /// Keep the newest snapshot of each of the N most recent months that have one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<usize>,
    /// Keep the newest snapshot of each of the N most recent years that have one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<usize>,
    /// Keep snapshots this close to the newest of their group (e.g. 3d), whatever the clock says.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub keep_within: Option<std::time::Duration>,
    /// Keep snapshots with this tag, even past their expiry; repeatable.
    #[arg(long = "keep-tag", value_name = "KEY=VALUE")]
    pub keep_tags: Vec<String>,
    /// Only consider snapshots of this host.
    #[arg(long)]
    pub host: Option<String>,
    /// Only consider snapshots carrying this tag; repeatable.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Only consider the versions of this volume (its head is always kept).
    #[arg(long)]
    pub volume: Option<String>,
    /// Print what would go and why, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn pairs(list: &[String]) -> Result<Vec<(String, String)>> {
    list.iter()
        .map(|t| t.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| anyhow!("tags must look like key=value"))
}

pub async fn forget(repo: &cairn_store::Repository, args: &ForgetArgs, json: bool) -> Result<()> {
    let opts = ForgetOptions {
        policy: Policy {
            keep_last: args.keep_last,
            keep_hourly: args.keep_hourly,
            keep_daily: args.keep_daily,
            keep_weekly: args.keep_weekly,
            keep_monthly: args.keep_monthly,
            keep_yearly: args.keep_yearly,
            keep_within: args.keep_within,
            keep_tags: pairs(&args.keep_tags)?,
        },
        host: args.host.clone(),
        tags: pairs(&args.tags)?,
        volume: args.volume.clone(),
        dry_run: args.dry_run,
    };
    let report = cairn_gc::forget(repo, &opts, std::time::SystemTime::now()).await?;
    if json {
        return crate::print_json(&report);
    }
    let mut group = None;
    for d in &report.decisions {
        if group.as_ref() != Some(&d.group) {
            outln!("{}:", d.group)?;
            group = Some(d.group.clone());
        }
        let verb = match (d.keep, report.dry_run) {
            (true, _) => "keep  ",
            (false, true) => "would remove",
            (false, false) => "remove",
        };
        outln!(
            "  {verb} {} {}  {}",
            d.id.short(),
            d.time.get(..19).unwrap_or(&d.time),
            d.reasons.join(", ")
        )?;
    }
    let done = if report.dry_run { "would remove" } else { "removed" };
    outln!("{} kept, {} {done} (chunks are freed by `cairn gc`)", report.kept, report.removed)?;
    Ok(())
}

#[derive(Args)]
pub struct GcArgs {
    /// Report what would be deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Revoke writer leases whose heartbeat is older than this (liveness only, not safety).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub lease_timeout: std::time::Duration,
    /// Stop waiting for writers after this long (the next run continues).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub max_wait: std::time::Duration,
    /// Rewrite packs whose live bytes are under this fraction of their size (0 turns it off).
    #[arg(long, default_value_t = 0.5, value_parser = fraction)]
    pub repack_below: f64,
    /// Read at most this much of packs to rewrite in one run (e.g. 4GiB).
    #[arg(long, default_value = "4GiB")]
    pub max_repack: bytesize::ByteSize,
}

fn fraction(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s} is not a fraction between 0 and 1 (e.g. 0.5)")),
    }
}

/// GC's memory is its live set plus one index segment or pack batch at a time, all large
/// buffers freed as it goes; glibc's default keeps raising its mmap threshold, so freed
/// buffers stay in the heap and the process keeps them. A fixed threshold hands them back
/// (about a third of a 1M-chunk run's peak). GC makes few such allocations, so the extra
/// mmap calls cost nothing measurable; pushes and restores keep the default.
fn return_large_frees_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before gc allocates much.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

pub async fn gc(
    repo: &cairn_store::Repository,
    args: &GcArgs,
    json: bool,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    return_large_frees_to_the_os();
    let opts = cairn_gc::GcOptions {
        dry_run: args.dry_run,
        lease_timeout: args.lease_timeout,
        max_wait: args.max_wait,
        repack_below: args.repack_below,
        max_repack: args.max_repack.as_u64(),
        ..Default::default()
    };
    let bar = crate::progress::Phases::new("gc");
    let result = cairn_gc::gc(repo, &opts, &bar, cancel).await;
    bar.finish();
    let r = result?;
    if json {
        return crate::print_json(&r);
    }
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    outln!(
        "{} snapshots, {} live chunks; {verb} {} of {} packs ({} freed)",
        r.snapshots,
        r.live_chunks,
        r.packs_deleted,
        r.packs,
        crate::bytes(r.bytes_freed)
    )?;
    if !r.dry_run {
        outln!(
            "repacked {} packs ({} written); index: {} segments written, {} deleted; writers: {} waited for, {} revoked, {} rolled forward; {} packs taken back",
            r.packs_repacked, crate::bytes(r.bytes_repacked), r.segments_written, r.segments_deleted, r.leases_waited, r.leases_revoked, r.leases_rolled_forward, r.packs_taken_back
        )?;
        if r.staging_removed > 0 {
            outln!("removed {} staging files left by writers killed mid-write", r.staging_removed)?;
        }
        if r.packs_missing > 0 {
            outln!(
                "{} indexed packs are missing from the bucket and left the index: the next push stores their chunks again; `cairn check` names the snapshots that lost data",
                r.packs_missing
            )?;
        }
    }
    let phases: Vec<String> = r.phases.iter().map(|(n, s)| format!("{n} {s:.2}s")).collect();
    outln!(
        "{} requests ({} GET, {} PUT, {} DELETE, {} LIST); {}",
        r.requests.requests(),
        r.requests.gets,
        r.requests.puts,
        r.requests.deletes,
        r.requests.lists,
        phases.join(", ")
    )?;
    Ok(())
}
