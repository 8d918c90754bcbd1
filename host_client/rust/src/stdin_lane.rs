//! One worker's stdin lane: how the frames the dispatcher routes to a worker reach its stdin,
//! whole and in order, without a caller ever waiting on the pipe. The supervisor
//! (`supervisor.rs`) opens a lane for each worker it installs and hands its [`FrameSender`] to
//! the dispatcher; the dispatcher's pending table keeps each [`Frame`] for re-sending.
//!
//! ```text
//!   send(frame) ─▶ lane lock ─▶ stdin idle and nothing queued? ─▶ the caller writes the frame
//!                    │              now, as far as the pipe takes it without waiting (never
//!                    │              awaits, never blocks) ─▶ all of it: done
//!                    └─ else (writer busy, or the pipe full) ─▶ queue (the rest of) the frame
//!                         ─▶ writer task: takes stdin out of the lane, writes the queue in
//!                            order, flushes, puts stdin back once the queue is empty
//!   the sender dropped ─▶ the writer task writes what is queued and closes stdin
//!   a write fails ─▶ the writer task ends and reports it (the supervisor: the worker is gone)
//! ```
//!
//! Frames go out in the order of `send` and never interleave: a caller writes only while the
//! queue is empty and the writer task does not hold the stream, and whatever part of its frame
//! the pipe did not take is queued first. The lane's lock is never held across an await: a
//! worker that stops reading fills the pipe, the caller queues what is left and returns, and
//! only the writer task waits (until the worker reads again, or is killed and its stdin
//! breaks).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::process::ChildStdin;
use tokio::sync::Notify;

/// Bytes buffered towards the worker's stdin before a write system call.
const STDIN_BUFFER_BYTES: usize = 64 * 1024;

/// A frame shared by the dispatcher's pending table (for re-sending) and the worker's stdin
/// lane ([`FrameSender`]).
pub(crate) type Frame = Arc<OutFrame>;

/// One request's whole frame, and for a traced request when it was first written whole.
pub(crate) struct OutFrame {
    bytes: Vec<u8>,
    written_at: Option<OnceLock<std::time::Instant>>,
}

impl OutFrame {
    pub(crate) fn new(bytes: Vec<u8>, traced: bool) -> Frame {
        Arc::new(Self { bytes, written_at: traced.then(OnceLock::new) })
    }

    /// The length prefix and payload.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// For a traced frame: the frame has been handed whole to the worker's stdin (the first
    /// time counts: a frame sent again to a new worker keeps its first time).
    fn mark_written(&self) {
        if let Some(written_at) = &self.written_at {
            let _ = written_at.set(std::time::Instant::now());
        }
    }

    /// When a traced frame was first written whole; `None` for an untraced one, or one not
    /// written yet.
    pub(crate) fn written_at(&self) -> Option<std::time::Instant> {
        self.written_at.as_ref().and_then(|at| at.get().copied())
    }
}

/// Where the dispatcher puts the frames routed to one worker ([`FrameSender::send`]): the
/// worker's stdin, written by the caller itself when nobody else is writing, else by the
/// lane's writer task (see the module's picture). Dropping it closes the worker's stdin once
/// every frame sent before is written.
pub(crate) struct FrameSender {
    lane: Arc<Lane>,
}

impl FrameSender {
    /// Writes `frame` to the worker's stdin after every frame sent before it: at once, by the
    /// calling thread, when the stream is idle and the pipe has room; what is left is handed
    /// to the writer task. Returns without waiting in either case; a worker whose stdin broke
    /// is reported by the writer task.
    pub(crate) fn send(&self, frame: Frame) {
        let mut lane = self.lane.lock();
        let mut written = 0;
        if cfg!(unix) && lane.queue.is_empty() {
            if let Some(stdin) = lane.idle.as_mut() {
                written = write_now(stdin.get_mut(), frame.bytes(), &self.lane.no_wake);
                if written == frame.bytes().len() {
                    frame.mark_written();
                    return;
                }
            }
        }
        lane.queue.push_back((frame, written));
        drop(lane);
        self.lane.work.notify_one();
    }
}

