//! Criterion benchmarks of the push hot path, one stage at a time, against the physical
//! limits of the same machine: BLAKE3 alone, FastCDC alone, zstd alone, and the whole
//! chunk → hash → seal → pack sequence. Run: `cargo bench -p cairn-store`.

use cairn_store::format::pack::{self, PackBuilder, PackKind};
use cairn_store::format::tree::{Content, Extent, Node, NodeKind, Tree};
use cairn_store::Id;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// 16 MiB that compresses about as well as a root filesystem (text-like, 2-3x).
fn sample() -> Vec<u8> {
    let words = [&b"usr/lib/python3 "[..], b"import os, sys\n", b"\x7fELF\x02\x01\x01\0", b"Copyright (C) "];
    let mut out = Vec::with_capacity(16 << 20);
    let mut x: u64 = 0x9E3779B97F4A7C15;
    while out.len() < 16 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 3 == 0 {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(words[(x % 4) as usize]);
        }
    }
    out
}

fn stages(c: &mut Criterion) {
    let data = sample();
    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("blake3", |b| b.iter(|| Id::of(&data)));
    g.bench_function("fastcdc_256k", |b| {
        b.iter(|| fastcdc::v2020::FastCDC::new(&data, 65536, 262144, 1 << 20).count())
    });
    for level in [1, 3] {
        g.bench_with_input(BenchmarkId::new("zstd", level), &level, |b, &level| {
            b.iter(|| data.chunks(262144).map(|c| pack::seal_chunk(c, level).1.len()).sum::<usize>())
        });
    }
    g.bench_function("chunk_hash_seal_pack", |b| {
        b.iter(|| {
            let mut p = PackBuilder::new(PackKind::Data, 16 << 20);
            for c in fastcdc::v2020::FastCDC::new(&data, 65536, 262144, 1 << 20) {
                let raw = &data[c.offset..c.offset + c.length];
                let (codec, stored) = pack::seal_chunk(raw, 3);
                p.add(Id::of(raw), raw.len() as u32, codec, &stored);
            }
            p.finish().bytes.len()
        })
    });
    g.finish();
}

fn metadata(c: &mut Criterion) {
    let nodes: Vec<Node> = (0..100_000)
        .map(|i| Node {
            name: format!("file-{i:07}.py").into_bytes(),
            kind: NodeKind::File {
                size: 100,
                content: Content::Extents(vec![Extent { chunk: Some(Id::of(&[i as u8])), len: 100 }]),
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 1_700_000_000_000_000_000,
            xattrs: vec![],
            link_group: None,
        })
        .collect();
    let objects = Tree::build(nodes.clone());
    let mut g = c.benchmark_group("trees");
    g.throughput(Throughput::Elements(nodes.len() as u64));
    g.bench_function("build_100k_entries", |b| b.iter(|| Tree::build(nodes.clone()).len()));
    g.bench_function("decode_one_page", |b| b.iter(|| Tree::decode(&objects[0].bytes, "bench").is_ok()));
    g.finish();
}

criterion_group!(benches, stages, metadata);
criterion_main!(benches);
