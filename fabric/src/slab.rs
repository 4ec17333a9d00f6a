//! A slab with generation-checked keys: O(1) insert, lookup and removal, and
//! a key that outlived its entry finds nothing instead of the slot's next
//! occupant (a late response cannot complete the wrong call).

/// Key: slot index in the low 32 bits, the slot's generation in the high 32
/// bits. Generations start at 1, so no key is 0.
pub(crate) type Key = u64;

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

pub(crate) struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self { slots: Vec::new(), free: Vec::new(), len: 0 }
    }
}

fn split(key: Key) -> (usize, u32) {
    ((key & 0xffff_ffff) as usize, (key >> 32) as u32)
}

impl<T> Slab<T> {
    pub(crate) fn insert(&mut self, value: T) -> Key {
        self.insert_with(|_| value)
    }

    /// Inserts the value `f` makes from its own key.
    pub(crate) fn insert_with(&mut self, f: impl FnOnce(Key) -> T) -> Key {
        let index = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(Slot { generation: 0, value: None });
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[index];
        slot.generation = slot.generation.wrapping_add(1).max(1);
        let key = (u64::from(slot.generation) << 32) | index as u64;
        slot.value = Some(f(key));
        self.len += 1;
        key
    }

    pub(crate) fn get(&self, key: Key) -> Option<&T> {
        let (i, g) = split(key);
        self.slots.get(i).filter(|s| s.generation == g).and_then(|s| s.value.as_ref())
    }

    pub(crate) fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let (i, g) = split(key);
        self.slots.get_mut(i).filter(|s| s.generation == g).and_then(|s| s.value.as_mut())
    }

    pub(crate) fn remove(&mut self, key: Key) -> Option<T> {
        let (i, g) = split(key);
        let slot = self.slots.get_mut(i).filter(|s| s.generation == g)?;
        let value = slot.value.take()?;
        self.free.push(i as u32);
        self.len -= 1;
        Some(value)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (Key, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.value.as_ref().map(|v| ((u64::from(s.generation) << 32) | i as u64, v)))
    }

    pub(crate) fn keys(&self) -> Vec<Key> {
        self.iter().map(|(k, _)| k).collect()
    }

    /// A 32-bit form of `key` (16-bit index, 16-bit generation), for wire
    /// fields that only have 32 bits; `None` if the index does not fit.
    pub(crate) fn short(key: Key) -> Option<u32> {
        let (i, g) = split(key);
        (i < 1 << 16).then_some(((g & 0xffff) << 16) | i as u32)
    }

    /// The entry a [`Slab::short`] key names, with its full key, if it is still there.
    #[cfg(feature = "libfabric")]
    pub(crate) fn find_short(&mut self, short: u32) -> Option<(Key, &mut T)> {
        let i = (short & 0xffff) as usize;
        let s = self.slots.get_mut(i).filter(|s| s.generation & 0xffff == short >> 16)?;
        let key = (u64::from(s.generation) << 32) | i as u64;
        s.value.as_mut().map(|v| (key, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_keys_find_nothing() {
        let mut s = Slab::default();
        let a = s.insert("a");
        assert_ne!(a, 0);
        assert_eq!(s.remove(a), Some("a"));
        let b = s.insert("b");
        assert_eq!(split(a).0, split(b).0, "the slot is reused");
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None);
        assert_eq!(s.get(b), Some(&"b"));
        #[cfg(feature = "libfabric")]
        {
            let short = Slab::<&str>::short(b).unwrap();
            assert_eq!(s.find_short(short).map(|(k, v)| (k, *v)), Some((b, "b")));
            assert!(s.find_short(Slab::<&str>::short(a).unwrap()).is_none());
        }
        assert_eq!(s.len(), 1);
        assert_eq!(s.keys(), vec![b]);
    }
}
