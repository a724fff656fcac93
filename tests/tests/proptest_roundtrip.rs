//! Property: any tree (every file type and piece of metadata Cairn keeps) and any memory
//! image, pushed and restored, comes back byte- and metadata-identical; a second push
//! after changing some files stores no more new data than those files hold.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use cairn_store::format::config::{Chunking, MemoryCut};
use cairn_store::push::{NoProgress, ParentSpec, PushOptions};
use cairn_store::{Kind, Repository};
use cairn_tests::assert_same_tree;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Spec {
    File { data: Vec<u8>, hole_before: u32, mode: u32 },
    Dir { children: Vec<(String, Spec)>, mode: u32 },
    Symlink(String),
    Fifo,
    HardLinkToFirstFile,
}

fn name() -> impl Strategy<Value = String> {
    "[a-z]{1,6}(\\.[a-z]{1,3})?".prop_map(|s| s)
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2000),
        (any::<u8>(), 1usize..400_000).prop_map(|(b, n)| (0..n).map(|i| b ^ (i / 1000) as u8).collect()),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    let leaf = prop_oneof![
        4 => (data(), prop_oneof![Just(0u32), 1u32..200], 0o400u32..0o7777).prop_map(|(data, h, mode)| Spec::File {
            data,
            hole_before: h * 4096 * 16,
            mode: mode | 0o400
        }),
        1 => "[a-z./]{1,20}".prop_map(Spec::Symlink),
        1 => Just(Spec::Fifo),
        1 => Just(Spec::HardLinkToFirstFile),
    ];
    leaf.prop_recursive(3, 40, 6, |inner| {
        (prop::collection::btree_map(name(), inner, 0..6), 0o700u32..0o7777)
            .prop_map(|(m, mode)| Spec::Dir { children: m.into_iter().collect(), mode: mode | 0o700 })
    })
}

