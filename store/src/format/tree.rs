//! Directory trees and chunk lists: the metadata chunks of a snapshot.
//!
//! A directory is a [`Tree`] object: either one leaf of nodes sorted by name, or — when its
//! encoding passes [`PAGE_BYTES`] — a list of pages, each a leaf holding a name range. A lookup
//! in a huge directory reads the page list, binary-searches it and decodes one page.
//!
//! A file's content is a list of [`Extent`]s (a chunk or a hole, with its length). Long lists
//! move to [`ChunkList`] objects named from the node by [`ListPage`]s carrying the byte length
//! they cover, so a reader maps a file offset to its chunk by reading one page, not all.
//!
//! Encodings: `"CRNT" 0x01 postcard(Tree)` and `"CRNL" 0x01 postcard(Vec<Extent>)`. Decoding
//! checks every invariant a restore or a mount relies on (names, order, sizes).

use serde::{Deserialize, Serialize};

use super::{check_header, with_header};
use crate::error::{Error, Result};
use crate::id::{ChunkId, Id};

const TREE_MAGIC: &[u8; 4] = b"CRNT";
const LIST_MAGIC: &[u8; 4] = b"CRNL";
/// A directory whose encoding passes this is split into pages of about this size.
pub const PAGE_BYTES: usize = 64 * 1024;
/// Files with more extents than this keep them in chunk-list objects.
pub const INLINE_EXTENTS: usize = 256;
/// Extents per chunk-list object.
pub const LIST_EXTENTS: usize = 4096;
/// No chunk is longer than this (the largest chunk size `config` allows).
pub const MAX_CHUNK: u64 = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: Vec<u8>,
    pub kind: NodeKind,
    /// Permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    pub xattrs: Vec<Xattr>,
    /// Nodes with the same group in one snapshot are hard links to one inode.
    pub link_group: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    Dir { tree: Id },
    File { size: u64, content: Content },
    Symlink { target: Vec<u8> },
    CharDevice { rdev: u64 },
    BlockDevice { rdev: u64 },
    Fifo,
    Socket,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    Extents(Vec<Extent>),
    Lists(Vec<ListPage>),
}

/// A run of file bytes: a chunk, or a hole (`chunk: None`) that reads as zeros and is
/// never stored or fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub chunk: Option<ChunkId>,
    pub len: u64,
}

/// A chunk-list object and the bytes of the file it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListPage {
    pub id: Id,
    pub len: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tree {
    Leaf(Vec<Node>),
    Pages(Vec<TreePage>),
}

/// One page of a paged directory: its first name, its leaf object and how many nodes it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreePage {
    pub first: Vec<u8>,
    pub id: Id,
    pub count: u32,
}

/// A metadata object ready to be stored as a chunk.
pub struct MetaObject {
    pub id: Id,
    pub bytes: Vec<u8>,
}

impl MetaObject {
    fn new(magic: &[u8; 4], body: Vec<u8>) -> MetaObject {
        let bytes = with_header(magic, &body);
        MetaObject { id: Id::of(&bytes), bytes }
    }
}

