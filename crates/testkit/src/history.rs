//! The history checker: many clients on several engines run random
//! operations on a few hot keys; every operation's invocation and
//! completion is recorded, and each key's history is checked for
//! linearizability against a register (the Wing–Gong–Lowe search with the
//! memoization Porcupine adds). A stale read shows as a history no order of
//! the operations can explain.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use writethrough_core::{Handle, Patch};

use crate::suite::engine::{Item, item};

/// What an operation did to, or saw in, a key's register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Wrote value `.0`.
    Write(u32),
    /// Read; `None` if no row.
    Read(Option<u32>),
    /// Updated to `.0` if a row existed; the bool says whether one did.
    Update(u32, bool),
    /// Deleted; the bool says whether a row existed.
    Delete(bool),
}

/// One recorded operation on one key.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    /// The key.
    pub key: i64,
    /// What it did.
    pub op: Op,
    /// Logical time of the invocation.
    pub call: u64,
    /// Logical time of the completion; `u64::MAX` if its outcome is unknown
    /// (it failed in a way that may have taken effect).
    pub ret: u64,
    /// Which client ran it.
    pub client: u32,
}

impl Event {
    /// One line of text, for a history written by another process.
    pub fn to_line(&self) -> String {
        let op = match self.op {
            Op::Write(v) => format!("w {v}"),
            Op::Read(Some(v)) => format!("r {v}"),
            Op::Read(None) => "r -".to_owned(),
            Op::Update(v, e) => format!("u {v} {}", u8::from(e)),
            Op::Delete(e) => format!("d {}", u8::from(e)),
        };
        format!(
            "{} {} {} {} {op}",
            self.key, self.call, self.ret, self.client
        )
    }

    /// Reads a line of [`Event::to_line`].
    pub fn parse_line(line: &str) -> Option<Event> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
        let op = match *f.get(4)? {
            "w" => Op::Write(u32::try_from(num(5)?).ok()?),
            "r" if f.get(5) == Some(&"-") => Op::Read(None),
            "r" => Op::Read(Some(u32::try_from(num(5)?).ok()?)),
            "u" => Op::Update(u32::try_from(num(5)?).ok()?, num(6)? == 1),
            "d" => Op::Delete(num(5)? == 1),
            _ => return None,
        };
        Some(Event {
            key: f.first()?.parse().ok()?,
            call: num(1)?,
            ret: num(2)?,
            client: u32::try_from(num(3)?).ok()?,
            op,
        })
    }
}

/// Collects events; timestamps come from one atomic counter, so their order
/// agrees with real time across every thread, or (see
/// [`Recorder::monotonic`]) from the system's monotonic clock, which every
/// process of the machine shares.
#[derive(Default)]
pub struct Recorder {
    clock: AtomicU64,
    monotonic: bool,
    events: Mutex<Vec<Event>>,
}

/// Nanoseconds of `CLOCK_MONOTONIC`: one clock for every process of the
/// machine, so that events recorded by several processes can be ordered.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is readable");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

impl Recorder {
    /// A recorder whose timestamps are [`monotonic_ns`], for histories
    /// merged across processes.
    pub fn monotonic() -> Self {
        Recorder {
            monotonic: true,
            ..Self::default()
        }
    }

    /// A timestamp for an invocation or a completion.
    pub fn now(&self) -> u64 {
        if self.monotonic {
            return monotonic_ns();
        }
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// Records a finished operation.
    pub fn record(&self, e: Event) {
        self.events.lock().push(e);
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().clone()
    }
}

/// The sizes of a run.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Operations in all.
    pub ops: usize,
    /// Hot keys, `1..=keys`.
    pub keys: i64,
    /// Concurrent clients, spread over the engines.
    pub clients: usize,
    /// Cold keys, `keys + 1..=keys + cold_keys`: a third of the operations
    /// go to them, and nineteen in twenty of those are reads, so an entry
    /// the cache wrongly holds stays wrong long enough to be read.
    pub cold_keys: i64,
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Operations recorded.
    pub ops: usize,
    /// Keys.
    pub keys: i64,
    /// Clients.
    pub clients: usize,
    /// Engines.
    pub engines: usize,
    /// Operations that failed (and so were recorded with an unknown outcome).
    pub failed: usize,
    /// Keys whose history is not linearizable, with a description.
    pub violations: Vec<String>,
    /// How long the operations took.
    pub run_time: Duration,
    /// How long the check took.
    pub check_time: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ops on {} keys by {} clients over {} engines ({} failed) in {:.1?}, checked in {:.1?}: {} violations",
            self.ops,
            self.keys,
            self.clients,
            self.engines,
            self.failed,
            self.run_time,
            self.check_time,
            self.violations.len()
        )
    }
}