fn materialize(path: &Path, spec: &Spec, first_file: &mut Option<std::path::PathBuf>, seed: u64) {
    match spec {
        Spec::File { data, hole_before, mode } => {
            let f = std::fs::File::create(path).unwrap();
            f.write_all_at(data, *hole_before as u64).unwrap();
            f.set_len(*hole_before as u64 + data.len() as u64).unwrap();
            xattr::set(path, "user.seed", &seed.to_le_bytes()).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode)).unwrap();
            first_file.get_or_insert_with(|| path.to_path_buf());
        }
        Spec::Dir { children, mode } => {
            std::fs::create_dir(path).unwrap();
            for (i, (n, c)) in children.iter().enumerate() {
                materialize(&path.join(n), c, first_file, seed + i as u64);
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        Spec::Symlink(t) => std::os::unix::fs::symlink(t, path).unwrap(),
        Spec::Fifo => nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap(),
        Spec::HardLinkToFirstFile => match first_file {
            Some(f) => std::fs::hard_link(f, path).unwrap(),
            None => std::fs::write(path, b"no file yet").unwrap(),
        },
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn memory_repo(cache: &Path) -> Repository {
    memory_repo_with(cache, Chunking::default()).await
}

async fn memory_repo_with(cache: &Path, chunking: Chunking) -> Repository {
    let store = Arc::new(object_store::memory::InMemory::new());
    Repository::init_on(store, "memory://", chunking, cache).await.unwrap()
}

/// An upper bound on the chunks a change can make new under page-aligned CDC: a run of data
/// pages (between zero pages) without a changed page is cut as before, and a run holds at
/// most one chunk per `min` bytes (and a last one).
fn page_cdc_bound(image: &[u8], changed: &std::collections::BTreeMap<u64, u8>, min: usize) -> u64 {
    let zero = |p: usize| image[p * 4096..(p + 1) * 4096].iter().all(|&b| b == 0);
    let (mut bound, mut p, n) = (0, 0, image.len() / 4096);
    while p < n {
        if zero(p) {
            p += 1;
            continue;
        }
        let start = p;
        while p < n && !zero(p) {
            p += 1;
        }
        if changed.keys().any(|&c| (start as u64..p as u64).contains(&c)) {
            bound += ((p - start) * 4096).div_ceil(min) as u64;
        }
    }
    bound
}

fn opts(source: &Path, kind: Kind) -> PushOptions {
    PushOptions {
        source: source.to_path_buf(),
        kind,
        tags: Default::default(),
        parent: ParentSpec::Auto,
        expire_in: None,
        host: Some("prop".into()),
        label: None,
        overlay: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn trees_round_trip(children in prop::collection::btree_map(name(), spec(), 1..8)) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let mut first = None;
        materialize(&src, &Spec::Dir { children: children.into_iter().collect(), mode: 0o755 }, &mut first, 1);
        let rt = runtime();
        rt.block_on(async {
            let repo = memory_repo(&tmp.path().join("cache")).await;
            let cancel = AtomicBool::new(false);
            let summary = cairn_store::push::push(&repo, &opts(&src, Kind::Fs), &NoProgress, &cancel).await.unwrap();
            let snap = repo.load_snapshot(&summary.snapshot).await.unwrap();
            let out = tmp.path().join("out");
            cairn_store::restore::restore(&repo, &snap, None, &out, &cairn_store::restore::NoProgress, &cancel).await.unwrap();
            assert_same_tree(&src, &out);
            let report = cairn_store::commands::check(&repo, true).await.unwrap();
            assert!(report.is_ok(), "{:?}", report.damage);
        });
    }

    #[test]
    fn memory_images_round_trip_and_share_pages(
        pages in prop::collection::btree_map(0u64..2048, any::<u8>(), 0..64),
        changed in prop::collection::btree_map(0u64..2048, any::<u8>(), 0..8),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("guest.mem");
        let write = |pages: &std::collections::BTreeMap<u64, u8>| {
            let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&img).unwrap();
            for (p, b) in pages {
                let page: Vec<u8> = (0..4096u32).map(|i| b.wrapping_add((i % 7) as u8)).collect();
                f.write_all_at(&page, p * 4096).unwrap();
            }
            f.set_len(2048 * 4096).unwrap();
        };
        let rt = runtime();
        for cut in [MemoryCut::Fixed, MemoryCut::Pages] {
            let _ = std::fs::remove_file(&img);
            write(&pages);
            rt.block_on(async {
                let chunking = Chunking { memory_cut: cut, ..Chunking::default() };
                let repo = memory_repo_with(&tmp.path().join(format!("cache-{cut:?}")), chunking).await;
                let cancel = AtomicBool::new(false);
                let first = cairn_store::push::push(&repo, &opts(&img, Kind::Memory), &NoProgress, &cancel).await.unwrap();
                write(&changed);
                let second = cairn_store::push::push(&repo, &opts(&img, Kind::Memory), &NoProgress, &cancel).await.unwrap();
                // Only chunks touched by the change can be new.
                let bound = match cut {
                    MemoryCut::Fixed => {
                        let pages_per_chunk = chunking.memory as u64 / 4096;
                        changed.keys().map(|p| p / pages_per_chunk).collect::<std::collections::BTreeSet<_>>().len() as u64
                    }
                    MemoryCut::Pages => page_cdc_bound(&std::fs::read(&img).unwrap(), &changed, chunking.memory as usize / 4),
                };
                assert!(second.stats.new_chunks <= bound, "{cut:?}: {:?} vs {bound}", second.stats);
                let snap = repo.load_snapshot(&second.snapshot).await.unwrap();
                let out = tmp.path().join(format!("out-{cut:?}"));
                cairn_store::restore::restore(&repo, &snap, None, &out, &cairn_store::restore::NoProgress, &cancel).await.unwrap();
                assert_eq!(std::fs::read(out.join("guest.mem")).unwrap(), std::fs::read(&img).unwrap());
                assert!(first.stats.chunks <= pages.len() as u64);
            });
        }
    }
}
