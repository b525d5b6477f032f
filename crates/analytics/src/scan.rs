//! Running a query over every customer, on every core, within a budget.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::error::AnalyticsError;
use crate::model::{Ev, Model, Slot};

/// How much time and memory one query may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub time: Duration,
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time: Duration::from_secs(10),
            memory_bytes: 1 << 30,
        }
    }
}

/// One query's budget: checked as it runs, so a query past it stops with an error.
pub struct Budget {
    limits: Limits,
    deadline: Instant,
    used: AtomicUsize,
    exceeded: AtomicBool,
}

impl Budget {
    pub fn start(limits: Limits) -> Budget {
        Budget {
            limits,
            deadline: Instant::now() + limits.time,
            used: AtomicUsize::new(0),
            exceeded: AtomicBool::new(false),
        }
    }

    /// Fails once the query has run past its time.
    pub fn check_time(&self) -> Result<(), AnalyticsError> {
        if self.exceeded.load(Ordering::Relaxed) || Instant::now() > self.deadline {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(AnalyticsError::Budget(format!(
                "the query ran past its time budget of {} ms; narrow its range or steps",
                self.limits.time.as_millis()
            )));
        }
        Ok(())
    }

    /// Counts `bytes` more held by the query; fails past its memory budget.
    pub fn charge(&self, bytes: usize) -> Result<(), AnalyticsError> {
        let used = self.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if used > self.limits.memory_bytes {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(AnalyticsError::Budget(format!(
                "the query needs more than its memory budget of {} MiB; narrow its range or breakdown",
                self.limits.memory_bytes >> 20
            )));
        }
        Ok(())
    }
}

/// One customer's events, in time order, each with the profile it belongs to.
pub struct Customer<'m> {
    pub root: u32,
    pub events: Vec<(&'m Slot, Ev)>,
}

/// Profiles whose customers are handed to a block visitor at once: enough for it to start
/// every memory load a block needs before it waits on the first, few enough for the block
/// to stay in cache.
pub const BLOCK: usize = 64;

/// Calls `visit` for every customer with at least one event, split over the cores; each
/// worker folds into its own `T`, and the workers' results are returned.
pub fn customers<T, I, V>(
    model: &Model,
    budget: &Budget,
    init: I,
    visit: V,
) -> Result<Vec<T>, AnalyticsError>
where
    T: Send,
    I: Fn() -> T + Sync,
    V: Fn(&mut T, &Customer<'_>) -> Result<(), AnalyticsError> + Sync,
{
    blocks(
        model,
        budget,
        || {
            let customer = Customer {
                root: 0,
                events: Vec::new(),
            };
            (init(), customer)
        },
        |(acc, customer), roots| {
            for &root in roots {
                fill(model, root, customer);
                visit(acc, customer)?;
            }
            Ok(())
        },
    )
    .map(|parts| parts.into_iter().map(|(acc, _)| acc).collect())
}

/// Calls `visit` with the root profiles of every customer with at least one event, those
/// among [`BLOCK`] profiles at a time, split over the cores; each worker folds into its own
/// `T`, and the workers' results are returned. The budget's time is checked between blocks.
pub fn blocks<T, I, V>(
    model: &Model,
    budget: &Budget,
    init: I,
    visit: V,
) -> Result<Vec<T>, AnalyticsError>
where
    T: Send,
    I: Fn() -> T + Sync,
    V: Fn(&mut T, &[u32]) -> Result<(), AnalyticsError> + Sync,
{
    // Workers take the next range of profiles as they finish one: a few very active
    // customers would leave a fixed split waiting on one core.
    let profiles = model.slots().len();
    let next = AtomicUsize::new(0);
    let ranges = profiles.div_ceil(BLOCK);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers().min(ranges).max(1))
            .map(|_| {
                let (init, visit, next) = (&init, &visit, &next);
                scope.spawn(move || {
                    let mut acc = init();
                    let mut roots = Vec::with_capacity(BLOCK);
                    loop {
                        let start = next.fetch_add(1, Ordering::Relaxed) * BLOCK;
                        if start >= profiles {
                            return Ok(acc);
                        }
                        budget.check_time()?;
                        roots.clear();
                        roots.extend(
                            (start..(start + BLOCK).min(profiles))
                                .map(|i| i as u32)
                                .filter(|&i| model.is_root(i) && model.customer_has_events(i)),
                        );
                        visit(&mut acc, &roots)?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| AnalyticsError::Internal("a query worker panicked".into()))?
            })
            .collect()
    })
}

/// `f` of each item, on every core, in the items' order. Each item goes to the core with
/// the least `weight` given so far, heaviest first, so one large item does not leave the
/// other cores idle behind it.
pub fn map_parallel<T, R, W, F>(items: Vec<T>, weight: W, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    W: Fn(&T) -> usize,
    F: Fn(T) -> R + Sync,
{
    let workers = workers().min(items.len());
    if workers < 2 {
        return items.into_iter().map(f).collect();
    }
    let mut order: Vec<(usize, usize, T)> = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| (weight(&item), i, item))
        .collect();
    order.sort_by_key(|(w, _, _)| std::cmp::Reverse(*w));
    let mut lanes: Vec<(usize, Vec<(usize, T)>)> = (0..workers).map(|_| (0, Vec::new())).collect();
    for (w, i, item) in order {
        if let Some(lane) = lanes.iter_mut().min_by_key(|(load, _)| *load) {
            lane.0 += w;
            lane.1.push((i, item));
        }
    }
    let f = &f;
    let mut done: Vec<(usize, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = lanes
            .into_iter()
            .map(|(_, lane)| {
                scope.spawn(move || {
                    lane.into_iter()
                        .map(|(i, item)| (i, f(item)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// The threads a query runs on.
fn workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
}

/// Loads `root`'s events (over all its profiles) into `customer`, in time order.
pub fn fill<'m>(model: &'m Model, root: u32, customer: &mut Customer<'m>) {
    customer.root = root;
    customer.events.clear();
    let members = model.members(root);
    let mut sorted = true;
    for &m in members {
        let slot = model.slot(m);
        let (base, recent) = model.events_of(slot);
        customer.events.extend(base.iter().map(|e| (slot, *e)));
        customer.events.extend(recent.iter().map(|e| (slot, *e)));
        sorted &= base.is_empty() || recent.is_empty();
    }
    if members.len() > 1 || !sorted {
        customer.events.sort_by_key(|(_, e)| (e.at, e.tie));
    }
}
