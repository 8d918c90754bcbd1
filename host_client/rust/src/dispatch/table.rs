//! The pool's one table: every wire request waiting for its reply, each with its route (the
//! worker slot and generation it was written to, and when), and every worker slot's state.
//! Which worker a request goes to, each worker's load and the pool's [`ClientStats`] are all
//! computed from it, never kept in step beside it. The dispatcher (`dispatch.rs`) owns it
//! behind one lock and applies the supervisors' news to it.
//!
//! ```text
//!   pending: id ─▶ Pending {frame, reply, route: Some({slot, generation, sent_at}) | None,
//!                           attempts, texts, tokens, ...}
//!   slots:   [WorkerSlot {state: Ready {frames, ...} | Starting | GaveUp | Stopped, ...}]
//!   loads():  estimated tokens outstanding per ready slot, summed over `pending`
//!   route(id): least_loaded(loads) ─▶ that slot's FrameSender ─▶ route set, attempts + 1
//!   route_waiting(): every request whose route is None (no worker was ready, or its worker
//!                    died), oldest first
//! ```

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::stdin_lane::{Frame, FrameSender};
use crate::types::{EmbeddingError, EmbeddingResult};
use crate::wire::ReadyHello;

/// A snapshot of the pool, for monitoring and tests ([`WorkerClient::stats`]).
///
/// [`WorkerClient::stats`]: crate::WorkerClient::stats
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientStats {
    /// Each worker slot, in slot order (`WorkerConfig::workers` of them).
    pub workers: Vec<WorkerStats>,
    /// Texts admitted and not yet answered: written to a worker, or held for re-sending.
    pub in_flight_texts: usize,
    /// Workers that replaced a dead or hung one, over all slots.
    pub restarts: u32,
    /// Wire requests sent again, to any worker, after theirs died or hung.
    pub resent_requests: u64,
}

/// One worker slot of the pool ([`ClientStats::workers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStats {
    /// The slot's place in the pool, 0 to `workers - 1`.
    pub index: usize,
    /// `ready`, `starting` (its worker is being replaced), `given up` (its restart budget is
    /// spent, or its worker refused to start) or `stopped`.
    pub state: &'static str,
    /// The slot's serving worker process; `None` while it has none ready (being replaced,
    /// given up, closed).
    pub pid: Option<u32>,
    /// Workers of this slot that replaced a dead or hung one.
    pub restarts: u32,
    /// Wire requests written to this slot's worker and not yet answered.
    pub in_flight_requests: usize,
    /// Their texts.
    pub in_flight_texts: usize,
    /// Their estimated tokens: requests go to the slot with the fewest.
    pub in_flight_tokens: usize,
    /// Replies this slot's workers delivered (embed requests and ops).
    pub answered_requests: u64,
}

/// One wire request waiting for its reply.
pub(super) struct Pending {
    pub(super) frame: Frame,
    pub(super) reply: oneshot::Sender<EmbeddingResult<Delivery>>,
    /// The worker it was last written to, and when; `None` while it waits for one.
    pub(super) route: Option<Route>,
    /// Workers it has been written to.
    pub(super) attempts: u32,
    pub(super) texts: usize,
    pub(super) tokens: usize,
    /// Its share of `max_in_flight_texts`, given back when the entry goes.
    pub(super) _texts: Option<OwnedSemaphorePermit>,
    /// Whether its reply shows the worker's model path is alive (a `ping` is answered by the
    /// worker's reader alone, so it does not).
    pub(super) shows_progress: bool,
    /// Whether its caller wants the client's stage times.
    pub(super) traced: bool,
}

/// A reply as its caller receives it.
pub(super) struct Delivery {
    pub(super) payload: Vec<u8>,
    /// When the reader read the first bytes of its frame.
    pub(super) first_bytes_at: Instant,
    /// When it was handed to the caller (taken for traced requests only).
    pub(super) delivered_at: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Route {
    pub(super) slot: usize,
    pub(super) generation: u64,
    pub(super) sent_at: Instant,
}

/// Whether a worker slot takes requests.
pub(super) enum SlotState {
    /// A worker is serving; frames routed to it go through `frames` to its stdin.
    Ready { generation: u64, pid: u32, frames: FrameSender, last_reply_at: Instant },
    /// Its worker is being replaced.
    Starting,
    /// Its supervisor gave up (the error went to the pool).
    GaveUp,
    /// Stopped on purpose (close) or with the whole pool.
    Stopped,
}

pub(super) struct WorkerSlot {
    pub(super) state: SlotState,
    /// Workers this slot made ready (the first one included).
    pub(super) readies: u32,
    pub(super) answered: u64,
}

/// Whether the pool takes calls.
pub(super) enum Serving {
    Open,
    /// `close()` began: no new calls; the workers finish what they hold.
    Closing,
    /// Every call fails with this error (given up, or the supervisors are gone).
    Failed(EmbeddingError),
    Closed,
}

pub(super) struct Table {
    pub(super) pending: HashMap<u64, Pending>,
    pub(super) slots: Vec<WorkerSlot>,
    pub(super) serving: Serving,
    /// The latest ready worker's hello (kept across restarts for model facts and limits).
    pub(super) hello: ReadyHello,
    pub(super) resent_requests: u64,
    /// Where the search for the least-loaded worker starts, so ties take turns.
    pub(super) route_turn: usize,
}

impl Table {
    /// Estimated tokens outstanding at each ready worker; `None` for the others.
    pub(super) fn loads(&self) -> Vec<Option<usize>> {
        let mut loads: Vec<Option<usize>> = self
            .slots
            .iter()
            .map(|slot| matches!(slot.state, SlotState::Ready { .. }).then_some(0))
            .collect();
        for pending in self.pending.values() {
            if let Some(load) = pending.route.and_then(|route| loads[route.slot].as_mut()) {
                *load += pending.tokens;
            }
        }
        loads
    }

