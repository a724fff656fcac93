//! `check`: is every committed snapshot fully readable?
//!
//! Structure: every snapshot root, tree and chunk list decodes and verifies, every chunk a
//! file names is in the index, and every pack the index names exists. With `read_data`,
//! every pack is downloaded, its table and id verified, and every chunk's BLAKE3 checked.
//! Damage is reported by snapshot and path.

use std::collections::{HashMap, HashSet};

use futures::future::BoxFuture;
use futures::StreamExt;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::index::IndexSegment;
use crate::format::pack;
use crate::format::tree::{Content, Node, NodeKind};
use crate::id::{ChunkId, Id, PackId};
use crate::repo::Repository;

#[derive(Clone, Debug, Serialize)]
pub struct Damage {
    /// The snapshot affected, when the damage is under one.
    pub snapshot: Option<String>,
    pub path: Option<String>,
    pub problem: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    pub snapshots: usize,
    pub trees: u64,
    pub chunks_referenced: u64,
    pub packs: usize,
    pub packs_read: usize,
    pub bytes_read: u64,
    pub damage: Vec<Damage>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.damage.is_empty()
    }
}

struct Walk<'a> {
    repo: &'a Repository,
    snapshot: String,
    /// Chunks found bad by reading packs.
    bad: &'a HashMap<ChunkId, String>,
    /// Subtrees already found whole, shared by all snapshots.
    clean: &'a mut HashSet<Id>,
    report: &'a mut CheckReport,
}

pub async fn check(repo: &Repository, read_data: bool) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    // Packs the index names must all exist.
    let listed: HashMap<String, u64> = repo.list("packs").await?.into_iter().collect();
    let mut indexed: HashMap<PackId, u64> = HashMap::new();
    for (name, _) in repo.list("index").await? {
        let bytes = repo.get(&name).await?;
        match IndexSegment::decode(&bytes, &name) {
            Ok(seg) => indexed.extend(seg.packs.iter().map(|p| (p.id, p.len))),
            Err(e) => report.damage.push(Damage { snapshot: None, path: None, problem: e.to_string() }),
        }
    }
    report.packs = indexed.len();
    for (id, len) in &indexed {
        let name = pack::object_name(id);
        match listed.get(&name) {
            None => report.damage.push(Damage {
                snapshot: None,
                path: None,
                problem: format!("{name} is missing"),
            }),
            Some(size) if size != len => report.damage.push(Damage {
                snapshot: None,
                path: None,
                problem: format!("{name} has {size} bytes, the index says {len}"),
            }),
            _ => {}
        }
    }
    let mut bad: HashMap<ChunkId, String> = HashMap::new();
    if read_data {
        let names: Vec<PackId> =
            indexed.keys().copied().filter(|id| listed.contains_key(&pack::object_name(id))).collect();
        let mut reads = futures::stream::iter(names.into_iter().map(|id| async move {
            let name = pack::object_name(&id);
            let result = async {
                let bytes = repo.get(&name).await?;
                let mut bad = Vec::new();
                if Id::of(&bytes) != id {
                    bad.push((None, format!("{name}: content does not match its id")));
                }
                match pack::decode_table_of(&bytes, &name) {
                    Ok((_, entries)) => {
                        for e in entries {
                            let stored = &bytes[e.stored_range()];
                            if let Err(err) = pack::open_chunk(&e, stored, &name) {
                                bad.push((Some(e.id), err.to_string()));
                            }
                        }
                    }
                    Err(err) => bad.push((None, err.to_string())),
                }
                Ok::<_, Error>((bytes.len() as u64, bad))
            }
            .await;
            (id, result)
        }))
        .buffer_unordered(4);
        while let Some((id, result)) = reads.next().await {
            report.packs_read += 1;
            match result {
                Ok((n, problems)) => {
                    report.bytes_read += n;
                    for (chunk, problem) in problems {
                        match chunk {
                            Some(c) => {
                                bad.insert(c, problem);
                            }
                            None => report.damage.push(Damage { snapshot: None, path: None, problem }),
                        }
                    }
                }
                Err(e) => report.damage.push(Damage {
                    snapshot: None,
                    path: None,
                    problem: format!("{}: {e}", pack::object_name(&id)),
                }),
            }
        }
        // A pack whose table is unreadable makes its chunks unreadable too.
    }
    let mut clean = HashSet::new();
    for id in repo.snapshot_ids().await? {
        report.snapshots += 1;
        let snap = match repo.fetch_snapshot(&id).await {
            Ok(s) => s,
            Err(e) => {
                report.damage.push(Damage {
                    snapshot: Some(id.to_hex()),
                    path: None,
                    problem: e.to_string(),
                });
                continue;
            }
        };
        let mut walk =
            Walk { repo, snapshot: id.to_hex(), bad: &bad, clean: &mut clean, report: &mut report };
        walk.node(&snap.root, "/".into()).await;
    }
    Ok(report)
}

impl Walk<'_> {
    fn damage(&mut self, path: &str, problem: String) {
        self.report.damage.push(Damage {
            snapshot: Some(self.snapshot.clone()),
            path: Some(path.into()),
            problem,
        });
    }

    /// Check a chunk is in the index and not known bad.
    fn chunk(&mut self, path: &str, id: &ChunkId) -> bool {
        self.report.chunks_referenced += 1;
        if let Some(problem) = self.bad.get(id) {
            self.damage(path, problem.clone());
            return false;
        }
        match self.repo.locate(id) {
            Ok(_) => true,
            Err(e) => {
                self.damage(path, e.to_string());
                false
            }
        }
    }

    /// Returns whether the node and everything below it is whole.
    fn node<'s>(&'s mut self, node: &'s Node, path: String) -> BoxFuture<'s, bool> {
        Box::pin(async move {
            match &node.kind {
                NodeKind::Dir { tree } => {
                    if self.clean.contains(tree) {
                        return true;
                    }
                    self.report.trees += 1;
                    let mut ok = self.chunk(&path, tree);
                    let children = match self.repo.read_dir(tree).await {
                        Ok(c) => c,
                        Err(e) => {
                            self.damage(&path, e.to_string());
                            return false;
                        }
                    };
                    for child in &children {
                        let p = format!(
                            "{}/{}",
                            path.trim_end_matches('/'),
                            String::from_utf8_lossy(&child.name)
                        );
                        ok &= self.node(child, p).await;
                    }
                    if ok {
                        self.clean.insert(*tree);
                    }
                    ok
                }
                NodeKind::File { content, .. } => {
                    let mut ok = true;
                    if let Content::Lists(pages) = content {
                        for p in pages {
                            ok &= self.chunk(&path, &p.id);
                        }
                        if !ok {
                            return false;
                        }
                    }
                    match self.repo.extents(content).await {
                        Ok(extents) => {
                            for id in extents.iter().filter_map(|e| e.chunk) {
                                ok &= self.chunk(&path, &id);
                            }
                            ok
                        }
                        Err(e) => {
                            self.damage(&path, e.to_string());
                            false
                        }
                    }
                }
                _ => true,
            }
        })
    }
}
