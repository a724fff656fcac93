#![no_main]
use cairn_store::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Snapshot::decode_unchecked(data, "fuzz");
});
