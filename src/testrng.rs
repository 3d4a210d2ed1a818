//! The pseudo-random sequence the property tests draw from: xorshift64, reproducible from
//! its seed, no dependency.

/// The xorshift64 sequence from `seed` (which must not be 0): each call returns the next
/// state.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
