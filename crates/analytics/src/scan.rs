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

/// How many customers run between budget checks.
const CHECK_EVERY: usize = 1024;

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
    let roots: Vec<u32> = model
        .roots()
        .filter(|(_, s)| s.members.iter().any(|m| model.has_events(model.slot(*m))))
        .map(|(i, _)| i)
        .collect();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let chunk = roots.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = roots
            .chunks(chunk)
            .map(|part| {
                let (init, visit) = (&init, &visit);
                scope.spawn(move || {
                    let mut acc = init();
                    let mut customer = Customer {
                        root: 0,
                        events: Vec::new(),
                    };
                    for (n, &root) in part.iter().enumerate() {
                        if n % CHECK_EVERY == 0 {
                            budget.check_time()?;
                        }
                        fill(model, root, &mut customer);
                        visit(&mut acc, &customer)?;
                    }
                    Ok(acc)
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

/// Loads `root`'s events (over all its profiles) into `customer`, in time order.
pub fn fill<'m>(model: &'m Model, root: u32, customer: &mut Customer<'m>) {
    customer.root = root;
    customer.events.clear();
    let members = &model.slot(root).members;
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
