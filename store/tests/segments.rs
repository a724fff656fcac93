//! Index segments read as they download (`Repository::visit_segment`): the object's hash is
//! checked once all of it is read, on either runtime flavour.

use cairn_store::format::config::Chunking;
use cairn_store::format::index::{self, IndexSegment, IndexedPack};
use cairn_store::format::pack::{Codec, PackEntry, PackKind};
use cairn_store::{Error, Id, Repository};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use std::sync::Arc;

fn segment(chunks: u32) -> IndexSegment {
    let entries = (0..chunks)
        .map(|i| PackEntry {
            id: Id::of(&i.to_le_bytes()),
            offset: 8 + i,
            stored_len: 1,
            raw_len: 1,
            codec: Codec::Raw,
        })
        .collect();
    IndexSegment {
        packs: vec![IndexedPack { id: Id::of(b"pack"), kind: PackKind::Data, len: 99, chunks: entries }],
        supersedes: vec![],
    }
}

async fn visit(repo: &Repository, id: &Id) -> Result<usize, Error> {
    repo.visit_segment(id, |r| {
        let mut n = 0;
        while r.next_head()?.is_some() {
            while r.next_entry()?.is_some() {
                n += 1;
            }
        }
        r.supersedes()?;
        Ok(n)
    })
    .await
}

async fn checks() {
    let tmp = tempfile::tempdir().unwrap();
    let inner = Arc::new(InMemory::new());
    let repo =
        Repository::init_on(inner.clone(), "memory://", Chunking::default(), tmp.path()).await.unwrap();
    let (id, bytes) = segment(20_000).encode();
    inner.put(&Path::from(index::object_name(&id)), PutPayload::from(bytes.clone())).await.unwrap();
    assert_eq!(visit(&repo, &id).await.unwrap(), 20_000);

    // Well-formed, but not the object its name promises.
    let (other, _) = segment(3).encode();
    inner.put(&Path::from(index::object_name(&other)), PutPayload::from(bytes.clone())).await.unwrap();
    assert!(matches!(visit(&repo, &other).await, Err(Error::Corrupt { .. })));

    // Cut short, stored under the name of what is left: the hash matches, the content fails.
    let short = bytes[..bytes.len() / 2].to_vec();
    let cut = Id::of(&short);
    inner.put(&Path::from(index::object_name(&cut)), PutPayload::from(short)).await.unwrap();
    assert!(matches!(visit(&repo, &cut).await, Err(Error::Corrupt { .. })));

    // Gone.
    assert!(matches!(visit(&repo, &Id::of(b"nothing")).await, Err(Error::NotFound(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_segment_is_checked_against_its_name() {
    checks().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_segment_read_whole_is_checked_against_its_name() {
    checks().await;
}
