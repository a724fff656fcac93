//! `diff`: what changed between two snapshots. Subtrees with equal ids are equal and skipped
//! without being read, so the cost follows the change, not the snapshot size.

use futures::future::BoxFuture;
use serde::Serialize;

use crate::error::Result;
use crate::format::tree::{Node, NodeKind};
use crate::repo::Repository;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    /// Content changed (or the entry changed type).
    Modified,
    /// Only metadata (mode, owner, time, xattrs) changed.
    Metadata,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiffEntry {
    pub path: String,
    pub change: Change,
}

pub async fn diff(repo: &Repository, a: &Node, b: &Node) -> Result<Vec<DiffEntry>> {
    let mut out = Vec::new();
    diff_nodes(repo, a, b, String::new(), &mut out).await?;
    Ok(out)
}

fn same_meta(a: &Node, b: &Node) -> bool {
    a.mode == b.mode && a.uid == b.uid && a.gid == b.gid && a.mtime_ns == b.mtime_ns && a.xattrs == b.xattrs
}

fn diff_nodes<'a>(
    repo: &'a Repository,
    a: &'a Node,
    b: &'a Node,
    path: String,
    out: &'a mut Vec<DiffEntry>,
) -> BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        match (&a.kind, &b.kind) {
            (NodeKind::Dir { tree: ta }, NodeKind::Dir { tree: tb }) => {
                if !same_meta(a, b) && !path.is_empty() {
                    out.push(DiffEntry { path: path.clone(), change: Change::Metadata });
                }
                if ta == tb {
                    return Ok(());
                }
                let (la, lb) = (repo.read_dir(ta).await?, repo.read_dir(tb).await?);
                let (mut i, mut j) = (0, 0);
                while i < la.len() || j < lb.len() {
                    let ord = match (la.get(i), lb.get(j)) {
                        (Some(x), Some(y)) => x.name.cmp(&y.name),
                        (Some(_), None) => std::cmp::Ordering::Less,
                        _ => std::cmp::Ordering::Greater,
                    };
                    match ord {
                        std::cmp::Ordering::Less => {
                            added_or_removed(repo, &la[i], &path, Change::Removed, out).await?;
                            i += 1;
                        }
                        std::cmp::Ordering::Greater => {
                            added_or_removed(repo, &lb[j], &path, Change::Added, out).await?;
                            j += 1;
                        }
                        std::cmp::Ordering::Equal => {
                            let child = format!("{path}/{}", String::from_utf8_lossy(&la[i].name));
                            diff_nodes(repo, &la[i], &lb[j], child, out).await?;
                            i += 1;
                            j += 1;
                        }
                    }
                }
            }
            (ka, kb) if ka == kb => {
                if !same_meta(a, b) {
                    out.push(DiffEntry { path: display(path), change: Change::Metadata });
                }
            }
            _ => out.push(DiffEntry { path: display(path), change: Change::Modified }),
        }
        Ok(())
    })
}

fn display(path: String) -> String {
    if path.is_empty() {
        "/".into()
    } else {
        path
    }
}

/// Report an added or removed entry and, for a directory, everything below it.
fn added_or_removed<'a>(
    repo: &'a Repository,
    node: &'a Node,
    parent: &'a str,
    change: Change,
    out: &'a mut Vec<DiffEntry>,
) -> BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        let path = format!("{parent}/{}", String::from_utf8_lossy(&node.name));
        out.push(DiffEntry { path: path.clone(), change });
        if let NodeKind::Dir { tree } = &node.kind {
            for child in repo.read_dir(tree).await? {
                added_or_removed(repo, &child, &path, change, out).await?;
            }
        }
        Ok(())
    })
}
