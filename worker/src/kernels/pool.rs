//! A process-wide pool of `f32` buffers.
//!
//! A training step allocates and frees the same few dozen activation-sized
//! buffers (megabytes each) for every micro-batch. Taken from the system
//! allocator each time, they come back as fresh pages that the kernel must
//! fault in and zero, and `vec![0.0; n]` zeroes them once more; both cost as
//! much as a fifth of a step. The layers take their buffers from here and
//! their caches give them back when dropped, so after the first micro-batch
//! a step reuses memory that is already mapped.
//!
//! [`take`] returns a buffer whose contents are unspecified (finite values
//! left by its previous user): only for outputs that are fully overwritten.
//! [`zeroed`] returns one filled with zeros.

use std::sync::Mutex;

/// At most this many bytes wait in the pool; buffers beyond go back to the
/// allocator.
const MAX_POOLED_BYTES: usize = 1 << 30;

/// Buffers smaller than this are not worth pooling.
const MIN_POOLED_LEN: usize = 4096;

struct Pool {
    free: Vec<Vec<f32>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: Vec::new(),
    bytes: 0,
});

fn lock() -> std::sync::MutexGuard<'static, Pool> {
    // A panic while holding the lock leaves the list valid.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of `n` values with unspecified (finite) contents.
pub fn take(n: usize) -> Vec<f32> {
    if n < MIN_POOLED_LEN {
        return vec![0.0; n];
    }
    let found = {
        let mut pool = lock();
        // Best fit: the smallest buffer that holds `n` without wasting more
        // than half of itself.
        let best = pool
            .free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= n && v.capacity() / 2 <= n)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        best.map(|i| {
            let v = pool.free.swap_remove(i);
            pool.bytes -= v.capacity() * 4;
            v
        })
    };
    match found {
        Some(mut v) => {
            if v.len() >= n {
                v.truncate(n);
            } else {
                v.resize(n, 0.0);
            }
            v
        }
        None => vec![0.0; n],
    }
}

/// A buffer of `n` zeros.
pub fn zeroed(n: usize) -> Vec<f32> {
    let mut v = take(n);
    v.fill(0.0);
    v
}

/// A pooled copy of `x`.
pub fn copy_of(x: &[f32]) -> Vec<f32> {
    let mut v = take(x.len());
    v.copy_from_slice(x);
    v
}

/// Hand a buffer back for reuse.
pub fn give(v: Vec<f32>) {
    if v.capacity() < MIN_POOLED_LEN {
        return;
    }
    let mut pool = lock();
    if pool.bytes + v.capacity() * 4 <= MAX_POOLED_BYTES {
        pool.bytes += v.capacity() * 4;
        pool.free.push(v);
    }
}

/// Hand back every buffer of a cache (helper for `Drop` impls).
pub fn give_all<const N: usize>(bufs: [&mut Vec<f32>; N]) {
    for b in bufs {
        give(std::mem::take(b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_have_the_requested_length_and_zeroed_ones_are_zero() {
        let n = MIN_POOLED_LEN * 3 + 7;
        let mut a = take(n);
        a.fill(5.0);
        give(a);
        // Other tests share the pool, so any buffer may come back; it has
        // the right length, and `zeroed` clears what a previous user left.
        assert_eq!(take(n).len(), n);
        let z = zeroed(n);
        assert!(z.iter().all(|&x| x == 0.0));
        give(z);
        // A larger request than any pooled buffer grows or allocates one.
        let big = take(n + 100);
        assert_eq!(big.len(), n + 100);
        // Small buffers bypass the pool.
        assert_eq!(take(3), vec![0.0; 3]);
    }
}