    /// Writes request `id` to the least-loaded ready worker, if any is ready; `loads` is
    /// updated for the next decision.
    pub(super) fn route(&mut self, id: u64, loads: &mut [Option<usize>]) {
        let chosen = least_loaded(loads, self.route_turn);
        let Some(slot) = chosen else { return };
        let SlotState::Ready { generation, frames, .. } = &self.slots[slot].state else {
            return;
        };
        let Some(pending) = self.pending.get_mut(&id) else { return };
        // Written now when the worker's stdin is idle, else queued for its writer task (never
        // waits). A worker that just died reports it; its supervisor re-routes what it held.
        frames.send(pending.frame.clone());
        pending.route = Some(Route { slot, generation: *generation, sent_at: Instant::now() });
        pending.attempts += 1;
        if let Some(load) = &mut loads[slot] {
            *load += pending.tokens;
        }
        self.route_turn = (slot + 1) % loads.len();
    }

    /// Routes every request waiting for a worker, oldest first.
    pub(super) fn route_waiting(&mut self) {
        let mut waiting: Vec<u64> =
            self.pending.iter().filter(|(_, p)| p.route.is_none()).map(|(&id, _)| id).collect();
        if waiting.is_empty() {
            return;
        }
        waiting.sort_unstable();
        let mut loads = self.loads();
        for id in waiting {
            self.route(id, &mut loads);
        }
    }

    /// The pool as [`ClientStats`] shows it: each slot's load computed from the table.
    pub(super) fn stats(&self) -> ClientStats {
        let mut workers: Vec<WorkerStats> = self
            .slots
            .iter()
            .enumerate()
            .map(|(index, slot)| WorkerStats {
                index,
                state: match slot.state {
                    SlotState::Ready { .. } => "ready",
                    SlotState::Starting => "starting",
                    SlotState::GaveUp => "given up",
                    SlotState::Stopped => "stopped",
                },
                pid: match slot.state {
                    SlotState::Ready { pid, .. } => Some(pid),
                    _ => None,
                },
                restarts: slot.readies.saturating_sub(1),
                in_flight_requests: 0,
                in_flight_texts: 0,
                in_flight_tokens: 0,
                answered_requests: slot.answered,
            })
            .collect();
        for pending in self.pending.values() {
            if let Some(route) = pending.route {
                let worker = &mut workers[route.slot];
                worker.in_flight_requests += 1;
                worker.in_flight_texts += pending.texts;
                worker.in_flight_tokens += pending.tokens;
            }
        }
        ClientStats {
            in_flight_texts: self.pending.values().map(|p| p.texts).sum(),
            restarts: workers.iter().map(|w| w.restarts).sum(),
            resent_requests: self.resent_requests,
            workers,
        }
    }
}

/// The ready worker with the fewest estimated tokens outstanding (`loads`, `None` for a worker
/// not ready); among equals the first counting from `turn`, so that idle workers take turns.
fn least_loaded(loads: &[Option<usize>], turn: usize) -> Option<usize> {
    (0..loads.len())
        .map(|offset| (turn + offset) % loads.len())
        .filter_map(|slot| loads[slot].map(|load| (load, slot)))
        .min_by_key(|&(load, _)| load)
        .map(|(_, slot)| slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_go_to_the_ready_worker_with_the_fewest_tokens_outstanding() {
        // a bulk request holds worker 0; worker 2 is being replaced
        let loads = [Some(8192), Some(40), None];
        assert_eq!(least_loaded(&loads, 0), Some(1));
        assert_eq!(least_loaded(&[None, None], 1), None);
    }

    #[test]
    fn idle_workers_take_turns() {
        let idle = [Some(0), Some(0), Some(0)];
        assert_eq!(least_loaded(&idle, 0), Some(0));
        assert_eq!(least_loaded(&idle, 1), Some(1));
        assert_eq!(least_loaded(&idle, 2), Some(2));
        assert_eq!(least_loaded(&[Some(0), None, Some(0)], 1), Some(2));
    }
}
