//! A map kept as a sorted, exactly-sized vector, for what the controller keeps per pod (its
//! labels, its sources): a pod has one or a few, and a `BTreeMap` spends a whole node (about 400 bytes, 11 slots)
//! on one entry, a `HashMap` a table of at least 3. At 150,000 pods that was a few hundred
//! MiB for nothing. Lookups are a binary search; changes are rare (a pod's sources change).
//! Up to [`EXACT`] entries the vector is exactly sized; past that it grows and shrinks
//! geometrically, so that a pod in 1,000 registrations is not copied whole on every change.

use std::borrow::Borrow;

/// Up to this many entries, no spare room is kept.
const EXACT: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmallMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap(Vec::new())
    }
}

impl<K: Ord, V> SmallMap<K, V> {
    fn find<Q: Ord + ?Sized>(&self, k: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        self.0.binary_search_by(|(e, _)| e.borrow().cmp(k))
    }

    pub fn get<Q: Ord + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.find(k).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key<Q: Ord + ?Sized>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.find(k).is_ok()
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        match self.find(&k) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            Err(i) => {
                if self.0.len() < EXACT {
                    self.0.reserve_exact(1);
                }
                self.0.insert(i, (k, v));
                None
            }
        }
    }

    pub fn remove<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let i = self.find(k).ok()?;
        let (_, v) = self.0.remove(i);
        let len = self.0.len();
        if len <= EXACT {
            self.0.shrink_to_fit();
        } else if self.0.capacity() > 4 * len {
            self.0.shrink_to(2 * len);
        }
        Some(v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for SmallMap<K, V> {
    /// The last value of a repeated key wins, as in the std maps.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut v: Vec<(K, V)> = iter.into_iter().collect();
        // Stable: equal keys keep their order, so the last one is kept below.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(K, V)> = Vec::with_capacity(v.len());
        for (k, val) in v {
            match out.last_mut() {
                Some(last) if last.0 == k => last.1 = val,
                _ => out.push((k, val)),
            }
        }
        out.shrink_to_fit();
        SmallMap(out)
    }
}

impl<K, V> IntoIterator for SmallMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<K: Ord + Borrow<Q>, Q: Ord + ?Sized, V> std::ops::Index<&Q> for SmallMap<K, V> {
    type Output = V;
    /// Panics when the key is absent, as the std maps do.
    fn index(&self, k: &Q) -> &V {
        self.get(k).expect("no entry for the key")
    }
}

/// A set the same way (a pod's matching registrations). Add with [`SmallMap::add`], which
/// answers as `BTreeSet::insert` does (`insert` answers as a map's).
pub type SmallSet<K> = SmallMap<K, ()>;

impl<K: Ord> SmallMap<K, ()> {
    /// True when `k` was not there yet.
    pub fn add(&mut self, k: K) -> bool {
        self.insert(k, ()).is_none()
    }

    pub fn contains<Q: Ord + ?Sized>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.contains_key(k)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn it_behaves_as_a_btreemap_under_any_sequence_of_changes() {
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut small: SmallMap<String, u64> = SmallMap::default();
        let mut model: BTreeMap<String, u64> = BTreeMap::new();
        for _ in 0..5000 {
            let k = format!("k{}", next() % 12);
            let v = next();
            if next() % 3 == 0 {
                assert_eq!(small.remove(k.as_str()), model.remove(&k));
            } else {
                assert_eq!(small.insert(k.clone(), v), model.insert(k, v));
            }
            assert_eq!(small.0.len(), model.len());
            assert!(small.iter().eq(model.iter()), "same entries in the same order");
            if small.0.len() <= EXACT {
                assert_eq!(small.0.capacity(), small.0.len(), "exactly sized while small");
            } else {
                assert!(small.0.capacity() <= 4 * small.0.len(), "bounded spare room");
            }
        }
        for k in ["k1", "k5", "nope"] {
            assert_eq!(small.get(k), model.get(k));
            assert_eq!(small.contains_key(k), model.contains_key(k));
        }
    }

    #[test]
    fn collecting_keeps_the_last_value_of_a_repeated_key_in_key_order() {
        let m: SmallMap<&str, i32> = [("b", 1), ("a", 2), ("b", 3)].into_iter().collect();
        assert_eq!(m.into_iter().collect::<Vec<_>>(), vec![("a", 2), ("b", 3)]);
        let mut s: SmallSet<&str> = [("x", ()), ("x", ())].into_iter().collect();
        assert!(s.contains("x") && s.0.len() == 1);
        assert!(!s.add("x") && s.add("y"), "add answers whether the key is new");
    }

    #[test]
    fn a_large_map_grows_geometrically() {
        let mut m: SmallMap<u32, ()> = SmallMap::default();
        let mut reallocations = 0;
        for i in 0..1000 {
            let cap = m.0.capacity();
            m.add(i);
            reallocations += usize::from(m.0.capacity() != cap);
        }
        assert!(reallocations < 20, "{reallocations} reallocations for 1,000 adds");
    }
}
