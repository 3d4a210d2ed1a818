//! libFuzzer entry point; the checks live in `dispatchd_fuzz::config_parser` so stable builds test them too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dispatchd_fuzz::config_parser(data));
