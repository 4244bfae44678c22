//! The request body's progress deadline (`proxy.body_read_timeout`, docs/spec.md §5).
//!
//! A request whose body stops arriving would otherwise hold its connection, its upstream
//! request and (for a buffered body) its memory forever: the connection watchdog never cuts a
//! connection with a request in flight. [`DeadlineBody`] wraps the downstream body and fails it
//! with [`BodyError::Stalled`] once it has made no progress for the timeout.
//!
//! *No progress* is measured only while the body is being waited for: the clock starts when a
//! poll finds no data ready and stops at the next frame. Time the consumer spends not polling
//! (the upstream applying backpressure) never counts against the client. A body read into
//! memory ([`read_to_bytes`], at most `retry_body_limit`) must in addition arrive whole within
//! one timeout, so trickling a byte at a time cannot stretch it.
//!
//! What happens next is the caller's ([`super::serve`]): a body read into memory ends the
//! request with 408 before anything is forwarded; a streamed body's error aborts the upstream
//! request (hyper closes that upstream exchange) and the downstream gets 408 if no response has
//! started, else its connection is cut. Either way the downstream body is dropped unfinished,
//! so hyper closes the HTTP/1 connection after the answer and resets an HTTP/2 stream.

use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};

/// Why reading the downstream body failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the request body made no progress for {0:?}")]
    Stalled(Duration),
    #[error("the request body is larger than announced")]
    TooLarge,
    #[error("the request body could not be read: {0}")]
    Read(#[source] Box<dyn StdError + Send + Sync>),
}

/// A body that fails with [`BodyError::Stalled`] after `timeout` without progress.
#[derive(Debug)]
pub(crate) struct DeadlineBody<B> {
    inner: B,
    timeout: Duration,
    /// Allocated at the first wait and reset afterwards; `armed` says whether it is running.
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// The deadline fired: the body is over. Whoever needs to know after the fact finds
    /// [`BodyError::Stalled`] as the cause of the HTTP client's body error (no shared flag, so
    /// no allocation per request).
    fired: bool,
}

impl<B> DeadlineBody<B> {
    pub(crate) fn new(inner: B, timeout: Duration) -> DeadlineBody<B> {
        DeadlineBody {
            inner,
            timeout,
            sleep: None,
            armed: false,
            fired: false,
        }
    }

    #[cfg(test)]
    fn fired(&self) -> bool {
        self.fired
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.fired {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                Poll::Ready(frame.map(|r| r.map_err(|e| BodyError::Read(e.into()))))
            }
            Poll::Pending => {
                let deadline = Instant::now() + this.timeout;
                let sleep = match &mut this.sleep {
                    Some(s) => {
                        if !this.armed {
                            s.as_mut().reset(deadline);
                        }
                        s
                    }
                    None => this
                        .sleep
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.armed = true;
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.fired = true;
                        Poll::Ready(Some(Err(BodyError::Stalled(this.timeout))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.fired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a whole body of at most `limit` bytes into one buffer, sized from its announced length.
pub(crate) async fn read_to_bytes<B>(
    mut body: DeadlineBody<B>,
    limit: usize,
) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let announced = body.size_hint().exact().unwrap_or(0);
    let mut buf = BytesMut::with_capacity(usize::try_from(announced).unwrap_or(limit).min(limit));
    // Progress alone is not enough here: a client sending one byte per (timeout − 1 s) would
    // hold its connection and request slot for days. The whole buffered body (at most
    // `limit`, retry_body_limit) must arrive within one timeout.
    let timeout = body.timeout;
    let read = async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(BodyError::TooLarge);
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| BodyError::Stalled(timeout))??;
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_buffered_body_that_trickles_is_cut_after_one_timeout_in_all() {
        const T: Duration = Duration::from_secs(30);
        let (mut tx, rx) = Channel::<Bytes, Infallible>::new(1);
        let body = DeadlineBody::new(rx, T);
        tokio::spawn(async move {
            // One byte every 20 s: progress each time, never a 30 s stall.
            for _ in 0..10 {
                if tx.send_data(Bytes::from_static(b"x")).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
        });
        let started = Instant::now();
        let err = read_to_bytes(body, 1024).await.unwrap_err();
        assert!(matches!(err, BodyError::Stalled(d) if d == T), "{err}");
        assert_eq!(started.elapsed(), T);
    }
    use http_body_util::channel::Channel;
    use std::convert::Infallible;

    const T: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_fails_after_the_timeout_not_before() {
        let (mut tx, rx) = Channel::<Bytes, Infallible>::new(4);
        let body = DeadlineBody::new(rx, T);
        let reader = tokio::spawn(read_to_bytes(body, 1024));
        tx.send_data(Bytes::from_static(b"abc")).await.unwrap();
        tokio::time::sleep(T - Duration::from_secs(1)).await;
        assert!(!reader.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let err = reader.await.unwrap().unwrap_err();
        assert!(matches!(err, BodyError::Stalled(d) if d == T), "{err}");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn each_frame_restarts_the_clock() {
        let (mut tx, rx) = Channel::<Bytes, Infallible>::new(1);
        let mut body = DeadlineBody::new(rx, T);
        // A streamed body (read frame by frame, as the upstream client does); a buffered one
        // also has a total bound (`read_to_bytes`).
        let reader = tokio::spawn(async move {
            let mut n = 0;
            while let Some(frame) = body.frame().await {
                n += frame?.into_data().map_or(0, |d| d.len());
            }
            Ok::<_, BodyError>((n, body.fired()))
        });
        // Ten chunks, each arriving just inside the timeout: 290 s in all, never stalled.
        for _ in 0..10 {
            tokio::time::sleep(T - Duration::from_secs(1)).await;
            tx.send_data(Bytes::from_static(b"0123456789"))
                .await
                .unwrap();
        }
        drop(tx);
        assert_eq!(reader.await.unwrap().unwrap(), (100, false));
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_consumer_does_not_poll_is_not_counted() {
        let (mut tx, rx) = Channel::<Bytes, Infallible>::new(4);
        tx.send_data(Bytes::from_static(b"a")).await.unwrap();
        tx.send_data(Bytes::from_static(b"b")).await.unwrap();
        let mut body = DeadlineBody::new(rx, T);
        assert!(body.frame().await.unwrap().is_ok());
        // The consumer (the upstream, applying backpressure) waits far longer than the timeout.
        tokio::time::sleep(T * 3).await;
        assert!(body.frame().await.unwrap().is_ok());
        assert!(!body.fired());
    }

    #[tokio::test]
    async fn more_bytes_than_the_limit_are_refused() {
        let (mut tx, rx) = Channel::<Bytes, Infallible>::new(4);
        tx.send_data(Bytes::from(vec![0u8; 10])).await.unwrap();
        drop(tx);
        let body = DeadlineBody::new(rx, T);
        assert!(matches!(
            read_to_bytes(body, 5).await,
            Err(BodyError::TooLarge)
        ));
    }
}