impl Drop for FrameSender {
    /// The dispatcher routes nothing more here: the writer task writes what is queued and
    /// closes the worker's stdin.
    fn drop(&mut self) {
        self.lane.lock().open = false;
        self.lane.work.notify_one();
    }
}

/// One worker's stdin, shared by the callers (through the [`FrameSender`]) and its writer task.
struct Lane {
    state: Mutex<LaneState>,
    /// Wakes the writer task: a frame was queued, or the sender was dropped.
    work: Notify,
    /// The waker of a caller's write: nobody waits for its readiness (what the pipe does not
    /// take at once goes to the writer task, which waits with its own waker).
    no_wake: Waker,
}

struct LaneState {
    /// The worker's stdin while nobody is writing to it, its buffer empty. The writer task
    /// takes it out while it writes.
    idle: Option<BufWriter<ChildStdin>>,
    /// What the writer task has to write, in order: frames, each with the bytes of it
    /// already written (by a caller whose write the pipe took only in part).
    queue: VecDeque<(Frame, usize)>,
    /// False once the sender is dropped.
    open: bool,
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        // Every update is one step: a panic elsewhere leaves the lane consistent.
        self.state.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

struct NoWake;

impl std::task::Wake for NoWake {
    fn wake(self: Arc<Self>) {}
}

/// Writes what the pipe takes of `bytes` right now, without waiting; returns how many bytes
/// were written (0 when the pipe is full or the write failed: the writer task then meets the
/// same error and reports it).
fn write_now(stdin: &mut ChildStdin, mut bytes: &[u8], no_wake: &Waker) -> usize {
    let mut context = Context::from_waker(no_wake);
    let mut written = 0;
    while !bytes.is_empty() {
        match Pin::new(&mut *stdin).poll_write(&mut context, bytes) {
            Poll::Ready(Ok(count)) if count > 0 => {
                written += count;
                bytes = &bytes[count..];
            }
            _ => break,
        }
    }
    written
}

/// Opens a lane over a worker's `stdin` and spawns its writer task on the current tokio
/// runtime. `on_broken` is told why, should a write to the worker fail.
pub(crate) fn open(
    stdin: ChildStdin,
    on_broken: impl FnOnce(std::io::Error) + Send + 'static,
) -> FrameSender {
    let lane = Arc::new(Lane {
        state: Mutex::new(LaneState {
            idle: Some(BufWriter::with_capacity(STDIN_BUFFER_BYTES, stdin)),
            queue: VecDeque::new(),
            open: true,
        }),
        work: Notify::new(),
        no_wake: Waker::from(Arc::new(NoWake)),
    });
    tokio::spawn(write_frames(lane.clone(), on_broken));
    FrameSender { lane }
}

/// The writer task of a worker's stdin lane: whenever frames are queued, takes the stream out
/// of the lane, writes them in order (several at once are flushed together), and puts the
/// stream back once nothing is queued. Ends when the dispatcher drops the sender (after the
/// frames queued before: the worker's stdin then closes) or when a write fails (told to
/// `on_broken`).
async fn write_frames(lane: Arc<Lane>, on_broken: impl FnOnce(std::io::Error)) {
    let mut written = Vec::new();
    loop {
        let next = {
            let mut state = lane.lock();
            match (state.queue.is_empty(), state.open) {
                (false, _) => Next::Write(state.idle.take()),
                (true, true) => Next::Wait,
                (true, false) => Next::Close(state.idle.take()),
            }
        };
        let mut stdin = match next {
            Next::Wait => {
                lane.work.notified().await;
                continue;
            }
            Next::Close(stdin) => {
                if let Some(mut stdin) = stdin {
                    let _ = stdin.shutdown().await;
                }
                return;
            }
            // only this task takes the stream out of the lane, and it puts it back before
            // it waits: it is there
            Next::Write(None) => return,
            Next::Write(Some(stdin)) => stdin,
        };
        loop {
            if let Err(error) = write_queued(&lane, &mut stdin, &mut written).await {
                on_broken(error);
                return;
            }
            let mut state = lane.lock();
            if state.queue.is_empty() {
                state.idle = Some(stdin);
                break;
            }
        }
    }
}

enum Next {
    Write(Option<BufWriter<ChildStdin>>),
    Wait,
    Close(Option<BufWriter<ChildStdin>>),
}

/// Writes the lane's queue to `stdin` until it is empty, and flushes.
async fn write_queued(
    lane: &Lane,
    stdin: &mut BufWriter<ChildStdin>,
    written: &mut Vec<Frame>,
) -> std::io::Result<()> {
    loop {
        let next = lane.lock().queue.pop_front();
        let Some((frame, from)) = next else { break };
        stdin.write_all(&frame.bytes()[from..]).await?;
        written.push(frame);
    }
    stdin.flush().await?;
    written.drain(..).for_each(|frame| frame.mark_written());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    const SENDERS: u32 = 4;
    const FRAMES_EACH: u32 = 200;
    const BODY_BYTES: usize = 2000;

    /// A frame of `BODY_BYTES` bytes naming its sender and its number, filled with a byte of
    /// both, so that a frame cut or interleaved with another is seen.
    fn numbered_frame(sender: u32, number: u32) -> Frame {
        let length = (8 + BODY_BYTES) as u32;
        let mut bytes = length.to_be_bytes().to_vec();
        bytes.extend(sender.to_be_bytes());
        bytes.extend(number.to_be_bytes());
        bytes.extend(std::iter::repeat((sender * 31 + number) as u8).take(BODY_BYTES));
        OutFrame::new(bytes, false)
    }

    /// Several threads send at once to a stdin that reads nothing for a while, then reads fast:
    /// callers' own writes fill the pipe, the rest of a frame goes to the writer task, which
    /// takes the stream over while callers go on sending and hands it back when its queue is
    /// empty, again and again over 1.6 MB. Every frame comes out whole, each sender's in order.
    #[test]
    fn frames_sent_from_many_threads_stay_whole_and_in_order_through_a_full_pipe() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        runtime.block_on(async {
            let mut child = tokio::process::Command::new("sh")
                .args(["-c", "sleep 0.005; exec cat"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdout = child.stdout.take().unwrap();
            let reading = tokio::spawn(async move {
                let mut all = Vec::new();
                stdout.read_to_end(&mut all).await.map(|_| all)
            });
            let (broken, mut broken_rx) = tokio::sync::oneshot::channel();
            let sender = open(child.stdin.take().unwrap(), |error| {
                let _ = broken.send(error);
            });
            let sender = Arc::new(sender);
            let threads: Vec<_> = (0..SENDERS)
                .map(|who| {
                    let (sender, handle) = (sender.clone(), handle.clone());
                    std::thread::spawn(move || {
                        let _runtime = handle.enter();
                        for number in 0..FRAMES_EACH {
                            sender.send(numbered_frame(who, number));
                            if number % 8 == 0 {
                                // pauses: the pipe drains and callers write themselves again
                                std::thread::sleep(Duration::from_micros(300));
                            }
                        }
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
            drop(sender); // the last one: the writer closes stdin after what is queued
            let all = reading.await.unwrap().unwrap();
            child.wait().await.unwrap();
            assert!(broken_rx.try_recv().is_err(), "no write failed");

            let mut next = vec![0u32; SENDERS as usize];
            let mut rest = &all[..];
            while !rest.is_empty() {
                let length = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                assert_eq!(length, 8 + BODY_BYTES, "a frame cut or interleaved");
                let payload = &rest[4..4 + length];
                let who = u32::from_be_bytes(payload[..4].try_into().unwrap());
                let number = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                assert_eq!(number, next[who as usize], "sender {who}'s frames out of order");
                let fill = (who * 31 + number) as u8;
                assert!(payload[8..].iter().all(|&byte| byte == fill), "a frame's body mixed");
                next[who as usize] += 1;
                rest = &rest[4 + length..];
            }
            assert_eq!(next, vec![FRAMES_EACH; SENDERS as usize], "frames lost");
        });
    }
}
