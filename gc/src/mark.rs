//! Marking: every chunk a snapshot references, read straight from the bucket.
//!
//! GC needs no local chunk index. [`MetaIndex`] keeps where the metadata chunks (tree pages and
//! chunk lists, a small fraction of all chunks) are, taken from the index segments' metadata
//! packs; data chunks are only ever looked up in the [`LiveSet`]. Trees are read in batches
//! of ranged reads grouped by pack, and each page is decoded, marked and dropped: memory holds
//! one batch, never a snapshot's whole metadata.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use cairn_store::format::pack::{PackEntry, PackKind};
use cairn_store::format::snapshot::Snapshot;
use cairn_store::format::tree::{self, Content, ListPage, Node, NodeKind, Tree};
use cairn_store::{Error, Id, PackId, Repository, Result};
use futures::StreamExt;

use crate::liveset::LiveSet;

/// Plain bytes of metadata read per batch: bounds what marking holds at once.
const BATCH_BYTES: u64 = 1 << 20;
/// Packs read from at once within a batch.
const READS_IN_FLIGHT: usize = 8;

/// Where each metadata chunk of the index is.
#[derive(Default)]
pub struct MetaIndex {
    packs: Vec<PackId>,
    chunks: HashMap<Id, (u32, PackEntry)>,
    segments: HashSet<Id>,
    indexed: usize,
}

impl MetaIndex {
    /// Take in the index segments not read before (all of them, the first time). A chunk
    /// indexed in several packs (two pushes that did not know of each other) keeps a
    /// location in a pack of `listed` (the bucket's listing) over one in a pack that is not:
    /// a pack the bucket lost must not stop GC while a copy exists.
    pub async fn update(
        &mut self,
        repo: &Repository,
        segments: &[Id],
        listed: &HashMap<PackId, u64>,
    ) -> Result<()> {
        for id in segments {
            if !self.segments.insert(*id) {
                continue;
            }
            let (packs, chunks, indexed) = (&mut self.packs, &mut self.chunks, &mut self.indexed);
            repo.visit_segment(id, |reader| {
                while let Some(head) = reader.next_head()? {
                    *indexed += head.chunks;
                    if head.kind != PackKind::Meta {
                        continue;
                    }
                    let slot = packs.len() as u32;
                    packs.push(head.id);
                    let here_listed = listed.contains_key(&head.id);
                    while let Some(e) = reader.next_entry()? {
                        match chunks.entry(e.id) {
                            Entry::Occupied(mut seen) => {
                                if here_listed || !listed.contains_key(&packs[seen.get().0 as usize]) {
                                    seen.insert((slot, e));
                                }
                            }
                            Entry::Vacant(v) => {
                                v.insert((slot, e));
                            }
                        }
                    }
                }
                reader.supersedes().map(drop)
            })
            .await?;
        }
        Ok(())
    }

    /// Chunks the index segments list (a chunk indexed twice counts twice).
    pub fn indexed(&self) -> usize {
        self.indexed
    }

    fn locate(&self, id: &Id) -> Option<(u32, PackEntry)> {
        self.chunks.get(id).copied()
    }

    /// Find `wanted` in packs of any kind. A push deduplicates a tree page or chunk list
    /// against any stored chunk, so one can live only in a data pack (a file holding the same
    /// bytes, which a sandbox can write on purpose). Rare, so a whole pass over the index
    /// for each batch that meets one is fine; a chunk found nowhere is missing.
    async fn search(&mut self, repo: &Repository, mut wanted: HashSet<Id>) -> Result<()> {
        let segments: Vec<Id> = self.segments.iter().copied().collect();
        for id in &segments {
            let (packs, chunks, wanted) = (&mut self.packs, &mut self.chunks, &mut wanted);
            repo.visit_segment(id, |reader| {
                while let Some(head) = reader.next_head()? {
                    let mut slot = None;
                    while let Some(e) = reader.next_entry()? {
                        if wanted.remove(&e.id) {
                            let slot = *slot.get_or_insert_with(|| {
                                packs.push(head.id);
                                packs.len() as u32 - 1
                            });
                            chunks.insert(e.id, (slot, e));
                        }
                    }
                }
                reader.supersedes().map(drop)
            })
            .await?;
        }
        match wanted.into_iter().next() {
            Some(id) => Err(Error::MissingChunk(id)),
            None => Ok(()),
        }
    }
}

