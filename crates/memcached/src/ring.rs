//! Which server holds a key: rendezvous (highest random weight) hashing.
//!
//! Every server scores every key with a hash of (server name, key); the
//! highest score wins. Adding a server moves only the keys it now wins
//! (about 1/n of them) and removing one moves only its own keys, with no
//! ring of virtual nodes to build. The cost is one hash per server per key,
//! which is nothing next to a network round trip for the handful of
//! servers a memcached tier has.
//!
//! The hash is 64-bit FNV-1a followed by the MurmurHash3 finalizer, fixed
//! here so that every process (and every version of this crate) maps a key
//! to the same server. Servers are named as written in the URL
//! (`host:port`), so all clients must list them the same way. This is not
//! libmemcached's ketama: other clients sharing the tier will place keys
//! differently.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The servers' names, pre-hashed.
#[derive(Debug, Clone)]
pub(crate) struct Rendezvous {
    seeds: Vec<u64>,
}

impl Rendezvous {
    /// Builds the table for servers named `names`, in order.
    pub(crate) fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Rendezvous {
            // The separator keeps ("a", "bc") and ("ab", "c") apart.
            seeds: names
                .into_iter()
                .map(|n| fnv1a(fnv1a(FNV_OFFSET, n.as_bytes()), &[0xff]))
                .collect(),
        }
    }

    /// The index of the server that holds `key`.
    pub(crate) fn pick(&self, key: &str) -> usize {
        if self.seeds.len() == 1 {
            return 0;
        }
        let mut best = (0, 0u64);
        for (i, &seed) in self.seeds.iter().enumerate() {
            let score = fmix64(fnv1a(seed, key.as_bytes()));
            if i == 0 || score > best.1 {
                best = (i, score);
            }
        }
        best.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<String> {
        (0..20_000).map(|i| format!("app:products:{i}")).collect()
    }

    #[test]
    fn keys_spread_evenly_over_servers() {
        let r = Rendezvous::new(["a:11211", "b:11211", "c:11211", "d:11211"]);
        let mut counts = [0usize; 4];
        for k in keys() {
            counts[r.pick(&k)] += 1;
        }
        for c in counts {
            assert!((4_000..6_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn adding_a_server_moves_only_the_keys_it_takes() {
        let three = Rendezvous::new(["a:1", "b:1", "c:1"]);
        let four = Rendezvous::new(["a:1", "b:1", "c:1", "d:1"]);
        let mut moved = 0;
        for k in keys() {
            let (before, after) = (three.pick(&k), four.pick(&k));
            if before != after {
                assert_eq!(after, 3, "a key moved between old servers");
                moved += 1;
            }
        }
        // About a quarter of the keys move, all of them to the new server.
        assert!((4_000..6_000).contains(&moved), "{moved}");
    }

    #[test]
    fn placement_is_stable_across_builds_and_orders() {
        let ab = Rendezvous::new(["a:1", "b:1"]);
        let ba = Rendezvous::new(["b:1", "a:1"]);
        for k in keys().iter().take(1000) {
            assert_eq!(ab.pick(k), 1 - ba.pick(k));
        }
        // Pinned so a change of hash (which would move every key) is noticed.
        let r = Rendezvous::new(["127.0.0.1:11211", "127.0.0.1:11212"]);
        let picks: Vec<usize> = (0..8).map(|i| r.pick(&format!("k{i}"))).collect();
        assert_eq!(picks, PINNED);
    }

    const PINNED: [usize; 8] = [0, 0, 0, 1, 1, 0, 1, 1];
}
