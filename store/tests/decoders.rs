//! Every decoder of untrusted bytes, fed random and mutated input: an error, never a panic,
//! and what is accepted keeps the invariants readers rely on. (The fuzz targets in `fuzz/`
//! do the same, coverage-guided.)

use cairn_store::format::config::{Chunking, Config};
use cairn_store::format::index::{IndexSegment, IndexedPack};
use cairn_store::format::lease::{GcState, Lease, LeaseState};
use cairn_store::format::pack::{self, PackBuilder, PackKind};
use cairn_store::format::trace::Trace;
use cairn_store::format::tree::{self, check_name, Content, Extent, Node, NodeKind, Tree};
use cairn_store::format::volume::{Head, Version};
use cairn_store::{Id, Snapshot};
use proptest::prelude::*;

fn sample_pack() -> Vec<u8> {
    let mut b = PackBuilder::new(PackKind::Data, 1 << 16);
    for i in 0..4u8 {
        let raw = vec![i; 3000];
        let (codec, stored) = pack::seal_chunk(&raw, 3);
        b.add(Id::of(&raw), raw.len() as u32, codec, &stored);
    }
    b.finish().bytes.to_vec()
}

fn sample_tree() -> Vec<u8> {
    let node = |n: &str| Node {
        name: n.as_bytes().to_vec(),
        kind: NodeKind::File {
            size: 3,
            content: Content::Extents(vec![Extent { chunk: Some(Id::of(b"abc")), len: 3 }]),
        },
        mode: 0o644,
        uid: 1,
        gid: 2,
        mtime_ns: 3,
        xattrs: vec![],
        link_group: None,
    };
    Tree::build(vec![node("a"), node("b")]).pop().unwrap().bytes
}

fn sample_index() -> Vec<u8> {
    let p = {
        let mut b = PackBuilder::new(PackKind::Meta, 1024);
        b.add(Id::of(b"x"), 1, pack::Codec::Raw, b"x");
        b.finish()
    };
    IndexSegment {
        packs: vec![IndexedPack { id: p.id, kind: p.kind, len: 9, chunks: p.entries }],
        supersedes: vec![],
    }
    .encode()
    .1
}

fn mutate(mut base: Vec<u8>, edits: &[(usize, u8)], cut: usize) -> Vec<u8> {
    for (i, v) in edits {
        if !base.is_empty() {
            let n = base.len();
            base[i % n] ^= v;
        }
    }
    let keep = base.len().saturating_sub(cut % 8);
    base.truncate(keep);
    base
}

fn check_all(data: &[u8]) {
    if let Ok((_, entries)) = pack::decode_table_of(data, "t") {
        for e in entries {
            let stored = &data[e.stored_range()];
            let _ = pack::open_chunk(&e, stored, "t");
        }
    }
    let _ = IndexSegment::decode(data, "t");
    if let Ok(Tree::Leaf(nodes)) = Tree::decode(data, "t") {
        assert!(nodes.iter().all(|n| check_name(&n.name).is_ok()));
        assert!(nodes.windows(2).all(|w| w[0].name < w[1].name));
    }
    let _ = tree::decode_list(data, &tree::ListPage { id: Id::of(data), len: 3 }, "t");
    let _ = Snapshot::decode_unchecked(data, "t");
    let _ = Config::decode(data);
    let _ = Trace::decode(data, "t");
    if let Ok(l) = Lease::decode(data, "t") {
        if let LeaseState::Committed { snapshot, root } = &l.state {
            assert_eq!(Id::of(root.as_bytes()), *snapshot, "a committed lease must embed its root");
        }
    }
    let _ = GcState::decode(data);
    if let Ok(h) = Head::decode(data, "volumes/data") {
        assert_eq!(h.history.last().map(|v| (v.version, v.snapshot)), Some((h.version, h.snapshot)));
        assert!(h.history.windows(2).all(|w| w[0].version < w[1].version));
    }
}

fn sample_head() -> Vec<u8> {
    let v = |n: u64| Version {
        version: n,
        snapshot: Id::of(&n.to_le_bytes()),
        time: "2026-11-29T00:00:00Z".into(),
        host: "h".into(),
        how: "commit".into(),
        base: (n > 1).then(|| Id::of(b"base")),
        writer: (n > 1).then(|| "w1".to_string()),
    };
    Head {
        format: 1,
        name: "data".into(),
        id: "0123abcd".into(),
        version: 2,
        snapshot: v(2).snapshot,
        history: vec![v(1), v(2)],
    }
    .encode()
}

fn sample_trace() -> Vec<u8> {
    Trace { chunks: vec![Id::of(b"a"), Id::of(b"b"), Id::of(b"c")] }.encode()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        check_all(&data);
    }

    #[test]
    fn mutated_objects(which in 0..6usize, edits in prop::collection::vec((any::<usize>(), 1u8..), 1..4), cut in any::<usize>()) {
        let base = match which {
            0 => sample_pack(),
            1 => sample_tree(),
            2 => sample_index(),
            3 => sample_trace(),
            4 => sample_head(),
            _ => Config::new(Chunking::default()).unwrap().encode(),
        };
        let data = mutate(base, &edits, cut);
        check_all(&data);
    }
}

#[test]
fn mutated_pack_never_yields_a_wrong_chunk() {
    let base = sample_pack();
    for i in 0..base.len() {
        let mut bad = base.clone();
        bad[i] ^= 0x20;
        if let Ok((_, entries)) = pack::decode_table_of(&bad, "t") {
            for e in entries {
                let stored = &bad[e.stored_range()];
                if let Ok(chunk) = pack::open_chunk(&e, stored, "t") {
                    assert_eq!(
                        Id::of(&chunk),
                        e.id,
                        "byte {i}: a chunk that does not match its id was accepted"
                    );
                }
            }
        }
    }
}
