//! Submitting that waits for room: `try_reserve`, `reserve_timeout`,
//! `reserve_deadline` and `reserve` on every front-end, and the
//! [`Permit`] they give, which submits one request into the room taken.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::submit::{Submit, Work};
use crate::request::owner::on_owner_thread;
use crate::request::{Acquire, Admission, Refused, Room};
use crate::{IsleError, Task};

/// Room for one request in a bounded queue, taken ahead of the request.
///
/// Given by `try_reserve`, `reserve_timeout`, `reserve_deadline` and
/// `reserve` on [`Isle`](crate::Isle), [`IslePool`](crate::IslePool) and
/// [`Session`](crate::Session) (`F` is the one it came from). Its request
/// methods (`eval`, `call`, `exec` and their `spawn_*` forms, as on `F`)
/// use the permit up: the request goes into the room the permit holds, so
/// it is never refused [`QueueFull`](IsleError::QueueFull). One exception:
/// a session's permit whose session was closed since holds room in the
/// closed session's own queue (`session_queue_capacity`); its request then
/// runs in the key's fresh session and needs room in that one's queue,
/// and is refused `QueueFull` if there is none. Dropping an unused permit
/// gives the room back.
///
/// The room counts as taken while the permit is held: hold it briefly, as
/// a queued request would.
///
/// ```
/// use std::time::Duration;
/// use mlua_isle::IslePool;
///
/// let pool = IslePool::builder().workers(1).queue_capacity(16).build()?;
/// // Waits up to 50 ms for room, then submits into it.
/// let permit = pool.reserve_timeout(Duration::from_millis(50))?;
/// assert_eq!(permit.eval::<i64>("return 6 * 7")?, 42);
/// # Ok::<(), mlua_isle::IsleError>(())
/// ```
#[must_use = "a permit holds room in the queue until it is used or dropped"]
pub struct Permit<F> {
    front: F,
    admission: Admission,
}

// The bounds are on the methods: `Submit` is the crate's own.
impl<F> Permit<F> {
    /// What the request methods' bodies call (see `request_methods!`).
    pub(crate) fn spawn<T, W>(self, work: W) -> Task<T>
    where
        F: Submit,
        T: Send + 'static,
        W: Work<T>,
    {
        let Permit { front, admission } = self;
        front.spawn_admitted(work, Some(admission))
    }

    /// `spawn` + `wait`, refusing at once (the room given back) on the
    /// owner's own VM thread.
    pub(crate) fn run<T, W>(self, work: W) -> Result<T, IsleError>
    where
        F: Submit,
        T: Send + 'static,
        W: Work<T>,
    {
        if on_owner_thread(self.front.owner().id) {
            return Err(IsleError::Reentrant);
        }
        self.spawn(work).wait()
    }

    /// The isle, pool or session this permit submits to.
    pub fn target(&self) -> &F {
        &self.front
    }
}

impl<F: fmt::Debug> fmt::Debug for Permit<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("target", &self.front)
            .field("holds_room", &!self.admission.is_empty())
            .finish()
    }
}

/// `try_reserve`: room now, or `QueueFull`.
pub(crate) fn try_reserve<F: Submit + Clone>(front: &F) -> Result<Permit<F>, IsleError> {
    if front.is_closed() {
        return Err(IsleError::Shutdown);
    }
    // The queue's room first, then the session's, asked for only once the
    // queue's is had: taking it binds the session's key, and a reservation
    // the pool refuses opens no session (as a request it refuses does not).
    let queue = front.room().cloned();
    let rooms = queue
        .into_iter()
        .chain(std::iter::once_with(|| front.first_room()).flatten());
    let mut admission = Admission::none();
    for room in rooms {
        // On failure, room taken in the first is given back.
        admission = admission.and(room.try_acquire().ok_or(IsleError::QueueFull)?);
    }
    Ok(Permit {
        front: front.clone(),
        admission,
    })
}

