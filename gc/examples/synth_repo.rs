//! Build a synthetic repository of N tiny chunks for the GC benchmark (bench/gc.py):
//! `synth_repo DIR N` writes one snapshot referencing all N chunks (files of 256 chunks,
//! directories of 1000 files) plus N/10 chunks that nothing references, through the real
//! format encoders. Chunks are 16 bytes so that a 10M-chunk repository fits on any disk.

use std::path::PathBuf;
use std::time::SystemTime;

use cairn_store::format::config::Chunking;
use cairn_store::format::index::{self, IndexSegment, IndexedPack, MAX_CHUNKS_PER_SEGMENT};
use cairn_store::format::pack::{self, Codec, FinishedPack, PackBuilder, PackKind};
use cairn_store::format::snapshot::{self, Kind, Snapshot, SnapshotStats};
use cairn_store::format::tree::{Content, Extent, Node, NodeKind, Tree};
use cairn_store::{Id, Repository};

const PACK_CHUNKS: usize = 100_000;

fn node(name: String, kind: NodeKind) -> Node {
    Node {
        name: name.into_bytes(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        xattrs: vec![],
        link_group: None,
    }
}

struct Writer<'a> {
    repo: &'a Repository,
    data: PackBuilder,
    meta: PackBuilder,
    segment: IndexSegment,
    meta_packs: Vec<Id>,
}

impl Writer<'_> {
    async fn flush(&mut self, kind: PackKind) {
        let b = match kind {
            PackKind::Data => std::mem::replace(&mut self.data, PackBuilder::new(PackKind::Data, 8 << 20)),
            PackKind::Meta => std::mem::replace(&mut self.meta, PackBuilder::new(PackKind::Meta, 8 << 20)),
        };
        if b.is_empty() {
            return;
        }
        let FinishedPack { id, kind, bytes, entries } = b.finish();
        self.repo.put(&pack::object_name(&id), bytes.clone()).await.unwrap();
        if kind == PackKind::Meta {
            self.meta_packs.push(id);
        }
        if self.segment.chunk_count() + entries.len() > MAX_CHUNKS_PER_SEGMENT {
            let (sid, sbytes) = std::mem::take(&mut self.segment).encode();
            self.repo.put(&index::object_name(&sid), sbytes).await.unwrap();
        }
        self.segment.packs.push(IndexedPack { id, kind, len: bytes.len() as u64, chunks: entries });
    }

    async fn chunk(&mut self, i: u64) -> Id {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&i.to_le_bytes());
        raw[8..].copy_from_slice(b"synthetc");
        let id = Id::of(&raw);
        self.data.add(id, 16, Codec::Raw, &raw);
        if self.data.len() >= 16 * PACK_CHUNKS {
            self.flush(PackKind::Data).await;
        }
        id
    }

    async fn meta(&mut self, objects: Vec<cairn_store::format::tree::MetaObject>) {
        for o in objects {
            self.meta.add(o.id, o.bytes.len() as u32, Codec::Raw, &o.bytes);
            if self.meta.len() >= 8 << 20 {
                self.flush(PackKind::Meta).await;
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: synth_repo DIR N"));
    let n: u64 = args.next().expect("usage: synth_repo DIR N").parse().expect("N is a number");
    let cache = dir.with_extension("cache");
    let repo = Repository::init(dir.to_str().unwrap(), Chunking::default(), None, &cache).await.unwrap();
    let mut w = Writer {
        repo: &repo,
        data: PackBuilder::new(PackKind::Data, 8 << 20),
        meta: PackBuilder::new(PackKind::Meta, 8 << 20),
        segment: IndexSegment::default(),
        meta_packs: vec![],
    };
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut next = 0u64;
    while next < n {
        let mut extents = Vec::new();
        while extents.len() < 256 && next < n {
            extents.push(Extent { chunk: Some(w.chunk(next).await), len: 16 });
            next += 1;
        }
        let size = 16 * extents.len() as u64;
        files.push(node(
            format!("f{:06}", files.len()),
            NodeKind::File { size, content: Content::Extents(extents) },
        ));
        if files.len() == 1000 || next == n {
            let objects = Tree::build(std::mem::take(&mut files));
            let top = objects.last().unwrap().id;
            w.meta(objects).await;
            dirs.push(node(format!("d{:06}", dirs.len()), NodeKind::Dir { tree: top }));
        }
    }
    // Garbage: chunks nothing references, in their own packs.
    w.flush(PackKind::Data).await;
    for i in 0..n / 10 {
        w.chunk(u64::MAX - i).await;
    }
    w.flush(PackKind::Data).await;
    let objects = Tree::build(dirs);
    let top = objects.last().unwrap().id;
    w.meta(objects).await;
    w.flush(PackKind::Meta).await;
    let (sid, sbytes) = std::mem::take(&mut w.segment).encode();
    repo.put(&index::object_name(&sid), sbytes).await.unwrap();
    let mut root = node("synthetic".into(), NodeKind::Dir { tree: top });
    root.mode = 0o755;
    let snap = Snapshot {
        format: 1,
        time: humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
        host: "synth".into(),
        source: "/synthetic".into(),
        kind: Kind::Fs,
        tags: Default::default(),
        parent: None,
        expires: None,
        root,
        meta_packs: w.meta_packs.clone(),
        stats: SnapshotStats { chunks: n, ..Default::default() },
    };
    let (id, bytes) = snap.encode();
    repo.put(&snapshot::object_name(&id), bytes).await.unwrap();
    println!("{id}");
}
