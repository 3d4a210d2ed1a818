//! libFuzzer entry point; the checks live in `dispatchd_fuzz::stored_record` so stable builds test them too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dispatchd_fuzz::stored_record(data));