/// `reserve_timeout` and `reserve_deadline`: room, waiting for it until
/// `deadline` (`None`: as long as it takes).
pub(crate) fn reserve_until<F: Submit + Clone>(
    front: &F,
    deadline: Option<Instant>,
) -> Result<Permit<F>, IsleError> {
    if on_owner_thread(front.owner().id) {
        return Err(IsleError::Reentrant);
    }
    if front.is_closed() {
        return Err(IsleError::Shutdown);
    }
    let mut admission = Admission::none();
    for room in rooms(front) {
        admission = admission.and(room.acquire_until(deadline).map_err(refused)?);
    }
    Ok(Permit {
        front: front.clone(),
        admission,
    })
}

/// The rooms a waiting reservation of `front` takes, in order: a
/// session's own, then the queue's (waiting in its session's line first).
fn rooms<F: Submit>(front: &F) -> impl Iterator<Item = Arc<Room>> {
    [front.first_room(), front.room().cloned()]
        .into_iter()
        .flatten()
}

fn refused(r: Refused) -> IsleError {
    match r {
        Refused::Full => IsleError::QueueFull,
        Refused::Closed => IsleError::Shutdown,
    }
}

/// The future of `reserve`: a [`Permit`] once there is room.
///
/// Dropping it gives up the wait (and gives back room handed to it
/// meanwhile). It resolves [`IsleError::Shutdown`] if its isle or pool
/// shuts down first, and [`IsleError::Reentrant`] if a session's own
/// request would wait for room in that session's queue (held by requests
/// that wait behind it; also when a permit held elsewhere would free it);
/// it never resolves `QueueFull`. Runtime-agnostic: any
/// executor, or [`futures::executor::block_on`](https://docs.rs/futures),
/// can drive it. Polling it again after it resolved panics, as futures may.
#[must_use = "futures do nothing unless polled; dropping it gives up the wait"]
pub struct Reserve<F> {
    /// Taken when it resolves.
    front: Option<F>,
    /// The rooms still to wait for, in order (none: an unbounded queue).
    waits: VecDeque<Acquire>,
    /// True while the first of `waits` is a session's own room.
    session_room: bool,
    /// Room had so far.
    held: Admission,
}

impl<F> Reserve<F> {
    pub(crate) fn new(front: F) -> Reserve<F>
    where
        F: Submit,
    {
        let session_room = front.first_room().is_some();
        let waits = rooms(&front).map(Acquire::new).collect();
        Reserve {
            front: Some(front),
            waits,
            session_room,
            held: Admission::none(),
        }
    }
}

impl<F: Submit + Unpin> Future for Reserve<F> {
    type Output = Result<Permit<F>, IsleError>;

    /// # Panics
    /// If polled after it resolved.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(front) = &this.front else {
            panic!("mlua_isle::Reserve polled after it resolved");
        };
        // A closed owner refuses at once, even with room free; while we
        // wait, closing it closes the room, which wakes us.
        let r = if front.is_closed() {
            Err(IsleError::Shutdown)
        } else {
            loop {
                let Some(wait) = this.waits.front_mut() else {
                    break Ok(std::mem::take(&mut this.held));
                };
                match wait.poll_acquire(cx.waker()) {
                    Poll::Ready(Ok(a)) => {
                        this.held = std::mem::take(&mut this.held).and(a);
                        this.waits.pop_front();
                        this.session_room = false;
                    }
                    Poll::Ready(Err(r)) => {
                        // Room had in a first room goes back now.
                        this.held = Admission::none();
                        break Err(refused(r));
                    }
                    // A session's own request, suspended: the requests
                    // holding its session's room wait behind it.
                    Poll::Pending if this.session_room && front.waits_on_itself() => {
                        this.waits.clear();
                        break Err(IsleError::Reentrant);
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        };
        let front = this.front.take().expect("checked above");
        Poll::Ready(r.map(|admission| Permit { front, admission }))
    }
}

impl<F: fmt::Debug> fmt::Debug for Reserve<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reserve")
            .field("target", &self.front)
            .finish_non_exhaustive()
    }
}