/// Why a name may not appear in a tree: it would escape or alias its directory.
pub fn check_name(name: &[u8]) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        Err("empty name")
    } else if name == b"." || name == b".." {
        Err("name is . or ..")
    } else if name.contains(&b'/') {
        Err("name contains '/'")
    } else if name.contains(&0) {
        Err("name contains NUL")
    } else {
        Ok(())
    }
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }

    pub fn size(&self) -> u64 {
        match &self.kind {
            NodeKind::File { size, .. } => *size,
            NodeKind::Symlink { target } => target.len() as u64,
            _ => 0,
        }
    }

    pub(crate) fn validate(&self, object: &str) -> Result<()> {
        let name = String::from_utf8_lossy(&self.name);
        check_name(&self.name).map_err(|why| Error::corrupt(object, format!("entry {name:?}: {why}")))?;
        if self.mode & !0o7777 != 0 {
            return Err(Error::corrupt(
                object,
                format!("entry {name:?}: mode {:o} has type bits", self.mode),
            ));
        }
        if let NodeKind::File { size, content } = &self.kind {
            let (sum, ok) = match content {
                Content::Extents(ex) => (
                    ex.iter().try_fold(0u64, |a, e| a.checked_add(e.len)),
                    ex.iter().all(|e| e.len > 0 && (e.chunk.is_none() || e.len <= MAX_CHUNK)),
                ),
                Content::Lists(pages) => (
                    pages.iter().try_fold(0u64, |a, p| a.checked_add(p.len)),
                    pages.iter().all(|p| p.len > 0),
                ),
            };
            if !ok || sum != Some(*size) {
                return Err(Error::corrupt(
                    object,
                    format!("entry {name:?}: content does not add up to its size"),
                ));
            }
        }
        if let NodeKind::Symlink { target } = &self.kind {
            if target.is_empty() || target.contains(&0) {
                return Err(Error::corrupt(object, format!("entry {name:?}: bad symlink target")));
            }
        }
        Ok(())
    }
}

impl Tree {
    /// Encode a directory's nodes (sorted, unique names) into one leaf or a paged tree.
    /// The last object returned is the directory's top object.
    pub fn build(nodes: Vec<Node>) -> Vec<MetaObject> {
        let leaf = Tree::Leaf(nodes);
        let body = postcard::to_stdvec(&leaf).expect("tree serializes");
        if body.len() <= PAGE_BYTES {
            return vec![MetaObject::new(TREE_MAGIC, body)];
        }
        let Tree::Leaf(nodes) = leaf else { unreachable!() };
        let mut objects = Vec::new();
        let mut pages = Vec::new();
        let mut current: Vec<Node> = Vec::new();
        let mut current_bytes = 0;
        let mut flush = |current: &mut Vec<Node>, objects: &mut Vec<MetaObject>| {
            let page = Tree::Leaf(std::mem::take(current));
            let Tree::Leaf(ref nodes) = page else { unreachable!() };
            let (first, count) = (nodes[0].name.clone(), nodes.len() as u32);
            let obj = MetaObject::new(TREE_MAGIC, postcard::to_stdvec(&page).expect("tree serializes"));
            pages.push(TreePage { first, id: obj.id, count });
            objects.push(obj);
        };
        for node in nodes {
            let len = postcard::experimental::serialized_size(&node).unwrap_or(256);
            if current_bytes + len > PAGE_BYTES && !current.is_empty() {
                flush(&mut current, &mut objects);
                current_bytes = 0;
            }
            current_bytes += len;
            current.push(node);
        }
        if !current.is_empty() {
            flush(&mut current, &mut objects);
        }
        let top = Tree::Pages(pages);
        objects.push(MetaObject::new(TREE_MAGIC, postcard::to_stdvec(&top).expect("tree serializes")));
        objects
    }

    pub fn decode(bytes: &[u8], object: &str) -> Result<Tree> {
        let body = check_header(bytes, TREE_MAGIC, object)?;
        let tree: Tree =
            postcard::from_bytes(body).map_err(|e| Error::corrupt(object, format!("postcard: {e}")))?;
        match &tree {
            Tree::Leaf(nodes) => {
                for n in nodes {
                    n.validate(object)?;
                }
                if !nodes.windows(2).all(|w| w[0].name < w[1].name) {
                    return Err(Error::corrupt(object, "entries are not sorted and unique"));
                }
            }
            Tree::Pages(pages) => {
                if pages.is_empty() || !pages.windows(2).all(|w| w[0].first < w[1].first) {
                    return Err(Error::corrupt(object, "pages are not sorted and unique"));
                }
            }
        }
        Ok(tree)
    }
}

