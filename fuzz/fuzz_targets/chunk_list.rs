#![no_main]
use cairn_store::format::tree::{decode_list, ListPage};
use cairn_store::Id;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let len = u64::from_le_bytes(data[..8].try_into().unwrap());
    let page = ListPage { id: Id::of(&data[8..]), len };
    if let Ok(extents) = decode_list(&data[8..], &page, "fuzz") {
        assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), len);
    }
});