/// The methods that take room ahead of a request (`try_reserve`,
/// `reserve_timeout`, `reserve_deadline`, `reserve`), for a front-end that
/// is `Submit + Clone`.
macro_rules! reserve_methods {
    () => {
        /// Takes room for one request in the queue now, without waiting:
        /// the returned [`Permit`](crate::Permit) submits into it. Without
        /// a `queue_capacity` there is always room.
        ///
        /// # Errors
        /// [`IsleError::QueueFull`](crate::IsleError::QueueFull) if the
        /// queue is full (or others wait for room: they are served first);
        /// [`IsleError::Shutdown`](crate::IsleError::Shutdown) after
        /// shutdown.
        pub fn try_reserve(&self) -> Result<crate::Permit<Self>, crate::IsleError> {
            crate::host::reserve::try_reserve(self)
        }

        /// Takes room for one request in the queue, waiting up to
        /// `timeout` for it: the returned [`Permit`](crate::Permit)
        /// submits into it. Blocks the calling thread while the queue is
        /// full. Callers waiting for room are served in the order they
        /// came; while any waits, plain submits are refused `QueueFull`.
        /// Without a `queue_capacity` it never waits. A timeout too large
        /// to represent (such as `Duration::MAX`) waits as long as it
        /// takes.
        ///
        /// ```
        /// use std::time::Duration;
        ///
        /// let pool = mlua_isle::IslePool::builder().workers(1).queue_capacity(8).build()?;
        /// let n: i64 = pool.reserve_timeout(Duration::from_secs(1))?.eval("return 1 + 1")?;
        /// assert_eq!(n, 2);
        /// # Ok::<(), mlua_isle::IsleError>(())
        /// ```
        ///
        /// # Errors
        /// [`IsleError::QueueFull`](crate::IsleError::QueueFull) if the
        /// queue is still full when `timeout` has passed;
        /// [`IsleError::Shutdown`](crate::IsleError::Shutdown) if shutdown
        /// begins before or while it waits;
        /// [`IsleError::Reentrant`](crate::IsleError::Reentrant) (at once)
        /// on one of this owner's own VM threads, where waiting for the
        /// queue to drain could deadlock (use [`reserve`](Self::reserve)
        /// from async code there, or [`try_reserve`](Self::try_reserve)).
        pub fn reserve_timeout(
            &self,
            timeout: std::time::Duration,
        ) -> Result<crate::Permit<Self>, crate::IsleError> {
            crate::host::reserve::reserve_until(
                self,
                std::time::Instant::now().checked_add(timeout),
            )
        }

        /// Like [`reserve_timeout`](Self::reserve_timeout), waiting until
        /// `deadline` at most.
        ///
        /// # Errors
        /// As for [`reserve_timeout`](Self::reserve_timeout).
        pub fn reserve_deadline(
            &self,
            deadline: std::time::Instant,
        ) -> Result<crate::Permit<Self>, crate::IsleError> {
            crate::host::reserve::reserve_until(self, Some(deadline))
        }

        /// Takes room for one request in the queue, waiting for it without
        /// blocking: a future that resolves to a
        /// [`Permit`](crate::Permit) once there is room (right away if
        /// there is, or without a `queue_capacity`). Waiters are served in
        /// the order they came. Cancel the wait by dropping the future;
        /// room handed to it meanwhile goes back to the queue.
        ///
        /// It may be awaited anywhere, on any executor, including in async
        /// code running on this owner's own VMs (a suspended request holds
        /// no VM, so the queue keeps draining).
        ///
        /// ```
        /// # futures::executor::block_on(async {
        /// let pool = mlua_isle::IslePool::builder().workers(1).queue_capacity(8).build()?;
        /// let permit = pool.reserve().await?;
        /// let n: i64 = permit.spawn_eval("return 1 + 1").await?;
        /// assert_eq!(n, 2);
        /// # Ok::<(), mlua_isle::IsleError>(())
        /// # }).unwrap();
        /// ```
        ///
        /// # Errors
        /// The future resolves
        /// [`IsleError::Shutdown`](crate::IsleError::Shutdown) if shutdown
        /// begins before or while it waits; never `QueueFull`.
        pub fn reserve(&self) -> crate::Reserve<Self> {
            crate::host::reserve::Reserve::new(self.clone())
        }
    };
}
pub(crate) use reserve_methods;
