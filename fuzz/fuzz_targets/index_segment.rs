#![no_main]
use cairn_store::format::index::IndexSegment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = IndexSegment::decode(data, "fuzz");
});
