//! `ls`, `cat` and `stats`: read-only views of snapshots and the repository.

use std::io::Write;

use futures::future::BoxFuture;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::snapshot::Snapshot;
use crate::format::tree::{Node, NodeKind};
use crate::repo::Repository;

#[derive(Clone, Debug, Serialize)]
pub struct LsEntry {
    pub path: String,
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

pub fn kind_name(node: &Node) -> &'static str {
    match node.kind {
        NodeKind::Dir { .. } => "dir",
        NodeKind::File { .. } => "file",
        NodeKind::Symlink { .. } => "symlink",
        NodeKind::CharDevice { .. } => "chardev",
        NodeKind::BlockDevice { .. } => "blockdev",
        NodeKind::Fifo => "fifo",
        NodeKind::Socket => "socket",
    }
}

fn entry(path: String, node: &Node) -> LsEntry {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(node.mtime_ns.max(0) as u64);
    LsEntry {
        path,
        kind: kind_name(node),
        mode: node.mode,
        uid: node.uid,
        gid: node.gid,
        size: node.size(),
        mtime: humantime::format_rfc3339_seconds(t).to_string(),
        target: match &node.kind {
            NodeKind::Symlink { target } => Some(String::from_utf8_lossy(target).into_owned()),
            _ => None,
        },
    }
}

/// The entries of a directory in a snapshot (or the one entry a file path names).
pub async fn ls(repo: &Repository, snap: &Snapshot, path: &str, recursive: bool) -> Result<Vec<LsEntry>> {
    let node = repo.walk_path(&snap.root, path).await?;
    let base = format!("/{}", path.trim_matches('/'));
    let mut out = Vec::new();
    match node.kind {
        NodeKind::Dir { .. } => {
            list_into(repo, &node, base.trim_end_matches('/'), recursive, &mut out).await?
        }
        _ => out.push(entry(base, &node)),
    }
    Ok(out)
}

fn list_into<'a>(
    repo: &'a Repository,
    dir: &'a Node,
    prefix: &'a str,
    recursive: bool,
    out: &'a mut Vec<LsEntry>,
) -> BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        let NodeKind::Dir { tree } = &dir.kind else {
            return Ok(());
        };
        for child in repo.read_dir(tree).await? {
            let path = format!("{prefix}/{}", String::from_utf8_lossy(&child.name));
            out.push(entry(path.clone(), &child));
            if recursive && child.is_dir() {
                list_into(repo, &child, &path, true, out).await?;
            }
        }
        Ok(())
    })
}

/// Write one file of a snapshot to `out`, every chunk verified; holes are written as zeros.
pub async fn cat(
    repo: &Repository,
    snap: &Snapshot,
    path: &str,
    out: &mut (dyn Write + Send),
) -> Result<u64> {
    let node = repo.walk_path(&snap.root, path).await?;
    let NodeKind::File { content, .. } = &node.kind else {
        return Err(Error::Usage(format!("{path} is a {}, not a file", kind_name(&node))));
    };
    let mut written = 0;
    let zeros = vec![0u8; 1 << 16];
    for e in repo.extents(content).await? {
        match e.chunk {
            Some(id) => {
                let data = repo.read_chunk(&id).await?;
                out.write_all(&data).map_err(|err| Error::io("<stdout>", err))?;
            }
            None => {
                let mut left = e.len;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    out.write_all(&zeros[..n]).map_err(|err| Error::io("<stdout>", err))?;
                    left -= n as u64;
                }
            }
        }
        written += e.len;
    }
    Ok(written)
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RepoStats {
    pub snapshots: usize,
    pub index_segments: usize,
    pub data_packs: usize,
    pub meta_packs: usize,
    pub pack_bytes: u64,
    pub chunks: u64,
    /// Sum of the logical size of every snapshot (what restoring all would write).
    pub logical_bytes: u64,
    /// Plain bytes of all chunks (after dedup, before compression).
    pub unique_bytes: u64,
}

pub async fn repo_stats(repo: &Repository) -> Result<RepoStats> {
    let snapshots = repo.snapshots().await?;
    let packs = repo.list("packs").await?;
    let segments = repo.list("index").await?;
    let mut stats = RepoStats {
        snapshots: snapshots.len(),
        index_segments: segments.len(),
        pack_bytes: packs.iter().map(|(_, s)| s).sum(),
        logical_bytes: snapshots.iter().map(|(_, s)| s.stats.bytes).sum(),
        ..Default::default()
    };
    let mut seen = std::collections::HashSet::new();
    for (name, _) in &segments {
        let bytes = repo.get(name).await?;
        let seg = crate::format::index::IndexSegment::decode(&bytes, name)?;
        for p in seg.packs {
            if !seen.insert(p.id) {
                continue;
            }
            match p.kind {
                crate::format::pack::PackKind::Data => stats.data_packs += 1,
                crate::format::pack::PackKind::Meta => stats.meta_packs += 1,
            }
            stats.chunks += p.chunks.len() as u64;
            stats.unique_bytes += p.chunks.iter().map(|c| c.raw_len as u64).sum::<u64>();
        }
    }
    Ok(stats)
}
