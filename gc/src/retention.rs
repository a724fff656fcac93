//! Retention policies: which snapshots `forget` keeps, and why.
//!
//! Calendar rules (`--keep-daily 7`…) count *snapshots*, newest first: "the newest snapshot of
//! each of the 7 most recent days that have one", as restic does. A host that was offline for a
//! month therefore keeps its last 7 days of snapshots, not nothing (kopia#3758). `keep_within`
//! is measured back from the group's newest snapshot, not from the clock, for the same reason.
//! Expiry (`--expire-in` at push) is the snapshot's own rule and is applied by the clock:
//! an expired snapshot goes unless a `keep_tags` pin holds it.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_store::{Id, Snapshot};
use serde::Serialize;

/// A time bucket of the keep rules: its name, how many to keep, and a snapshot's bucket key.
type Bucket = (&'static str, Option<usize>, fn(SystemTime) -> String);

#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub keep_last: Option<usize>,
    pub keep_hourly: Option<usize>,
    pub keep_daily: Option<usize>,
    pub keep_weekly: Option<usize>,
    pub keep_monthly: Option<usize>,
    pub keep_yearly: Option<usize>,
    /// Keep everything this close to the group's newest snapshot.
    pub keep_within: Option<Duration>,
    /// Keep snapshots carrying any of these `key=value` tags (also past their expiry).
    pub keep_tags: Vec<(String, String)>,
}

