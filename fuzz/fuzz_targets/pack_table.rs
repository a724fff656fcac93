//! A pack's footer and table from arbitrary bytes: errors, never panics; every entry it
//! accepts lies inside the pack body, and opening any accepted chunk never panics.
#![no_main]
use cairn_store::format::pack;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, entries)) = pack::decode_table_of(data, "fuzz") {
        for e in entries {
            let stored = &data[e.offset as usize..(e.offset + e.stored_len) as usize];
            let _ = pack::open_chunk(&e, stored, "fuzz");
        }
    }
});
