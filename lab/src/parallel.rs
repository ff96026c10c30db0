//! Running one step for many items on a few threads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{anyhow, Result};

/// `step(i)` for every i below `count`, by `workers` threads taking the next i as they come
/// free; the results in the order of i. Stops at the first error.
pub fn in_parallel<T: Send>(
    count: usize,
    workers: usize,
    step: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let step = &step;
    let (next, failed) = (&next, &failed);
    let done: Vec<Vec<(usize, T)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.clamp(1, count.max(1)))
            .map(|_| {
                scope.spawn(move || -> Result<Vec<(usize, T)>> {
                    let mut done = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        match step(i) {
                            Ok(value) => done.push((i, value)),
                            Err(error) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(error);
                            }
                        }
                    }
                    Ok(done)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .map_err(|_| anyhow!("a worker thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut all: Vec<(usize, T)> = done.into_iter().flatten().collect();
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, value)| value).collect())
}

#[cfg(test)]
mod tests {
    use anyhow::ensure;

    use super::*;

    #[test]
    fn in_parallel_keeps_the_order_and_stops_at_an_error() {
        let squares = in_parallel(50, 8, |i| Ok(i * i)).unwrap();
        assert_eq!(squares, (0..50).map(|i| i * i).collect::<Vec<_>>());
        assert!(in_parallel(0, 8, Ok).unwrap().is_empty());
        let error = in_parallel(50, 3, |i| {
            ensure!(i != 7, "step {i} failed");
            Ok(i)
        })
        .unwrap_err();
        assert_eq!(error.to_string(), "step 7 failed");
    }
}