impl Policy {
    /// Whether any keep rule is given; without one, only expiry removes snapshots.
    pub fn has_rules(&self) -> bool {
        self.keep_last.is_some()
            || self.keep_hourly.is_some()
            || self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
            || self.keep_yearly.is_some()
            || self.keep_within.is_some()
            || !self.keep_tags.is_empty()
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Decision {
    pub id: Id,
    pub time: String,
    pub group: String,
    pub keep: bool,
    /// Why it is kept ("last 3", "daily 2026-11-28", "tag pin=1") or why it goes.
    pub reasons: Vec<String>,
}

/// The group a snapshot's retention is counted in: same host and same source path; the
/// versions of a volume form one group whichever host committed them.
pub fn group_of(s: &Snapshot) -> String {
    match s.tags.get(cairn_store::format::volume::TAG) {
        Some(name) => format!("volume:{name}"),
        None => format!("{}:{}", s.host, s.source),
    }
}

fn secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Decide every snapshot of `snaps` (any order) under `policy` at time `now`.
pub fn decide(snaps: &[(Id, Snapshot)], policy: &Policy, now: SystemTime) -> Vec<Decision> {
    let mut groups: BTreeMap<String, Vec<&(Id, Snapshot)>> = BTreeMap::new();
    for s in snaps {
        groups.entry(group_of(&s.1)).or_default().push(s);
    }
    let mut out = Vec::with_capacity(snaps.len());
    for (group, mut members) in groups {
        // Newest first; ties broken by id so the result does not depend on input order. A
        // volume's versions are ordered by number: they come from hosts whose clocks differ.
        let version =
            |s: &Snapshot| s.tags.get(cairn_store::format::volume::VERSION_TAG)?.parse::<u64>().ok();
        // (A total order even on odd input: a version-less member sorts below numbered ones.)
        members.sort_by_key(|s| std::cmp::Reverse((version(&s.1), s.1.time(), s.0)));
        // Measured from the newest snapshot (an offline host keeps its last ones), but never
        // from a future that one host's fast clock made up: that would drop every real one.
        let newest = members.iter().map(|s| s.1.time()).max().unwrap_or(now).min(now);
        let mut reasons: Vec<Vec<String>> = vec![Vec::new(); members.len()];
        if let Some(n) = policy.keep_last {
            for (i, r) in reasons.iter_mut().enumerate().take(n) {
                r.push(format!("last {}", i + 1));
            }
        }
        let buckets: [Bucket; 5] = [
            ("hourly", policy.keep_hourly, |t| fmt(t)[..13].to_string()),
            ("daily", policy.keep_daily, |t| fmt(t)[..10].to_string()),
            ("weekly", policy.keep_weekly, |t| {
                format!("week {}", (secs(t).div_euclid(86400) + 3).div_euclid(7))
            }),
            ("monthly", policy.keep_monthly, |t| fmt(t)[..7].to_string()),
            ("yearly", policy.keep_yearly, |t| fmt(t)[..4].to_string()),
        ];
        for (name, count, bucket) in buckets {
            let Some(count) = count else { continue };
            let mut seen = HashSet::new();
            for (i, s) in members.iter().enumerate() {
                if seen.len() >= count {
                    break;
                }
                let b = bucket(s.1.time());
                if seen.insert(b.clone()) {
                    reasons[i].push(format!("{name} {b}"));
                }
            }
        }
        if let Some(within) = policy.keep_within {
            for (i, s) in members.iter().enumerate() {
                if newest.duration_since(s.1.time()).unwrap_or_default() <= within {
                    reasons[i].push(format!("within {}", humantime::format_duration(within)));
                }
            }
        }
        for (i, s) in members.iter().enumerate() {
            let pinned: Vec<String> = policy
                .keep_tags
                .iter()
                .filter(|(k, v)| s.1.tags.get(k) == Some(v))
                .map(|(k, v)| format!("tag {k}={v}"))
                .collect();
            let expired =
                s.1.expires
                    .as_deref()
                    .and_then(|e| humantime::parse_rfc3339(e).ok())
                    .is_some_and(|e| e <= now);
            let (keep, why) = if !pinned.is_empty() {
                (true, pinned)
            } else if expired {
                (false, vec![format!("expired {}", s.1.expires.as_deref().unwrap_or(""))])
            } else if !policy.has_rules() {
                (true, vec!["no policy given; not expired".to_string()])
            } else if reasons[i].is_empty() {
                (false, vec!["no keep rule matched".to_string()])
            } else {
                (true, std::mem::take(&mut reasons[i]))
            };
            out.push(Decision { id: s.0, time: s.1.time.clone(), group: group.clone(), keep, reasons: why });
        }
    }
    out
}

fn fmt(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_store::format::snapshot::SnapshotStats;
    use cairn_store::format::tree::{Node, NodeKind};
    use proptest::prelude::*;

    fn snap(host: &str, t: SystemTime, expires: Option<SystemTime>, tags: &[(&str, &str)]) -> (Id, Snapshot) {
        let s = Snapshot {
            format: 1,
            time: humantime::format_rfc3339_nanos(t).to_string(),
            host: host.into(),
            source: "/src".into(),
            kind: cairn_store::Kind::Fs,
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            parent: None,
            expires: expires.map(|e| humantime::format_rfc3339_seconds(e).to_string()),
            root: Node {
                name: b"src".to_vec(),
                kind: NodeKind::Dir { tree: Id([0; 32]) },
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime_ns: 0,
                xattrs: vec![],
                link_group: None,
            },
            meta_packs: vec![],
            stats: SnapshotStats::default(),
        };
        (s.encode().0, s)
    }

    const DAY: u64 = 86400;

    fn at(days: f64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_secs_f64(days * DAY as f64)
    }

    fn kept(d: &[Decision]) -> usize {
        d.iter().filter(|d| d.keep).count()
    }

    #[test]
    fn a_host_offline_for_a_month_keeps_its_last_days() {
        // Four snapshots a day for ten days, then the host went away for 40 days.
        let snaps: Vec<_> = (0..40).map(|i| snap("h", at(i as f64 / 4.0), None, &[])).collect();
        let policy = Policy { keep_daily: Some(7), ..Default::default() };
        let d = decide(&snaps, &policy, at(50.0));
        assert_eq!(kept(&d), 7, "{d:#?}");
        let within = Policy { keep_within: Some(Duration::from_secs(2 * DAY)), ..Default::default() };
        assert_eq!(
            kept(&decide(&snaps, &within, at(50.0))),
            9,
            "two days back from the newest, not from now"
        );
    }

    #[test]
    fn one_fast_clock_does_not_push_the_others_out() {
        // A week of daily snapshots, then one from a host whose clock says next year.
        let mut snaps: Vec<_> = (0..7).map(|i| snap("h", at(i as f64), None, &[])).collect();
        snaps.push(snap("h", at(400.0), None, &[]));
        let within = Policy { keep_within: Some(Duration::from_secs(3 * DAY)), ..Default::default() };
        // Now is day 7: days 4-6 are within 3 days of it, and the future one is kept too.
        assert_eq!(kept(&decide(&snaps, &within, at(7.0))), 4);
    }

    #[test]
    fn a_volumes_versions_count_by_number_not_by_clock() {
        use cairn_store::format::volume::{TAG, VERSION_TAG};
        // Version 3 was committed by a host whose clock runs two days behind.
        let v = |n: &str, day: f64| snap("h", at(day), None, &[(TAG, "v"), (VERSION_TAG, n)]);
        let snaps = vec![v("1", 1.0), v("2", 2.0), v("3", 0.5)];
        let d = decide(&snaps, &Policy { keep_last: Some(2), ..Default::default() }, at(3.0));
        let keep: Vec<bool> = snaps.iter().map(|s| d.iter().find(|x| x.id == s.0).unwrap().keep).collect();
        assert_eq!(keep, vec![false, true, true]);
    }

    #[test]
    fn expiry_removes_unless_pinned_and_groups_count_apart() {
        let snaps = vec![
            snap("a", at(0.0), Some(at(1.0)), &[]),
            snap("a", at(0.1), Some(at(1.0)), &[("pin", "yes")]),
            snap("a", at(0.2), Some(at(9.0)), &[]),
            snap("b", at(0.0), None, &[]),
        ];
        let d = decide(
            &snaps,
            &Policy { keep_tags: vec![("pin".into(), "yes".into())], ..Default::default() },
            at(2.0),
        );
        let keep: Vec<bool> = snaps.iter().map(|s| d.iter().find(|x| x.id == s.0).unwrap().keep).collect();
        // Expired goes; pinned stays; not yet expired... has no matching rule under a policy.
        assert_eq!(keep, vec![false, true, false, false]);
        let d = decide(&snaps, &Policy::default(), at(2.0));
        let keep: Vec<bool> = snaps.iter().map(|s| d.iter().find(|x| x.id == s.0).unwrap().keep).collect();
        assert_eq!(keep, vec![false, false, true, true], "without a policy only expiry removes");
        let d = decide(&snaps, &Policy { keep_last: Some(1), ..Default::default() }, at(0.5));
        assert_eq!(kept(&d), 2, "keep-last counts per host");
    }

    proptest! {
        #[test]
        fn keep_last_keeps_exactly_the_newest(times in proptest::collection::vec(0u32..10_000, 0..40), n in 0usize..10) {
            let snaps: Vec<_> = times.iter().map(|t| snap("h", at(*t as f64 / 24.0), None, &[])).collect();
            let d = decide(&snaps, &Policy { keep_last: Some(n), ..Default::default() }, at(1e4));
            prop_assert_eq!(d.len(), snaps.len());
            prop_assert_eq!(kept(&d), n.min(snaps.len()));
            let oldest_kept = d.iter().filter(|x| x.keep).map(|x| humantime::parse_rfc3339(&x.time).unwrap()).min();
            let newest_dropped = d.iter().filter(|x| !x.keep).map(|x| humantime::parse_rfc3339(&x.time).unwrap()).max();
            if let (Some(k), Some(g)) = (oldest_kept, newest_dropped) {
                prop_assert!(k >= g);
            }
        }

        #[test]
        fn daily_keeps_one_per_distinct_day_up_to_n(times in proptest::collection::vec(0u32..2_000, 1..60), n in 1usize..10) {
            let snaps: Vec<_> = times.iter().map(|t| snap("h", at(*t as f64 / 24.0), None, &[])).collect();
            let days: HashSet<String> = snaps.iter().map(|s| fmt(s.1.time())[..10].to_string()).collect();
            let d = decide(&snaps, &Policy { keep_daily: Some(n), ..Default::default() }, at(1e4));
            prop_assert_eq!(kept(&d), n.min(days.len()));
        }
    }
}
