#![no_main]
// See homeport_fuzz::conntrack for the input format and what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| homeport_fuzz::conntrack(data));
