//! The merged sessions of recent adapter sets, least recently used first out.

use std::collections::VecDeque;

use super::{LoraAdapter, LoraError};

/// Merged sessions of one (adapter, weight) set: `None` where the base session serves.
pub(crate) struct MergedModels<U, T> {
    pub(crate) unet: Option<U>,
    pub(crate) text_encoders: Vec<Option<T>>,
    /// The residual-input UNet with the same merges, built when a controlled generation first
    /// needs it.
    pub(crate) residual_unet: Option<U>,
}

/// The adapter names and weight bits of a set, sorted by name.
type CacheKey = Vec<(String, u32)>;
type CacheEntry<U, T> = (CacheKey, MergedModels<U, T>);

/// A least-recently-used cache of merged sessions.
pub(crate) struct MergedCache<U, T> {
    capacity: usize,
    entries: VecDeque<CacheEntry<U, T>>,
}

impl<U, T> MergedCache<U, T> {
    pub(crate) fn new(capacity: usize) -> MergedCache<U, T> {
        MergedCache { capacity, entries: VecDeque::new() }
    }

    /// The cached sessions for `set`, or those `build` makes, now the most recent entry; the bool
    /// is whether it was a hit. With capacity 0 the entry lives until [`Self::trim`].
    pub(crate) fn get_or_build(
        &mut self,
        set: &[(&LoraAdapter, f32)],
        build: impl FnOnce() -> Result<MergedModels<U, T>, LoraError>,
    ) -> Result<(&mut MergedModels<U, T>, bool), LoraError> {
        let key: CacheKey = set.iter().map(|(a, w)| (a.name.clone(), w.to_bits())).collect();
        let hit = match self.entries.iter().position(|(k, _)| *k == key) {
            Some(at) => {
                let entry = self.entries.remove(at).expect("position is in range");
                self.entries.push_back(entry);
                true
            }
            None => {
                let models = build()?;
                while !self.entries.is_empty() && self.entries.len() >= self.capacity {
                    self.entries.pop_front();
                }
                self.entries.push_back((key, models));
                false
            }
        };
        let (_, models) = self.entries.back_mut().expect("the set was just put last");
        Ok((models, hit))
    }

    /// Drops the least recently used sets beyond the capacity.
    pub(crate) fn trim(&mut self) {
        while self.entries.len() > self.capacity {
            self.entries.pop_front();
        }
    }

    /// How many merged sets are held.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}
