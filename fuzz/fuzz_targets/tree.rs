//! Tree objects: every accepted leaf has valid, sorted, unique names.
#![no_main]
use cairn_store::format::tree::{check_name, Tree};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Tree::Leaf(nodes)) = Tree::decode(data, "fuzz") {
        assert!(nodes.iter().all(|n| check_name(&n.name).is_ok()));
        assert!(nodes.windows(2).all(|w| w[0].name < w[1].name));
    }
});