/// Runs `w` with clients spread round-robin over `handles` (one per
/// engine, all on the same table), then checks every key.
pub async fn run(handles: &[Handle<Item>], w: Workload) -> Report {
    let rec = Arc::new(Recorder::default());
    let next_value = Arc::new(AtomicU32::new(1));
    let remaining = Arc::new(AtomicU64::new(w.ops as u64));
    let started = Instant::now();
    let tasks: Vec<_> = (0..w.clients)
        .map(|c| {
            let h = handles[c % handles.len()].clone();
            let (rec, next_value, remaining) = (rec.clone(), next_value.clone(), remaining.clone());
            tokio::spawn(async move {
                client(c as u32, h, w, &rec, &next_value, &remaining).await;
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a client does not panic");
    }
    let run_time = started.elapsed();
    let events = rec.events();
    let failed = events.iter().filter(|e| e.ret == u64::MAX).count();
    let started = Instant::now();
    // The search is CPU-bound: keep it off the async workers.
    let (events, violations) = tokio::task::spawn_blocking(move || {
        let mut violations = Vec::new();
        for key in 1..=w.keys {
            let mut evs: Vec<Event> = events.iter().filter(|e| e.key == key).copied().collect();
            evs.sort_by_key(|e| e.call);
            if !linearizable(&evs) {
                violations.push(describe(key, &evs));
            }
        }
        (events, violations)
    })
    .await
    .expect("the check does not panic");
    Report {
        ops: events.len(),
        keys: w.keys,
        clients: w.clients,
        engines: handles.len(),
        failed,
        violations,
        run_time,
        check_time: started.elapsed(),
    }
}

/// Runs `w.clients` clients on `h` in this process, recording into `rec`;
/// values written start at `first_value`, client ids at `first_client`
/// (so that several processes can write distinct values).
pub async fn run_clients(
    h: &Handle<Item>,
    w: Workload,
    rec: &Arc<Recorder>,
    first_value: u32,
    first_client: u32,
) {
    let next_value = Arc::new(AtomicU32::new(first_value));
    let remaining = Arc::new(AtomicU64::new(w.ops as u64));
    let tasks: Vec<_> = (0..w.clients)
        .map(|c| {
            let h = h.clone();
            let (rec, next_value, remaining) = (rec.clone(), next_value.clone(), remaining.clone());
            tokio::spawn(async move {
                client(first_client + c as u32, h, w, &rec, &next_value, &remaining).await;
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a client does not panic");
    }
}

/// What a check under a nemesis found.
#[derive(Debug, Clone, Default)]
pub struct WindowedReport {
    /// Operations checked.
    pub ops: usize,
    /// Operations whose outcome is unknown.
    pub failed: usize,
    /// Reads that started inside a fault window: left out of the check.
    pub in_window_reads: usize,
    /// Of those, reads that returned a value already overwritten (or
    /// deleted) by an operation completed before the read began.
    pub in_window_stale: usize,
    /// The largest staleness among them: how long before the read began
    /// the value it returned had been overwritten.
    pub max_staleness: Duration,
    /// Keys whose history outside the windows is not linearizable.
    pub violations: Vec<String>,
}

impl std::fmt::Display for WindowedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ops ({} of unknown outcome), {} reads inside fault windows ({} stale, at most {:.0?} behind), {} violations outside them",
            self.ops,
            self.failed,
            self.in_window_reads,
            self.in_window_stale,
            self.max_staleness,
            self.violations.len()
        )
    }
}

/// Checks a history recorded with [`Recorder::monotonic`] timestamps:
/// reads that begin inside one of `windows` (monotonic nanoseconds, start
/// and end) are counted apart, with how stale they were; every other
/// operation of each key must be linearizable.
pub fn check_windowed(events: &[Event], windows: &[(u64, u64)]) -> WindowedReport {
    let inside = |t: u64| windows.iter().any(|&(a, b)| a <= t && t <= b);
    let mut report = WindowedReport {
        ops: events.len(),
        failed: events.iter().filter(|e| e.ret == u64::MAX).count(),
        ..WindowedReport::default()
    };
    let mut keys: Vec<i64> = events.iter().map(|e| e.key).collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let mut evs: Vec<Event> = events.iter().filter(|e| e.key == key).copied().collect();
        evs.sort_by_key(|e| e.call);
        let (windowed, kept): (Vec<Event>, Vec<Event>) = evs
            .iter()
            .partition(|e| matches!(e.op, Op::Read(_)) && inside(e.call));
        for r in &windowed {
            report.in_window_reads += 1;
            if let Some(behind) = staleness(&evs, r) {
                report.in_window_stale += 1;
                report.max_staleness = report.max_staleness.max(behind);
            }
        }
        if !linearizable(&kept) {
            report.violations.push(describe(key, &kept));
        }
    }
    report
}

/// What `e` left in the register, if it changed it: a value, or no row.
fn sets(e: &Event) -> Option<Option<u32>> {
    match e.op {
        Op::Write(v) | Op::Update(v, true) => Some(Some(v)),
        Op::Delete(true) => Some(None),
        _ => None,
    }
}

/// How long before read `r` began the value it returned had been replaced
/// by an operation that completed before it began; `None` if it had not.
fn staleness(evs: &[Event], r: &Event) -> Option<Duration> {
    let Op::Read(seen) = r.op else { return None };
    // What produced the value seen: if one of its producers may have
    // taken effect while the read ran, the read was not stale.
    let producers: Vec<&Event> = evs
        .iter()
        .filter(|e| sets(e) == Some(seen) && e.call < r.ret)
        .collect();
    if producers
        .iter()
        .any(|e| e.ret == u64::MAX || e.ret > r.call)
    {
        return None;
    }
    if seen.is_some() && producers.is_empty() {
        // A value nobody wrote: not a matter of staleness; the
        // linearizability check of the other events is unaffected.
        return None;
    }
    let produced = producers.iter().map(|e| e.ret).max().unwrap_or(0);
    // The first operation that began after that one completed and
    // completed, with another value, before the read began.
    evs.iter()
        .filter(|e| e.ret != u64::MAX && e.call > produced && e.ret < r.call)
        .filter(|e| sets(e).is_some_and(|v| v != seen))
        .map(|e| e.ret)
        .min()
        .map(|t| Duration::from_nanos(r.call - t))
}

async fn client(
    id: u32,
    h: Handle<Item>,
    w: Workload,
    rec: &Recorder,
    next_value: &AtomicU32,
    remaining: &AtomicU64,
) {
    while remaining
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let (key, dice) = {
            let mut rng = rand::rng();
            if w.cold_keys > 0 && rng.random_range(0..3) == 0 {
                let key = rng.random_range(w.keys + 1..=w.keys + w.cold_keys);
                // Reads, but for one in twenty: a write, update or delete.
                let dice = if rng.random_range(0..20) == 0 {
                    rng.random_range(50..100u32)
                } else {
                    0
                };
                (key, dice)
            } else {
                (rng.random_range(1..=w.keys), rng.random_range(0..100u32))
            }
        };
        let call = rec.now();
        let (op, ok) = match dice {
            0..50 => match h.get(key).await {
                Ok(it) => (Op::Read(it.map(|i| i.qty as u32)), true),
                Err(_) => (Op::Read(None), false),
            },
            50..75 => {
                let v = next_value.fetch_add(1, Ordering::SeqCst);
                let mut it = item(key, f64::from(v));
                it.qty = i64::from(v);
                (Op::Write(v), h.put(&it).await.is_ok())
            }
            75..90 => {
                let v = next_value.fetch_add(1, Ordering::SeqCst);
                match h.update(key, Patch::new().set("qty", i64::from(v))).await {
                    Ok(r) => (Op::Update(v, r.is_some()), true),
                    Err(_) => (Op::Update(v, false), false),
                }
            }
            _ => match h.delete(key).await {
                Ok(existed) => (Op::Delete(existed), true),
                Err(_) => (Op::Delete(false), false),
            },
        };
        if !ok && matches!(op, Op::Read(_)) {
            // A failed read observed nothing and changed nothing.
            continue;
        }
        let ret = if ok { rec.now() } else { u64::MAX };
        rec.record(Event {
            key,
            op,
            call,
            ret,
            client: id,
        });
    }
}

/// One register step: whether `op` can happen in `state`, and the state after.
fn step(state: Option<u32>, op: Op, outcome_known: bool) -> Option<Option<u32>> {
    match op {
        Op::Write(v) => Some(Some(v)),
        Op::Read(seen) => (seen == state).then_some(state),
        Op::Update(v, existed) => {
            if !outcome_known {
                // Unknown outcome: it updated the row if there was one.
                return Some(state.map(|_| v));
            }
            match (state, existed) {
                (Some(_), true) => Some(Some(v)),
                (None, false) => Some(None),
                _ => None,
            }
        }
        Op::Delete(existed) => (!outcome_known || existed == state.is_some()).then_some(None),
    }
}

/// Whether a key's history is linearizable: the Wing–Gong–Lowe search
/// over a list of call and return entries, with a cache of (set of
/// linearized operations, state) pairs already explored. Operations whose
/// outcome is unknown have no return entry: they may take effect at any
/// point after their call, or never.
pub fn linearizable(events: &[Event]) -> bool {
    #[derive(Clone, Copy)]
    struct Entry {
        op: usize,
        call: bool,
        prev: usize,
        next: usize,
    }
    const NIL: usize = usize::MAX;
    let n = events.len();
    let mut raw: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in events.iter().enumerate() {
        raw.push((e.call, true, i));
        if e.ret != u64::MAX {
            raw.push((e.ret, false, i));
        }
    }
    // Calls before returns at equal times (they cannot be equal with one
    // clock, but the order must be total).
    raw.sort_by_key(|&(t, is_call, _)| (t, !is_call));
    let len = raw.len();
    let mut entries: Vec<Entry> = raw
        .iter()
        .enumerate()
        .map(|(i, &(_, call, op))| Entry {
            op,
            call,
            prev: if i == 0 { NIL } else { i - 1 },
            next: if i + 1 == len { NIL } else { i + 1 },
        })
        .collect();
    let mut ret_of = vec![NIL; n];
    for (i, e) in entries.iter().enumerate() {
        if !e.call {
            ret_of[e.op] = i;
        }
    }
    let mut returns_left = entries.iter().filter(|e| !e.call).count();
    let mut head = if len == 0 { NIL } else { 0 };
    let mut linearized = vec![0u64; n.div_ceil(64).max(1)];
    let mut seen: HashSet<(Vec<u64>, Option<u32>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<u32>)> = Vec::new();
    let mut state: Option<u32> = None;

    fn unlink(entries: &mut [Entry], head: &mut usize, i: usize) {
        let (p, nx) = (entries[i].prev, entries[i].next);
        if p == NIL {
            *head = nx;
        } else {
            entries[p].next = nx;
        }
        if nx != NIL {
            entries[nx].prev = p;
        }
    }
    fn relink(entries: &mut [Entry], head: &mut usize, i: usize) {
        let (p, nx) = (entries[i].prev, entries[i].next);
        if p == NIL {
            *head = i;
        } else {
            entries[p].next = i;
        }
        if nx != NIL {
            entries[nx].prev = i;
        }
    }

    let mut cur = head;
    loop {
        // Only calls of operations with unknown outcomes left: they may
        // never have happened, so the history is explained.
        if returns_left == 0 {
            return true;
        }
        let backtrack = cur == NIL || !entries[cur].call;
        if backtrack {
            // Either every call before the first pending return was tried,
            // or we reached a return whose operation is not linearized.
            let Some((entry, prev_state)) = stack.pop() else {
                return false;
            };
            let op = entries[entry].op;
            linearized[op / 64] &= !(1 << (op % 64));
            state = prev_state;
            if ret_of[op] != NIL {
                relink(&mut entries, &mut head, ret_of[op]);
                returns_left += 1;
            }
            relink(&mut entries, &mut head, entry);
            cur = entries[entry].next;
            continue;
        }
        let e = entries[cur];
        let ev = &events[e.op];
        if let Some(next_state) = step(state, ev.op, ev.ret != u64::MAX) {
            let mut lin = linearized.clone();
            lin[e.op / 64] |= 1 << (e.op % 64);
            if seen.insert((lin.clone(), next_state)) {
                stack.push((cur, state));
                state = next_state;
                linearized = lin;
                unlink(&mut entries, &mut head, cur);
                if ret_of[e.op] != NIL {
                    unlink(&mut entries, &mut head, ret_of[e.op]);
                    returns_left -= 1;
                }
                cur = head;
                continue;
            }
        }
        cur = e.next;
    }
}

fn describe(key: i64, evs: &[Event]) -> String {
    // The shortest prefix (by invocation) that no order explains, with the
    // writes that produced the values its reads returned (a read may return
    // a write that began after it did): its last operation is where the
    // history goes wrong.
    let with_producers = |end: usize| -> Vec<Event> {
        let mut part: Vec<Event> = evs[..end].to_vec();
        for e in &evs[end..] {
            let needed = sets(e).flatten().is_some_and(|v| {
                part.iter()
                    .any(|r| r.op == Op::Read(Some(v)) && e.call < r.ret)
            });
            if needed {
                part.push(*e);
            }
        }
        part.sort_by_key(|e| e.call);
        part
    };
    let (mut lo, mut hi) = (0, evs.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if linearizable(&with_producers(mid + 1)) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let end = (lo + 1).min(evs.len());
    let part = with_producers(end);
    let last = evs[end - 1].call;
    let mut s = format!(
        "key {key}: no linearization of {} operations; the first {end} (with the writes their reads saw) already have none, ending at the invocation {last}:\n",
        evs.len()
    );
    let at = part
        .iter()
        .position(|e| e.call == last)
        .unwrap_or(part.len() - 1);
    for e in part[..=at]
        .iter()
        .rev()
        .take(40)
        .rev()
        .chain(&part[at + 1..])
    {
        let ret = if e.ret == u64::MAX {
            "?".to_string()
        } else {
            e.ret.to_string()
        };
        s.push_str(&format!(
            "  [{:>7} .. {:>7}] client {:>2} {:?}\n",
            e.call, ret, e.client, e.op
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(op: Op, call: u64, ret: u64) -> Event {
        Event {
            key: 1,
            op,
            call,
            ret,
            client: 0,
        }
    }

    #[test]
    fn sequential_histories_check_like_a_register() {
        let ok = [
            ev(Op::Read(None), 0, 1),
            ev(Op::Write(1), 2, 3),
            ev(Op::Read(Some(1)), 4, 5),
            ev(Op::Update(2, true), 6, 7),
            ev(Op::Read(Some(2)), 8, 9),
            ev(Op::Delete(true), 10, 11),
            ev(Op::Update(3, false), 12, 13),
            ev(Op::Read(None), 14, 15),
        ];
        assert!(linearizable(&ok));
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_caught() {
        let stale = [
            ev(Op::Write(1), 0, 1),
            ev(Op::Write(2), 2, 3),
            ev(Op::Read(Some(1)), 4, 5),
        ];
        assert!(!linearizable(&stale));
    }

    #[test]
    fn overlapping_operations_may_take_either_order() {
        let h = [
            ev(Op::Write(1), 0, 1),
            ev(Op::Write(2), 2, 6),
            ev(Op::Read(Some(1)), 3, 4),
            ev(Op::Read(Some(2)), 5, 7),
        ];
        assert!(linearizable(&h));
    }

    #[test]
    fn a_new_then_old_inversion_between_reads_is_caught() {
        let h = [
            ev(Op::Write(1), 0, 1),
            ev(Op::Write(2), 2, 10),
            ev(Op::Read(Some(2)), 3, 4),
            ev(Op::Read(Some(1)), 5, 6),
        ];
        assert!(!linearizable(&h));
    }

    #[test]
    fn a_resurrected_delete_is_caught() {
        let h = [
            ev(Op::Write(1), 0, 1),
            ev(Op::Delete(true), 2, 3),
            ev(Op::Read(Some(1)), 4, 5),
        ];
        assert!(!linearizable(&h));
    }

    #[test]
    fn an_operation_of_unknown_outcome_may_or_may_not_have_happened() {
        let took_effect = [
            ev(Op::Write(1), 0, 1),
            ev(Op::Write(2), 2, u64::MAX),
            ev(Op::Read(Some(2)), 5, 6),
        ];
        assert!(linearizable(&took_effect));
        let did_not = [
            ev(Op::Write(1), 0, 1),
            ev(Op::Write(2), 2, u64::MAX),
            ev(Op::Read(Some(1)), 5, 6),
            ev(Op::Read(Some(1)), 7, 8),
        ];
        assert!(linearizable(&did_not));
        let flip_flop = [
            ev(Op::Write(1), 0, 1),
            ev(Op::Write(2), 2, u64::MAX),
            ev(Op::Read(Some(2)), 5, 6),
            ev(Op::Read(Some(1)), 7, 8),
        ];
        assert!(!linearizable(&flip_flop));
    }

    #[test]
    fn a_long_concurrent_history_is_checked_and_a_late_stale_read_caught() {
        // 8 clients, 4,000 overlapping writes and reads of one key.
        let mut h = Vec::new();
        let mut t = 0;
        for i in 0..500u32 {
            for c in 0..4u64 {
                h.push(ev(Op::Write(i * 4 + c as u32), t + c, t + 8 + c));
            }
            t += 12;
            for c in 0..4u64 {
                h.push(ev(Op::Read(Some(i * 4 + 3)), t + c, t + 4 + c));
            }
            t += 8;
        }
        assert!(linearizable(&h));
        let mut stale = h.clone();
        stale.push(ev(Op::Read(Some(0)), t + 100, t + 101));
        assert!(!linearizable(&stale));
    }
}
