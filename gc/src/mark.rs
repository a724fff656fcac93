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
pub struct MetaIndex {
    packs: Vec<PackId>,
    chunks: HashMap<Id, (u32, PackEntry)>,
    /// The segments read, with their sizes.
    segments: Vec<(Id, u64)>,
    indexed: usize,
    /// The packs of the bucket's listing: a chunk indexed in several packs is read from one
    /// of these, so a pack the bucket lost does not stop GC while a copy exists.
    listed: HashSet<PackId>,
    /// Packs a read found missing: never read from again.
    gone: HashSet<PackId>,
}

impl MetaIndex {
    pub fn new(listed: &HashMap<PackId, u64>) -> MetaIndex {
        MetaIndex {
            packs: Vec::new(),
            chunks: HashMap::new(),
            segments: Vec::new(),
            indexed: 0,
            listed: listed.keys().copied().collect(),
            gone: HashSet::new(),
        }
    }

    /// Take in the index segments not read before (all of them, the first time). A chunk
    /// indexed in several metadata packs (two pushes that did not know of each other) keeps
    /// a location in a listed pack over one in a pack that is not.
    pub async fn update(&mut self, repo: &Repository, segments: &[(Id, u64)]) -> Result<()> {
        let seen: HashSet<Id> = self.segments.iter().map(|(id, _)| *id).collect();
        let new: Vec<(Id, u64)> = segments.iter().filter(|(id, _)| !seen.contains(id)).copied().collect();
        let (packs, chunks, indexed, listed) =
            (&mut self.packs, &mut self.chunks, &mut self.indexed, &self.listed);
        repo.visit_segments(&new, |_, reader| {
            while let Some(head) = reader.next_head()? {
                *indexed = indexed.saturating_add(head.chunks);
                if head.kind != PackKind::Meta {
                    continue;
                }
                let slot = packs.len() as u32;
                packs.push(head.id);
                let here_listed = listed.contains(&head.id);
                while let Some(e) = reader.next_entry()? {
                    match chunks.entry(e.id) {
                        Entry::Occupied(mut seen) => {
                            if here_listed || !listed.contains(&packs[seen.get().0 as usize]) {
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
        self.segments.extend(new);
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
    /// bytes, which a sandbox can write on purpose); and the metadata pack a chunk was found
    /// in may turn out to be lost while another pack holds a copy. Rare, so one pass over the
    /// whole index per call is fine; [`mark`] gathers what it cannot locate and asks once it
    /// has nothing else to read, so a snapshot costs one pass per tree level that needs one.
    /// A listed pack is preferred; a chunk found nowhere (but in packs found gone) is missing.
    async fn search(&mut self, repo: &Repository, mut wanted: HashSet<Id>) -> Result<()> {
        let mut unlisted: HashMap<Id, (PackId, PackEntry)> = HashMap::new();
        {
            let (packs, chunks, wanted, unlisted, listed, gone) =
                (&mut self.packs, &mut self.chunks, &mut wanted, &mut unlisted, &self.listed, &self.gone);
            repo.visit_segments(&self.segments, |_, reader| {
                while let Some(head) = reader.next_head()? {
                    if gone.contains(&head.id) {
                        continue;
                    }
                    let here_listed = listed.contains(&head.id);
                    let mut slot = None;
                    while let Some(e) = reader.next_entry()? {
                        if !wanted.contains(&e.id) {
                            continue;
                        }
                        if !here_listed {
                            unlisted.entry(e.id).or_insert((head.id, e));
                            continue;
                        }
                        wanted.remove(&e.id);
                        let slot = *slot.get_or_insert_with(|| {
                            packs.push(head.id);
                            packs.len() as u32 - 1
                        });
                        chunks.insert(e.id, (slot, e));
                    }
                }
                reader.supersedes().map(drop)
            })
            .await?;
        }
        // Packs stored after the listing (a root committed meanwhile) are not listed either.
        for id in wanted {
            let Some((pack, e)) = unlisted.remove(&id) else { return Err(Error::MissingChunk(id)) };
            self.packs.push(pack);
            self.chunks.insert(id, (self.packs.len() as u32 - 1, e));
        }
        Ok(())
    }

    /// A read found `pack` missing: forget every location in it, so the chunks it held are
    /// searched for elsewhere.
    fn lost(&mut self, pack: PackId) {
        self.gone.insert(pack);
        let packs = &self.packs;
        self.chunks.retain(|_, (slot, _)| packs[*slot as usize] != pack);
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
    // Chunks no metadata pack of the index holds: searched for all at once when nothing
    // else is left to read.
    let mut unknown: Vec<Todo> = Vec::new();
    mark_nodes(std::slice::from_ref(&snap.root), live, &mut todo);
    while !todo.is_empty() || !unknown.is_empty() {
        if todo.is_empty() {
            meta.search(repo, unknown.iter().map(|t| *t.id()).collect()).await?;
            todo.append(&mut unknown);
        }
        // Taken from the end: the walk stays close to depth first, so `todo` stays small.
        let mut by_pack: HashMap<u32, Vec<(PackEntry, Todo)>> = HashMap::new();
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
        let meta_ref = &*meta;
        let mut reads = futures::stream::iter(by_pack.into_iter().map(|(slot, mut items)| async move {
            items.sort_by_key(|(e, _)| e.offset);
            let entries: Vec<PackEntry> = items.iter().map(|(e, _)| *e).collect();
            let pack = meta_ref.packs[slot as usize];
            let read = repo.read_pack_chunks(&pack, &entries).await;
            (pack, items, read)
        }))
        .buffer_unordered(READS_IN_FLIGHT);
        let mut lost = Vec::new();
        while let Some((pack, items, read)) = reads.next().await {
            match read {
                Ok(chunks) => {
                    for ((_, t), bytes) in items.into_iter().zip(chunks) {
                        take(t, &bytes, live, &mut todo)?;
                    }
                }
                // A pack the listing did not hold and the bucket does not have: look for
                // copies of its chunks elsewhere (none, and the search says they are missing).
                Err(Error::NotFound(_)) if !meta_ref.listed.contains(&pack) => {
                    lost.push(pack);
                    unknown.extend(items.into_iter().map(|(_, t)| t));
                }
                Err(e) => return Err(e),
            }
        }
        drop(reads);
        for pack in lost {
            meta.lost(pack);
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
