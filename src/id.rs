//! Message ids (`_msg_id`, `_unique_id`): 32 hex digits of a random (version 4) uuid, like
//! oslo's `uuid4().hex`.
//!
//! Ids must be unguessable: a peer that could predict the next `_msg_id` could answer a call
//! with a forged result, and one that could predict `_unique_id`s could make real casts drop
//! as duplicates. Each thread draws them from its own ChaCha20 generator (a CSPRNG) seeded
//! from the operating system, which is as unpredictable as a `getrandom` call per id and
//! costs no system call.

use std::cell::RefCell;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

thread_local! {
    static RNG: RefCell<ChaCha20Rng> = RefCell::new(ChaCha20Rng::from_os_rng());
}

/// A new random id: 32 lowercase hex digits, a version 4 uuid without hyphens.
pub(crate) fn new_id() -> String {
    let mut bytes = [0u8; 16];
    RNG.with(|rng| rng.borrow_mut().fill_bytes(&mut bytes));
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .simple()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid4_hex() {
        let id = new_id();
        assert_eq!(id.len(), 32);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let parsed = uuid::Uuid::parse_str(&id).expect("a uuid");
        assert_eq!(parsed.get_version_num(), 4);
    }

    #[test]
    fn ids_share_no_prefix_nor_counter() {
        // A predictable scheme (prefix + counter) keeps most of its digits between two ids;
        // random ids agree in about 1/16 of their positions.
        let ids: Vec<String> = (0..64).map(|_| new_id()).collect();
        for pair in ids.windows(2) {
            let same = pair[0]
                .bytes()
                .zip(pair[1].bytes())
                .filter(|(a, b)| a == b)
                .count();
            // 32 positions, 2 of them fixed by the uuid version and variant.
            assert!(
                same <= 14,
                "{} and {} share {same} digits",
                pair[0],
                pair[1]
            );
        }
        let other_thread = std::thread::spawn(new_id).join().expect("thread");
        assert!(!ids.contains(&other_thread));
    }
}