/// Put a file's extents into the node: inline when few, else into chunk-list objects.
pub fn build_content(extents: Vec<Extent>) -> (Content, Vec<MetaObject>) {
    if extents.len() <= INLINE_EXTENTS {
        return (Content::Extents(extents), Vec::new());
    }
    let mut objects = Vec::new();
    let pages = extents
        .chunks(LIST_EXTENTS)
        .map(|part| {
            let obj = MetaObject::new(LIST_MAGIC, postcard::to_stdvec(part).expect("list serializes"));
            let page = ListPage { id: obj.id, len: part.iter().map(|e| e.len).sum() };
            objects.push(obj);
            page
        })
        .collect();
    (Content::Lists(pages), objects)
}

/// Decode a chunk-list object and check it covers exactly `page.len` bytes.
pub fn decode_list(bytes: &[u8], page: &ListPage, object: &str) -> Result<Vec<Extent>> {
    let body = check_header(bytes, LIST_MAGIC, object)?;
    let extents: Vec<Extent> =
        postcard::from_bytes(body).map_err(|e| Error::corrupt(object, format!("postcard: {e}")))?;
    let sum = extents.iter().try_fold(0u64, |a, e| if e.len == 0 { None } else { a.checked_add(e.len) });
    if sum != Some(page.len) || extents.iter().any(|e| e.chunk.is_some() && e.len > MAX_CHUNK) {
        return Err(Error::corrupt(object, "chunk list does not add up to its page length"));
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: u64) -> Node {
        Node {
            name: name.as_bytes().to_vec(),
            kind: NodeKind::File { size, content: Content::Extents(vec![Extent { chunk: None, len: size }]) },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            xattrs: vec![],
            link_group: None,
        }
    }

    #[test]
    fn small_directory_is_one_leaf() {
        let objs = Tree::build(vec![file("a", 1), file("b", 2)]);
        assert_eq!(objs.len(), 1);
        assert!(matches!(Tree::decode(&objs[0].bytes, "t").unwrap(), Tree::Leaf(n) if n.len() == 2));
    }

    #[test]
    fn huge_directory_is_paged_and_every_page_decodes() {
        let nodes: Vec<Node> = (0..20_000).map(|i| file(&format!("f{i:06}"), 1)).collect();
        let objs = Tree::build(nodes);
        assert!(objs.len() > 3);
        let Tree::Pages(pages) = Tree::decode(&objs.last().unwrap().bytes, "t").unwrap() else { panic!() };
        assert_eq!(pages.iter().map(|p| p.count as usize).sum::<usize>(), 20_000);
        for (page, obj) in pages.iter().zip(&objs) {
            assert_eq!(page.id, obj.id);
            assert!(obj.bytes.len() <= PAGE_BYTES + 200);
            let Tree::Leaf(n) = Tree::decode(&obj.bytes, "p").unwrap() else { panic!() };
            assert_eq!(n[0].name, page.first);
        }
    }

    #[test]
    fn escaping_names_are_rejected() {
        for bad in ["..", ".", "a/b", ""] {
            let objs = Tree::build(vec![file(bad, 1)]);
            assert!(Tree::decode(&objs[0].bytes, "t").is_err(), "{bad:?}");
        }
        let objs = Tree::build(vec![file("b", 1), file("a", 1)]);
        assert!(Tree::decode(&objs[0].bytes, "t").is_err());
    }

    #[test]
    fn long_content_moves_to_lists() {
        let ext: Vec<Extent> =
            (0..10_000u32).map(|i| Extent { chunk: Some(Id::of(&i.to_le_bytes())), len: 7 }).collect();
        let (content, objs) = build_content(ext.clone());
        let Content::Lists(pages) = content else { panic!() };
        assert_eq!(pages.len(), 3);
        let back: Vec<Extent> =
            pages.iter().zip(&objs).flat_map(|(p, o)| decode_list(&o.bytes, p, "l").unwrap()).collect();
        assert_eq!(back, ext);
    }
}