/// A metadata chunk still to be read.
enum Todo {
    Dir(Id),
    /// A page of a paged directory: a leaf.
    Page(Id),
    List(ListPage),
}

impl Todo {
    fn id(&self) -> &Id {
        match self {
            Todo::Dir(id) | Todo::Page(id) => id,
            Todo::List(page) => &page.id,
        }
    }
}

/// Mark every chunk `snap` references: trees, chunk lists and data. Subtrees and chunk lists
/// marked before (shared with an earlier snapshot) are not read again.
pub async fn mark(
    repo: &Repository,
    meta: &mut MetaIndex,
    snap: &Snapshot,
    live: &mut LiveSet,
) -> Result<()> {
    let mut todo = Vec::new();
    mark_nodes(std::slice::from_ref(&snap.root), live, &mut todo);
    while !todo.is_empty() {
        // Taken from the end: the walk stays close to depth first, so `todo` stays small.
        let mut by_pack: HashMap<u32, Vec<(PackEntry, Todo)>> = HashMap::new();
        let mut unknown = Vec::new();
        let mut bytes = 0;
        while let Some(t) = todo.pop() {
            match meta.locate(t.id()) {
                Some((slot, entry)) => {
                    bytes += entry.raw_len as u64;
                    by_pack.entry(slot).or_default().push((entry, t));
                }
                None => unknown.push(t),
            }
            if bytes >= BATCH_BYTES {
                break;
            }
        }
        if !unknown.is_empty() {
            meta.search(repo, unknown.iter().map(|t| *t.id()).collect()).await?;
            todo.extend(unknown);
        }
        let meta = &*meta;
        let mut reads = futures::stream::iter(by_pack.into_iter().map(|(slot, mut items)| async move {
            items.sort_by_key(|(e, _)| e.offset);
            let entries: Vec<PackEntry> = items.iter().map(|(e, _)| *e).collect();
            let chunks = repo.read_pack_chunks(&meta.packs[slot as usize], &entries).await?;
            Ok::<_, Error>(items.into_iter().map(|(_, t)| t).zip(chunks).collect::<Vec<_>>())
        }))
        .buffer_unordered(READS_IN_FLIGHT);
        while let Some(read) = reads.next().await {
            for (t, bytes) in read? {
                take(t, &bytes, live, &mut todo)?;
            }
        }
    }
    Ok(())
}

/// Mark what one metadata chunk names; what still has to be read goes on `todo`.
fn take(t: Todo, bytes: &[u8], live: &mut LiveSet, todo: &mut Vec<Todo>) -> Result<()> {
    match t {
        Todo::Dir(id) => match Tree::decode(bytes, &format!("tree {id}"))? {
            Tree::Leaf(nodes) => mark_nodes(&nodes, live, todo),
            Tree::Pages(pages) => {
                for p in pages {
                    live.insert(&p.id);
                    todo.push(Todo::Page(p.id));
                }
            }
        },
        Todo::Page(id) => match Tree::decode(bytes, &format!("tree {id}"))? {
            Tree::Leaf(nodes) => mark_nodes(&nodes, live, todo),
            Tree::Pages(_) => return Err(Error::corrupt(format!("tree {id}"), "nested pages")),
        },
        Todo::List(page) => {
            let object = format!("chunk list {}", page.id);
            for e in tree::decode_list(bytes, &page, &object)? {
                if let Some(c) = e.chunk {
                    live.insert(&c);
                }
            }
        }
    }
    Ok(())
}

/// Mark the nodes' own chunks; directories and chunk lists not walked before go on `todo`.
#[allow(clippy::collapsible_match)] // marking a tree in a match guard would hide its side effect
fn mark_nodes(nodes: &[Node], live: &mut LiveSet, todo: &mut Vec<Todo>) {
    for node in nodes {
        match &node.kind {
            NodeKind::Dir { tree } => {
                if live.insert_walked(tree) {
                    todo.push(Todo::Dir(*tree));
                }
            }
            NodeKind::File { content: Content::Extents(extents), .. } => {
                extents.iter().filter_map(|e| e.chunk.as_ref()).for_each(|c| live.insert(c));
            }
            NodeKind::File { content: Content::Lists(pages), .. } => {
                for p in pages {
                    if live.insert_walked(&p.id) {
                        todo.push(Todo::List(*p));
                    }
                }
            }
            _ => {}
        }
    }
}
