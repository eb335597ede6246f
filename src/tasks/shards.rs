//! A map of task ids split into a fixed number of shards. A hash map grows by rehashing all it
//! holds at once; with a million live tasks that stalled every submission, which waits on the
//! queue's lock, for a quarter of a second. A shard holds a 64th of them, so each growth is a
//! 64th as long.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

const SHARDS: usize = 64;

pub struct Shards<V> {
    /// Picks a key's shard; each shard hashes with its own seed.
    pick: RandomState,
    shards: Vec<HashMap<String, V>>,
}

impl<V> Default for Shards<V> {
    fn default() -> Self {
        Shards { pick: RandomState::new(), shards: (0..SHARDS).map(|_| HashMap::new()).collect() }
    }
}

impl<V> Shards<V> {
    fn index(&self, key: &str) -> usize {
        (self.pick.hash_one(key) % SHARDS as u64) as usize
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.shards[self.index(key)].get(key)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        let index = self.index(key);
        self.shards[index].get_mut(key)
    }

    pub fn insert(&mut self, key: String, value: V) {
        let index = self.index(&key);
        self.shards[index].insert(key, value);
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        let index = self.index(key);
        self.shards[index].remove(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_where_they_were_put_until_removed() {
        let mut map = Shards::default();
        for i in 0..1000 {
            map.insert(format!("task-{i}"), i);
        }
        assert_eq!(map.shards.iter().filter(|shard| !shard.is_empty()).count(), SHARDS);
        for i in 0..1000 {
            assert_eq!(map.get(&format!("task-{i}")), Some(&i));
        }
        *map.get_mut("task-7").unwrap() = 70;
        assert_eq!(map.remove("task-7"), Some(70));
        assert_eq!(map.get("task-7"), None);
        assert_eq!(map.remove("task-7"), None);
    }
}
